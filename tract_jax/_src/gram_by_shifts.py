"""The Gram matrix of a convolution's patches without its patches: by shifts.

Overlapping windows share products: in a 7x7/2 stem, input rows ``t`` and ``t'`` meet
in every pair of kernel rows ``(a, a')`` with ``t' − t = a' − a``. This module sums
each such product once (the same second moment as KFAC-JAX's patches second moment,
formulated differently); ``choice.py`` decides where it pays.

Split the kernel offsets into ``a`` along the first spatial axis and ``u`` along the
others (with the channels). Block ``(a, a')`` of the Gram matrix sums, over output
rows ``i``, the products of input rows ``t = s·i + d·a`` and ``t + d·(a' − a)`` (``s``,
``d``: stride and dilation of that axis), each row unfolded along the other axes only.
The sum depends on ``a`` only through which rows it runs over: the rows of one phase
``t mod s``, minus a few at either end. So per phase and shift ``Δ = a' − a ≥ 0`` the
sum over *all* rows of the phase is taken once, as a 1-D correlation of the phase with
itself (one ``lax.conv`` per pair of phases, one large contraction), and each block
subtracts the few rows it does not cover; blocks below the diagonal are transposes.
For a 7x7/2 stem that is about 0.28 of the multiply-adds of the patches' Gram, for a
3x3/1 one 0.37, and the patches along the first axis are never materialized.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from tract_jax._src import gram, unfold

ShiftPlan = dict[tuple[int, int], tuple[int, int, int, int]]


def shift_plan(k0: int, s0: int, d0: int) -> ShiftPlan:
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


def reach(plan: ShiftPlan) -> int:
    """The furthest offset between a block's rows and its partner's, in rows of a phase."""
    return max(offset for *_, offset in plan.values())


def offset_ranges(plan: ShiftPlan) -> dict[tuple[int, int], tuple[int, int]]:
    """The smallest and largest offset at which the plan's blocks use each pair of phases."""
    ranges: dict[tuple[int, int], tuple[int, int]] = {}
    for phase, partner_phase, _, offset in plan.values():
        lo, hi = ranges.get((phase, partner_phase), (offset, offset))
        ranges[phase, partner_phase] = (min(lo, offset), max(hi, offset))
    return ranges


def gram_by_shifts(
    x: jax.Array,
    window: unfold.Window,
    *,
    correlate_from: int,
    precision: jax.lax.PrecisionLike,
    keep_images: bool = False,
) -> jax.Array:
    """``XᵀX`` of the patches of the padded input ``x``, each shared product once.

    Phases of at least ``correlate_from`` rows are correlated whole in one
    ``lax.conv`` per pair of phases; shorter ones (a video stem's few frames) take one
    matmul per phase, partner and offset. With ``keep_images`` (a batch that may lie
    split over devices) those products contract over rows and images without merging
    them, so that the batch stays split (``gram.rows_product``).
    """
    (k0, *k_rest), (s0, *s_rest), (d0, *d_rest) = window
    rows = unfold.patches(x, unfold.Window((1, *k_rest), (1, *s_rest), (1, *d_rest)))
    images, size0 = rows.shape[:2]
    m = math.prod(rows.shape[-2:])
    out0 = window.out(x.shape[1:-1])[0]
    if out0 == 0 or rows.size == 0:
        return jnp.zeros((k0 * m, k0 * m), x.dtype)
    plan = shift_plan(k0, s0, d0)
    length = -(-size0 // s0)  # rows per phase, padded with zero rows
    extra = reach(plan)
    rows = rows.reshape(images, size0, -1, m)
    rows = jnp.pad(rows, ((0, 0), (0, (length + extra) * s0 - size0), (0, 0), (0, 0)))
    # (phase, row of the phase, images × positions, m)
    phases = rows.reshape(images, length + extra, s0, -1, m).transpose(2, 1, 0, 3, 4)
    phases = phases.reshape(s0, length + extra, -1, m)

    def rows_product(phase, partner_phase, offset, start, stop):
        """Σ over rows r in [start, stop) of phase rows r against partner rows r + offset."""
        a = phases[phase, start:stop]
        b = phases[partner_phase, start + offset : stop + offset]
        if not keep_images:
            a, b = a.reshape(-1, m), b.reshape(-1, m)
        return gram.rows_product(a, b, precision)

    full: dict[tuple[int, int, int], jax.Array] = {}
    if length >= correlate_from:
        # One 1-D correlation per pair of phases gives every offset at once:
        # out[j, i, o] = Σ over positions and rows r < length of
        # phases[phase][r, :, i] · phases[partner_phase][r + o, :, j], over the offsets
        # the pair's blocks use only.
        channels_first = phases.transpose(0, 3, 2, 1)  # (phase, m, positions, row)
        for (phase, partner_phase), (lo, hi) in offset_ranges(plan).items():
            out = jax.lax.conv_general_dilated(
                channels_first[partner_phase, :, :, lo : hi + length],
                channels_first[phase, :, :, :length],
                window_strides=(1,),
                padding='VALID',
                dimension_numbers=('NCH', 'OIH', 'NCH'),
                precision=precision,
            )
            for offset in range(lo, hi + 1):
                full[phase, partner_phase, offset] = out[:, :, offset - lo].T
    blocks = shifted_blocks(plan, full, rows_product, out0, length)
    return gram.symmetric_from_upper(blocks, k0)


Product = Callable[[int, int, int, int, int], jax.Array]


def shifted_blocks(
    plan: ShiftPlan,
    full: dict[tuple[int, int, int], jax.Array],
    product: Product,
    out0: int,
    length: int,
) -> dict[tuple[int, int], jax.Array]:
    """The plan's blocks ``(a, a + Δ)``: each pair of phases' product over all ``length``
    rows at the block's offset (from ``full``, or ``product(phase, partner, offset, 0,
    length)`` where missing), less the rows before the block's first and after its last.
    ``product(phase, partner, offset, start, stop)`` sums rows ``[start, stop)`` of the
    phase against rows ``[start + offset, stop + offset)`` of the partner phase."""
    blocks = {}
    for (a, b), (phase, partner_phase, j0, offset) in plan.items():
        key = (phase, partner_phase, offset)
        if key not in full:
            full[key] = product(*key, 0, length)
        block = full[key]
        if j0 > 0:
            block = block - product(*key, 0, j0)
        if j0 + out0 < length:
            block = block - product(*key, j0 + out0, length)
        blocks[a, b] = block
    return blocks


def multiply_adds(padded: list[int], window: unfold.Window, channels: int) -> int:
    """Multiply-adds per image of :func:`gram_by_shifts` on a padded image of that size."""
    out = window.out(padded)
    (k0, *k_rest), s0, d0 = window.kernel_size, window.strides[0], window.dilation[0]
    m = math.prod(k_rest) * channels
    length = -(-padded[0] // s0)
    plan = shift_plan(k0, s0, d0)
    correlated = sum(hi - lo + 1 for lo, hi in offset_ranges(plan).values())
    # Each block subtracts the rows of its phase before j0 and after the output's.
    uncovered = sum(j0 + max(length - j0 - out[0], 0) for _, _, j0, _ in plan.values())
    return (correlated * length + uncovered) * math.prod(out[1:]) * m * m


def bytes_held(padded: list[int], window: unfold.Window, channels: int, itemsize: int) -> int:
    """Bytes per image that :func:`gram_by_shifts` holds: the rows unfolded along the
    other axes, in phases."""
    out = window.out(padded)
    (k0, *k_rest), s0, d0 = window.kernel_size, window.strides[0], window.dilation[0]
    extra = reach(shift_plan(k0, s0, d0))
    length = -(-padded[0] // s0)
    return (length + extra) * s0 * math.prod(out[1:]) * math.prod(k_rest) * channels * itemsize
