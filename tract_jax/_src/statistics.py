"""The public builders: a first layer's input in, its TrAct statistic out.

:func:`dense_statistic` and :func:`conv_statistic` are what every front end (linen,
NNX, Equinox, capture) calls, and what plain-JAX users call themselves. A conv's Gram
is built by the platform's :class:`~tract_jax._src.choice.Plan`: over patches, by
shifts or from segments of image rows, in chunks of images when the batch is large,
at the plan's precision. Under ``jit`` with explicitly sharded inputs the statistic
comes out replicated, the compiler summing the per-device parts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tract_jax._src import (
    choice,
    gram,
    gram_by_kernel,
    gram_by_segments,
    gram_by_shifts,
    internals,
    statistic,
    unfold,
)
from tract_jax._src.statistic import Layout, Statistic
from tract_jax._src.unfold import ConvGeometry


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
    with internals.use_abstract_mesh(mesh):
        return jax.sharding.auto_axes(fn, out_sharding=jax.sharding.PartitionSpec())(inputs)


def _in_statistic_dtype(inputs: jax.Array) -> jax.Array:
    inputs = jax.lax.stop_gradient(jnp.asarray(inputs))
    return inputs.astype(statistic.statistic_dtype(inputs.dtype))


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
    statistic.check_layout(layout)

    def of(inputs):
        return statistic.from_rows(unfold.dense_rows(_in_statistic_dtype(inputs)), layout)

    with jax.named_scope(statistic.STATISTIC_SCOPE):
        return _global(of, jnp.asarray(inputs))


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
    in chunks of images (see :func:`geometry_statistic`).

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
    kernel_size = unfold.as_tuple(kernel_size, 1)
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
    method: choice.GramMethod = 'auto',
    plan: choice.Plan | None = None,
) -> Statistic:
    """The statistic of a channels-last convolution's unfolded input; see ``conv_rows``.

    The Gram matrix is the patches' ``XᵀX`` (``method='patches'``), the same sum
    with the products that overlapping windows share computed once (``'shifts'``, see
    ``gram_by_shifts.py``), or, for a 2-D convolution, that sum over segments of image
    rows that fill a TPU's lanes (``'segments'``, see ``gram_by_segments.py``), or,
    for a 2-D convolution, in one Pallas kernel that never writes the patches
    (``'kernel'``, see ``gram_by_kernel.py``; Pallas's interpreter off a GPU);
    ``'auto'`` takes what the plan picks for this geometry.
    When the working set of the whole batch would take more than ``max_chunk_bytes``
    (default: the plan's), the Gram matrix is summed over chunks of images, so that
    only one chunk's patches exist at a time. ``plan`` (default: the plan of the
    platform the step is compiled for) forces one platform's choices anywhere, for
    tests and benchmarks. All agree up to summation order.
    """
    statistic.check_layout(layout)

    def of(inputs: jax.Array) -> Statistic:
        images = _in_statistic_dtype(inputs)
        images = images.reshape((-1, *images.shape[-(geometry.rank + 1) :]))
        cost = gram_cost(images.shape, geometry, images.dtype)
        if images.shape[0] * cost.rows < cost.fan_in:  # few rows: keep them
            return statistic.from_rows(unfold.conv_rows(images, geometry))

        split = math.gcd(images.shape[0], _mesh_size(images))  # the images', not a plan's

        def decide(plan: choice.Plan) -> _Sum:
            return _sum_for(plan, cost, images.shape[0], method, max_chunk_bytes, split)

        def run(how: _Sum, images: jax.Array) -> Statistic:
            count = jnp.asarray(images.shape[0] * cost.rows, images.dtype)
            return statistic.GramStatistic(_gram(how, geometry, images), count)

        if plan is None:
            return choice.per_platform(decide, run, images)
        return run(decide(plan), images)

    with jax.named_scope(statistic.STATISTIC_SCOPE):
        stat = _global(of, jnp.asarray(inputs))
        return statistic.with_layout(stat, layout, unfold.Window.of(geometry).offsets)


def gram_cost(
    shape: Sequence[int], geometry: ConvGeometry, dtype: Any = jnp.float32
) -> choice.GramCost:
    """What each formulation costs per image for channels-last inputs of ``shape``."""
    one = jax.ShapeDtypeStruct((1, *shape[-(geometry.rank + 1) :]), dtype)
    found = []

    def unpadded(images: jax.Array) -> jax.Array:
        x, zeros = _unpadded(images, geometry)
        found.append(zeros)
        return x

    x, (zeros,) = jax.eval_shape(unpadded, one), found
    padded = [size + low + high for size, (low, high) in zip(x.shape[1:-1], zeros, strict=True)]
    itemsize = statistic.statistic_dtype(dtype).itemsize
    return choice.gram_cost(padded, unfold.Window.of(geometry), x.shape[-1], itemsize, zeros=zeros)


def _unpadded(images: jax.Array, geometry: ConvGeometry) -> tuple[jax.Array, list[tuple[int, int]]]:
    """The images before the zeros ``unfold.padded`` adds, and those zeros, ``(low, high)``
    per spatial dim: what the Gram by segments takes (a dilated input comes padded, with
    no zeros left to add)."""
    x, config = unfold.zero_padding(images, geometry)
    if any(interior for *_, interior in config):
        return unfold.padded(images, geometry), [(0, 0)] * len(config)
    return x, [(low, high) for low, high, _ in config]


def chosen_method(
    shape: Sequence[int],
    geometry: ConvGeometry,
    dtype: Any = jnp.float32,
    plan: choice.Plan = choice.CPU,
) -> str:
    """The formulation ``method='auto'`` takes under ``plan`` for inputs of ``shape``."""
    return choice.method(gram_cost(shape, geometry, dtype), plan)


class _Sum(NamedTuple):
    """How one platform sums a conv Gram for one batch shape (hashable: platforms whose
    sums agree share one branch of the step)."""

    method: str  # 'patches', 'shifts', 'segments' or 'kernel'
    parts: int  # column blocks of the patches' Gram (< 2: one product)
    bands: bool  # the upper blocks a band per product
    precision: jax.lax.PrecisionLike
    chunk: int  # images per chunk
    scan: bool  # chunks in a lax.scan rather than unrolled
    images_minor: bool  # the patches' rows position-major, images minor
    split: bool  # the batch may lie split over devices: rows keep the images a dim apart
    interpret: bool  # a kernel in Pallas's interpreter (off a GPU)
    programs: int  # about how many kernel programs (0 for other methods)
    rows: int  # the fewest rows a kernel program multiplies (0 for other methods)


def _mesh_size(images: jax.Array) -> int:
    """The devices of the mesh ``images`` lie on (1 off a mesh): the most ways ``jit`` may
    split their batch. Known when the step is traced, also where the mesh's axes are
    ``Auto`` and the split itself is XLA's to choose."""
    mesh = getattr(jax.typeof(images).sharding, 'mesh', None)
    return 1 if mesh is None or mesh.empty else mesh.size


def _sum_for(
    plan: choice.Plan,
    cost: choice.GramCost,
    batch: int,
    method: choice.GramMethod,
    max_chunk_bytes: int | None,
    split: int = 1,
) -> _Sum:
    """How ``plan`` sums the Gram of ``batch`` images, which may lie split ``split`` ways
    over devices (``split`` divides ``batch``)."""
    if method == 'auto':
        method = choice.method(cost, plan)
    per_image = cost.of(method)[1]
    budget = plan.chunk_bytes if max_chunk_bytes is None else max_chunk_bytes
    chunk = _chunk(batch, split, max(1, budget // max(per_image, 1)))
    scan = plan.scan_chunks and chunk < batch
    minor = plan.images_minor_from is not None and cost.fan_in >= plan.images_minor_from
    parts, bands = choice.gram_blocks(cost.fan_in, plan) if method == 'patches' else (1, False)
    if minor and split > 1:
        # Rows that keep the images apart are sliced into bands by copies: on one v5e
        # chip ViT-S/16's statistic so took 1.56M estimated cycles in 3 bands, 1.22M in
        # one product (merged rows, off a mesh: 0.95M in bands).
        parts, bands = 1, False
    kernel = method == 'kernel'
    interpret = kernel and plan.name != choice.GPU.name
    programs, rows = (plan.kernel_programs, plan.kernel_rows) if kernel else (0, 0)
    return _Sum(
        method,
        parts,
        bands,
        plan.precision,
        chunk,
        scan,
        minor,
        split > 1,
        interpret,
        programs,
        rows,
    )


def _chunk(batch: int, split: int, most: int) -> int:
    """Images per chunk, so that each device of the ``split`` that may share the batch
    holds at most ``most`` of its images at a time; as few chunks as its share divides
    into (so that each chunk splits alike, see ``_gram``), or, where its share divides
    only into over half as many again, chunks of ``most`` images of the whole batch,
    the last padded with zero images (they add nothing)."""
    share = batch // split
    needed = -(-share // most)
    chunks = next(k for k in range(needed, share + 1) if share % k == 0)
    if 2 * chunks > 3 * needed:
        return min(most * split, batch)
    return batch // chunks


def _gram(how: _Sum, geometry: ConvGeometry, images: jax.Array) -> jax.Array:
    """The Gram of channels-last images' patches as ``how`` says: by patches, shifts or
    segments, over chunks of images.

    Chunk ``j`` of ``k`` holds images ``j, j + k, j + 2k, ...``: strided through the
    batch, not consecutive. When ``jit`` splits the batch over devices, each device
    then holds its share of every chunk and sums its own images (where ``k`` divides
    each device's share, as ``_chunk`` picks it); a chunk of consecutive images lay on
    a few devices, and XLA's partitioner moved it (a video stem's chunks: 16 MB of
    collective-permutes on 8 devices). Zero images (padding to whole chunks) unfold to
    zero rows and add nothing."""

    def gram_of(images: jax.Array) -> jax.Array:
        window = unfold.Window.of(geometry)
        if how.method == 'patches':
            cut = unfold.patches(
                unfold.padded(images, geometry), window, images_minor=how.images_minor
            )
            # On a mesh, rows (images, positions) or (positions, images): the images a dim
            # of their own, never merged with the positions (see gram.gram_of_rows). Off
            # one, merged: images-minor rows merge free in XLA:TPU's layout, where
            # contracting both dims cost ViT-S/16's statistic 1.6x the estimated cycles.
            n, batch = cut.shape[-2] * cut.shape[-1], images.shape[0]
            shape = (
                ((-1, batch, n) if how.images_minor else (batch, -1, n)) if how.split else (-1, n)
            )
            rows = cut.reshape(shape)
            return gram.gram_of_rows(
                rows, parts=how.parts, precision=how.precision, bands=how.bands
            )
        if how.method == 'shifts':
            return gram_by_shifts.gram_by_shifts(
                unfold.padded(images, geometry),
                window,
                correlate_from=choice.CORRELATE_FROM,
                precision=how.precision,
                keep_images=how.split,
            )
        x, zeros = _unpadded(images, geometry)  # segments need not write the zeros
        if how.method == 'kernel':
            return gram_by_kernel.gram_by_kernel(
                x,
                window,
                pads=zeros,
                programs=how.programs,
                rows=how.rows,
                precision=how.precision,
                interpret=how.interpret,
            )
        return gram_by_segments.gram_by_segments(
            x, window, lanes=choice.SEGMENT_LANES, precision=how.precision, pads=zeros
        )

    batch = images.shape[0]
    if how.chunk >= batch:
        return gram_of(images)
    count = -(-batch // how.chunk)
    images = jnp.pad(images, [(0, count * how.chunk - batch)] + [(0, 0)] * (images.ndim - 1))
    chunks = images.reshape(how.chunk, count, *images.shape[1:])
    if not how.scan:  # straight-line code, one chunk after another
        total = gram_of(chunks[:, 0])
        for j in range(1, chunks.shape[1]):
            total = total + gram_of(chunks[:, j])
        return total
    chunks = chunks.swapaxes(0, 1)  # the chunks along the leading dim, which scan takes
    total, _ = jax.lax.scan(
        lambda total, chunk: (total + gram_of(chunk), None), gram_of(chunks[0]), chunks[1:]
    )
    return total


def check_conv_options(
    layer: str,
    groups: int,
    mask: object = None,
    *,
    field: str = 'feature_group_count',
    instead: str = 'Use the plain Flax layer for it, or feature_group_count=1.',
) -> None:
    """Rejects conv options for which TrAct's update is not implemented; ``field`` and
    ``instead`` name the framework's grouping field and what to do instead."""
    if groups != 1:
        raise ValueError(
            f'{layer}: {field}={groups} (a grouped or depthwise convolution) is not '
            f'supported by TrAct, whose least-squares step is over the full fan-in. {instead}'
        )
    if mask is not None:
        raise ValueError(
            f'{layer}: a kernel mask is not supported by TrAct (the solve would move the '
            'masked weights). Use the plain Flax layer for a masked convolution.'
        )
