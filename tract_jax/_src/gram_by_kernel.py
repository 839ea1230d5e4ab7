"""The Gram matrix of a 2-D convolution's patches in one Pallas kernel, for GPUs.

XLA:GPU sums a stem's Gram over materialized patches: a ResNet-50 stem at batch 64
writes and reads 472 MB of them, 25x the bytes the layer needs (the image once, the
Gram once), and a ``n x n`` product where the Gram's upper triangle is all it needs.
Here one Pallas (Triton) kernel gathers each block of patch rows from the image where
it lies, in registers, and multiplies it straight into the Gram: no patch is written.

The Gram is cut into square blocks of patch entries; a program multiplies
one block ``(i, j)``, ``i <= j`` (those below are the transposes), over the output
positions of a chunk of images, ``ROWS`` positions at a time, and writes that partial
sum; XLA sums the chunks' partials. A patch entry ``(u, v, c)`` of output position
``(y, x)`` is image value ``(s·y + d·u − low, s·x + d·v − low', c)``, a zero where
that falls in the padding, which is never written. Patch entries run as the kernel's
``features_last`` rows do: kernel row, kernel column, channel.

Only a 2-D convolution with its zero padding (``statistics._unpadded``) comes here.
Off a GPU the kernel runs in Pallas's interpreter (correct, slow): it is for tests.
``choice.py`` says where a plan takes it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.experimental.pallas import triton as plgpu
from jax.sharding import NamedSharding, PartitionSpec

from tract_jax._src import unfold


def block_size(n: int) -> int:
    """Patch entries per side of a Gram block: 16, the least a Triton product takes, for a
    Gram of up to 64 entries (CIFAR stems: 27 entries in 2 blocks multiply 0.75x what one
    block of 32 does, 48 in 3: 0.5x); 32 above, where 16 would save under a tenth
    (ResNet-50's 147: 0.92x) for twice the gathered values per multiply-add."""
    return 16 if n <= 64 else 32


ROWS = 64
"""Output positions a program gathers and multiplies at a time."""

INDEX_LIMIT = 2**31 - 1
"""The kernel indexes image values and output positions with int32: a batch with more
is summed in parts that stay below (a 2,048-image 224² batch has 308M values)."""


def blocks(n: int) -> int:
    """Blocks of :func:`block_size` patch entries per side of an ``n``-entry Gram."""
    return -(-n // block_size(n))


def upper_blocks(n: int) -> int:
    """The blocks ``(i, j)``, ``i <= j``, of an ``n``-entry Gram: one program each per
    chunk of images."""
    k = blocks(n)
    return k * (k + 1) // 2


def multiply_adds(positions: int, n: int) -> int:
    """What the kernel multiplies for ``positions`` output positions (all images): the
    upper blocks, each ``block_size(n)²`` per position."""
    return positions * upper_blocks(n) * block_size(n) ** 2


def chunks(images: int, positions: int, n: int, programs: int, rows: int) -> tuple[int, int]:
    """``(chunks, images per chunk)``: how :func:`gram_by_kernel` cuts a batch of images
    of ``positions`` output positions each so that about ``programs`` programs multiply
    the upper blocks, each over at least ``rows`` rows (whole images)."""
    wanted = max(1, min(-(-programs // upper_blocks(n)), images))
    per_chunk = max(-(-images // wanted), min(-(-rows // max(positions, 1)), images))
    return -(-images // per_chunk), per_chunk


def partials_bytes(images: int, positions: int, n: int, programs: int, rows: int) -> int:
    """Bytes of the float32 partial sums the programs write (and XLA reads back to sum):
    a block per program."""
    count = chunks(images, positions, n, programs, rows)[0]
    return count * upper_blocks(n) * block_size(n) ** 2 * 4


def _block_of(pair: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Block ``(i, j)``, ``i <= j``, of upper block number ``pair`` (row by row)."""

    def first(row):  # the number of block row ``row``'s first block, ``(row, row)``
        return row * k - row * (row - 1) // 2

    i = sum((pair >= first(row)).astype(jnp.int32) for row in range(1, k))
    i = i + jnp.zeros_like(pair)  # an array where k = 1 (the sum of nothing is 0)
    return i, pair - first(i) + i


def _kernel(
    x_ref,
    out_ref,
    *,
    shape: tuple[int, int, int, int],
    window: unfold.Window,
    lows: tuple[int, int],
    out: tuple[int, int],
    per_chunk: int,
    precision: jax.lax.PrecisionLike,
):
    """One program: an upper Gram block over one chunk's images (grid ``(pair, chunk)``)."""
    images, height, width, channels = shape
    (k0, k1), (s0, s1), (d0, d1) = window
    n = k0 * k1 * channels
    size = block_size(n)
    i, j = _block_of(pl.program_id(0), blocks(n))
    positions = out[0] * out[1]
    first = pl.program_id(1) * per_chunk * positions
    stop = jnp.minimum(first + per_chunk * positions, images * positions)

    def columns(block):
        """The parts of block ``block``'s patch entries ``(u, v, c)`` that do not change
        from row to row (hoisted out of the loop): ``(d·u, d'·v, c, entry < n)``."""
        entry = block * size + jnp.arange(size)
        u, v, c = entry // (k1 * channels), entry // channels % k1, entry % channels
        return d0 * u, d1 * v, c, entry < n

    def gather(cols, image, y0, x0, row):
        """``(ROWS, size)``: a block's patch entries of the rows at these positions."""
        dy, dx, c, real = cols
        y = y0[:, None] + dy
        x = x0[:, None] + dx
        inside = row[:, None] & real & (y >= 0) & (y < height) & (x >= 0) & (x < width)
        flat = ((image[:, None] * height + y) * width + x) * channels + c
        flat = jnp.clip(flat, 0, images * height * width * channels - 1)
        return jnp.where(inside, x_ref[flat], 0)

    left_columns, right_columns = columns(i), columns(j)

    def step(t, acc):
        position = first + t * ROWS + jnp.arange(ROWS)
        image, rest = position // positions, position % positions
        y0 = rest // out[1] * s0 - lows[0]
        x0 = rest % out[1] * s1 - lows[1]
        row = position < stop
        left = gather(left_columns, image, y0, x0, row)
        right = gather(right_columns, image, y0, x0, row)
        dims = (((0,), (0,)), ((), ()))
        return acc + jax.lax.dot_general(
            left, right, dims, precision=precision, preferred_element_type=acc.dtype
        )

    steps = -(-per_chunk * positions // ROWS)
    out_ref[...] = jax.lax.fori_loop(0, steps, step, jnp.zeros((size, size), out_ref.dtype))


def gram_by_kernel(
    x: jax.Array,
    window: unfold.Window,
    *,
    pads: Sequence[tuple[int, int]],
    programs: int,
    rows: int,
    precision: jax.lax.PrecisionLike,
    interpret: bool,
) -> jax.Array:
    """``XᵀX`` of the patches of unpadded channels-last images ``x`` (``images, rows,
    columns, channels``) under ``window``, with ``pads`` zeros ``(low, high)`` per
    spatial dim around them, summed in one kernel.

    Args:
      x: the images, float32 (or float64 with ``interpret``).
      window: the convolution's window (2-D).
      pads: the zeros around the images, as ``statistics._unpadded`` gives them
        (negative: cropped).
      programs: about how many programs to run: the batch is cut into chunks of
        whole images, about ``programs`` over the upper blocks. More keep more of a GPU
        busy; each writes a block's partial sum.
      rows: the fewest rows (output positions) a program multiplies, so that its
        partial sum is small next to what it reads (a CIFAR patch embedding's 8x8
        positions would leave a program one step of ``ROWS``).
      precision: the products' precision (``HIGHEST``: true float32 on a GPU).
      interpret: run in Pallas's interpreter (any platform) rather than compiled by
        Triton (GPUs).

    Returns:
      The ``n x n`` Gram, ``n = k0·k1·channels``, in ``x``'s dtype.

    Raises:
      ValueError: for a window that is not 2-D.
    """
    if len(window.kernel_size) != 2 or x.ndim != 4:
        raise ValueError(
            f"tract_jax: method='kernel' sums the Gram of 2-D convolutions; this one has "
            f'{len(window.kernel_size)} spatial dims. Use the default (auto).'
        )
    images, height, width, channels = x.shape
    out = tuple(window.out([height + sum(pads[0]), width + sum(pads[1])]))
    if images > 1 and max(x.size, images * math.prod(out) + ROWS) > INDEX_LIMIT:
        half = functools.partial(
            gram_by_kernel,
            window=window,
            pads=pads,
            programs=programs,
            rows=rows,
            precision=precision,
            interpret=interpret,
        )
        return half(x[: images // 2]) + half(x[images // 2 :])
    if max(x.size, math.prod(out) + ROWS) > INDEX_LIMIT:
        raise ValueError(
            f'gram_by_kernel: one image of shape {x.shape[1:]} has more values or output '
            'positions than int32 indexes. Use another method.'
        )
    n = math.prod(window.kernel_size) * channels
    pads = tuple(tuple(pad) for pad in pads)
    sums = _upper_sums(x, window, pads, programs, rows, precision, interpret)
    return _assemble(sums, blocks(n))[:n, :n]


def _kernel_sums(
    x: jax.Array,
    window: unfold.Window,
    pads: tuple[tuple[int, int], ...],
    programs: int,
    rows: int,
    precision: jax.lax.PrecisionLike,
    interpret: bool,
) -> jax.Array:
    """``(upper blocks, size, size)``: each upper block summed over ``x``'s images."""
    images, height, width, channels = x.shape
    out = tuple(window.out([height + sum(pads[0]), width + sum(pads[1])]))
    n = math.prod(window.kernel_size) * channels
    count, per_chunk = chunks(images, math.prod(out), n, programs, rows)
    kernel = functools.partial(
        _kernel,
        shape=x.shape,
        window=window,
        lows=(pads[0][0], pads[1][0]),
        out=out,
        per_chunk=per_chunk,
        precision=precision,
    )
    pairs, size = upper_blocks(n), block_size(n)
    parts = pl.pallas_call(
        kernel,
        grid=(pairs, count),
        out_specs=pl.BlockSpec((None, None, size, size), lambda p, c: (p, c, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((pairs, count, size, size), x.dtype),
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name='tract_gram',
    )(x.reshape(-1))
    return parts.sum(1)


# XLA cannot split a custom call across devices: left alone, a batch sharded by jit
# would be gathered whole onto every device, each summing the whole Gram. So the call
# says how it splits: each device sums its own images, the sums added over the mesh
# axes the batch is sharded on (any other dim of the images replicated first).
_upper_sums = custom_partitioning(_kernel_sums, static_argnums=(1, 2, 3, 4, 5, 6))


def _replicated(*args: Any) -> NamedSharding:
    """The sums' sharding, whatever the images': on every device, whole."""
    mesh = args[-3]  # (static args..., mesh, operand shapes, result shape)
    return NamedSharding(mesh, PartitionSpec())


def _by_images(*args: Any) -> tuple[Any, ...]:
    """``(mesh, per-device computation, sums' sharding, images' sharding)``: the images
    split along the batch as they come, every other dim whole."""
    *static, mesh, operands, _ = args
    spec = getattr(operands[0].sharding, 'spec', ())
    batch = spec[0] if len(spec) else None
    axes = () if batch is None else batch if isinstance(batch, tuple) else (batch,)

    def lower(x: jax.Array) -> jax.Array:
        sums = _kernel_sums(x, *static)
        return jax.lax.psum(sums, axes) if axes else sums

    images = NamedSharding(mesh, PartitionSpec(batch))
    return mesh, lower, NamedSharding(mesh, PartitionSpec()), (images,)


_upper_sums.def_partition(
    _by_images, infer_sharding_from_operands=_replicated, sharding_rule='b h w c -> p i j'
)


def _assemble(upper: jax.Array, k: int) -> jax.Array:
    """The ``k·size`` square Gram from its upper blocks ``(pairs, size, size)``, row by
    row; a block below the diagonal is its mirror's transpose (one gather, one select).

    ``gram.symmetric_from_upper`` builds the same matrix block by block (``jnp.block``),
    which XLA:GPU launches as a kernel or so per block: compiled for an H100, ViT-S/16's
    statistic (24 blocks a side) took 130 thunks that way, 2 this way."""
    i, j = np.triu_indices(k)
    number = np.zeros((k, k), np.int32)
    number[i, j] = number[j, i] = np.arange(len(i))
    picked = upper[number]  # (k, k, size, size)
    below = np.tril(np.ones((k, k), bool), -1)[:, :, None, None]
    picked = jnp.where(below, picked.swapaxes(2, 3), picked)
    size = upper.shape[-1]
    return picked.swapaxes(1, 2).reshape(k * size, k * size)
