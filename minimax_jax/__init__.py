"""MiniMax-M2.5 in JAX."""
