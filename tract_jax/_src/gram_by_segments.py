"""The Gram matrix of a 2-D convolution's patches from whole segments of image rows.

A TPU multiplies 128x128 tiles and lays an array's last dim across 128 lanes. A stem's
patches are narrow (3 channels: a 7x7 window's row of 21 values, a 3x3 window's 9), so
the patches' Gram and the Gram by shifts of ``gram_by_shifts.py`` fill a sixth of
the lanes and copy the image into that layout first. Here a row's unit is a *segment*:
the input columns that ``J`` neighbouring output columns read, all channels, ``c·w``
values (``w = s·(J − 1) + d·(k − 1) + 1`` columns), ``J`` chosen so that the
segments fill the lanes (a ResNet-50 stem: ``J = 8``, 63 values, 126 with its two phases
side by side; a CIFAR stem: the whole 34-column row, 102 values).

Each pair of kernel rows ``(a, a')`` is then the product of segment rows ``t`` and
``t + d·(a' − a)`` summed over images, segments and output rows; as in
``gram_by_shifts.py``, the sum over one phase's rows is taken once per offset and
each block subtracts the few rows it does not cover. The segments are cut by one
convolution with a 0/1 kernel, which XLA:TPU reads from the layout a batch of images
comes in and writes with the rows of the ``s`` phases side by side (``s·c·w`` values)
and the images minor; every offset of every pair of phases is then one convolution
whose window is a whole phase, contracting over rows, segments and images, so that
the segments are read once (a product per phase, partner and offset read its rows
each time: 14 reads of half the segments in a ResNet-50 stem, which bounded its
cost). A block is ``(c·w)²``; the ``(k·c)²`` block of the Gram is
the sum, over the ``J`` output columns of a segment, of the sub-blocks at their
columns, picked by a 0/1 matrix (two small products at HIGHEST: exact).

Where a whole unpadded image row fits the lanes and the window moves one row at a time
(a CIFAR stem: 32 columns x 3 channels, 96 values), the segments are the image rows
themselves, in XLA:TPU's layout a bitcast of the images (rows, then channels, then
columns, the images in the lanes): nothing is cut and the zero padding is never
written. The products of every row offset are then one convolution over the rows,
each block subtracts the few rows its window does not cover (or the padding does),
and the picks skip the padded columns.

``choice.py`` decides where it pays (XLA:TPU's prices there); any platform runs it.
"""

from __future__ import annotations

import functools
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np

from tract_jax._src import gram, gram_by_shifts, unfold

Pads = tuple[tuple[int, int], ...] | list[tuple[int, int]]


def segment_width(columns: int, window: unfold.Window) -> int:
    """Input columns that ``columns`` neighbouring output columns read along the last
    spatial axis."""
    k, s, d = window.kernel_size[-1], window.strides[-1], window.dilation[-1]
    return s * (columns - 1) + d * (k - 1) + 1


def segment_columns(window: unfold.Window, out_last: int, channels: int, lanes: int) -> int:
    """Output columns per segment ``J``: the divisor of ``out_last`` that leaves the
    fewest tiles of ``lanes`` to multiply at each row offset, ``out_last / J`` segments
    of ``s·c·w`` values each (the rows of the ``s`` phases side by side) times
    ``⌈s·c·w / lanes⌉²``; the widest of equals.

    A ResNet-50 stem (7x7/2): ``J = 8``, 63 values a phase, 126 side by side, one tile
    for 14 segments; ``J = 16`` (111 values, 222) took four for 7. A CIFAR stem (3x3/1):
    the whole row, 102 values."""
    s0 = window.strides[0]

    def tiles(j: int) -> tuple[int, int]:
        values = s0 * channels * segment_width(j, window)
        return out_last // j * math.ceil(values / lanes) ** 2, -j

    return min((j for j in range(1, out_last + 1) if out_last % j == 0), key=tiles, default=1)


def fits(window: unfold.Window, channels: int, lanes: int) -> bool:
    """Whether one output column's segment holds at most ``lanes`` values."""
    return len(window.kernel_size) == 2 and segment_width(1, window) * channels <= lanes


def _last_row(size0: int, s0: int, phase: int, partner: int, offset: int, stop: int) -> int:
    """``stop``, or the first row of the phase past which either phase has no rows left
    (the rest of the sum is zeros, not computed)."""
    rows = [-(-(size0 - p) // s0) for p in (phase, partner)]
    return min(stop, rows[0], rows[1] - offset)


def _selection(
    columns: int, width: int, window: unfold.Window, channels: int, skipped: int = 0
) -> np.ndarray:
    """``(c·w, J, k·c)`` 0/1: segment value ``(channel, column)`` of output column ``j``'s
    patch entry ``(offset, channel)``, for segments that start ``skipped`` columns into
    the padded row (entries in the columns left out are zeros: no value)."""
    k, s, d = window.kernel_size[-1], window.strides[-1], window.dilation[-1]
    j, u, c = np.meshgrid(np.arange(columns), np.arange(k), np.arange(channels), indexing='ij')
    column = s * j + d * u - skipped
    inside = (column >= 0) & (column < width)
    picks = np.zeros((channels * width, columns, k * channels), np.float32)
    picks[(c * width + column)[inside], j[inside], (u * channels + c)[inside]] = 1
    return picks


def _assemble(blocks: dict[tuple[int, int], jax.Array], picks: np.ndarray, k0: int) -> jax.Array:
    """The Gram from its blocks of segment values: each ``(k·c)²`` block is the sum over
    output columns of the sub-blocks at their columns, picked by the 0/1 ``picks``
    (two small products at HIGHEST: exact)."""
    stacked = jnp.stack(list(blocks.values()))
    picks = jnp.asarray(picks, stacked.dtype)
    highest = jax.lax.Precision.HIGHEST
    picked = jnp.einsum('bpq,qjy->bpjy', stacked, picks, precision=highest)
    picked = jnp.einsum('pjx,bpjy->bxy', picks, picked, precision=highest)
    return gram.symmetric_from_upper(dict(zip(blocks, picked, strict=True)), k0)


def whole_rows(
    shape: tuple[int, ...], window: unfold.Window, lanes: int, pads: Pads = ((0, 0), (0, 0))
) -> bool:
    """Whether the segments of unpadded images of ``shape`` (``images, rows, columns,
    channels``), padded with ``pads`` zeros, are their whole rows: there are some, a row
    fits the lanes, the padding adds zeros (none cropped) and the window moves one row
    at a time (stride and dilation 1 along the rows)."""
    return (
        len(window.kernel_size) == 2
        and window.strides[0] == 1
        and window.dilation[0] == 1
        and shape[2] * shape[3] <= lanes
        and math.prod(shape) > 0
        and min(min(p) for p in pads) >= 0
    )


def _row_products(
    rows: int, k0: int, low: int, out0: int
) -> dict[tuple[int, int], tuple[bool, list[tuple[int, int]]]]:
    """How :func:`_by_whole_rows` makes each block ``(a, a + Δ)`` of a stride-1 window
    over ``rows`` unpadded rows below ``low`` zero rows: ``(True, ranges)``, the
    offset-``Δ`` product of all rows less the products of rows ``[start, stop)`` in
    ``ranges``, or ``(False, ranges)``, the sum of those products alone (where fewer
    rows are in the block than out of it; no range: zeros). A range's product pairs
    its rows with the rows ``Δ`` below."""
    found = {}
    for delta in range(k0):
        for a in range(k0 - delta):
            first, stop = max(a - low, 0), min(a - low + out0, rows - delta)
            if stop - first <= (rows - delta) - (stop - first):
                found[a, a + delta] = (False, [(first, stop)] if stop > first else [])
            else:
                out = [(0, first)] if first > 0 else []
                out += [(stop, rows - delta)] if stop < rows - delta else []
                found[a, a + delta] = (True, out)
    return found


def _by_whole_rows(
    x: jax.Array, window: unfold.Window, pads: Pads, precision: jax.lax.PrecisionLike
) -> jax.Array:
    """:func:`gram_by_segments` where :func:`whole_rows` holds: the image rows are the
    segments, unpadded; every row offset's product in one convolution over the rows."""
    (k0, _), (low0, high0), (low1, high1) = window.kernel_size, *pads
    images, rows, width, channels = x.shape
    out0, out1 = window.out([rows + low0 + high0, width + low1 + high1])
    m = channels * width
    # (row, value, image), values (channel, column): XLA:TPU's layout of the images.
    segments = x.transpose(1, 3, 2, 0).reshape(rows, m, images)

    def product(start: int, stop: int, delta: int) -> jax.Array:
        a, b = segments[start:stop], segments[start + delta : stop + delta]
        return jax.lax.dot_general(a, b, (((0, 2), (0, 2)), ((), ())), precision=precision)

    # offset[Δ][p, q] = Σ_r segments[r + Δ, p] segments[r, q], all rows r (zeros past
    # the last): one convolution whose window is the whole image.
    offset = jax.lax.conv_general_dilated(
        segments,
        segments,
        (1,),
        [(0, k0 - 1)],
        dimension_numbers=('WNC', 'WOI', 'WNC'),
        precision=precision,
    )
    blocks = {}
    for (a, b), (from_offset, ranges) in _row_products(rows, k0, low0, out0).items():
        products = [product(start, stop, b - a) for start, stop in ranges]
        if from_offset:
            blocks[a, b] = functools.reduce(operator.sub, products, offset[b - a].T)
        else:
            blocks[a, b] = sum(products, jnp.zeros((m, m), x.dtype))
    return _assemble(blocks, _selection(out1, width, window, channels, low1), k0)


def _cut(
    x: jax.Array,
    width: int,
    stride: int,
    count: int,
    phases: int,
    precision: jax.lax.PrecisionLike,
) -> jax.Array:
    """``(row of a phase, segment, (phase, value), image)``: the ``count`` segments of
    ``width`` columns every ``stride`` columns of each padded image row, values
    ``(channel, column)``, the rows of the ``phases`` phases side by side (``x``'s rows
    a multiple of ``phases``).

    Cut by one convolution with a 0/1 kernel (each output feature picks one value of
    its window, ``phases`` rows high and strided alike). XLA:TPU then reads the images
    once, in the layout they come in, and writes the segments in the layout the
    products read; slices and a stack took four passes there (a copy of the images, a
    padded transpose, the slices, their stack: 1.6M estimated cycles of the ResNet-50
    step on v5e, against the convolution's 0.29M), and the phases interleaved after a
    cut of single rows, a copy of the segments (0.15M on v6e).

    The cut runs at the ``precision`` of the products it feeds, which keeps of each
    value what they read: at HIGHEST it is exact (six bfloat16 passes hold all 24 bits
    of a float32 times 1); at HIGH (three passes, the TPU plan's) it keeps the value's
    two bfloat16 parts, ``hi + lo``, which a HIGH product splits back into ``hi`` and
    ``lo`` (or, where ``lo`` rounded to half a unit of ``hi``, into another pair of the
    same sum, which differs only in the ``lo·lo`` term bf16_3x leaves out anyway); at
    DEFAULT, ``hi``. The emulated update is the same to three digits (``tests``). (A
    TPU's passes cost the 7x7/2 stem's cut of 16-column segments, which multiplies both
    phases' rows, 0.57M of the v5e step's estimated cycles at HIGHEST, 0.29M at HIGH.)
    """
    channels, size1 = x.shape[-1], x.shape[2]
    m = channels * width
    picks = np.zeros((phases, width, channels, phases * m), np.float32)
    phase, column, channel = np.meshgrid(
        np.arange(phases), np.arange(width), np.arange(channels), indexing='ij'
    )
    picks[phase, column, channel, phase * m + channel * width + column] = 1
    segments = jax.lax.conv_general_dilated(
        x,
        jnp.asarray(picks, x.dtype),
        (phases, stride),
        [(0, 0), (0, max(stride * (count - 1) + width - size1, 0))],
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        precision=precision,
    )
    return segments.transpose(1, 2, 3, 0)


def gram_by_segments(
    x: jax.Array,
    window: unfold.Window,
    *,
    lanes: int,
    precision: jax.lax.PrecisionLike,
    pads: Pads = ((0, 0), (0, 0)),
) -> jax.Array:
    """``XᵀX`` of the patches of the 2-D input ``x`` (``images, rows, columns,
    channels``) padded with ``pads`` zeros (``(low, high)`` per spatial dim; ``window``
    slides over the padded input), from segments of at most ``lanes`` values (see the
    module docstring)."""
    if len(window.kernel_size) != 2:
        raise ValueError(
            f'tract_jax: the Gram by segments is for 2-D convolutions; this one has '
            f'{len(window.kernel_size)} spatial dims. Use method="patches" or "shifts".'
        )
    if whole_rows(x.shape, window, lanes, pads):
        return _by_whole_rows(x, window, pads, precision)
    (k0, k1), (s0, s1), _ = window
    images, channels = x.shape[0], x.shape[-1]
    size0, size1 = (size + sum(p) for size, p in zip(x.shape[1:3], pads, strict=True))
    out0, out1 = window.out([size0, size1])
    if out0 == 0 or out1 == 0 or images == 0:
        return jnp.zeros((k0 * k1 * channels,) * 2, x.dtype)
    length = -(-size0 // s0)  # rows per phase, the last ones zeros where phases differ
    (low0, high0), (low1, high1) = pads
    x = jax.lax.pad(
        x,
        jnp.zeros((), x.dtype),
        [(0, 0, 0), (low0, high0 + length * s0 - size0, 0), (low1, high1, 0), (0, 0, 0)],
    )
    columns = segment_columns(window, out1, channels, lanes)
    width, stride, count = segment_width(columns, window), s1 * columns, out1 // columns
    m = channels * width
    segments = _cut(x, width, stride, count, s0, precision)
    plan = gram_by_shifts.shift_plan(k0, s0, window.dilation[0])
    reach = gram_by_shifts.reach(plan)
    # offsets[o, (q, i), (p, j)] = Σ over rows r, segments and images of phase q's row
    # r + o, value i, times phase p's row r, value j: every offset of every pair of
    # phases in one convolution whose window is a whole phase (zeros past the last row).
    offsets = jax.lax.conv_general_dilated(
        segments,
        segments,
        (1, 1),
        [(0, reach), (0, 0)],
        dimension_numbers=('HWNC', 'HWOI', 'HWNC'),
        precision=precision,
    )[:, 0]
    full = {
        (p, q, o): offsets[o, q * m : (q + 1) * m, p * m : (p + 1) * m].T
        for (p, q), (lo, hi) in gram_by_shifts.offset_ranges(plan).items()
        for o in range(lo, hi + 1)
    }

    def product(phase, partner, offset, start, stop):
        stop = _last_row(size0, s0, phase, partner, offset, stop)
        if stop <= start:
            return jnp.zeros((m, m), x.dtype)
        a = segments[start:stop, :, phase * m : (phase + 1) * m]
        b = segments[start + offset : stop + offset, :, partner * m : (partner + 1) * m]
        contract = (0, 1, 3)
        return jax.lax.dot_general(a, b, ((contract, contract), ((), ())), precision=precision)

    blocks = gram_by_shifts.shifted_blocks(plan, full, product, out0, length)
    return _assemble(blocks, _selection(columns, width, window, channels), k0)


def cost(
    padded: list[int],
    window: unfold.Window,
    channels: int,
    lanes: int,
    itemsize: int,
    pads: Pads | None = None,
) -> tuple[int, int]:
    """Multiply-adds and bytes held per image by :func:`gram_by_segments` on a padded
    image of that size (with ``pads``, the zeros of that padding: whole rows may apply):
    the convolution that cuts the segments and the one over the phases' rows (every
    offset of every pair of phases, over all rows), or by whole rows the convolution
    over the rows, and the products of the rows the blocks leave out (the 0/1 picks of
    the blocks are per batch, not per image); and the segments of every row."""
    out = window.out(padded)
    k0, s0, d0 = window.kernel_size[0], window.strides[0], window.dilation[0]
    if pads is not None:
        rows, width = (size - sum(p) for size, p in zip(padded, pads, strict=True))
        if whole_rows((1, rows, width, channels), window, lanes, pads):
            m = channels * width
            ranges = _row_products(rows, k0, pads[0][0], out[0]).values()
            products = sum(stop - start for _, found in ranges for start, stop in found)
            return (k0 * rows + products) * m * m, rows * m * itemsize
    columns = segment_columns(window, out[1], channels, lanes)
    count, m = out[1] // columns, channels * segment_width(columns, window)
    plan = gram_by_shifts.shift_plan(k0, s0, d0)
    length = -(-padded[0] // s0)
    reach = gram_by_shifts.reach(plan)

    def rows_of(phase, partner, offset, start, stop):
        return max(_last_row(padded[0], s0, phase, partner, offset, stop) - start, 0)

    uncovered = sum(
        rows_of(p, q, o, 0, j0) + rows_of(p, q, o, j0 + out[0], length)
        for p, q, j0, o in plan.values()
    )
    cut = length * count * s0 * s0 * m * m  # a (phases x width) window per phases x values
    offsets = (reach + 1) * length * count * (s0 * m) ** 2
    return cut + offsets + uncovered * count * m * m, length * s0 * count * m * itemsize
