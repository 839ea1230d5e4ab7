"""Flax linen front end: drop-in layers, capture for models you cannot edit, TrainState."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import optax
from flax.training import train_state

from tract_jax._src import internals, statistic, statistics, unfold

COLLECTION = 'tract'
"""The Flax collection the layers record into; the statistic sits at the kernel's path."""


def _apply_root() -> object:
    """The module that this ``apply`` (or ``bind``) runs: the bottom of linen's call stack.

    Flax binds a fresh clone of the model for every ``apply``, so this object marks one
    pass. Unlike the layer's scope it is the same inside lifted transforms (``nn.remat``,
    ``nn.scan``), whose inner scopes are new roots.
    """
    return next(m for m in internals.linen_module_stack() if m is not None)


def _recorded_paths() -> set[tuple[str, ...]]:
    """Paths of the layers that have recorded in the current ``apply`` so far."""
    root = _apply_root()
    key = id(root)
    if key not in _RECORDED:
        _RECORDED[key] = set()
        weakref.finalize(root, _RECORDED.pop, key, None)
    return _RECORDED[key]


_RECORDED: dict[int, set[tuple[str, ...]]] = {}


def record(module: nn.Module, make_stat: Callable[[], statistic.Statistic]) -> None:
    """Stores ``make_stat()`` as ``module``'s entry in the ``'tract'`` collection.

    A statistic belongs to the ``apply`` that records it. An entry that came in with the
    variables (a loop that merges every mutated collection back into ``variables``) is
    replaced, never added to; a second call of the same layer in the same ``apply`` (a
    shared stem, two crops) accumulates into the first. Records nothing while
    initializing or when ``'tract'`` is not mutable, so a model applied without
    ``mutable=['tract']`` does no extra work.
    """
    if module.is_initializing() or not module.is_mutable_collection(COLLECTION):
        return
    stat = make_stat()
    recorded, path = _recorded_paths(), tuple(module.path)
    if path in recorded and module.has_variable(COLLECTION, 'kernel'):
        stat = statistic.merge(module.get_variable(COLLECTION, 'kernel'), stat)
    recorded.add(path)
    module.put_variable(COLLECTION, 'kernel', stat)


class Dense(nn.Dense):
    """``flax.linen.Dense`` that also records TrAct statistics of its input.

    Same fields, parameters and outputs as :class:`flax.linen.Dense`. When applied with
    ``mutable=['tract']`` it records, at ``'tract'/<path>/'kernel'``, the Gram matrix of
    its input rows (every input vector, any number of leading dims) or the rows
    themselves when there are fewer rows than input features, for :func:`tract_jax.tract`.

    A statistic belongs to the ``apply`` that records it: one that comes in with the
    variables (a loop that merges every mutated collection back) is replaced, never
    added to, while calls of the layer within one ``apply`` (a shared stem, two crops)
    accumulate. Pass the collection of the ``apply`` inside your loss to ``tract``.

    Examples:
      >>> import jax, jax.numpy as jnp, tract_jax
      >>> layer = tract_jax.Dense(features=4)
      >>> x = jnp.ones((8, 3))
      >>> variables = layer.init(jax.random.key(0), x)
      >>> y, state = layer.apply(variables, x, mutable=['tract'])
      >>> state['tract']['kernel'].gram.shape
      (3, 3)
    """

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        record(self, lambda: statistics.dense_statistic(inputs))
        return super().__call__(inputs)


class Conv(nn.Conv):
    """``flax.linen.Conv`` that also records TrAct statistics of its unfolded input.

    Same fields, parameters and outputs as :class:`flax.linen.Conv` (1-D, 2-D and 3-D;
    any strides, input and kernel dilation, and every padding Flax accepts). When
    applied with ``mutable=['tract']`` it records, at ``'tract'/<path>/'kernel'``, the
    Gram matrix of its unfolded input (one row per image and output position, columns
    in the kernel's flattening order) with the row count, or the rows themselves when
    there are fewer rows than ``prod(kernel_size) * in_features``. Statistics belong
    to one ``apply``, as for :class:`Dense`.

    Raises:
      ValueError: for ``feature_group_count > 1`` or a ``mask``, which TrAct does not
        support.

    Examples:
      >>> import jax, jax.numpy as jnp, tract_jax
      >>> layer = tract_jax.Conv(features=16, kernel_size=(3, 3), use_bias=False)
      >>> x = jnp.ones((2, 32, 32, 3))
      >>> variables = layer.init(jax.random.key(0), x)
      >>> y, state = layer.apply(variables, x, mutable=['tract'])
      >>> state['tract']['kernel'].gram.shape
      (27, 27)
    """

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        statistics.check_conv_options('tract_jax.Conv', self.feature_group_count, self.mask)
        geometry = unfold.ConvGeometry.of(self)
        record(self, lambda: statistics.geometry_statistic(inputs, geometry))
        return super().__call__(inputs)


def _statistic_of(module: nn.Module, inputs: jax.Array) -> statistic.Statistic:
    name = f"capture: layer '{'/'.join(module.path)}'"
    if isinstance(module, nn.Conv):
        statistics.check_conv_options(name, module.feature_group_count, module.mask)
        return statistics.geometry_statistic(inputs, unfold.ConvGeometry.of(module))
    if isinstance(module, nn.Dense):
        return statistics.dense_statistic(inputs)
    raise TypeError(
        f'tract_jax.{name} is a {type(module).__name__}; TrAct applies to a '
        'flax.linen.Dense or flax.linen.Conv (the first layer: a stem conv or patch embedding).'
    )


@contextlib.contextmanager
def capture(*layers: str) -> Iterator[None]:
    """Records TrAct statistics for layers of a linen model you cannot edit.

    Inside the context, applying a model with ``mutable=['tract']`` records, for each
    named ``flax.linen.Dense`` or ``flax.linen.Conv`` submodule, exactly what
    :class:`tract_jax.Dense` / :class:`tract_jax.Conv` would record, at the same place
    in the ``'tract'`` collection, under the same rule (one ``apply``, one statistic);
    so :func:`tract_jax.tract` works unchanged. Use it around the ``apply`` (also
    inside a jitted function: it acts while tracing).

    Args:
      *layers: module paths of the layers, as in the params tree, with ``/`` between
        nesting levels, e.g. ``'conv_init'``, ``'Embed_0'``, ``'backbone/stem'``.

    Raises:
      ValueError: on leaving the context, if a named layer was not called by any
        ``apply`` inside it (a misspelt path); the message lists the Dense/Conv layers
        that were called.
      TypeError: if a named layer is neither a ``Dense`` nor a ``Conv``.

    Examples:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, tract_jax
      >>> model = nn.Sequential([nn.Conv(8, (3, 3)), nn.relu])
      >>> x = jnp.ones((2, 8, 8, 3))
      >>> variables = model.init(jax.random.key(0), x)
      >>> with tract_jax.capture('layers_0'):
      ...     y, state = model.apply(variables, x, mutable=['tract'])
      >>> state['tract']['layers_0']['kernel'].gram.shape
      (27, 27)
    """
    targets = {tuple(layer.strip('/').split('/')) for layer in layers}
    seen: set[tuple[str, ...]] = set()
    candidates: set[str] = set()

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == '__call__' and module.scope is not None:
            path = tuple(module.path)
            if isinstance(module, (nn.Dense, nn.Conv)):
                candidates.add('/'.join(path))
            if path in targets and not isinstance(module, (Dense, Conv)):
                seen.add(path)
                inputs = args[0] if args else kwargs['inputs']
                record(module, lambda: _statistic_of(module, inputs))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield
    missing = targets - seen
    if missing:
        raise ValueError(
            f'tract_jax.capture: no layer {sorted("/".join(m) for m in missing)} was called '
            'in this context. Name a Dense or Conv by its path in the params tree; the '
            f'Dense/Conv layers called were: {sorted(candidates) or "none"}.'
        )


class TrainState(train_state.TrainState):
    """``flax.training.train_state.TrainState`` whose update takes TrAct statistics.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, tract_jax
      >>> model = tract_jax.Dense(2)
      >>> x = jnp.ones((4, 3))
      >>> state = tract_jax.TrainState.create(
      ...     apply_fn=model.apply,
      ...     params=model.init(jax.random.key(0), x)['params'],
      ...     tx=optax.chain(tract_jax.tract(0.1), optax.sgd(0.1)),
      ... )
      >>> def loss_fn(params):
      ...     y, s = state.apply_fn({'params': params}, x, mutable=['tract'])
      ...     return jnp.mean(y**2), s['tract']
      >>> grads, stats = jax.grad(loss_fn, has_aux=True)(state.params)
      >>> state = state.apply_gradients(grads=grads, tract_stats=stats)
      >>> int(state.step)
      1
    """

    def apply_gradients(self, *, grads: Any, tract_stats: Any = None, **kwargs: Any) -> TrainState:
        """One optimizer step with ``tract_stats`` passed to ``tx.update``.

        Args:
          grads: gradients of the params.
          tract_stats: the ``'tract'`` collection recorded in the forward pass.
          **kwargs: other fields to replace, as in Flax's ``apply_gradients``.

        Returns:
          The state after the step, with ``step`` incremented.
        """
        updates, opt_state = self.tx.update(
            grads, self.opt_state, self.params, tract_stats=tract_stats
        )
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **kwargs)
