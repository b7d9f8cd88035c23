"""Environment defaults a GPU process sets before JAX starts (imports nothing else)."""

from __future__ import annotations

import os

# NVLink multicast (NVLS) stays off in NCCL and its peers: collectives take the ring and tree
# algorithms. XLA's allocator takes 92% of each card (JAX's own default is 75%), of which
# --mem-fraction-static then gives weights and the KV cache their share, as sglang's does of the
# whole card. A value already in the environment wins.
DEFAULTS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
            "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.92"}


def apply_defaults() -> None:
    """Sets each of DEFAULTS that the environment does not set already."""
    for var, value in DEFAULTS.items():
        os.environ.setdefault(var, value)
