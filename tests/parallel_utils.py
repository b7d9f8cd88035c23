"""Runs one forward step of a model on a given layout of the 8 simulated CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from minimax_jax.model import LocalComm, StepInput
from sharding.forward import sharded_forward
from sharding.mesh import Layout, make_mesh
from sharding.specs import KV_SPEC, shard_state


def make_step(tokens, valid, page_table, start=0) -> StepInput:
    b, t = tokens.shape
    positions = np.broadcast_to(np.arange(start, start + t, dtype=np.int32), (b, t))
    return StepInput(tokens=jnp.asarray(tokens, jnp.int32), positions=jnp.asarray(positions),
                     valid=jnp.asarray(valid), page_table=jnp.asarray(page_table, jnp.int32))


def needs_devices(count: int) -> None:
    """Skips the test where the platform has fewer devices (e.g. the kernel tests on one GPU)."""
    if jax.device_count() < count:
        pytest.skip(f"needs {count} devices, {jax.device_count()} here")


class LayoutRunner:
    """The jitted sharded forward of `model` on `layout` with a fresh (or given) KV cache."""

    def __init__(self, model, layout: Layout, pages_per_rank: int, page_size: int, kv_fill=None):
        needs_devices(layout.dp * layout.tp)
        cfg = self.cfg = model.cfg
        self.layout, self.mesh = layout, make_mesh(layout)
        graphdef, state = nnx.split(model)
        self.state = shard_state(state, layout, self.mesh, cfg.head_dim, cfg.num_kv_heads)
        self.forward = jax.jit(sharded_forward(cfg, graphdef, self.state, layout, self.mesh, jnp.float32))
        heads = cfg.num_kv_heads * layout.kv_head_replicas(cfg.num_kv_heads)
        shape = (cfg.num_layers, layout.dp * pages_per_rank, page_size, heads, cfg.head_dim)
        fill = kv_fill if kv_fill is not None else np.zeros(shape, np.float32)
        sharding = NamedSharding(self.mesh, KV_SPEC)
        self.kv = (jax.device_put(fill, sharding), jax.device_put(fill, sharding))

    def __call__(self, step: StepInput, logit_index):
        logits, self.kv, counts = self.forward(self.state, self.kv, step, jnp.asarray(logit_index, jnp.int32))
        return np.asarray(logits), np.asarray(counts)

    def lowered_text(self, step: StepInput, logit_index) -> str:
        return self.forward.lower(self.state, self.kv, step, jnp.asarray(logit_index, jnp.int32)).compile().as_text()


def reference_logits(model, tokens, valid, page_size=4, fp4_dispatch=False):
    """Single device, LocalComm: logits of every slot's last token."""
    b, t = tokens.shape
    pages = -(-t // page_size)
    kv = (jnp.zeros((model.cfg.num_layers, b * pages, page_size, model.cfg.num_kv_heads, model.cfg.head_dim)),) * 2
    table = np.arange(b * pages).reshape(b, pages)
    last = np.maximum(valid.sum(1) - 1, 0)
    logits, _, _ = model(make_step(tokens, valid, table), kv, jnp.asarray(last, jnp.int32), LocalComm(fp4_dispatch))
    return np.asarray(logits)
