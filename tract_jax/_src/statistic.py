"""The statistic types: what one first layer's unfolded input leaves for the solve.

TrAct sees a first layer as ``Z = X @ W`` where ``X`` is the ``rows x n`` matrix of
*unfolded* inputs: every input vector of a Dense layer, or every (image, output
position) patch of a convolution, flattened in the kernel's own order so that
``kernel_matrix(kernel, layout)`` multiplies it. The update needs ``X`` only through
``XᵀX`` and the row count (a :class:`GramStatistic`), or through ``X`` itself when it
has fewer rows than columns (a :class:`RowStatistic`: the ``rows x rows`` Woodbury
form is cheaper). This module holds those types and their algebra: merging two
passes of a layer, kernel layouts, and the sum across devices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp

from tract_jax._src import choice

Layout = Literal['features_last', 'features_first']
"""How a kernel is laid out, so which of its axes make the fan-in ``n``.

- ``'features_last'``: ``(*window, in, features)``, a Dense ``(in, features)``: Flax
  linen and NNX, Haiku, Keras, ``lax.conv`` with ``'HWIO'``. Columns of ``X`` are in
  the order of ``kernel.reshape(n, features)``: window offsets outer, channels inner.
- ``'features_first'``: ``(features, in, *window)``, a Linear ``(features, in)``:
  Equinox, PyTorch, ``lax.conv`` with ``'OIHW'``. Columns of ``X`` are in the order of
  ``kernel.reshape(features, n)``: channels outer, window offsets inner.
"""

LAYOUTS: tuple[Layout, ...] = get_args(Layout)

STATISTIC_SCOPE = 'tract_statistic'
SOLVE_SCOPE = 'tract_solve'
"""The ``jax.named_scope`` of TrAct's own operations: building a statistic, and the
solve (with the statistic's reduction over ``axis_name``). XLA keeps them in its op
names, so a profile or a compiled program shows what TrAct adds to a step
(``benchmarks/compiled.py`` counts it that way)."""


def check_layout(layout: str) -> None:
    """Raises a ``ValueError`` that names both layouts for anything else."""
    if layout not in LAYOUTS:
        raise ValueError(
            f'tract_jax: layout must be one of {LAYOUTS}, got {layout!r}: '
            "'features_last' for Flax kernels (*window, in, features), 'features_first' for "
            'Equinox/PyTorch kernels (features, in, *window).'
        )


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=['gram', 'count'], meta_fields=['layout']
)
@dataclasses.dataclass(frozen=True)
class GramStatistic:
    """``XᵀX`` of a layer's unfolded input and the number of rows it sums over.

    Attributes:
      gram: ``(n, n)`` array, the sum over rows of ``x xᵀ``, columns in the kernel's
        flattening order for ``layout``.
      count: scalar array, the number of rows (images × output positions).
      layout: the layout of the kernel this statistic is for (static).
    """

    gram: jax.Array
    count: jax.Array
    layout: Layout = 'features_last'


@functools.partial(jax.tree_util.register_dataclass, data_fields=['rows'], meta_fields=['layout'])
@dataclasses.dataclass(frozen=True)
class RowStatistic:
    """The unfolded input ``X`` itself, kept when it has fewer rows than columns.

    Attributes:
      rows: ``(rows, n)`` array of unfolded inputs, columns in the kernel's
        flattening order for ``layout``.
      layout: the layout of the kernel this statistic is for (static).
    """

    rows: jax.Array
    layout: Layout = 'features_last'


Statistic = GramStatistic | RowStatistic


def is_statistic(node: Any) -> bool:
    """Whether ``node`` is one layer's statistic (and so a leaf of a stats tree)."""
    return isinstance(node, (GramStatistic, RowStatistic))


def statistic_dtype(dtype: Any) -> jnp.dtype:
    """Statistics are kept in float32, or in the input's dtype where that is wider."""
    return jnp.promote_types(dtype, jnp.float32)


def all_finite(stat: Statistic) -> jax.Array:
    """Whether every entry of the statistic is finite (a traced boolean)."""
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(stat)]))


def fan_in(stat: Statistic) -> int:
    """``n``: the number of columns of the unfolded input."""
    return stat.rows.shape[1] if isinstance(stat, RowStatistic) else stat.gram.shape[0]


def dtype_of(stat: Statistic) -> jnp.dtype:
    """The dtype the statistic is kept (and its solve runs) in."""
    return stat.rows.dtype if isinstance(stat, RowStatistic) else stat.gram.dtype


def from_rows(rows: jax.Array, layout: Layout = 'features_last') -> Statistic:
    """The statistic of an unfolded input: ``X`` if it has fewer rows than columns."""
    num_rows, n = rows.shape
    stat = RowStatistic(rows, layout)
    return stat if num_rows < n else to_gram(stat)


def to_gram(stat: Statistic) -> GramStatistic:
    """The Gram form of any statistic."""
    if isinstance(stat, GramStatistic):
        return stat
    rows = stat.rows
    count = jnp.asarray(rows.shape[0], rows.dtype)
    return GramStatistic(choice.gram_matrix(rows), count, stat.layout)


def merge(a: Statistic, b: Statistic) -> Statistic:
    """The statistic of the rows of ``a`` and ``b`` together (a layer called twice)."""
    if fan_in(a) != fan_in(b) or a.layout != b.layout:
        raise ValueError(
            f'tract_jax: statistics of fan-in {fan_in(a)} ({a.layout}) and {fan_in(b)} '
            f'({b.layout}) cannot be of one layer: its kernel cannot have both shapes.'
        )
    if isinstance(a, RowStatistic) and isinstance(b, RowStatistic):
        return from_rows(jnp.concatenate([a.rows, b.rows.astype(a.rows.dtype)]), a.layout)
    a, b = to_gram(a), to_gram(b)
    return GramStatistic(a.gram + b.gram, a.count + b.count, a.layout)


def kernel_fan_in(shape: Sequence[int], layout: Layout) -> int:
    """``n`` of a kernel of this shape and layout."""
    return math.prod(shape[:-1]) if layout == 'features_last' else math.prod(shape[1:])


def kernel_matrix(kernel: jax.Array, layout: Layout) -> jax.Array:
    """The kernel (or its gradient) as an ``(n, features)`` matrix, rows in ``X``'s order."""
    if layout == 'features_last':
        return kernel.reshape(-1, kernel.shape[-1])
    return kernel.reshape(kernel.shape[0], -1).T


def from_kernel_matrix(matrix: jax.Array, shape: Sequence[int], layout: Layout) -> jax.Array:
    """The inverse of :func:`kernel_matrix`: a ``(n, features)`` matrix back to ``shape``."""
    return (matrix if layout == 'features_last' else matrix.T).reshape(shape)


def with_layout(stat: Statistic, layout: Layout, window: int = 1) -> Statistic:
    """A statistic computed in ``'features_last'`` column order, in ``layout``'s order.

    ``window`` is the number of kernel offsets (1 for a Dense layer, whose columns are
    in the same order in both layouts).
    """
    check_layout(layout)
    if stat.layout != 'features_last':
        raise ValueError('tract_jax: with_layout takes a statistic in features_last order.')
    if layout == 'features_last' or window == 1:
        return dataclasses.replace(stat, layout=layout)
    n = fan_in(stat)
    # Column (offset, channel) of the features_last order moves to (channel, offset).
    order = jnp.arange(n).reshape(window, n // window).T.reshape(-1)
    if isinstance(stat, RowStatistic):
        return RowStatistic(stat.rows[:, order], layout)
    return GramStatistic(stat.gram[order][:, order], stat.count, layout)


def all_reduce(stat: Statistic, axis_name: str) -> Statistic:
    """The statistic of the rows of every shard along ``axis_name`` (inside shard_map/pmap).

    Gram matrices and row counts are summed. Row matrices are gathered, in shard order,
    by a sum of zero-padded blocks rather than ``all_gather``, so that the result is
    the same on every shard (shard_map's replication check sees it as invariant);
    rows are only kept when they are fewer than the fan-in, so this stays small. If
    the gathered rows reach the fan-in, the Gram form is used from there on.
    """
    if isinstance(stat, GramStatistic):
        return GramStatistic(*jax.lax.psum((stat.gram, stat.count), axis_name), stat.layout)
    rows = stat.rows
    shards = jax.lax.psum(1, axis_name)
    block = jax.lax.axis_index(axis_name) * rows.shape[0]
    padded = jnp.zeros((shards * rows.shape[0], rows.shape[1]), rows.dtype)
    padded = jax.lax.dynamic_update_slice(padded, rows, (block, jnp.zeros_like(block)))
    return from_rows(jax.lax.psum(padded, axis_name), stat.layout)
