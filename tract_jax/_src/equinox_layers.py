"""Equinox front end: the statistic rides in the gradient of the pass it belongs to.

An Equinox model is an immutable pytree, so a layer cannot store what it saw. Instead
:class:`TrAct` wraps the first layer with two zero "probe" arrays whose *gradient* is
the layer's statistic: the backward pass of the wrapper returns ``XᵀX`` of this call's
input as the cotangent of one probe and the row count as the other's. So the statistic
is computed by, and only by, the gradient computation it preconditions: several calls
add up (cotangents sum), ``jax.vmap`` over examples sums over the batch (the probes are
not mapped), a sharded ``jit`` reduces it across devices, and ``filter_checkpoint``
cannot record twice. Nothing outlives the pass, because nothing is stored.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from tract_jax._src import statistic, statistics, transform, unfold

Layer = eqx.nn.Linear | eqx.nn.Conv


class _Spec(NamedTuple):
    """What the statistic of a call needs of its layer: static, hashable."""

    fan_in: int
    geometry: unfold.ConvGeometry | None  # None for a Linear
    dtype: Any

    @classmethod
    def of(cls, layer: Layer) -> _Spec:
        dtype = statistic.statistic_dtype(layer.weight.dtype)
        n = math.prod(layer.weight.shape[1:])
        if not isinstance(layer, eqx.nn.Conv):
            return cls(n, None, dtype)
        geometry = unfold.ConvGeometry(
            kernel_size=tuple(layer.kernel_size),
            strides=tuple(layer.stride),
            padding=layer.padding,
            kernel_dilation=tuple(layer.dilation),
            padding_mode=layer.padding_mode.lower(),
        )
        return cls(n, geometry, dtype)

    def statistic(self, x: jax.Array) -> statistic.GramStatistic:
        """The Gram statistic of one call's input ``x``, in the Equinox weight's layout."""
        if self.geometry is None:
            stat = statistics.dense_statistic(jnp.reshape(x, (-1, self.fan_in)), layout=_LAYOUT)
        else:
            channels_last = jnp.moveaxis(x, 0, -1)[None]  # (1, *spatial, in)
            stat = statistics.geometry_statistic(channels_last, self.geometry, layout=_LAYOUT)
        return statistic.to_gram(stat)


_LAYOUT: statistic.Layout = 'features_first'


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attach(spec: _Spec, gram: jax.Array, count: jax.Array, y: jax.Array, x: jax.Array):
    """``y`` unchanged; the backward pass gives ``gram`` and ``count`` the statistic of ``x``."""
    del spec, gram, count, x
    return y


def _attach_fwd(spec, gram, count, y, x):
    del spec, gram, count
    return y, x


def _attach_bwd(spec, x, y_cotangent):
    stat = spec.statistic(x)
    # The row count is a constant of x's shape; under vmap JAX would return one
    # example's constant as the (unmapped) cotangent instead of the sum over the batch.
    # A (zero) dependence on x makes it batched, so that it is summed like the Gram.
    count = stat.count + jnp.isnan(x.ravel()[:1]).sum().astype(stat.count.dtype) * 0
    return stat.gram.astype(spec.dtype), count.astype(spec.dtype), y_cotangent, jnp.zeros_like(x)


_attach.defvjp(_attach_fwd, _attach_bwd)


class TrAct(eqx.Module):
    """An Equinox ``Linear`` or ``Conv`` whose gradient also carries its TrAct statistic.

    Calls the wrapped layer unchanged (same outputs, same weight gradients). Its two
    extra arrays, ``tract_gram`` ``(n, n)`` and ``tract_count`` ``()``, are zeros that
    the forward pass never reads; in the gradient they hold the sum of ``XᵀX`` over
    every call of this pass and the number of rows. :func:`split_stats` takes them out
    of the gradient for :func:`tract_jax.tract`. Build it with :func:`convert`.

    Attributes:
      layer: the wrapped ``eqx.nn.Linear`` or ``eqx.nn.Conv`` (1-D, 2-D, 3-D; every
        padding and padding mode, strides, dilation).
      tract_gram: zeros ``(n, n)``, float32 or the weight's dtype where wider.
      tract_count: a zero scalar of the same dtype.
    """

    layer: Layer
    tract_gram: jax.Array
    tract_count: jax.Array

    def __init__(self, layer: Layer):
        _check(layer)
        spec = _Spec.of(layer)
        self.layer = layer
        self.tract_gram = jnp.zeros((spec.fan_in, spec.fan_in), spec.dtype)
        self.tract_count = jnp.zeros((), spec.dtype)

    def __call__(self, x: jax.Array, *, key: Any = None) -> jax.Array:
        """The wrapped layer's output for one example ``x`` (vmap it as the layer)."""
        y = self.layer(x, key=key)
        x = jax.lax.stop_gradient(x)
        return _attach(_Spec.of(self.layer), self.tract_gram, self.tract_count, y, x)


def _check(layer: Any) -> None:
    if isinstance(layer, TrAct):
        raise TypeError('tract_jax.equinox.convert: this layer is converted already.')
    if not isinstance(layer, (eqx.nn.Linear, eqx.nn.Conv)) or isinstance(
        layer, eqx.nn.ConvTranspose
    ):
        raise TypeError(
            f'tract_jax.equinox.convert: got a {type(layer).__name__}; TrAct applies to an '
            'eqx.nn.Linear or eqx.nn.Conv{1,2,3}d (the first layer: a stem conv or patch '
            'embedding).'
        )
    if isinstance(layer, eqx.nn.Conv):
        statistics.check_conv_options(
            'tract_jax.equinox.convert',
            layer.groups,
            field='groups',
            instead='Convert a conv with groups=1.',
        )


def convert(model: Any, where: Callable[[Any], Any]) -> Any:
    """Wraps a model's first layer in :class:`TrAct`, keeping its weights.

    Args:
      model: an Equinox model (any pytree).
      where: selects the layer, as for ``eqx.tree_at``, e.g. ``lambda m: m.stem`` or
        ``lambda m: m.layers[0]``; it may also select several layers (a tuple).

    Returns:
      The model with the layer(s) replaced by ``TrAct(layer)``; outputs are unchanged.

    Raises:
      TypeError: if a selected node is not an ``eqx.nn.Linear`` or ``eqx.nn.Conv``.
      ValueError: for a grouped convolution.

    Examples:
      >>> import equinox as eqx, jax, jax.numpy as jnp, tract_jax.equinox
      >>> model = eqx.nn.Sequential([eqx.nn.Conv2d(3, 8, 3, key=jax.random.key(0))])
      >>> model = tract_jax.equinox.convert(model, lambda m: m.layers[0])
      >>> loss = lambda m, x: jnp.sum(jax.vmap(m)(x) ** 2)
      >>> grads = eqx.filter_grad(loss)(model, jnp.ones((2, 3, 8, 8)))
      >>> grads, stats = tract_jax.equinox.split_stats(grads)
      >>> stats['layers']['0']['layer']['weight'].count
      Array(72., dtype=float32)
    """
    return eqx.tree_at(where, model, replace_fn=TrAct)


def _is_tract(node: Any) -> bool:
    return isinstance(node, TrAct)


def split_stats(grads: Any) -> tuple[Any, dict[str, Any]]:
    """Takes the TrAct statistics out of an Equinox gradient, for :func:`tract_jax.tract`.

    Args:
      grads: the gradient of a model with :class:`TrAct` layers, e.g. from
        ``eqx.filter_value_and_grad``.

    Returns:
      ``(grads, tract_stats)``: the gradient with the probes' entries set to zero (so
      any optimizer leaves them alone), and a nested dict with each layer's
      :class:`GramStatistic` at its weight's path in the gradient tree, as ``tract``
      matches them (``{'stem': {'layer': {'weight': stat}}}``).

    Raises:
      ValueError: if the gradient has no TrAct layer, or a layer's probes have no
        gradient (the layer was not called, or not differentiated).
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(grads, is_leaf=_is_tract)
    stats: dict[str, Any] = {}
    for keys, node in flat:
        if not _is_tract(node):
            continue
        names = [transform.key_name(k) for k in keys]
        if node.tract_gram is None or node.tract_count is None:
            raise ValueError(
                f"tract_jax.equinox.split_stats: the TrAct layer at '{'/'.join(names)}' has "
                'no statistic in this gradient. Differentiate with respect to the whole '
                'layer (eqx.filter_grad over inexact arrays includes it).'
            )
        leaf = stats
        for name in names:
            leaf = leaf.setdefault(name, {})
        leaf['layer'] = {
            'weight': statistic.GramStatistic(
                node.tract_gram, node.tract_count, layout='features_first'
            )
        }
    if not stats:
        raise ValueError(
            'tract_jax.equinox.split_stats: the gradient has no TrAct layer. Wrap the first '
            'layer with tract_jax.equinox.convert(model, lambda m: m.stem) before training.'
        )
    zeroed = jax.tree.map(
        lambda node: (
            eqx.tree_at(
                lambda t: (t.tract_gram, t.tract_count),
                node,
                (jnp.zeros_like(node.tract_gram), jnp.zeros_like(node.tract_count)),
            )
            if _is_tract(node)
            else node
        ),
        grads,
        is_leaf=_is_tract,
    )
    return zeroed, stats
