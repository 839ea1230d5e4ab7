"""The Gram matrix of a 2-D convolution's patches from whole segments of image rows.

A TPU multiplies 128x128 tiles and lays an array's last dim across 128 lanes. A stem's
patches are narrow (3 channels: a 7x7 window's row of 21 values, a 3x3 window's 9), so
the patches' Gram and the Gram by shifts of ``gram_by_shifts.py`` fill a sixth of
the lanes and copy the image into that layout first. Here a row's unit is a *segment*:
the input columns that ``J`` neighbouring output columns read, all channels, ``c·w``
values (``w = s·(J − 1) + d·(k − 1) + 1`` columns), ``J`` chosen so that a segment
fills the lanes (a ResNet-50 stem: ``J = 16``, 111 values; a CIFAR stem: the whole
34-column row, 102 values).

Each pair of kernel rows ``(a, a')`` is then the product of segment rows ``t`` and
``t + d·(a' − a)`` summed over images, segments and output rows; as in
``gram_by_shifts.py``, the sum over one phase's rows is taken once per offset and
each block subtracts the few rows it does not cover. The products contract over the
images, the array's minor dim in the layout XLA:TPU gives a batch of images, and the
segments are cut by one convolution with a 0/1 kernel, which XLA:TPU reads from that
layout and writes in the products'. A block is ``(c·w)²``; the ``(k·c)²`` block of the Gram is
the sum, over the ``J`` output columns of a segment, of the sub-blocks at their
columns, picked by a 0/1 matrix (two small products at HIGHEST: exact).

``choice.py`` decides where it pays (XLA:TPU's prices there); any platform runs it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tract_jax._src import gram, gram_by_shifts, unfold


def segment_width(columns: int, window: unfold.Window) -> int:
    """Input columns that ``columns`` neighbouring output columns read along the last
    spatial axis."""
    k, s, d = window.kernel_size[-1], window.strides[-1], window.dilation[-1]
    return s * (columns - 1) + d * (k - 1) + 1


def segment_columns(window: unfold.Window, out_last: int, channels: int, lanes: int) -> int:
    """Output columns per segment: the largest divisor of ``out_last`` whose segment
    holds at most ``lanes`` values (at least 1)."""
    fits = [
        j
        for j in range(1, out_last + 1)
        if out_last % j == 0 and segment_width(j, window) * channels <= lanes
    ]
    return max(fits, default=1)


def fits(window: unfold.Window, channels: int, lanes: int) -> bool:
    """Whether one output column's segment holds at most ``lanes`` values."""
    return len(window.kernel_size) == 2 and segment_width(1, window) * channels <= lanes


def _last_row(size0: int, s0: int, phase: int, partner: int, offset: int, stop: int) -> int:
    """``stop``, or the first row of the phase past which either phase has no rows left
    (the rest of the sum is zeros, not computed)."""
    rows = [-(-(size0 - p) // s0) for p in (phase, partner)]
    return min(stop, rows[0], rows[1] - offset)


def _selection(columns: int, width: int, window: unfold.Window, channels: int) -> np.ndarray:
    """``(c·w, J, k·c)`` 0/1: segment value ``(channel, column)`` of output column ``j``'s
    patch entry ``(offset, channel)``."""
    k, s, d = window.kernel_size[-1], window.strides[-1], window.dilation[-1]
    j, u, c = np.meshgrid(np.arange(columns), np.arange(k), np.arange(channels), indexing='ij')
    picks = np.zeros((channels * width, columns, k * channels), np.float32)
    picks[c * width + s * j + d * u, j, u * channels + c] = 1
    return picks


def _cut(x: jax.Array, width: int, stride: int, count: int) -> jax.Array:
    """``(row, segment, value, image)``: the ``count`` segments of ``width`` columns every
    ``stride`` columns of each padded image row, values ``(channel, column)``.

    Cut by one convolution with a 0/1 kernel (each output feature picks one value of
    its window; HIGHEST, so exact: six bfloat16 passes on a TPU hold all 24 bits of a
    float32 times 1). XLA:TPU then reads the images once, in the layout they come in,
    and writes the segments in the layout the products read; slices and a stack took
    four passes there (a copy of the images, a padded transpose, the slices, their stack:
    1.6M estimated cycles of the ResNet-50 step on v5e, against the convolution's 0.29M).
    """
    channels, size1 = x.shape[-1], x.shape[2]
    m = channels * width
    picks = np.zeros((1, width, channels, m), np.float32)
    column, channel = np.meshgrid(np.arange(width), np.arange(channels), indexing='ij')
    picks[0, column, channel, channel * width + column] = 1
    segments = jax.lax.conv_general_dilated(
        x,
        jnp.asarray(picks, x.dtype),
        (1, stride),
        [(0, 0), (0, max(stride * (count - 1) + width - size1, 0))],
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        precision=jax.lax.Precision.HIGHEST,
    )
    return segments.transpose(1, 2, 3, 0)


def gram_by_segments(
    x: jax.Array, window: unfold.Window, *, lanes: int, precision: jax.lax.PrecisionLike
) -> jax.Array:
    """``XᵀX`` of the patches of the padded 2-D input ``x`` (``images, rows, columns,
    channels``), from segments of at most ``lanes`` values (see the module docstring)."""
    if len(window.kernel_size) != 2:
        raise ValueError(
            f'tract_jax: the Gram by segments is for 2-D convolutions; this one has '
            f'{len(window.kernel_size)} spatial dims. Use method="patches" or "shifts".'
        )
    (k0, k1), (s0, s1), _ = window
    images, size0, size1, channels = x.shape
    out0, out1 = window.out([size0, size1])
    if out0 == 0 or out1 == 0 or images == 0:
        return jnp.zeros((k0 * k1 * channels,) * 2, x.dtype)
    columns = segment_columns(window, out1, channels, lanes)
    width, stride, count = segment_width(columns, window), s1 * columns, out1 // columns
    m = channels * width
    segments = _cut(x, width, stride, count)

    def product(phase, partner, offset, start, stop):
        stop = _last_row(size0, s0, phase, partner, offset, stop)
        if stop <= start:
            return jnp.zeros((m, m), x.dtype)
        a = segments[phase + s0 * start : phase + s0 * (stop - 1) + 1 : s0]
        b = segments[partner + s0 * (start + offset) : partner + s0 * (stop + offset - 1) + 1 : s0]
        contract = (0, 1, 3)
        return jax.lax.dot_general(a, b, ((contract, contract), ((), ())), precision=precision)

    plan = gram_by_shifts.shift_plan(k0, s0, window.dilation[0])
    blocks = gram_by_shifts.shifted_blocks(plan, {}, product, out0, -(-size0 // s0))
    picks = jnp.asarray(_selection(columns, width, window, channels), x.dtype)
    stacked = jnp.stack(list(blocks.values()))
    highest = jax.lax.Precision.HIGHEST
    picked = jnp.einsum('bpq,qjy->bpjy', stacked, picks, precision=highest)
    picked = jnp.einsum('pjx,bpjy->bxy', picks, picked, precision=highest)
    return gram.symmetric_from_upper(dict(zip(blocks, picked, strict=True)), k0)


def cost(
    padded: list[int], window: unfold.Window, channels: int, lanes: int, itemsize: int
) -> tuple[int, int]:
    """Multiply-adds and bytes held per image by :func:`gram_by_segments` on a padded
    image of that size: the convolution that cuts the segments and the products of
    segment rows (the 0/1 picks of the blocks are per batch, not per image), and the
    segments of every row."""
    out = window.out(padded)
    columns = segment_columns(window, out[1], channels, lanes)
    count, m = out[1] // columns, channels * segment_width(columns, window)
    k0, s0, d0 = window.kernel_size[0], window.strides[0], window.dilation[0]
    plan = gram_by_shifts.shift_plan(k0, s0, d0)
    length = -(-padded[0] // s0)

    def rows(phase, partner, offset, start, stop):
        return max(_last_row(padded[0], s0, phase, partner, offset, stop) - start, 0)

    correlated = {(p, q, o) for p, q, _, o in plan.values()}
    summed = sum(rows(p, q, o, 0, length) for p, q, o in correlated)
    summed += sum(
        rows(p, q, o, 0, j0) + rows(p, q, o, j0 + out[0], length) for p, q, j0, o in plan.values()
    )
    cut = padded[0] * count * m * m
    return cut + summed * count * m * m, padded[0] * count * m * itemsize
