"""One jitted training step, with or without TrAct, shared by examples and benchmarks."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import optax

import tract_jax

Step = Callable[..., tuple[Any, Any, Any, jax.Array]]


def make_optimizer(base: optax.GradientTransformation, lam: float | None):
    """``base`` alone for the baseline, ``chain(tract(lam), base)`` for TrAct."""
    return base if lam is None else optax.chain(tract_jax.tract(lam), base)


def train_step(
    model: nn.Module, use_tract: bool, label_smoothing: float = 0.0
) -> Callable[..., tuple[Any, Any, Any, jax.Array]]:
    """``step(tx, params, batch_stats, opt_state, x, y) -> (params, batch_stats, opt_state,
    loss)``, not jitted: :func:`make_train_step` jits it, ``examples/study.py`` scans it.

    The model is applied with ``train=True`` and ``batch_stats`` mutable; with
    ``use_tract`` the ``'tract'`` collection is mutable too and its statistics go to the
    optimizer. Without it the TrAct layers record nothing: a plain Flax step. The loss
    is cross-entropy, with ``label_smoothing`` (the paper's ViT recipe uses 0.1).
    """
    mutable = ['batch_stats', 'tract'] if use_tract else ['batch_stats']

    def loss_fn(params, batch_stats, x, y):
        logits, state = model.apply(
            {'params': params, 'batch_stats': batch_stats}, x, train=True, mutable=mutable
        )
        targets = optax.smooth_labels(jax.nn.one_hot(y, logits.shape[-1]), label_smoothing)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        return loss, state

    def step(tx, params, batch_stats, opt_state, x, y):
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, x, y)
        extra = {'tract_stats': state['tract']} if use_tract else {}
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        params = optax.apply_updates(params, updates)
        return params, state.get('batch_stats', batch_stats), opt_state, loss

    return step


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    use_tract: bool,
    label_smoothing: float = 0.0,
) -> Step:
    """:func:`train_step` with ``tx`` bound, jitted, its state arguments donated:
    ``step(params, batch_stats, opt_state, x, y) -> (params, batch_stats, opt_state, loss)``.
    """
    return jax.jit(
        functools.partial(train_step(model, use_tract, label_smoothing), tx),
        donate_argnums=(0, 1, 2),
    )
