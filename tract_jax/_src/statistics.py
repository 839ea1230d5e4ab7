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

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding

_HIGHEST = jax.lax.Precision.HIGHEST

MAX_CHUNK_BYTES = 64 * 2**20
"""Largest unfolded-patch block a conv statistic materializes at once (64 MiB)."""


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


def _check_layout(layout: str) -> None:
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


GRAM_BLOCK = 192
"""Columns per block of a large Gram matrix (see :func:`gram_matrix`)."""


def gram_matrix(rows: jax.Array) -> jax.Array:
    """``XᵀX`` of ``rows``.

    With at least ``4 * GRAM_BLOCK`` columns it is summed in 4 to 8 blocks of columns
    (about ``GRAM_BLOCK`` each, or more where there are more columns), the blocks on and
    above the diagonal only (4 blocks: 10 of 16 products, 0.62x the multiply-adds; 8:
    0.56x) and those below as their exact transposes. Measured on this project's CPU,
    ViT-S/16's patch embedding (``n = 768``, 1568 rows), alternated with the layer's
    conv forward: 8.8 ms in 4 blocks and in 8, vs 12.3 ms in one product; 2 blocks gain
    nothing (11.2 ms), hence the threshold.
    """
    n = rows.shape[1]
    parts = min(n // GRAM_BLOCK, 8)
    if parts < 4:
        return jnp.matmul(rows.T, rows, precision=_HIGHEST)
    edges = [i * n // parts for i in range(parts + 1)]
    columns = [rows[:, lo:hi] for lo, hi in itertools.pairwise(edges)]
    upper = {
        (i, j): jnp.matmul(columns[i].T, columns[j], precision=_HIGHEST)
        for i, j in itertools.combinations_with_replacement(range(parts), 2)
    }
    return _symmetric_from_upper(upper, parts)


def _symmetric_from_upper(upper: dict[tuple[int, int], jax.Array], k: int) -> jax.Array:
    """The ``k x k`` block matrix whose blocks ``(i, j)``, ``i <= j``, are ``upper``'s and
    whose blocks below the diagonal are their transposes."""
    return jnp.block(
        [[upper[i, j] if i <= j else upper[j, i].T for j in range(k)] for i in range(k)]
    )


def to_gram(stat: Statistic) -> GramStatistic:
    """The Gram form of any statistic."""
    if isinstance(stat, GramStatistic):
        return stat
    rows = stat.rows
    return GramStatistic(gram_matrix(rows), jnp.asarray(rows.shape[0], rows.dtype), stat.layout)


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
    _check_layout(layout)
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


PADDING_MODES = {'zeros': 'constant', 'reflect': 'reflect', 'replicate': 'edge', 'circular': 'wrap'}
"""Values a border may take (Equinox's ``padding_mode``), as ``jnp.pad`` modes."""


class ConvGeometry(NamedTuple):
    """Where a convolution reads its input: the fields of ``nn.Conv``/``nnx.Conv``, and
    ``padding_mode`` (Equinox's: how the border is padded when it is not zeros)."""

    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] | None = 1
    padding: Any = 'SAME'
    input_dilation: int | Sequence[int] | None = 1
    kernel_dilation: int | Sequence[int] | None = 1
    padding_mode: str = 'zeros'

    @classmethod
    def of(cls, layer: Any) -> ConvGeometry:
        """The geometry of a linen or NNX conv layer."""
        return cls(*(getattr(layer, field) for field in cls._fields[:-1]))


class _Window(NamedTuple):
    """A convolution's window on its padded (and input-dilated) input: no padding left."""

    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    dilation: tuple[int, ...]

    def out(self, spatial: Sequence[int]) -> list[int]:
        """Output positions per spatial dim, for a padded input of these sizes."""
        return [
            max((s - (k - 1) * d - 1) // st + 1, 0)
            for s, k, d, st in zip(
                spatial, self.kernel_size, self.dilation, self.strides, strict=True
            )
        ]

    @classmethod
    def of(cls, geometry: ConvGeometry) -> _Window:
        kernel_size = _as_tuple(geometry.kernel_size, 1)
        rank = len(kernel_size)
        return cls(
            kernel_size,
            _as_tuple(geometry.strides, rank),
            _as_tuple(geometry.kernel_dilation, rank),
        )


def _padded(inputs: jax.Array, geometry: ConvGeometry) -> jax.Array:
    """The input as the convolution reads it, ``(images, *spatial, channels)``, padded
    and input-dilated exactly as ``flax.linen.Conv`` (or Equinox) does, in the
    statistic's dtype; ``_Window.of(geometry)`` then slides over it without padding."""
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

    # Flax pads CIRCULAR/REFLECT/CAUSAL itself, then runs a VALID convolution; so does
    # Equinox for a padding_mode other than zeros.
    pads = canonicalize_padding(geometry.padding, rank)
    if geometry.padding_mode != 'zeros':
        if geometry.padding_mode not in PADDING_MODES:
            raise ValueError(
                f'tract_jax: padding_mode must be one of {sorted(PADDING_MODES)}, '
                f'got {geometry.padding_mode!r}.'
            )
        if any(d != 1 for d in input_dilation) or pads in ('CIRCULAR', 'REFLECT', 'CAUSAL'):
            raise ValueError(
                f'tract_jax: padding_mode={geometry.padding_mode!r} takes int, pair or '
                "'SAME'/'SAME_LOWER'/'VALID' padding and no input dilation."
            )
        if isinstance(pads, str):
            pads = jax.lax.padtype_to_pads(x.shape[1:-1], window, strides, pads)
        x = jnp.pad(x, [(0, 0), *pads, (0, 0)], mode=PADDING_MODES[geometry.padding_mode])
        pads = 'VALID'
    elif pads in ('CIRCULAR', 'REFLECT'):
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

    return x


def _patches(x: jax.Array, window: _Window) -> jax.Array:
    """``(images, *out, offsets, channels)``: every window of the padded input, offsets
    in row-major order. One strided slice per kernel offset: a copy, no arithmetic."""
    batch, *spatial, channels = x.shape
    out = window.out(spatial)
    slices = []
    for offset in itertools.product(*(range(k) for k in window.kernel_size)):
        start = [o * d for o, d in zip(offset, window.dilation, strict=True)]
        limit = [
            b + max(o - 1, 0) * st + (o > 0)
            for b, o, st in zip(start, out, window.strides, strict=True)
        ]
        slices.append(
            jax.lax.slice(x, (0, *start, 0), (batch, *limit, channels), (1, *window.strides, 1))
        )
    return jnp.stack(slices, axis=-2)


def conv_rows(inputs: jax.Array, geometry: ConvGeometry) -> jax.Array:
    """Unfolded input of a Flax convolution, one row per (image, output position).

    Columns are in the order of ``kernel.reshape(-1, features)`` for a Flax kernel of
    shape ``(*kernel_size, in_features, features)``: spatial offsets outer, channels
    inner. Padding follows ``flax.linen.Conv`` exactly (``'SAME'``, ``'VALID'``,
    ``'CIRCULAR'``, ``'REFLECT'``, ``'CAUSAL'``, ints, pairs), as do strides, input
    and kernel dilation and leading batch dims.
    """
    patches = _patches(_padded(inputs, geometry), _Window.of(geometry))
    return patches.reshape(-1, patches.shape[-2] * patches.shape[-1])


def _shift_plan(k0: int, s0: int, d0: int) -> dict[tuple[int, int], tuple[int, int, int, int]]:
    """For each Gram block ``(a, a + Δ)``, ``Δ ≥ 0``, of the offsets along the first axis:
    ``(phase, partner phase, j0, offset)``. Its rows ``t = d·a + s·i`` are rows ``j0 + i``
    of phase ``d·a mod s``, against rows ``j0 + i + offset`` of the partner phase."""
    plan = {}
    for delta in range(k0):
        for a in range(k0 - delta):
            first, partner = a * d0, (a + delta) * d0
            offset = partner // s0 - first // s0
            plan[a, a + delta] = (first % s0, partner % s0, first // s0, offset)
    return plan


def _offset_ranges(plan: dict) -> dict[tuple[int, int], tuple[int, int]]:
    """The smallest and largest offset at which the plan's blocks use each pair of phases."""
    ranges: dict[tuple[int, int], tuple[int, int]] = {}
    for phase, partner_phase, _, offset in plan.values():
        lo, hi = ranges.get((phase, partner_phase), (offset, offset))
        ranges[phase, partner_phase] = (min(lo, offset), max(hi, offset))
    return ranges


_CORRELATE_FROM = 32
"""Rows per phase from which :func:`_gram_by_shifts` correlates whole phases in one
``lax.conv``; shorter phases (a video stem's few frames) take one matmul per offset,
which XLA's CPU convolution runs far faster there (measured: 0.4 s vs 5.6 s)."""


def _gram_by_shifts(x: jax.Array, window: _Window) -> jax.Array:
    """``XᵀX`` of the patches of ``x``, computing the products that windows share once.

    Split the kernel offsets into ``a`` along the first spatial axis and ``u`` along
    the others (with the channels). Block ``(a, a')`` of the Gram matrix sums, over
    output rows ``i``, the products of input rows ``t = s·i + d·a`` and ``t + d·(a' −
    a)`` (``s``, ``d``: stride and dilation of that axis), each row unfolded along the
    other axes only. The sum depends on ``a`` only through which rows it runs over: the
    rows of one phase ``t mod s``, minus a few at either end. So per phase and shift
    ``Δ = a' − a ≥ 0`` the sum over *all* rows of the phase is taken once, as a 1-D
    correlation of the phase with itself (one ``lax.conv`` per pair of phases, which
    XLA runs as one large contraction), and each block subtracts the few rows it does
    not cover; blocks below the diagonal are transposes. For a 7x7/2 stem that is
    about 0.28 of the multiply-adds of the patches' Gram, for a 3x3/1 one 0.37, and
    the patches along the first axis are never materialized.
    """
    (k0, *k_rest), (s0, *s_rest), (d0, *d_rest) = window
    rows = _patches(x, _Window((1, *k_rest), (1, *s_rest), (1, *d_rest)))
    images, size0 = rows.shape[:2]
    m = math.prod(rows.shape[-2:])
    out0 = window.out(x.shape[1:-1])[0]
    if out0 == 0 or rows.size == 0:
        return jnp.zeros((k0 * m, k0 * m), x.dtype)
    plan = _shift_plan(k0, s0, d0)
    length = -(-size0 // s0)  # rows per phase, padded with zero rows
    reach = max(offset for *_, offset in plan.values())
    rows = rows.reshape(images, size0, -1, m)
    rows = jnp.pad(rows, ((0, 0), (0, (length + reach) * s0 - size0), (0, 0), (0, 0)))
    # (phase, row of the phase, images × positions, m)
    phases = rows.reshape(images, length + reach, s0, -1, m).transpose(2, 1, 0, 3, 4)
    phases = phases.reshape(s0, length + reach, -1, m)

    def rows_product(phase, partner_phase, offset, start, stop):
        """Σ over rows r in [start, stop) of phase rows r against partner rows r + offset."""
        a = phases[phase, start:stop].reshape(-1, m)
        b = phases[partner_phase, start + offset : stop + offset].reshape(-1, m)
        return jnp.matmul(a.T, b, precision=_HIGHEST)

    full = {}
    if length >= _CORRELATE_FROM:
        # Long phases: one 1-D correlation per pair of phases gives every offset at once;
        # XLA runs it as one large contraction. out[j, i, o] = Σ over positions and rows
        # r < length of phases[phase][r, :, i] · phases[partner_phase][r + o, :, j].
        # Each pair of phases is correlated over the offsets its blocks use only.
        channels_first = phases.transpose(0, 3, 2, 1)  # (phase, m, positions, row)
        for (phase, partner_phase), (lo, hi) in _offset_ranges(plan).items():
            out = jax.lax.conv_general_dilated(
                channels_first[partner_phase, :, :, lo : hi + length],
                channels_first[phase, :, :, :length],
                window_strides=(1,),
                padding='VALID',
                dimension_numbers=('NCH', 'OIH', 'NCH'),
                precision=_HIGHEST,
            )
            for offset in range(lo, hi + 1):
                full[phase, partner_phase, offset] = out[:, :, offset - lo].T
    else:  # short phases with many positions: one matmul per phase, partner and offset
        for phase, partner_phase, _, offset in plan.values():
            if (phase, partner_phase, offset) not in full:
                full[phase, partner_phase, offset] = rows_product(
                    phase, partner_phase, offset, 0, length
                )

    blocks = {}
    for (a, b), (phase, partner_phase, j0, offset) in plan.items():
        block = full[phase, partner_phase, offset]
        if j0 > 0:
            block = block - rows_product(phase, partner_phase, offset, 0, j0)
        if j0 + out0 < length:
            block = block - rows_product(phase, partner_phase, offset, j0 + out0, length)
        blocks[a, b] = block
    return _symmetric_from_upper(blocks, k0)


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


def dense_statistic(inputs: jax.Array, *, layout: Layout = 'features_last') -> Statistic:
    """The TrAct statistic of a Dense (Linear) layer's input.

    Every input vector is a row of ``X``, so ``inputs`` may have any leading dims. Call
    it on the layer's input inside the training step and pass the result, at the
    kernel's path, as ``tract_stats``; this is what the Flax layers record.

    Args:
      inputs: the layer's input, ``(..., in_features)``.
      layout: the layout of the kernel: ``'features_last'`` for ``(in, features)``
        (Flax, Haiku), ``'features_first'`` for ``(features, in)`` (Equinox, PyTorch).

    Returns:
      A :class:`GramStatistic`, or a :class:`RowStatistic` when there are fewer rows
      than ``in_features``; float32, or the input's dtype where wider; no gradient.

    Examples:
      >>> import jax.numpy as jnp, tract_jax
      >>> stat = tract_jax.dense_statistic(jnp.ones((4, 16, 48)))  # 64 rows of 48
      >>> stat.gram.shape, stat.count
      ((48, 48), Array(64., dtype=float32))
    """
    _check_layout(layout)
    return _global(lambda x: from_rows(dense_rows(x), layout), jnp.asarray(inputs))


def conv_statistic(
    inputs: jax.Array,
    kernel_size: int | Sequence[int],
    *,
    strides: int | Sequence[int] = 1,
    padding: Any = 'SAME',
    input_dilation: int | Sequence[int] = 1,
    kernel_dilation: int | Sequence[int] = 1,
    padding_mode: str = 'zeros',
    channels_last: bool = True,
    layout: Layout = 'features_last',
) -> Statistic:
    """The TrAct statistic of an N-D convolution's unfolded input.

    ``X`` has one row per image and output position and one column per kernel offset
    and input channel, in the kernel's flattening order for ``layout``. Call it on the
    conv's input inside the training step and pass the result, at the kernel's path,
    as ``tract_stats``; this is what the Flax layers record. Large batches are summed
    in chunks of at most :data:`MAX_CHUNK_BYTES` of patches.

    Args:
      inputs: the conv's input, ``(*batch, *spatial, in)`` if ``channels_last`` else
        ``(*batch, in, *spatial)``; the rank of ``kernel_size`` gives the spatial rank.
      kernel_size: the window, an int (1-D) or a sequence of ints.
      strides: the window strides.
      padding: as ``flax.linen.Conv`` and ``lax.conv_general_dilated`` take it:
        ``'SAME'``, ``'SAME_LOWER'``, ``'VALID'``, ``'CIRCULAR'``, ``'REFLECT'``,
        ``'CAUSAL'``, an int, or a ``(low, high)`` pair (or int) per spatial dim.
      input_dilation: the input (lhs) dilation.
      kernel_dilation: the kernel (rhs) dilation.
      padding_mode: the border's values when ``padding`` adds one: ``'zeros'``, or as
        Equinox's ``padding_mode``: ``'reflect'``, ``'replicate'``, ``'circular'``.
      channels_last: whether the channel axis is the last (Flax) or precedes the
        spatial axes (Equinox, PyTorch).
      layout: the layout of the kernel: ``'features_last'`` for
        ``(*window, in, features)`` (Flax), ``'features_first'`` for
        ``(features, in, *window)`` (Equinox, PyTorch).

    Returns:
      A :class:`GramStatistic`, or a :class:`RowStatistic` when there are fewer rows
      than the fan-in; float32, or the input's dtype where wider; no gradient.

    Raises:
      ValueError: for an unknown layout or padding mode, or a padding mode with input
        dilation.

    Examples:
      >>> import jax.numpy as jnp, tract_jax
      >>> images = jnp.ones((2, 3, 32, 32))  # NCHW, as for lax.conv with 'OIHW'
      >>> stat = tract_jax.conv_statistic(
      ...     images, (3, 3), padding=1, channels_last=False, layout='features_first')
      >>> stat.gram.shape, stat.count
      ((27, 27), Array(2048., dtype=float32))
    """
    kernel_size = _as_tuple(kernel_size, 1)
    if not channels_last:
        inputs = jnp.moveaxis(jnp.asarray(inputs), -len(kernel_size) - 1, -1)
    geometry = ConvGeometry(
        kernel_size, strides, padding, input_dilation, kernel_dilation, padding_mode
    )
    return geometry_statistic(inputs, geometry, layout=layout)


def geometry_statistic(
    inputs: jax.Array,
    geometry: ConvGeometry,
    *,
    layout: Layout = 'features_last',
    max_chunk_bytes: int | None = None,
    method: GramMethod = 'auto',
) -> Statistic:
    """The statistic of a channels-last convolution's unfolded input; see :func:`conv_rows`.

    The Gram matrix is the patches' ``XᵀX`` (``method='patches'``) or the same sum
    with the products that overlapping windows share computed once
    (``'shifts'``, :func:`_gram_by_shifts`); ``'auto'`` takes the one with clearly
    fewer multiply-adds for this geometry. When the working set of the whole batch
    would take more than ``max_chunk_bytes`` (default :data:`MAX_CHUNK_BYTES`), the
    Gram matrix is summed over chunks of images in a ``lax.scan``, so that only one
    chunk's patches exist at a time. All agree up to summation order.
    """
    _check_layout(layout)
    kernel_size = _as_tuple(geometry.kernel_size, 1)
    budget = MAX_CHUNK_BYTES if max_chunk_bytes is None else max_chunk_bytes
    stat = _global(
        functools.partial(_conv_statistic, geometry, method, budget), jnp.asarray(inputs)
    )
    return with_layout(stat, layout, math.prod(kernel_size))


GramMethod = Literal['auto', 'patches', 'shifts']


class _GramCost(NamedTuple):
    """Multiply-adds per image of each way to the Gram, and the bytes each holds."""

    patches: int
    shifts: int
    patches_bytes: int
    shifts_bytes: int
    overlap: bool  # whether windows overlap along the first axis, so that rows are shared
    rows: int  # rows of X per image
    fan_in: int


def _gram_cost(padded: Sequence[int], window: _Window, channels: int, itemsize: int) -> _GramCost:
    """What each formulation costs for one padded image of spatial size ``padded``."""
    out = window.out(padded)
    (k0, *k_rest), s0, d0 = window.kernel_size, window.strides[0], window.dilation[0]
    rest = math.prod(out[1:])  # positions along the other axes
    m = math.prod(k_rest) * channels
    length = -(-padded[0] // s0)
    plan = _shift_plan(k0, s0, d0)
    reach = max(offset for *_, offset in plan.values())
    correlated = sum(hi - lo + 1 for lo, hi in _offset_ranges(plan).values())
    # Each block subtracts the rows of its phase before j0 and after the output's.
    uncovered = sum(j0 + max(length - j0 - out[0], 0) for _, _, j0, _ in plan.values())
    return _GramCost(
        patches=out[0] * rest * (k0 * m) ** 2,
        shifts=(correlated * length + uncovered) * rest * m * m,
        patches_bytes=out[0] * rest * k0 * m * itemsize,
        shifts_bytes=(length + reach) * s0 * rest * m * itemsize,
        overlap=(k0 - 1) * d0 >= s0,
        rows=math.prod(out),
        fan_in=k0 * m,
    )


SHIFTS_BELOW = 0.95
SHIFTS_FROM_BYTES = 2**20
"""``'auto'`` sums the Gram by shifts where windows overlap along the first axis, that
takes at most ``SHIFTS_BELOW`` of the patches' multiply-adds, and an image's patches
would take at least ``SHIFTS_FROM_BYTES``. Measured on this project's CPU
(``python -m benchmarks.micro``): by shifts, a ResNet-50 stem's statistic (7x7/2,
224²) takes 0.32x the patches' time and a 3x7x7/1x2x2 video stem's 0.45x, while a
3x3/1 stem on 32² images is faster by patches (1.1 vs 1.4 ms); patch embeddings (no
overlap) stay with the patches' one matmul."""


def _cost(shape: Sequence[int], geometry: ConvGeometry, dtype: Any) -> _GramCost:
    rank = len(_as_tuple(geometry.kernel_size, 1))
    one = jax.ShapeDtypeStruct((1, *shape[-(rank + 1) :]), dtype)
    padded = jax.eval_shape(functools.partial(_padded, geometry=geometry), one)
    return _gram_cost(
        padded.shape[1:-1], _Window.of(geometry), padded.shape[-1], padded.dtype.itemsize
    )


def _choice(cost: _GramCost) -> str:
    shifts = (
        cost.overlap
        and cost.shifts <= SHIFTS_BELOW * cost.patches
        and cost.patches_bytes >= SHIFTS_FROM_BYTES
    )
    return 'shifts' if shifts else 'patches'


def chosen_method(shape: Sequence[int], geometry: ConvGeometry, dtype: Any = jnp.float32) -> str:
    """The formulation ``method='auto'`` takes for channels-last inputs of ``shape``."""
    return _choice(_cost(shape, geometry, dtype))


def _conv_statistic(
    geometry: ConvGeometry, method: GramMethod, budget: int, images: jax.Array
) -> Statistic:
    """The statistic of a batch of channels-last images, its Gram summed in chunks of
    images within ``budget`` bytes of patches, by ``method`` (see :func:`_gram_by_shifts`)."""
    rank = len(_as_tuple(geometry.kernel_size, 1))
    images = images.reshape((-1, *images.shape[-(rank + 1) :]))
    window = _Window.of(geometry)
    cost = _cost(images.shape, geometry, images.dtype)
    dtype = statistic_dtype(images.dtype)
    batch, rows_per_image, n = images.shape[0], cost.rows, cost.fan_in
    if batch * rows_per_image < n:  # few rows: keep them
        return from_rows(conv_rows(images, geometry))
    if method == 'auto':
        method = _choice(cost)
    if method == 'shifts':
        per_image = cost.shifts_bytes

        def gram_of(images):
            return _gram_by_shifts(_padded(images, geometry), window)
    else:
        per_image = cost.patches_bytes

        def gram_of(images):
            return to_gram(RowStatistic(conv_rows(images, geometry))).gram

    count = jnp.asarray(batch * rows_per_image, dtype)
    chunk = max(1, budget // max(per_image, 1))
    if chunk >= batch:
        return GramStatistic(gram_of(images), count)

    # Zero images unfold to zero rows (every padding keeps zeros zero), so the batch is
    # padded to whole chunks and only the true rows are counted.
    num_chunks = -(-batch // chunk)
    images = jnp.pad(images, [(0, num_chunks * chunk - batch)] + [(0, 0)] * (rank + 1))
    images = images.reshape(num_chunks, chunk, *images.shape[1:])
    gram, _ = jax.lax.scan(
        lambda gram, chunk_images: (gram + gram_of(chunk_images), None),
        jnp.zeros((n, n), dtype),
        images,
    )
    return GramStatistic(gram, count)


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
        return GramStatistic(*jax.lax.psum((stat.gram, stat.count), axis_name), stat.layout)
    rows = stat.rows
    shards = jax.lax.psum(1, axis_name)
    block = jax.lax.axis_index(axis_name) * rows.shape[0]
    padded = jnp.zeros((shards * rows.shape[0], rows.shape[1]), rows.dtype)
    padded = jax.lax.dynamic_update_slice(padded, rows, (block, jnp.zeros_like(block)))
    return from_rows(jax.lax.psum(padded, axis_name), stat.layout)
