"""Gradient accumulation gives the whole accumulated batch's TrAct update, exactly."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tract_jax


class _Net(nn.Module):
    dense: bool = False

    @nn.compact
    def __call__(self, x):
        if self.dense:  # 3 rows a micro-batch < fan-in 48: row statistics
            h = tract_jax.Dense(5, name='stem')(x.reshape(x.shape[0], -1))
        else:
            h = tract_jax.Conv(5, (3, 3), strides=2, name='stem')(x).mean(axis=(1, 2))
        return nn.Dense(3, name='head')(nn.relu(h))


K, MICRO = 3, 3
X = np.random.default_rng(0).normal(size=(K * MICRO, 4, 4, 3))
Y = np.arange(K * MICRO) % 3


def _init(model):
    params = model.init(jax.random.key(0), jnp.asarray(X))['params']
    return jax.tree.map(lambda p: p.astype(jnp.float64), params)


@functools.partial(jax.jit, static_argnums=0)
def _grads_and_stats(model, params, x, y):
    def loss_fn(p):
        logits, state = model.apply({'params': p}, x, mutable=['tract'])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, state['tract']

    return jax.grad(loss_fn, has_aux=True)(params)


def _whole_batch_update(model, params, tx):
    grads, stats = _grads_and_stats(model, params, jnp.asarray(X), jnp.asarray(Y))
    return tx.update(grads, tx.init(params), params, tract_stats=stats)[0]


def _micro_batches():
    for i in range(K):
        part = slice(i * MICRO, (i + 1) * MICRO)
        yield jnp.asarray(X[part]), jnp.asarray(Y[part])


@pytest.mark.parametrize('dense', [False, True])
def test_multi_steps_equals_one_step_on_the_concatenated_batch(dense, x64):
    model = _Net(dense=dense)
    params = _init(model)
    inner = optax.chain(tract_jax.tract(0.1), optax.adam(1e-2))
    expected = _whole_batch_update(model, params, inner)

    micro = list(_micro_batches())
    stats_like = jax.eval_shape(lambda: _grads_and_stats(model, params, *micro[0])[1])
    tx = tract_jax.MultiSteps(inner, K, stats_like=stats_like, accumulator_dtype=jnp.float64)
    state = tx.init(params)
    update = jax.jit(lambda g, t, s: tx.update(g, s, params, tract_stats=t))
    for i, (x, y) in enumerate(micro):
        grads, stats = _grads_and_stats(model, params, x, y)
        updates, state = update(grads, stats, state)
        assert bool(tx.has_updated(state)) == (i == K - 1)
    chex.assert_trees_all_close(updates, expected, rtol=1e-10, atol=1e-14)
    # Accumulation starts again from nothing: the next K mini-steps give the same update.
    assert all(not np.any(leaf) for leaf in jax.tree.leaves(state.acc_stats))
    for x, y in micro:
        updates, state = update(*_grads_and_stats(model, params, x, y), state)
    chex.assert_trees_all_close(updates, expected, rtol=1e-10, atol=1e-14)


def test_optax_multi_steps_alone_sees_only_the_last_micro_batch(x64):
    """Why tract_jax.MultiSteps exists: optax's hands tract() one micro-batch's statistics."""
    model = _Net()
    params = _init(model)
    inner = optax.chain(tract_jax.tract(0.1), optax.sgd(1.0))
    tx = optax.MultiSteps(inner, K)
    state = tx.init(params)
    for x, y in _micro_batches():
        grads, stats = _grads_and_stats(model, params, x, y)
        updates, state = tx.update(grads, state, params, tract_stats=stats)
    expected = _whole_batch_update(model, params, inner)
    assert not np.allclose(updates['stem']['kernel'], expected['stem']['kernel'], rtol=1e-3)


def test_skipped_mini_steps_are_not_accumulated(x64):
    model = _Net()
    params = _init(model)
    inner = optax.chain(tract_jax.tract(0.1), optax.sgd(1.0))
    micro = list(_micro_batches())
    stats_like = _grads_and_stats(model, params, *micro[0])[1]
    tx = tract_jax.MultiSteps(
        inner,
        K,
        stats_like=stats_like,
        should_skip_update_fn=_skip_big,
        accumulator_dtype=jnp.float64,
    )
    state = tx.init(params)
    garbage = jnp.asarray(X[:MICRO] * 1e3), jnp.asarray(Y[:MICRO])
    for x, y in [micro[0], garbage, *micro[1:]]:
        grads, stats = _grads_and_stats(model, params, x, y)
        if x is garbage[0]:
            grads = jax.tree.map(lambda g: g + 1e6, grads)
        updates, state = tx.update(grads, state, params, tract_stats=stats)
    expected = _whole_batch_update(model, params, inner)
    chex.assert_trees_all_close(updates, expected, rtol=1e-10, atol=1e-14)


def _skip_big(updates, gradient_step, params):
    del gradient_step, params
    return optax.tree.norm(updates) > 1e5, ()


def test_hand_written_accumulation_with_lax_scan(x64):
    model = _Net(dense=True)
    params = _init(model)
    tx = optax.chain(tract_jax.tract(0.1), optax.sgd(1.0))
    xs = jnp.asarray(X).reshape(K, MICRO, *X.shape[1:])
    ys = jnp.asarray(Y).reshape(K, MICRO)

    @jax.jit
    def accumulated_update(params):
        grads, stats = _grads_and_stats(model, params, xs[0], ys[0])
        first = (grads, tract_jax.accumulate(stats))

        def micro_step(carry, batch):
            grads, stats = _grads_and_stats(model, params, *batch)
            return (
                jax.tree.map(jnp.add, carry[0], grads),
                tract_jax.accumulate(carry[1], stats),
            ), None

        (grads, stats), _ = jax.lax.scan(micro_step, first, (xs[1:], ys[1:]))
        grads = jax.tree.map(lambda g: g / K, grads)
        return tx.update(grads, tx.init(params), params, tract_stats=stats)[0]

    expected = _whole_batch_update(model, params, tx)
    chex.assert_trees_all_close(accumulated_update(params), expected, rtol=1e-10, atol=1e-14)


def test_accumulate_rejects_statistics_of_other_layers():
    stat = tract_jax.GramStatistic(jnp.eye(3), jnp.asarray(4.0))
    with pytest.raises(ValueError, match='accumulate: the statistics are not of the same layers'):
        tract_jax.accumulate({'stem': {'kernel': stat}}, {'other': {'kernel': stat}})
    with pytest.raises(ValueError, match=r'fan-in 3 \(features_last\) and 2'):
        tract_jax.accumulate(stat, tract_jax.GramStatistic(jnp.eye(2), jnp.asarray(1.0)))
    with pytest.raises(ValueError, match='at least one'):
        tract_jax.accumulate()
