"""The ``tract`` Optax gradient transformation."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tract_jax._src import solve, statistic

_HOW_TO_GET_STATS = (
    "Run the model with the 'tract' collection mutable and pass it on:\n"
    "    out, state = model.apply(variables, x, mutable=['tract'])\n"
    '    updates, opt_state = tx.update(grads, opt_state, params, '
    "tract_stats=state['tract'])"
)


class TractState(NamedTuple):
    """State of :func:`tract`.

    Attributes:
      count: the number of steps taken, for λ schedules.
      fallbacks: the number of steps on which some layer's plain gradient was passed on
        instead of its TrAct update: the update was not finite although the gradient
        was (non-finite statistics, e.g. from an overflowing pixel), or a traced λ
        (a schedule, ``inject_hyperparams``) was not a finite number > 0.
    """

    count: jax.Array
    fallbacks: jax.Array


def key_name(key: Any) -> str:
    """The name of one pytree key, as ``tract`` matches statistics to gradient leaves."""
    for attr in ('key', 'name', 'idx'):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path(keys: tuple[Any, ...]) -> tuple[str, ...]:
    names = tuple(key_name(k) for k in keys)
    # An NNX Variable flattens to its `.value`: nnx.State gradients end in that key.
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == 'value':
        names = names[:-1]
    return names


def _fmt(path: tuple[str, ...]) -> str:
    return '/'.join(path) or '<root>'


def _check_lam(lam: Any) -> None:
    try:
        value = float(lam)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return  # traced (e.g. under optax.inject_hyperparams): checked by the caller
    if not value > 0 or not math.isfinite(value):
        raise ValueError(
            f'tract_jax.tract: lam must be a finite number > 0, got {value}. '
            'It is the ridge term of the least-squares step (the paper uses 0.1); '
            'as lam grows, TrAct tends to plain gradient descent scaled by 1/lam.'
        )


def _collect_statistics(tract_stats: Any) -> list[tuple[tuple[str, ...], statistic.Statistic]]:
    """The (kernel path, statistic) pairs of a stats tree, with clear errors."""
    if tract_stats is None:
        raise ValueError(
            'tract_jax.tract: update() needs the first-layer statistics as the keyword '
            f'argument tract_stats, and got none. {_HOW_TO_GET_STATS}'
        )
    flat, _ = jax.tree_util.tree_flatten_with_path(tract_stats, is_leaf=statistic.is_statistic)
    found = []
    for keys, leaf in flat:
        if not statistic.is_statistic(leaf):
            raise TypeError(
                f'tract_jax.tract: tract_stats holds a {type(leaf).__name__} at '
                f"'{_fmt(_path(keys))}', which is not a TrAct statistic. Pass the 'tract' "
                f'collection itself, as the model recorded it. {_HOW_TO_GET_STATS}'
            )
        found.append((_path(keys), leaf))
    if not found:
        raise ValueError(
            'tract_jax.tract: tract_stats holds no statistics. Did the model use a '
            "tract_jax layer (tract_jax.Dense / tract_jax.Conv), and was 'tract' mutable "
            f'in that apply? {_HOW_TO_GET_STATS}'
        )
    return found


def _check_kernel(path: tuple[str, ...], stat: statistic.Statistic, grad: Any) -> None:
    n = statistic.fan_in(stat)
    shape = getattr(grad, 'shape', None)
    if shape is None or len(shape) < 2 or not jnp.issubdtype(grad.dtype, jnp.inexact):
        raise ValueError(
            f"tract_jax.tract: statistics were recorded for '{_fmt(path)}', but the gradient "
            f'there is {type(grad).__name__} {shape}, not a kernel gradient of rank >= 2 '
            'with a floating dtype.'
        )
    kernel_n = statistic.kernel_fan_in(shape, stat.layout)
    if kernel_n != n:
        other = next(lay for lay in statistic.LAYOUTS if lay != stat.layout)
        hint = (
            f' It would fit a {other} kernel: was the statistic made with the wrong layout?'
            if statistic.kernel_fan_in(shape, other) == n
            else ' Were they recorded by another model or layer?'
        )
        raise ValueError(
            f"tract_jax.tract: the statistics for '{_fmt(path)}' are of fan-in {n} for a "
            f'{stat.layout} kernel, but the kernel gradient there has shape {tuple(shape)} '
            f'(fan-in {kernel_n} as {stat.layout}).{hint}'
        )


def tract(
    lam: float | optax.ScalarOrSchedule = 0.1,
    *,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """TrAct: trains first-layer activations instead of first-layer weights.

    Replaces the kernel gradient ``G`` (``n x features``) of every layer that recorded
    statistics in the ``'tract'`` collection by ``(XᵀX / b + λI)⁻¹ G``, where ``X`` is
    the layer's ``b x n`` unfolded input (through the ``b x b`` Woodbury form when
    ``b < n``). This is the weight update that best reaches, in ridge least squares, a
    gradient step taken on the layer's pre-activations. Every other leaf (biases, the
    rest of the network) passes through unchanged, so chain it before any optimizer.

    Args:
      lam: the ridge term λ > 0, a float or an optax schedule of the step count.
        Keep the paper's 0.1 and standardize the inputs per channel: on standardized
        inputs every λ from 0.025 to 0.4 trained alike within noise in this project's
        study. λ is compared with ``XᵀX / b``, so it is in units of the squared input;
        on unnormalized ([0, 255]) inputs TrAct trained worse than plain, and scaling λ
        with the squared range did not replicate as a fix (see the docs' "Choosing λ").
        As λ grows the update tends to the plain gradient scaled by ``1/λ``. A concrete
        λ ≤ 0 raises; a traced one (a schedule under ``jit``, ``inject_hyperparams``)
        cannot, so on a step where it is not a finite positive number the plain
        gradient is passed on and :attr:`TractState.fallbacks` counts the step.
      axis_name: for ``shard_map``/``pmap``: the mapped axis over which per-device
        statistics are reduced (Gram matrices and row counts summed, row matrices
        gathered) so that the update is the global-batch one. Leave ``None`` under
        ``jax.jit`` with sharded arrays: there the statistics already are global.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes the
      statistics as ``update(updates, state, params=None, *, tract_stats)``.

    Raises:
      ValueError: at construction if ``lam`` is not a finite number > 0; at trace
        time if ``tract_stats`` is missing or empty, or does not fit the gradients.
      TypeError: at trace time if ``tract_stats`` is not a tree of statistics.

    Examples:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, optax, tract_jax
      >>> model = tract_jax.Conv(features=8, kernel_size=(3, 3))
      >>> x = jnp.ones((2, 8, 8, 3))
      >>> params = model.init(jax.random.key(0), x)['params']
      >>> tx = optax.chain(tract_jax.tract(0.1), optax.adam(1e-3))
      >>> opt_state = tx.init(params)
      >>> def loss_fn(params):
      ...     y, state = model.apply({'params': params}, x, mutable=['tract'])
      ...     return jnp.mean(y ** 2), state['tract']
      >>> grads, stats = jax.grad(loss_fn, has_aux=True)(params)
      >>> updates, opt_state = tx.update(grads, opt_state, params, tract_stats=stats)

    References:
      Petersen, Borgelt, Ermon, `TrAct: Making First-layer Pre-Activations Trainable
      <https://arxiv.org/abs/2410.23970>`_, NeurIPS 2024.
    """
    if not callable(lam):
        _check_lam(lam)

    def init_fn(params: optax.Params) -> TractState:
        del params
        return TractState(count=jnp.zeros([], jnp.int32), fallbacks=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: optax.Updates,
        state: TractState,
        params: optax.Params | None = None,
        *,
        tract_stats: Any = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, TractState]:
        del params, extra_args
        found = _collect_statistics(tract_stats)
        lam_now = lam(state.count) if callable(lam) else lam
        _check_lam(lam_now)
        # A traced λ (a schedule, inject_hyperparams) cannot be checked here: a step
        # whose λ is not a finite number > 0 passes the plain gradients on, counted.
        lam_ok = jnp.isfinite(lam_now) & (lam_now > 0)

        flat, treedef = jax.tree_util.tree_flatten_with_path(
            updates, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
        )
        index = {_path(keys): i for i, (keys, _) in enumerate(flat)}
        leaves = [leaf for _, leaf in flat]
        fell_back = jnp.zeros([], bool)
        for path, stat in found:
            i = index.get(path)
            if i is None:
                shown = [_fmt(p) for p in index][:8]
                more = f' and {len(index) - 8} more' if len(index) > 8 else ''
                raise ValueError(
                    f"tract_jax.tract: tract_stats has statistics for '{_fmt(path)}', but the "
                    'gradients have no leaf at that path. Pass the tract collection itself '
                    "(state['tract'], not the whole mutable state) and the gradients of the "
                    f'same model. Gradient leaves: {", ".join(shown)}{more}.'
                )
            if isinstance(leaves[i], optax.MaskedNode):
                continue  # masked out by optax.masked / multi_transform
            _check_kernel(path, stat, leaves[i])
            with jax.named_scope(statistic.SOLVE_SCOPE):
                if axis_name is not None:
                    stat = statistic.all_reduce(stat, axis_name)
                new = solve.tract_solve(stat, leaves[i], lam_now)
                # Never let a bad batch's statistics or a bad λ poison the kernel: where
                # the update is not finite, pass the plain gradient on (and count it).
                ok = lam_ok & jnp.all(jnp.isfinite(new)) & statistic.all_finite(stat)
                fell_back |= ~ok & jnp.all(jnp.isfinite(leaves[i]))
                leaves[i] = jnp.where(ok, new, leaves[i])
        new_state = TractState(
            count=optax.safe_int32_increment(state.count),
            fallbacks=state.fallbacks + fell_back.astype(jnp.int32),
        )
        return jax.tree_util.tree_unflatten(treedef, leaves), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
