"""Sums over a batch of images, taken on the devices that hold the images.

A conv statistic is a sum over images: with the batch sharded by ``jit``, each device
should sum its own images and one all-reduce of the ``n x n`` result should follow.
XLA's partitioner finds that for a plain product of image-major rows, but not through
every layout a plan uses: rows with the images minor (the TPU's wide patches), phases
that merge images with positions (the Gram by shifts), chunks cut along the batch, a
Pallas call (which it cannot split at all). There it gathered the whole batch, or its
patches, onto every device: a ViT-B/16 step on a TPU v5e 2x2 moved 90 GB that way
where the plain step moves 330 MB.

:func:`sum_over_images` says how such a sum splits, whatever the plan inside it does:
``custom_partitioning`` hands each device its own images (the batch split as it
comes, any other dim whole) and adds the results over the mesh axes the batch is
sharded on. On one device, under ``shard_map``/``pmap`` (whose code is per device
already) and under ``vmap`` it is the plain sum.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable
from typing import Any

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec


def sum_over_images(fn: Callable[[jax.Array], jax.Array], images: jax.Array) -> jax.Array:
    """``fn(images)``, for an ``fn`` that sums over the images (the first dim), each
    device summing the images it holds when ``jit`` shards them.

    Args:
      fn: images (a batch along the first dim) to an array summed over them; traced
        again on each device's own images when the batch is sharded.
      images: the batch.

    Returns:
      ``fn(images)``, replicated on every device of the mesh.
    """
    if _in_manual_code():
        return fn(images)

    @jax.custom_batching.custom_vmap
    def summed(images: jax.Array) -> jax.Array:
        return split(images)

    @summed.def_vmap
    def _(axis_size: int, in_batched: list[bool], images: jax.Array) -> Any:
        del axis_size, in_batched  # only the images are an argument, and they are batched
        return jax.vmap(fn)(images), True  # each element its own sum: no split to say

    # Traced in a jit of its own: a plan's constants (0/1 picks) stay inside it, where
    # custom_partitioning takes none from the function it is handed.
    split = custom_partitioning(jax.jit(fn))
    split.def_partition(
        _by_images(fn),
        infer_sharding_from_operands=_replicated,
        sharding_rule=_rule(images.ndim, jax.eval_shape(fn, images).ndim),
    )
    return summed(images)


def _in_manual_code() -> bool:
    """Whether this is traced inside ``shard_map`` over some mesh axes: the code there is
    each device's already, and its sums are the user's to add (``axis_name``)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and jax.sharding.AxisType.Manual in mesh.axis_types


def _rule(operand_rank: int, result_rank: int) -> str:
    """Shardy's rule: no dim of the result follows a dim of the images."""
    letters = iter(string.ascii_lowercase)
    operand = ' '.join(next(letters) for _ in range(operand_rank))
    result = ' '.join(next(letters) for _ in range(result_rank))
    return f'{operand} -> {result}'


def _replicated(mesh: Any, operands: Any, result: Any) -> NamedSharding:
    """The sum's sharding, whatever the images': on every device, whole."""
    del operands, result
    return NamedSharding(mesh, PartitionSpec())


def _by_images(fn: Callable[[jax.Array], jax.Array]) -> Callable[..., Any]:
    """The partition rule of ``fn``'s sum: the images split along the batch as they come
    (whole where the batch does not divide evenly among the devices that split it),
    every other dim whole; each device's sum added over the batch's mesh axes."""

    def partition(mesh: Any, operands: Any, result: Any) -> tuple[Any, ...]:
        del result
        spec = getattr(operands[0].sharding, 'spec', ())
        batch = spec[0] if len(spec) else None
        axes = () if batch is None else batch if isinstance(batch, tuple) else (batch,)
        if operands[0].shape[0] % math.prod(mesh.shape[axis] for axis in axes):
            axes = ()

        def per_device(images: jax.Array) -> jax.Array:
            sums = fn(images)
            return jax.lax.psum(sums, axes) if axes else sums

        images = NamedSharding(mesh, PartitionSpec(axes or None))
        return mesh, per_device, NamedSharding(mesh, PartitionSpec()), (images,)

    return partition
