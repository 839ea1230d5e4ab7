"""Gradient accumulation: the whole accumulated batch's TrAct update, exactly.

TrAct's update for a batch split into micro-batches ``X₁ … X_k`` is the update of the
concatenated batch: ``(Σ XᵢᵀXᵢ / Σ bᵢ + λI)⁻¹`` applied to the accumulated gradient.
So the statistics are summed (in Gram form, whose shape does not depend on the
number of rows) next to the gradients, and the solve runs once, at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tract_jax._src import internals, statistic


def accumulate(*tract_stats: Any) -> Any:
    """The statistics of several passes' inputs together, as one batch's.

    For gradient accumulation written by hand: sum the statistics of the micro-batches
    with this, average (or sum) their gradients, and give both to :func:`tract` once;
    the update is the one of the concatenated batch. Every statistic is returned in
    Gram form, whose shape does not depend on the number of rows, so the sum can be the
    carry of a ``lax.scan`` over micro-batches.

    Args:
      *tract_stats: trees of statistics of the same layers, e.g. the ``'tract'``
        collections of several micro-batches' passes, or a running sum and one of them.

    Returns:
      One tree of the same layers, each a :class:`GramStatistic` of all the rows.

    Raises:
      ValueError: if no tree is given, or the trees are not of the same layers, or a
        layer's fan-in differs between them.

    Examples:
      >>> import jax, jax.numpy as jnp, tract_jax
      >>> layer = tract_jax.Dense(4)
      >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 3)))
      >>> def stats(x):
      ...     return layer.apply(variables, x, mutable=['tract'])[1]['tract']
      >>> total = tract_jax.accumulate(stats(jnp.ones((2, 3))), stats(jnp.ones((5, 3))))
      >>> total['kernel'].count
      Array(7., dtype=float32)
    """
    if not tract_stats:
        raise ValueError('tract_jax.accumulate: give at least one tree of statistics.')
    structures = {jax.tree.structure(t, is_leaf=statistic.is_statistic) for t in tract_stats}
    if len(structures) > 1:
        raise ValueError(
            'tract_jax.accumulate: the statistics are not of the same layers: '
            f'{" vs ".join(str(s) for s in structures)}.'
        )
    return jax.tree.map(_sum, *tract_stats, is_leaf=statistic.is_statistic)


def _sum(*stats: statistic.Statistic) -> statistic.GramStatistic:
    total = statistic.to_gram(stats[0])
    for stat in stats[1:]:
        total = statistic.to_gram(statistic.merge(total, stat))
    return total


def _zeros_like(stat: Any) -> statistic.GramStatistic:
    """A zero Gram statistic of ``stat``'s fan-in and dtype (arrays or shapes)."""
    n = statistic.fan_in(stat)
    dtype = statistic.statistic_dtype(statistic.dtype_of(stat))
    return statistic.GramStatistic(jnp.zeros((n, n), dtype), jnp.zeros((), dtype), stat.layout)


class MultiStepsState(NamedTuple):
    """State of :class:`MultiSteps`.

    Attributes:
      inner: the state of the wrapped ``optax.MultiSteps`` (mini-step and gradient-step
        counters, the inner optimizer's state, the accumulated gradients).
      acc_stats: the sum of the statistics of the mini-steps so far, in Gram form.
    """

    inner: optax.MultiStepsState
    acc_stats: Any


class MultiSteps:
    """``optax.MultiSteps`` that also accumulates TrAct statistics: exact accumulation.

    ``optax.MultiSteps`` hands the inner optimizer each mini-step's own extra arguments,
    so a ``tract`` inside it would precondition the accumulated gradient with the last
    micro-batch's statistics only. This wrapper sums the statistics of the mini-steps
    next to the gradients and gives the inner optimizer the sum, so the update every
    ``k`` mini-steps is the TrAct update of the whole accumulated batch (equal to one
    step on the concatenated micro-batches). Arguments, semantics and methods are
    ``optax.MultiSteps``'s; ``update`` takes the mini-step's ``tract_stats``.

    Args:
      opt: the wrapped optimizer, e.g. ``optax.chain(tract_jax.tract(0.1), optax.adam(1e-3))``.
      every_k_schedule: how many mini-steps make a step: an int, or a function of the
        gradient step count.
      stats_like: the statistics of one mini-step as ``update`` will be given them, or
        their shapes (``jax.eval_shape``): the layers and fan-ins whose statistics are
        accumulated. Only shapes and dtypes are read.
      use_grad_mean: average (True, the default) or sum the accumulated gradients.
      should_skip_update_fn: as in ``optax.MultiSteps``; a skipped mini-step's
        statistics are not accumulated either.
      accumulator_dtype: dtype of the accumulated gradients (statistics are summed in
        their own dtype, float32 or wider); ``None`` for the parameters' dtype. With
        optax older than 0.2.8, whose ``MultiSteps`` accumulates in the parameters'
        dtype, only that dtype (or ``None``) is accepted.

    Raises:
      ValueError: at ``init``, with optax older than 0.2.8, if ``accumulator_dtype``
        is not the dtype of every floating-point parameter.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, tract_jax
      >>> model = tract_jax.Dense(2)
      >>> x = jnp.ones((4, 3))
      >>> params = model.init(jax.random.key(0), x)['params']
      >>> def loss_fn(params, x):
      ...     y, state = model.apply({'params': params}, x, mutable=['tract'])
      ...     return jnp.mean(y**2), state['tract']
      >>> grads, stats = jax.grad(loss_fn, has_aux=True)(params, x)
      >>> tx = tract_jax.MultiSteps(
      ...     optax.chain(tract_jax.tract(0.1), optax.sgd(0.1)), 2, stats_like=stats)
      >>> opt_state = tx.init(params)
      >>> for micro_batch in (x, 2 * x):
      ...     grads, stats = jax.grad(loss_fn, has_aux=True)(params, micro_batch)
      ...     updates, opt_state = tx.update(grads, opt_state, params, tract_stats=stats)
      >>> bool(tx.has_updated(opt_state))
      True
    """

    def __init__(
        self,
        opt: optax.GradientTransformation,
        every_k_schedule: int | Callable[[jax.Array], jax.Array],
        *,
        stats_like: Any,
        use_grad_mean: bool = True,
        should_skip_update_fn: optax.transforms.ShouldSkipUpdateFunction | None = None,
        accumulator_dtype: Any = jnp.float32,
    ):
        dtype = {'accumulator_dtype': accumulator_dtype}
        self._unsupported_dtype = None
        if not internals.MULTI_STEPS_HAS_ACCUMULATOR_DTYPE:
            dtype, self._unsupported_dtype = {}, accumulator_dtype
        self._multi_steps = optax.MultiSteps(
            opt,
            every_k_schedule,
            use_grad_mean=use_grad_mean,
            should_skip_update_fn=should_skip_update_fn,
            **dtype,
        )
        self._zero_stats = jax.tree.map(_zeros_like, stats_like, is_leaf=statistic.is_statistic)

    @property
    def inner_opt(self) -> optax.GradientTransformation:
        """The wrapped optimizer."""
        return self._multi_steps.inner_opt

    def init(self, params: optax.Params) -> MultiStepsState:
        """The initial state: no mini-step taken, nothing accumulated."""
        if self._unsupported_dtype is not None:
            _check_accumulates_in_params_dtype(self._unsupported_dtype, params)
        return MultiStepsState(self._multi_steps.init(params), self._zero_stats)

    def update(
        self,
        updates: optax.Updates,
        state: MultiStepsState,
        params: optax.Params | None = None,
        *,
        tract_stats: Any = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, MultiStepsState]:
        """Accumulates one mini-step; every ``k`` mini-steps returns the inner update.

        Raises:
          ValueError: if ``tract_stats`` is missing or not of the layers of
            ``stats_like``.
        """
        if tract_stats is None:
            raise ValueError(
                "tract_jax.MultiSteps: update() needs the mini-step's statistics as "
                'tract_stats, as tract() does.'
            )
        total = accumulate(state.acc_stats, tract_stats)
        new_updates, inner = self._multi_steps.update(
            updates, state.inner, params, tract_stats=total, **extra_args
        )
        emitted = inner.gradient_step != state.inner.gradient_step
        skipped = ~emitted & (inner.mini_step == state.inner.mini_step)
        acc_stats = jax.tree.map(
            lambda zero, old, new: jnp.where(emitted, zero, jnp.where(skipped, old, new)),
            self._zero_stats,
            state.acc_stats,
            total,
        )
        return new_updates, MultiStepsState(inner, acc_stats)

    def has_updated(self, state: MultiStepsState) -> jax.Array:
        """Whether the last ``update`` returned the inner optimizer's update."""
        return self._multi_steps.has_updated(state.inner)

    def gradient_transformation(self) -> optax.GradientTransformationExtraArgs:
        """This wrapper as an optax ``GradientTransformationExtraArgs``."""
        return optax.GradientTransformationExtraArgs(self.init, self.update)


def _check_accumulates_in_params_dtype(dtype: Any, params: optax.Params) -> None:
    """Fails unless optax's ``MultiSteps``, which before 0.2.8 accumulates in the
    parameters' dtype, accumulates in ``dtype``."""
    want = jax.dtypes.canonicalize_dtype(dtype)
    others = {
        str(leaf.dtype)
        for leaf in jax.tree.leaves(params)
        if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype != want
    }
    if others:
        raise ValueError(
            f'tract_jax.MultiSteps: accumulator_dtype={want} needs optax >= 0.2.8; '
            f"optax {optax.__version__} accumulates gradients in the parameters' dtype "
            f'({", ".join(sorted(others))} here). Upgrade optax, or pass '
            "accumulator_dtype=None to accumulate in the parameters' dtype."
        )
