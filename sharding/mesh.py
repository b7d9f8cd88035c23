"""The ("dp", "tp") device mesh and the Layout: how a step is split and which collectives run.

sglang's flags map one to one: `--tp-size N --dp-size D --enable-dp-attention` is mesh
(dp=D, tp=N/D); without `--enable-dp-attention`, dp=1 and tp=N. `--ep-size N` (= tp-size) puts
experts over all devices; otherwise each expert's intermediate dim is split (MoE-TP).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

EXPERT_AXES = ("dp", "tp")


class LayoutError(ValueError):
    """A parallel layout that cannot run this model or this device count."""


@dataclasses.dataclass(frozen=True)
class Layout:
    dp: int = 1
    tp: int = 1
    moe: Literal["ep", "tp"] = "ep"
    fp4_dispatch: bool = False
    # experts that round tokens to FP8 (W8A8) get them rounded before the all-gather: the same
    # numbers in about half the bytes of bf16
    fp8_dispatch: bool = True
    combine: Literal["reduce_scatter", "all_reduce"] = "reduce_scatter"
    ar_fusion: bool = True       # residual scattered over tp: RS + add + norm + AG instead of AR

    @property
    def devices(self) -> int:
        return self.dp * self.tp

    @classmethod
    def from_sglang(cls, tp_size: int = 1, dp_size: int = 1, ep_size: int | None = None,
                    enable_dp_attention: bool = False, num_experts: int | None = None,
                    **options) -> "Layout":
        """sglang's flag semantics: tp_size is the total device count; ep_size equal to it puts
        experts over all devices, ep_size 1 splits each expert (MoE-TP); None picks expert
        parallelism when the experts divide over the devices (the faster choice)."""
        if enable_dp_attention:
            if dp_size < 1 or tp_size % dp_size:
                raise LayoutError(f"--tp-size {tp_size} must be a multiple of --dp-size {dp_size}")
            dp, tp = dp_size, tp_size // dp_size
        elif dp_size != 1:
            raise LayoutError("--dp-size > 1 needs --enable-dp-attention (data-parallel replicas "
                              "of the whole model are not supported)")
        else:
            dp, tp = 1, tp_size
        if ep_size is None:
            moe = "ep" if num_experts is None or num_experts % tp_size == 0 else "tp"
        elif ep_size == tp_size:
            moe = "ep"
        elif ep_size == 1:
            moe = "tp"
        else:
            raise LayoutError(f"--ep-size must be 1 (MoE-TP) or equal --tp-size ({tp_size}), got {ep_size}")
        return cls(dp=dp, tp=tp, moe=moe, **options)

    def check(self, cfg, expert_format: str = "bf16") -> None:
        """Fails with one line if the model's shapes do not divide over this layout."""
        if cfg.num_heads % self.tp:
            raise LayoutError(f"{cfg.num_heads} attention heads do not split over tp={self.tp}")
        if self.tp > cfg.num_kv_heads and self.tp % cfg.num_kv_heads:
            raise LayoutError(f"tp={self.tp} > {cfg.num_kv_heads} KV heads needs tp to be a multiple of them")
        if self.tp <= cfg.num_kv_heads and cfg.num_kv_heads % self.tp:
            raise LayoutError(f"{cfg.num_kv_heads} KV heads do not split over tp={self.tp}")
        if cfg.vocab_size % self.tp:
            raise LayoutError(f"vocab {cfg.vocab_size} does not split over tp={self.tp}")
        n = self.devices
        if self.moe == "ep" and cfg.num_experts % n:
            raise LayoutError(f"{cfg.num_experts} experts do not split over {n} devices (expert parallel)")
        if self.moe == "tp" and cfg.intermediate_size % n:
            raise LayoutError(f"intermediate size {cfg.intermediate_size} does not split over {n} devices (MoE-TP)")
        block = {"fp8": 128, "nvfp4": 16}.get(expert_format)
        if self.moe == "tp" and block and n > 1 and (cfg.intermediate_size // n) % block:
            raise LayoutError(f"{expert_format} experts split over {n} devices (MoE-TP) would cut their "
                              f"{block}-wide scale blocks (intermediate {cfg.intermediate_size}); use expert "
                              f"parallelism (--ep-size {n})")
        if self.fp4_dispatch and cfg.hidden_size % 16:
            raise LayoutError(f"FP4 dispatch needs hidden size divisible by 16, got {cfg.hidden_size}")

    def kv_head_replicas(self, num_kv_heads: int) -> int:
        """How many devices hold a copy of each KV head (1 unless tp > num_kv_heads)."""
        return max(1, self.tp // num_kv_heads)


def make_mesh(layout: Layout, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    if len(devices) < layout.devices:
        raise LayoutError(f"layout dp={layout.dp} x tp={layout.tp} needs {layout.devices} devices, "
                          f"{len(devices)} available")
    grid = np.array(devices[:layout.devices]).reshape(layout.dp, layout.tp)
    return Mesh(grid, ("dp", "tp"))
