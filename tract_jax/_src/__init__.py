"""Internals of tract_jax; the public names are re-exported from ``tract_jax``."""
