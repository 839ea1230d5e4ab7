"""Flax linen drop-ins that record TrAct statistics of their unfolded input."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax

from tract_jax._src import statistics

COLLECTION = 'tract'
"""The Flax collection the layers record into; the statistic sits at the kernel's path."""


def record(module: nn.Module, make_rows: Callable[[], jax.Array]) -> None:
    """Adds the statistic of ``make_rows()`` to ``module``'s entry in ``'tract'``.

    Records nothing while initializing or when ``'tract'`` is not mutable, so a model
    applied without ``mutable=['tract']`` does no extra work. A second call in the same
    pass (a shared stem, two crops) accumulates into the first.
    """
    if module.is_initializing() or not module.is_mutable_collection(COLLECTION):
        return
    stat = statistics.from_rows(make_rows())
    if module.has_variable(COLLECTION, 'kernel'):
        stat = statistics.merge(module.get_variable(COLLECTION, 'kernel'), stat)
    module.put_variable(COLLECTION, 'kernel', stat)


def check_conv_options(layer: str, feature_group_count: int, mask: object) -> None:
    """Rejects conv options for which TrAct's update is not implemented."""
    if feature_group_count != 1:
        raise ValueError(
            f'{layer}: feature_group_count={feature_group_count} (a grouped or depthwise '
            'convolution) is not supported by TrAct, whose least-squares step is over the '
            'full fan-in. Use the plain Flax layer for it, or feature_group_count=1.'
        )
    if mask is not None:
        raise ValueError(
            f'{layer}: a kernel mask is not supported by TrAct (the solve would move the '
            'masked weights). Use the plain Flax layer for a masked convolution.'
        )


class Dense(nn.Dense):
    """``flax.linen.Dense`` that also records TrAct statistics of its input.

    Same fields, parameters and outputs as :class:`flax.linen.Dense`. When applied with
    ``mutable=['tract']`` it records, at ``'tract'/<path>/'kernel'``, the Gram matrix of
    its input rows (every input vector, any number of leading dims) or the rows
    themselves when there are fewer rows than input features, for :func:`tract_jax.tract`.

    Example:
      >>> import jax, jax.numpy as jnp, tract_jax
      >>> layer = tract_jax.Dense(features=4)
      >>> x = jnp.ones((8, 3))
      >>> variables = layer.init(jax.random.key(0), x)
      >>> y, state = layer.apply(variables, x, mutable=['tract'])
      >>> state['tract']['kernel'].gram.shape
      (3, 3)
    """

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        record(self, lambda: statistics.dense_rows(inputs))
        return super().__call__(inputs)


class Conv(nn.Conv):
    """``flax.linen.Conv`` that also records TrAct statistics of its unfolded input.

    Same fields, parameters and outputs as :class:`flax.linen.Conv` (1-D, 2-D and 3-D;
    any strides, input and kernel dilation, and every padding Flax accepts). When
    applied with ``mutable=['tract']`` it records, at ``'tract'/<path>/'kernel'``, the
    Gram matrix of its unfolded input (one row per image and output position, columns
    in the kernel's flattening order) with the row count, or the rows themselves when
    there are fewer rows than ``prod(kernel_size) * in_features``.

    Raises:
      ValueError: for ``feature_group_count > 1`` or a ``mask``, which TrAct does not
        support.

    Example:
      >>> import jax, jax.numpy as jnp, tract_jax
      >>> layer = tract_jax.Conv(features=16, kernel_size=(3, 3), use_bias=False)
      >>> x = jnp.ones((2, 32, 32, 3))
      >>> variables = layer.init(jax.random.key(0), x)
      >>> y, state = layer.apply(variables, x, mutable=['tract'])
      >>> state['tract']['kernel'].gram.shape
      (27, 27)
    """

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        check_conv_options('tract_jax.Conv', self.feature_group_count, self.mask)
        record(
            self,
            lambda: statistics.conv_rows(
                inputs,
                self.kernel_size,
                self.strides,
                self.padding,
                self.input_dilation,
                self.kernel_dilation,
            ),
        )
        return super().__call__(inputs)
