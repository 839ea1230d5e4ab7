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

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding

_HIGHEST = jax.lax.Precision.HIGHEST

MAX_CHUNK_BYTES = 64 * 2**20
"""Largest unfolded-patch block a conv statistic materializes at once (64 MiB)."""


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


def all_finite(stat: Statistic) -> jax.Array:
    """Whether every entry of the statistic is finite (a traced boolean)."""
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(leaf)) for leaf in stat]))


def fan_in(stat: Statistic) -> int:
    """``n``: the number of columns of the unfolded input."""
    return stat.rows.shape[1] if isinstance(stat, RowStatistic) else stat.gram.shape[0]


def from_rows(rows: jax.Array) -> Statistic:
    """The statistic of an unfolded input: ``X`` if it has fewer rows than columns."""
    num_rows, n = rows.shape
    return RowStatistic(rows) if num_rows < n else to_gram(RowStatistic(rows))


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


class ConvGeometry(NamedTuple):
    """Where a Flax convolution reads its input: the fields of ``nn.Conv``/``nnx.Conv``."""

    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] | None = 1
    padding: Any = 'SAME'
    input_dilation: int | Sequence[int] | None = 1
    kernel_dilation: int | Sequence[int] | None = 1

    @classmethod
    def of(cls, layer: Any) -> ConvGeometry:
        """The geometry of a linen or NNX conv layer."""
        return cls(*(getattr(layer, field) for field in cls._fields))


def conv_rows(inputs: jax.Array, geometry: ConvGeometry) -> jax.Array:
    """Unfolded input of a Flax convolution, one row per (image, output position).

    Columns are in the order of ``kernel.reshape(-1, features)`` for a Flax kernel of
    shape ``(*kernel_size, in_features, features)``: spatial offsets outer, channels
    inner. Padding follows ``flax.linen.Conv`` exactly (``'SAME'``, ``'VALID'``,
    ``'CIRCULAR'``, ``'REFLECT'``, ``'CAUSAL'``, ints, pairs), as do strides, input
    and kernel dilation and leading batch dims. Built from one strided slice of the
    padded input per kernel offset: a copy, no arithmetic.
    """
    inputs = jax.lax.stop_gradient(jnp.asarray(inputs))
    dtype = statistic_dtype(inputs.dtype)
    kernel_size = _as_tuple(geometry.kernel_size, 1)
    rank = len(kernel_size)
    strides, input_dilation, kernel_dilation = (
        _as_tuple(v, rank)
        for v in (geometry.strides, geometry.input_dilation, geometry.kernel_dilation)
    )
    x = inputs.reshape((-1, *inputs.shape[-(rank + 1) :])).astype(dtype)
    window = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation, strict=True)]

    # Flax pads CIRCULAR/REFLECT/CAUSAL itself, then runs a VALID convolution.
    pads = canonicalize_padding(geometry.padding, rank)
    if pads in ('CIRCULAR', 'REFLECT'):
        mode = {'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}[pads]
        x = jnp.pad(x, [(0, 0), *(((w - 1) // 2, w // 2) for w in window), (0, 0)], mode=mode)
        pads = 'VALID'
    elif pads == 'CAUSAL':
        if rank != 1:
            raise ValueError('Causal padding is only implemented for 1D convolutions.')
        x = jnp.pad(x, [(0, 0), (window[0] - 1, 0), (0, 0)])
        pads = 'VALID'
    if isinstance(pads, str):  # SAME / VALID, on the dilated input as lax does
        dilated = [(s - 1) * d + 1 for s, d in zip(x.shape[1:-1], input_dilation, strict=True)]
        pads = jax.lax.padtype_to_pads(dilated, window, strides, pads)
    config = [(lo, hi, d - 1) for (lo, hi), d in zip(pads, input_dilation, strict=True)]
    x = jax.lax.pad(x, jnp.zeros((), dtype), [(0, 0, 0), *config, (0, 0, 0)])

    batch, *spatial, channels = x.shape
    out = [max((s - w) // st + 1, 0) for s, w, st in zip(spatial, window, strides, strict=True)]
    slices = []
    for offset in itertools.product(*(range(k) for k in kernel_size)):
        start = [o * d for o, d in zip(offset, kernel_dilation, strict=True)]
        limit = [
            b + max(o - 1, 0) * st + (o > 0) for b, o, st in zip(start, out, strides, strict=True)
        ]
        slices.append(jax.lax.slice(x, (0, *start, 0), (batch, *limit, channels), (1, *strides, 1)))
    return jnp.stack(slices, axis=-2).reshape(-1, len(slices) * channels)


def _global(fn: Callable[[jax.Array], Statistic], inputs: jax.Array) -> Statistic:
    """``fn(inputs)``, replicated, also when ``inputs`` is sharded in explicit mode.

    Under ``jax.jit`` with an explicitly sharded batch (the default axis type of
    ``jax.make_mesh``) the reshapes and reductions over the batch need an output
    sharding; there the statistic is computed in auto mode and comes out replicated,
    the compiler summing the per-device parts.
    """
    mesh = getattr(jax.typeof(inputs).sharding, 'mesh', None)
    if mesh is None or mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types:
        return fn(inputs)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.sharding.auto_axes(fn, out_sharding=jax.sharding.PartitionSpec())(inputs)


def dense_statistic(inputs: jax.Array) -> Statistic:
    """The statistic of a Dense layer's input (every input vector is a row)."""
    return _global(lambda x: from_rows(dense_rows(x)), jnp.asarray(inputs))


def conv_statistic(
    inputs: jax.Array, geometry: ConvGeometry, *, max_chunk_bytes: int | None = None
) -> Statistic:
    """The statistic of a Flax convolution's unfolded input; see :func:`conv_rows`.

    When the unfolded patches of the whole batch would take more than
    ``max_chunk_bytes`` (default :data:`MAX_CHUNK_BYTES`), the Gram matrix is summed
    over chunks of images in a ``lax.scan``, so that only one chunk's patches exist
    at a time; the result equals the one-shot computation up to summation order.
    """
    unfold = functools.partial(conv_rows, geometry=geometry)
    rank = len(_as_tuple(geometry.kernel_size, 1))
    budget = MAX_CHUNK_BYTES if max_chunk_bytes is None else max_chunk_bytes
    return _global(
        functools.partial(_chunked_conv_statistic, unfold, rank, budget), jnp.asarray(inputs)
    )


def _chunked_conv_statistic(
    unfold: Callable[[jax.Array], jax.Array], rank: int, budget: int, images: jax.Array
) -> Statistic:
    """The Gram statistic of ``unfold(images)``, summed over chunks within ``budget``."""
    images = images.reshape((-1, *images.shape[-(rank + 1) :]))
    per_image = jax.eval_shape(unfold, jax.ShapeDtypeStruct((1, *images.shape[1:]), images.dtype))
    (rows_per_image, n), itemsize = per_image.shape, per_image.dtype.itemsize
    batch = images.shape[0]
    chunk = max(1, budget // max(rows_per_image * n * itemsize, 1))
    if batch * rows_per_image < n or chunk >= batch:  # few rows, or within the budget
        return from_rows(unfold(images))

    # Zero images unfold to zero rows (every Flax padding keeps zeros zero), so the
    # batch is padded to whole chunks and only the true rows are counted.
    num_chunks = -(-batch // chunk)
    images = jnp.pad(images, [(0, num_chunks * chunk - batch)] + [(0, 0)] * (rank + 1))
    images = images.reshape(num_chunks, chunk, *images.shape[1:])

    def add_chunk(gram, chunk_images):
        rows = unfold(chunk_images)
        return gram + jnp.matmul(rows.T, rows, precision=_HIGHEST), None

    gram, _ = jax.lax.scan(add_chunk, jnp.zeros((n, n), per_image.dtype), images)
    return GramStatistic(gram, jnp.asarray(batch * rows_per_image, per_image.dtype))


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


def all_reduce(stat: Statistic, axis_name: str) -> Statistic:
    """The statistic of the rows of every shard along ``axis_name`` (inside shard_map/pmap).

    Gram matrices and row counts are summed. Row matrices are gathered, in shard order,
    by a sum of zero-padded blocks rather than ``all_gather``, so that the result is
    the same on every shard (shard_map's replication check sees it as invariant);
    rows are only kept when they are fewer than the fan-in, so this stays small. If
    the gathered rows reach the fan-in, the Gram form is used from there on.
    """
    if isinstance(stat, GramStatistic):
        return GramStatistic(*jax.lax.psum((stat.gram, stat.count), axis_name))
    rows = stat.rows
    shards = jax.lax.psum(1, axis_name)
    block = jax.lax.axis_index(axis_name) * rows.shape[0]
    padded = jnp.zeros((shards * rows.shape[0], rows.shape[1]), rows.dtype)
    padded = jax.lax.dynamic_update_slice(padded, rows, (block, jnp.zeros_like(block)))
    return from_rows(jax.lax.psum(padded, axis_name))
