"""The expert computations agree with each other on random data."""
import jax
import jax.numpy as jnp
import numpy as np

from minimax_jax.ops import moe


def test_per_pair_experts_equal_the_grouped_gemm_including_foreign_and_padding_pairs():
    rng = np.random.RandomState(0)
    n, k, local, h, i, first = 5, 3, 6, 16, 8, 6          # this device owns experts 6..11
    x = jnp.asarray(rng.standard_normal((n, h)), jnp.float32)
    ids = jnp.asarray(rng.randint(0, 18, (n, k)), jnp.int32).at[4].set(24)   # token 4: padding
    weights = jnp.asarray(rng.random((n, k)), jnp.float32)
    w13 = jnp.asarray(rng.standard_normal((local, h, 2, i)), jnp.float32)
    w2 = jnp.asarray(rng.standard_normal((local, i, h)), jnp.float32)
    grouped = moe.routed_experts(x, ids, weights, w13, w2, first)
    rel = ids - first
    mine = (rel >= 0) & (rel < local)
    sel = jnp.where(mine, rel, 0).reshape(-1)
    pairs = moe.per_pair_experts(x, ids, weights, w13[sel], w2[sel], mine)
    np.testing.assert_allclose(np.asarray(pairs), np.asarray(grouped), rtol=1e-5, atol=1e-5)
    assert not np.asarray(pairs[4]).any() and np.asarray(mine).any() and not np.asarray(mine).all()
