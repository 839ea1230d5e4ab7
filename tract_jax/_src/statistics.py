"""Statistics of a first layer's unfolded input, as TrAct needs them.

TrAct sees a first layer as ``Z = X @ W`` where ``X`` is the ``rows x n`` matrix of
*unfolded* inputs: every input vector of a Dense layer, or every (image, output
position) patch of a convolution, flattened in the kernel's own order so that
``kernel.reshape(n, features)`` multiplies it. The update needs ``X`` only through
``XᵀX`` and the row count, or through ``X`` itself when it has fewer rows than
columns (then the ``rows x rows`` Woodbury form is cheaper). This module builds
those statistics; every front end (linen, NNX, interception) calls into it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


class GramStatistic(NamedTuple):
    """``XᵀX`` of a layer's unfolded input and the number of rows it sums over.

    Attributes:
      gram: ``(n, n)`` array, the sum over rows of ``x xᵀ``.
      count: scalar array, the number of rows (images × output positions).
    """

    gram: jax.Array
    count: jax.Array


class RowStatistic(NamedTuple):
    """The unfolded input ``X`` itself, kept when it has fewer rows than columns.

    Attributes:
      rows: ``(rows, n)`` array of unfolded inputs.
    """

    rows: jax.Array


Statistic = GramStatistic | RowStatistic


def is_statistic(node: Any) -> bool:
    """Whether ``node`` is one layer's statistic (and so a leaf of a stats tree)."""
    return isinstance(node, (GramStatistic, RowStatistic))


def statistic_dtype(dtype: Any) -> jnp.dtype:
    """Statistics are kept in float32, or in the input's dtype where that is wider."""
    return jnp.promote_types(dtype, jnp.float32)


def fan_in(stat: Statistic) -> int:
    """``n``: the number of columns of the unfolded input."""
    return stat.rows.shape[1] if isinstance(stat, RowStatistic) else stat.gram.shape[0]


def from_rows(rows: jax.Array) -> Statistic:
    """The statistic of an unfolded input: ``X`` if it has fewer rows than columns."""
    num_rows, n = rows.shape
    if num_rows < n:
        return RowStatistic(rows)
    gram = jnp.matmul(rows.T, rows, precision=_HIGHEST)
    return GramStatistic(gram, jnp.asarray(num_rows, rows.dtype))


def to_gram(stat: Statistic) -> GramStatistic:
    """The Gram form of any statistic."""
    if isinstance(stat, GramStatistic):
        return stat
    rows = stat.rows
    gram = jnp.matmul(rows.T, rows, precision=_HIGHEST)
    return GramStatistic(gram, jnp.asarray(rows.shape[0], rows.dtype))


def merge(a: Statistic, b: Statistic) -> Statistic:
    """The statistic of the rows of ``a`` and ``b`` together (a layer called twice)."""
    if fan_in(a) != fan_in(b):
        raise ValueError(
            f'tract_jax: a layer was called on inputs of fan-in {fan_in(a)} and {fan_in(b)} '
            'in one pass; its kernel cannot have both shapes.'
        )
    if isinstance(a, RowStatistic) and isinstance(b, RowStatistic):
        return from_rows(jnp.concatenate([a.rows, b.rows.astype(a.rows.dtype)]))
    a, b = to_gram(a), to_gram(b)
    return GramStatistic(a.gram + b.gram, a.count + b.count)


def dense_rows(inputs: jax.Array) -> jax.Array:
    """Unfolded input of a Dense layer: every input vector is a row."""
    inputs = jax.lax.stop_gradient(jnp.asarray(inputs))
    dtype = statistic_dtype(inputs.dtype)
    return inputs.reshape(-1, inputs.shape[-1]).astype(dtype)


def _as_tuple(value: int | Sequence[int] | None, rank: int) -> tuple[int, ...]:
    if value is None:
        return (1,) * rank
    if isinstance(value, int):
        return (value,) * rank
    return tuple(value)


def conv_rows(
    inputs: jax.Array,
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int] | None = 1,
    padding: Any = 'SAME',
    input_dilation: int | Sequence[int] | None = 1,
    kernel_dilation: int | Sequence[int] | None = 1,
) -> jax.Array:
    """Unfolded input of a convolution, one row per (image, output position).

    Columns are in the order of ``kernel.reshape(-1, features)`` for a Flax kernel of
    shape ``(*kernel_size, in_features, features)``: spatial offsets outer, channels
    inner. Padding, strides and dilations are applied by Flax's own ``Conv`` (every
    padding it accepts: ``'SAME'``, ``'VALID'``, ``'CIRCULAR'``, ``'REFLECT'``,
    ``'CAUSAL'``, ints, pairs), run on a grouped identity kernel that copies each
    patch into the output channels exactly.
    """
    inputs = jax.lax.stop_gradient(jnp.asarray(inputs))
    dtype = statistic_dtype(inputs.dtype)
    kernel_size = _as_tuple(kernel_size, 1)
    num_offsets = math.prod(kernel_size)
    channels = inputs.shape[-1]
    # Output channel c * num_offsets + j copies channel c at spatial offset j.
    identity = jnp.eye(num_offsets, dtype=dtype).reshape(*kernel_size, 1, num_offsets)
    identity = jnp.tile(identity, (1,) * len(kernel_size) + (1, channels))
    unfold = nn.Conv(
        features=channels * num_offsets,
        kernel_size=kernel_size,
        strides=strides,
        padding=padding,
        input_dilation=input_dilation,
        kernel_dilation=kernel_dilation,
        feature_group_count=channels,
        use_bias=False,
        dtype=dtype,
        param_dtype=dtype,
        precision=_HIGHEST,
        parent=None,
    )
    patches = unfold.apply({'params': {'kernel': identity}}, inputs.astype(dtype))
    # (…, channels, offsets) -> (…, offsets, channels): the kernel's flattening order.
    patches = patches.reshape(-1, channels, num_offsets).swapaxes(1, 2)
    return patches.reshape(-1, num_offsets * channels)


def all_reduce(stat: Statistic, axis_name: str) -> Statistic:
    """The statistic of the rows of every shard along ``axis_name`` (inside shard_map/pmap)."""
    if isinstance(stat, GramStatistic):
        return GramStatistic(*jax.lax.psum((stat.gram, stat.count), axis_name))
    return from_rows(jax.lax.all_gather(stat.rows, axis_name, tiled=True))
