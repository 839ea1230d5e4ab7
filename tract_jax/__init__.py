"""tract_jax: TrAct (Training Activations) for JAX, Flax and Optax.

TrAct (Petersen, Borgelt, Ermon, NeurIPS 2024) trains a vision model's first layer
as if its pre-activations were embeddings: the first-layer kernel gradient ``G`` is
replaced by ``(XᵀX / b + λI)⁻¹ G`` for the layer's unfolded input ``X``. The layers
here record what that needs; :func:`tract` applies it inside any Optax chain::

    tx = optax.chain(tract_jax.tract(0.1), optax.adam(1e-3))
"""

from tract_jax import nnx
from tract_jax._src.accumulation import MultiSteps, MultiStepsState, accumulate
from tract_jax._src.linen import COLLECTION, Conv, Dense, TrainState, capture
from tract_jax._src.solve import tract_solve
from tract_jax._src.statistic import GramStatistic, Layout, RowStatistic
from tract_jax._src.statistics import conv_statistic, dense_statistic
from tract_jax._src.transform import TractState, tract

__version__ = '0.1.0'

__all__ = [
    'COLLECTION',
    'Conv',
    'Dense',
    'GramStatistic',
    'Layout',
    'MultiSteps',
    'MultiStepsState',
    'RowStatistic',
    'TractState',
    'TrainState',
    'accumulate',
    'capture',
    'conv_statistic',
    'dense_statistic',
    'nnx',
    'tract',
    'tract_solve',
]
