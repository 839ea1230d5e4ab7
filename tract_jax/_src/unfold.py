"""Conv geometry and unfolding: where a convolution reads its input, and its patches.

A statistic must see exactly the rows the layer multiplies: the input padded (zeros,
reflect, wrap, edge, causal), input-dilated and windowed as ``flax.linen.Conv``,
``flax.nnx.Conv`` or Equinox's ``Conv`` does. :func:`padded` gives the input as the
convolution reads it, so that a :class:`Window` then slides over it with no padding
left; :func:`patches` cuts the windows out (copies, no arithmetic); :func:`conv_rows`
flattens them into the rows of ``X`` in the kernel's ``features_last`` order.
Nothing here casts: the caller hands in the dtype the statistic is kept in.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tract_jax._src import internals


def as_tuple(value: int | Sequence[int] | None, rank: int) -> tuple[int, ...]:
    """A conv field (an int, a sequence, or ``None`` for 1) as one int per spatial dim."""
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

    @property
    def rank(self) -> int:
        """The number of spatial dims."""
        return len(as_tuple(self.kernel_size, 1))


class Window(NamedTuple):
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

    @property
    def offsets(self) -> int:
        """The number of kernel offsets (the fan-in is this times the channels)."""
        return math.prod(self.kernel_size)

    @classmethod
    def of(cls, geometry: ConvGeometry) -> Window:
        """The window of ``geometry`` once :func:`padded` has padded its input."""
        kernel_size = as_tuple(geometry.kernel_size, 1)
        rank = len(kernel_size)
        return cls(
            kernel_size,
            as_tuple(geometry.strides, rank),
            as_tuple(geometry.kernel_dilation, rank),
        )


def padded(inputs: jax.Array, geometry: ConvGeometry) -> jax.Array:
    """The input as the convolution reads it, ``(images, *spatial, channels)``, padded
    and input-dilated exactly as ``flax.linen.Conv`` (or Equinox) does; ``Window.of
    (geometry)`` then slides over it without padding. Leading batch dims are merged."""
    x, config = zero_padding(inputs, geometry)
    return jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *config, (0, 0, 0)])


def zero_padding(
    inputs: jax.Array, geometry: ConvGeometry
) -> tuple[jax.Array, list[tuple[int, int, int]]]:
    """:func:`padded`'s input before its zeros: ``(images, *spatial, channels)`` with any
    other padding mode applied, and the zeros ``lax.pad`` adds per spatial dim, ``(low,
    high, interior)`` (interior: the input dilation). Lets a statistic leave the zeros
    unwritten."""
    inputs = jax.lax.stop_gradient(jnp.asarray(inputs))
    rank = geometry.rank
    kernel_size = as_tuple(geometry.kernel_size, rank)
    strides, input_dilation, kernel_dilation = (
        as_tuple(v, rank)
        for v in (geometry.strides, geometry.input_dilation, geometry.kernel_dilation)
    )
    x = inputs.reshape((-1, *inputs.shape[-(rank + 1) :]))
    window = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation, strict=True)]

    # Flax pads CIRCULAR/REFLECT/CAUSAL itself, then runs a VALID convolution; so does
    # Equinox for a padding_mode other than zeros.
    pads = internals.canonicalize_padding(geometry.padding, rank)
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
    return x, [(lo, hi, d - 1) for (lo, hi), d in zip(pads, input_dilation, strict=True)]


def patches(x: jax.Array, window: Window, *, images_minor: bool = False) -> jax.Array:
    """``(images, *out, offsets, channels)``: every window of the padded input, offsets
    in row-major order (``(*out, images, offsets, channels)`` with ``images_minor``).
    One strided slice per kernel offset, or, for windows that tile the input, one
    reshape and transpose: a copy, no arithmetic."""
    batch, *spatial, channels = x.shape
    out = window.out(spatial)
    if window.strides == window.kernel_size and set(window.dilation) == {1}:
        return _tiles(x, window.kernel_size, out, images_minor)
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
    cut = jnp.stack(slices, axis=-2)
    return jnp.moveaxis(cut, 0, -3) if images_minor else cut


def _tiles(
    x: jax.Array, kernel_size: tuple[int, ...], out: list[int], images_minor: bool
) -> jax.Array:
    """:func:`patches` of windows that tile the input (stride = kernel, no dilation): the
    image cut into tiles by one reshape and one transpose, not a slice per offset."""
    rank = len(kernel_size)
    batch, channels = x.shape[0], x.shape[-1]
    x = x[(slice(None), *(slice(o * k) for o, k in zip(out, kernel_size, strict=True)))]
    x = x.reshape(batch, *itertools.chain(*zip(out, kernel_size, strict=True)), channels)
    positions, offsets = list(range(1, 2 * rank, 2)), list(range(2, 2 * rank + 1, 2))
    order = [*positions, 0] if images_minor else [0, *positions]
    shape = [*out, batch] if images_minor else [batch, *out]
    return x.transpose([*order, *offsets, 2 * rank + 1]).reshape(
        *shape, math.prod(kernel_size), channels
    )


def conv_rows(
    inputs: jax.Array, geometry: ConvGeometry, *, images_minor: bool = False
) -> jax.Array:
    """Unfolded input of a Flax convolution, one row per (image, output position).

    Columns are in the order of ``kernel.reshape(-1, features)`` for a Flax kernel of
    shape ``(*kernel_size, in_features, features)``: spatial offsets outer, channels
    inner. Padding follows ``flax.linen.Conv`` exactly (``'SAME'``, ``'VALID'``,
    ``'CIRCULAR'``, ``'REFLECT'``, ``'CAUSAL'``, ints, pairs), as do strides, input
    and kernel dilation and leading batch dims. Rows run image-major, or with
    ``images_minor`` position-major (the same rows in another order: a sum over rows,
    such as the Gram, is unchanged, while XLA:TPU, which keeps a batch of images
    images-minor, then copies the patches without moving the images off its lanes).
    """
    cut = patches(padded(inputs, geometry), Window.of(geometry), images_minor=images_minor)
    return cut.reshape(-1, cut.shape[-2] * cut.shape[-1])


def dense_rows(inputs: jax.Array) -> jax.Array:
    """Unfolded input of a Dense layer: every input vector is a row."""
    inputs = jax.lax.stop_gradient(jnp.asarray(inputs))
    return inputs.reshape(-1, inputs.shape[-1])
