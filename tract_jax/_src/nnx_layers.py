"""Flax NNX front end: drop-in layers, an in-place converter, and popping statistics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
from flax import nnx

from tract_jax._src import internals, passes, statistic, statistics, unfold

STAT_ATTRIBUTE = 'tract_stats'
"""The attribute of a TrAct NNX layer that holds its statistic between steps."""


class TractStatistics(nnx.Variable):
    """NNX variable type of recorded TrAct statistics.

    Select them with ``nnx.state(model, TractStatistics)``; ``nnx.Param`` filters, and
    so ``nnx.grad`` and ``nnx.Optimizer(..., wrt=nnx.Param)``, never see them.
    """


def _record(module: nnx.Module, make_stat: Callable[[], statistic.Statistic]) -> None:
    """Stores the statistic of this call on ``module``, if a gradient is being taken.

    Outside a differentiated pass (an evaluation or logging forward, even in training
    mode) nothing is recorded or computed. Inside one, a statistic left by another pass
    (a gradient whose statistics were never popped) is replaced, never added to; a
    second call in the same pass (a shared stem, two crops) accumulates.
    """
    if module.deterministic:
        return
    trace = passes.current_pass()
    if trace is None:
        return
    stat = make_stat()
    previous = getattr(module, STAT_ATTRIBUTE, None)
    if isinstance(previous, TractStatistics) and _mark(previous).is_current(trace):
        internals.set_variable_value(
            previous, statistic.merge(internals.variable_value(previous), stat)
        )
    else:
        setattr(module, STAT_ATTRIBUTE, TractStatistics(stat, tract_pass=passes.PassMark(trace)))


def _mark(variable: TractStatistics) -> passes.PassMark:
    mark = variable.get_metadata().get('tract_pass')
    if not isinstance(mark, passes.PassMark):
        raise ValueError(
            'tract_jax.nnx: a TractStatistics variable without the mark of the pass that '
            'recorded it. Statistics are recorded by the TrAct layers only; do not create '
            'or restore TractStatistics variables by hand.'
        )
    return mark


class Linear(nnx.Linear):
    """``flax.nnx.Linear`` that also records TrAct statistics of its input.

    Same arguments, parameters and outputs as :class:`flax.nnx.Linear`, plus
    ``deterministic`` (set by ``model.eval()``/``model.train()``).

    The statistic belongs to the pass it preconditions: the layer records only while a
    gradient is being taken (inside ``nnx.grad``, ``nnx.value_and_grad``, ``jax.grad``,
    also through ``nnx.remat`` and ``nnx.jit`` inside them) and not ``deterministic``.
    Calls in one gradient computation accumulate (a shared stem, two crops); a new
    gradient computation replaces what an earlier one left, so an evaluation or logging
    forward between steps, or a gradient whose statistics were not popped, never
    leaks into the next step. Take the statistics after the gradient with
    :func:`pop_stats`.

    Examples:
      >>> import jax.numpy as jnp, tract_jax
      >>> from flax import nnx
      >>> layer = tract_jax.nnx.Linear(3, 4, rngs=nnx.Rngs(0))
      >>> x = jnp.ones((8, 3))
      >>> y = layer(x)  # not differentiated: nothing recorded
      >>> grads = nnx.grad(lambda layer: layer(x).sum())(layer)
      >>> tract_jax.nnx.pop_stats(layer)['kernel'].gram.shape
      (3, 3)
    """

    def __init__(self, *args: Any, deterministic: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.deterministic = deterministic

    def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        _record(self, lambda: statistics.dense_statistic(inputs))
        return super().__call__(inputs, *args, **kwargs)


class Conv(nnx.Conv):
    """``flax.nnx.Conv`` that also records TrAct statistics of its unfolded input.

    Same arguments, parameters and outputs as :class:`flax.nnx.Conv` (every padding,
    strides, dilations), plus ``deterministic``; it records as :class:`Linear` does:
    only while a gradient is being taken, one pass at a time.

    Raises:
      ValueError: for ``feature_group_count > 1`` or a ``mask``.

    Examples:
      >>> import jax.numpy as jnp, tract_jax
      >>> from flax import nnx
      >>> layer = tract_jax.nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0))
      >>> x = jnp.ones((2, 8, 8, 3))
      >>> grads = nnx.grad(lambda layer: layer(x).sum())(layer)
      >>> tract_jax.nnx.pop_stats(layer)['kernel'].count
      Array(128., dtype=float32)
    """

    def __init__(self, *args: Any, deterministic: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        statistics.check_conv_options('tract_jax.nnx.Conv', self.feature_group_count, self.mask)
        self.deterministic = deterministic

    def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        geometry = unfold.ConvGeometry.of(self)
        _record(self, lambda: statistics.geometry_statistic(inputs, geometry))
        return super().__call__(inputs, *args, **kwargs)


Layer = TypeVar('Layer', nnx.Linear, nnx.Conv)


def convert(layer: Layer) -> Layer:
    """Turns an ``nnx.Linear`` or ``nnx.Conv`` into its TrAct layer, in place.

    The layer keeps its parameters (the same ``nnx.Param`` objects), its outputs and
    its place in the model; from now on it records statistics like
    :class:`tract_jax.nnx.Linear` / :class:`tract_jax.nnx.Conv`. The counterpart of
    ``model.conv1 = TrAct(model.conv1)`` in the PyTorch implementation.

    Args:
      layer: the first layer of a model, e.g. ``model.stem``.

    Returns:
      The same object, now of the TrAct class (returned for chaining).

    Raises:
      TypeError: if ``layer`` is neither an ``nnx.Linear`` nor an ``nnx.Conv``.
      ValueError: for a grouped or masked convolution.

    Examples:
      >>> import jax.numpy as jnp, tract_jax
      >>> from flax import nnx
      >>> stem = nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0))
      >>> _ = tract_jax.nnx.convert(stem)
      >>> isinstance(stem, tract_jax.nnx.Conv)
      True
    """
    if isinstance(layer, (Linear, Conv)):
        return layer
    if type(layer) is nnx.Linear:
        layer.__class__ = Linear
    elif type(layer) is nnx.Conv:
        statistics.check_conv_options(
            'tract_jax.nnx.convert', layer.feature_group_count, layer.mask
        )
        layer.__class__ = Conv
    else:
        raise TypeError(
            f'tract_jax.nnx.convert: got a {type(layer).__name__}; TrAct applies to an '
            'nnx.Linear or nnx.Conv (the first layer: a stem conv or patch embedding).'
        )
    layer.deterministic = False
    return layer


def pop_stats(model: nnx.Module) -> dict[str, Any]:
    """Removes the recorded statistics from ``model`` and returns them for ``tract``.

    Call it right after the gradient computation whose update it is for (e.g. after
    ``nnx.value_and_grad``) and pass the result to ``optimizer.update(model, grads,
    tract_stats=...)``. The returned tree puts each statistic at its layer's kernel
    path (``{'stem': {'kernel': stat}}``), as the linen layers do, so it matches the
    gradients. What it returns was recorded in the most recent gradient computation
    that called each layer, and only there: layers record nothing outside a gradient
    computation, and a new one replaces what an earlier one left.

    Args:
      model: an NNX module containing TrAct layers.

    Returns:
      A nested dict of statistics; empty if nothing was recorded.

    Raises:
      ValueError: if the layers' statistics come from different gradient computations
        (one layer was called in the last one, another only in an earlier one).
    """
    state = nnx.pop(model, TractStatistics)
    serials = {_mark(v).serial for _, v in nnx.to_flat_state(state)}
    if len(serials) > 1:
        raise ValueError(
            'tract_jax.nnx.pop_stats: the TrAct layers of this model hold statistics of '
            f'{len(serials)} different gradient computations, so some are stale. Call '
            'pop_stats right after each gradient computation, and call every TrAct layer '
            'in the one whose update you take.'
        )
    return _kernel_paths(nnx.to_pure_dict(state))


def _kernel_paths(tree: dict[Any, Any]) -> dict[Any, Any]:
    """Moves each statistic from ``<layer>/tract_stats`` to ``<layer>/kernel``."""
    return {
        ('kernel' if key == STAT_ATTRIBUTE else key): (
            value if statistic.is_statistic(value) else _kernel_paths(value)
        )
        for key, value in tree.items()
    }
