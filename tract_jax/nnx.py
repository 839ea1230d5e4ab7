"""TrAct for Flax NNX: ``tract_jax.nnx.Linear``, ``tract_jax.nnx.Conv``, and helpers."""

from tract_jax._src.nnx_layers import Conv, Linear, TractStatistics, convert, pop_stats

__all__ = ['Conv', 'Linear', 'TractStatistics', 'convert', 'pop_stats']
