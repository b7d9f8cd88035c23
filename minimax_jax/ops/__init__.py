"""Kernels with a slow, obviously-correct reference each; fast paths are selected per backend."""
