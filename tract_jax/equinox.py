"""TrAct for Equinox: ``tract_jax.equinox.convert``, ``split_stats`` and ``TrAct``.

Needs Equinox (``pip install 'tract_jax[equinox]'``).
"""

from tract_jax._src.equinox_layers import TrAct, convert, split_stats

__all__ = ['TrAct', 'convert', 'split_stats']
