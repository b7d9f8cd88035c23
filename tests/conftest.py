"""Tests run on 8 simulated CPU devices; transformers is the oracle."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """The default tiny random checkpoint written by transformers, float32."""
    from minimax_jax.hf_testing import make_hf_model, save_hf_checkpoint
    return save_hf_checkpoint(make_hf_model(seed=0), tmp_path_factory.mktemp("tiny_hf"))
