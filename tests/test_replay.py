"""The collectives read off a sharded step, and the program that replays only them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimax_jax.loader import load_model
from sharding.mesh import Layout
from sharding.replay import collectives_only, step_collectives
from tests.parallel_utils import LayoutRunner, make_step

SLOTS, PAGE, PAGES_PER_SLOT = 8, 4, 3


@pytest.fixture(scope="module")
def model(tiny_hf_dir):
    return load_model(tiny_hf_dir, dtype=jnp.float32)


def decode_collectives(model, layout: Layout):
    runner = LayoutRunner(model, layout, SLOTS // layout.dp * PAGES_PER_SLOT, PAGE)
    per_rank = SLOTS // layout.dp
    table = (np.arange(SLOTS)[:, None] % per_rank * PAGES_PER_SLOT + np.arange(PAGES_PER_SLOT)).astype(np.int32)
    step = make_step(np.arange(SLOTS)[:, None] % 512, np.ones((SLOTS, 1), bool), table, start=5)
    return step_collectives(runner.forward, runner.state, runner.kv, step, jnp.zeros(SLOTS, jnp.int32))


def per_layer(collectives, layers: int) -> list[tuple[str, tuple]]:
    """(primitive, first operand's shape) of the collectives that run once per layer."""
    return sorted((c.name, c.operands[0].shape) for c in collectives if c.count == layers)


def test_dep_decode_step_issues_one_all_gather_and_one_reduce_scatter_per_layer(model):
    mesh, collectives = decode_collectives(model, Layout(8, 1, fp4_dispatch=True))
    h, k, layers = model.cfg.hidden_size, model.cfg.num_experts_per_tok, model.cfg.num_layers
    width = h // 2 + h // 16 + 4 + 8 * k                # codes, scales, global scale, ids, weights
    assert mesh.shape == {"dp": 8, "tp": 1}
    assert per_layer(collectives, layers) == [("all_gather", (1, width)), ("reduce_scatter", (8, h))]


def test_tp_decode_step_without_ar_fusion_all_reduces_attention_and_experts(model):
    _, collectives = decode_collectives(model, Layout(2, 4, ar_fusion=False, combine="all_reduce"))
    h, k, layers = model.cfg.hidden_size, model.cfg.num_experts_per_tok, model.cfg.num_layers
    packed = h + 2 * k                                  # float32 hidden, expert ids and weights
    assert per_layer(collectives, layers) == [("all_gather", (4, packed)), ("psum", (4, 2)), ("psum", (4, h)),
                                              ("psum", (8, h))]
    assert all(c.count in (1, layers) for c in collectives)     # outside the layer scan: the logits' gather


def test_replay_runs_every_collective_of_the_step(model):
    mesh, collectives = decode_collectives(model, Layout(2, 4))
    program, inputs = collectives_only(mesh, collectives)
    text = program.as_text()
    issued = sum(c.count for c in collectives)
    assert sum(text.count(f" {op}(") + text.count(f" {op}-start(") for op in
               ("all-gather", "all-reduce", "reduce-scatter")) == issued
    results = program(*inputs)
    assert len(results) == issued and not any(np.asarray(r).any() for r in results)


def test_a_conditional_counts_its_heaviest_branch_and_a_scan_its_length():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("x",))

    def body(x, pick):
        def step(carry, _):
            return jax.lax.psum(carry, "x"), None
        x, _ = jax.lax.scan(step, x, None, length=3)
        return jax.lax.cond(pick[0] > 0, lambda: jax.lax.all_gather(x, "x", tiled=True)[:2],
                            lambda: jax.lax.all_gather(x[:1], "x", tiled=True)[:2])

    fn = jax.shard_map(body, mesh=mesh, in_specs=(jax.sharding.PartitionSpec("x"),) * 2,
                       out_specs=jax.sharding.PartitionSpec("x"), check_vma=False)
    _, collectives = step_collectives(fn, jnp.zeros((8, 16)), jnp.zeros(4, jnp.int32))
    assert sorted((c.name, c.operands[0].shape, c.count) for c in collectives) == [
        ("all_gather", (2, 16), 1), ("psum", (2, 16), 3)]


def test_a_collective_inside_a_while_loop_is_refused_not_counted_once():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("x",))

    def body(x):
        return jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (jax.lax.psum(c[0], "x"), c[1] + 1), (x, 0))[0]

    fn = jax.shard_map(body, mesh=mesh, in_specs=jax.sharding.PartitionSpec("x"),
                       out_specs=jax.sharding.PartitionSpec("x"), check_vma=False)
    with pytest.raises(ValueError, match="while loop"):
        step_collectives(fn, jnp.zeros((8, 16)))
