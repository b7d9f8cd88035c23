"""scripts/bench.py runs end to end at tiny sizes on the simulated CPU devices, so a section
broken by a model or engine change shows here, not first on a GPU."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_bench(tmp_path, *argv):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--smoke", "--out", str(out), *argv],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "bench.json").read_text())["rows"], proc.stdout


def test_every_cpu_section_of_the_benchmark_records_its_rows(tmp_path):
    rows, stdout = run_bench(tmp_path, "--sections", "env,kernels,moe,layouts,breakdown,engine,check-long")
    sections = {r["section"] for r in rows}
    assert sections == {"env", "kernels", "moe", "layouts", "breakdown", "engine", "check-long"}, stdout[-2000:]
    layouts = {r["variant"]: r["value"] for r in rows if r["section"] == "layouts"}
    # bf16 dispatch is the same arithmetic as TP on one host: logits agree to bf16 rounding (the
    # fused qkv product of a TP8 device's rows sums in another order than DEP8's of all rows;
    # 1.9e-3 of the largest logit, a quarter of bf16's spacing; the fp4 dispatch moves it 1e-2)
    assert layouts["first-step logits DEP8 bf16-dispatch vs TP8, 2 layers"] < 4e-3
    assert all(r["value"] > 0 for r in rows if r["section"] in ("kernels", "moe", "engine", "breakdown"))
    # the decode step's floor adds the step's collectives, replayed alone and named in the log
    replayed = [r for r in rows if r["section"] == "engine" and r["variant"].endswith("collectives, replayed alone")]
    assert len(replayed) == 1 and replayed[0]["value"] > 0
    assert "x all_gather(" in stdout and "x reduce_scatter(" in stdout     # DEP8: dispatch and combine
    # the moe section checks each kernel against its reference: W8A8's rounding of the rows moves
    # the block by a few percent of its largest output, no more
    agreement = {r["variant"]: r["value"] for r in rows if r["unit"] == "x max|ref|"}
    assert list(agreement) == ["xla-w8a8 16 tok vs xla"] and agreement["xla-w8a8 16 tok vs xla"] < 0.1
    # check-long on CPUs builds the XLA path twice: the same logits and tokens, or the engine is
    # not deterministic at prefill size
    assert {r["unit"]: r["value"] for r in rows if r["section"] == "check-long"} == {
        "x max|logit|": 0.0, "fraction equal": 1.0}


def test_a_shared_prefix_is_computed_once_then_read_from_the_prefix_cache(tmp_path):
    # 4 prompts of 24 tokens whose first 16 (two pages of 8) are shared; one request in flight
    rows, _ = run_bench(tmp_path, "--sections", "engine", "--requests", "4", "--shared-prefix", "16",
                        "--max-running-requests", "1")
    share = {r["variant"].rsplit(" ", 1)[0][-40:]: r["value"] for r in rows if r["unit"] == "fraction"}
    assert list(share.values()) == [3 * 16 / (4 * 24)], share


def test_prompt_logprobs_score_every_prompt_token_after_the_start(tmp_path):
    rows, _ = run_bench(tmp_path, "--sections", "engine", "--requests", "3", "--logprob-start-len", "5")
    scored = [r["value"] for r in rows if r["variant"].endswith("prompt tokens scored")]
    assert scored == [3 * (24 - 5)], scored      # position 5 and on of each 24-token prompt


def test_fp8_kernel_section_runs_its_reference_on_cpus(tmp_path):
    rows, _ = run_bench(tmp_path, "--sections", "kernels", "--quantization", "fp8")
    assert [r["variant"] for r in rows if r["section"] == "kernels"] == [
        "fp8 dequant+xla m=64 routed=1.00", "fp8 dequant+xla m=64 routed=0.25"]


def test_xla_flag_sets_run_each_set_in_its_own_process_and_name_its_rows(tmp_path):
    rows, stdout = run_bench(tmp_path, "--sections", "kernels", "--xla-flag-sets", "default", "command-buffers-off")
    names = [r["variant"] for r in rows]
    assert "[default] xla m=64 routed=1.00" in names, names
    assert "[command-buffers-off] xla m=64 routed=1.00" in names, names
    assert "--xla_gpu_enable_command_buffer='" in stdout      # added to the flags already set


def load_bench():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench          # as an import would: dataclasses look their module up
    spec.loader.exec_module(bench)
    return bench


def test_workloads_set_the_issue_shapes_and_flags_beside_them_win():
    bench = load_bench()
    w2 = bench.parse_args(["--workload", "W2"])
    assert (w2.requests, w2.prompt, w2.output, w2.max_running_requests, w2.engine_layout) == (512, 1000, 1000, 256, "dep")
    w3 = bench.parse_args(["--workload", "W3", "--output", "200"])
    assert (w3.requests, w3.prompt, w3.output, w3.engine_layout, w3.ep_size) == (1, 1000, 200, "tp", 1)
    plain = bench.parse_args([])
    assert (plain.requests, plain.prompt, plain.output, plain.max_running_requests, plain.engine_layout) == (
        256, 900, 100, None, "dep")
    assert bench.workload_name(w2) == "W2 512x1000/1000 at 256 in flight"


def test_router_probe_prints_each_form_against_float64():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "router_probe.py"), "--tokens", "32",
                           "--layers", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {line[7:31].strip(): line.split() for line in proc.stdout.splitlines()[1:]}
    assert set(lines) == {"default (TF32 on GPUs)", "HIGHEST", "BF16_BF16_F32_X3", "three bf16 parts"}
    assert float(lines["three bf16 parts"][-2]) < 1e-6 and lines["three bf16 parts"][-1] == "0.00%"


def test_the_warm_up_compiles_the_measured_prompts_last_prefill_step(tmp_path):
    """11 prompts in prefill steps of 8 rows end in a step of 3; a warm-up of 8 prompts ran no
    such step, so the engine section warms it before the measured wall starts."""
    rows, _ = run_bench(tmp_path, "--sections", "engine", "--engine-layout", "tp", "--requests", "11",
                        "--warmup-requests", "8")
    notes = [r["note"] for r in rows if r["variant"].endswith("output throughput")]
    assert len(notes) == 1 and notes[0].endswith("0 while measured"), notes
