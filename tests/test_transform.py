"""The optax transform: composition with optax, pass-through leaves, and clear errors."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tract_jax


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = tract_jax.Conv(4, (3, 3), strides=2, name='stem')(x)
        x = nn.relu(x).mean(axis=(1, 2))
        return nn.Dense(3, name='head')(x)


X = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
MODEL = _Net()
PARAMS = MODEL.init(jax.random.key(1), X)['params']


def _grads_and_stats(params=PARAMS):
    def loss_fn(p):
        y, state = MODEL.apply({'params': p}, X, mutable=['tract'])
        return jnp.mean(y**2), state['tract']

    return jax.grad(loss_fn, has_aux=True)(params)


def _expected_stem(grads, stats, lam):
    return tract_jax.tract_solve(stats['stem']['kernel'], grads['stem']['kernel'], lam)


def test_only_recorded_kernels_change():
    grads, stats = _grads_and_stats()
    tx = tract_jax.tract(0.1)
    updates, state = tx.update(grads, tx.init(PARAMS), PARAMS, tract_stats=stats)
    chex.assert_trees_all_equal(updates['head'], grads['head'])
    chex.assert_trees_all_equal(updates['stem']['bias'], grads['stem']['bias'])
    assert not np.allclose(updates['stem']['kernel'], grads['stem']['kernel'])
    chex.assert_trees_all_close(updates['stem']['kernel'], _expected_stem(grads, stats, 0.1))
    assert int(state.count) == 1


def test_chain_with_adam_is_jittable_and_equals_manual_composition():
    grads, stats = _grads_and_stats()
    tx = optax.chain(tract_jax.tract(0.1), optax.adam(1e-3))
    state = tx.init(PARAMS)
    updates, _ = jax.jit(lambda g, s, p, t: tx.update(g, s, p, tract_stats=t))(
        grads, state, PARAMS, stats
    )
    adam = optax.adam(1e-3)
    manual = {**grads, 'stem': {**grads['stem'], 'kernel': _expected_stem(grads, stats, 0.1)}}
    expected, _ = adam.update(manual, adam.init(PARAMS), PARAMS)
    chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-7)


def test_lambda_schedule_follows_the_step_count():
    grads, stats = _grads_and_stats()
    tx = tract_jax.tract(lambda count: 0.1 * (count + 1))
    state = tx.init(PARAMS)
    for lam in (0.1, 0.2, 0.3):
        updates, state = tx.update(grads, state, tract_stats=stats)
        chex.assert_trees_all_close(
            updates['stem']['kernel'], _expected_stem(grads, stats, lam), rtol=1e-5
        )


def test_inject_hyperparams():
    grads, stats = _grads_and_stats()
    tx = optax.inject_hyperparams(tract_jax.tract)(lam=0.5)
    state = tx.init(PARAMS)
    updates, state = jax.jit(lambda g, s, t: tx.update(g, s, tract_stats=t))(grads, state, stats)
    chex.assert_trees_all_close(updates['stem']['kernel'], _expected_stem(grads, stats, 0.5))
    assert float(state.hyperparams['lam']) == 0.5


@pytest.mark.parametrize('stem_on', [True, False])
def test_masked(stem_on):
    grads, stats = _grads_and_stats()
    mask = {'stem': {'kernel': stem_on, 'bias': False}, 'head': {'kernel': False, 'bias': False}}
    tx = optax.masked(tract_jax.tract(0.1), mask)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS, tract_stats=stats)
    expected = _expected_stem(grads, stats, 0.1) if stem_on else grads['stem']['kernel']
    chex.assert_trees_all_close(updates['stem']['kernel'], expected)
    chex.assert_trees_all_equal(updates['head'], grads['head'])


def test_multi_transform():
    grads, stats = _grads_and_stats()
    labels = {
        'stem': {'kernel': 'stem', 'bias': 'rest'},
        'head': {'kernel': 'rest', 'bias': 'rest'},
    }
    tx = optax.multi_transform(
        {'stem': optax.chain(tract_jax.tract(0.1), optax.sgd(1.0)), 'rest': optax.sgd(1.0)}, labels
    )
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS, tract_stats=stats)
    chex.assert_trees_all_close(updates['stem']['kernel'], -_expected_stem(grads, stats, 0.1))
    chex.assert_trees_all_close(updates['head'], jax.tree.map(lambda g: -g, grads['head']))


# --- errors, at trace time, in words a user acts on ---


@pytest.mark.parametrize('lam', [0.0, -0.1, float('nan'), float('inf')])
def test_bad_lambda(lam):
    with pytest.raises(ValueError, match='lam must be a finite number > 0'):
        tract_jax.tract(lam)


def test_bad_lambda_from_a_schedule_is_caught_when_concrete():
    grads, stats = _grads_and_stats()
    tx = tract_jax.tract(lambda count: 0.0)
    with pytest.raises(ValueError, match='lam must be'):
        tx.update(grads, tx.init(PARAMS), tract_stats=stats)


def test_missing_statistics_say_how_to_get_them():
    grads, _ = _grads_and_stats()
    tx = optax.chain(tract_jax.tract(), optax.adam(1e-3))
    with pytest.raises(ValueError, match=r"mutable=\['tract'\]"):
        tx.update(grads, tx.init(PARAMS), PARAMS)


def test_empty_statistics():
    grads, _ = _grads_and_stats()
    tx = tract_jax.tract()
    with pytest.raises(ValueError, match='holds no statistics'):
        tx.update(grads, tx.init(PARAMS), tract_stats={})


def test_whole_mutable_state_instead_of_the_collection():
    grads, stats = _grads_and_stats()
    tx = tract_jax.tract()
    with pytest.raises(ValueError, match=r"for 'tract/stem/kernel'.*state\['tract'\]"):
        jax.jit(lambda g, t: tx.update(g, tx.init(PARAMS), tract_stats=t))(grads, {'tract': stats})


def test_statistics_of_another_model_do_not_fit():
    grads, _ = _grads_and_stats()
    other = tract_jax.Conv(4, (5, 5), name='stem')
    _, state = other.apply(other.init(jax.random.key(0), X), X, mutable=['tract'])
    tx = tract_jax.tract()
    with pytest.raises(ValueError, match=r"'stem/kernel' are of fan-in 75.*\(3, 3, 3, 4\)"):
        tx.update(grads, tx.init(PARAMS), tract_stats={'stem': state['tract']})


def test_statistics_for_a_leaf_that_is_no_kernel():
    grads, stats = _grads_and_stats()
    tx = tract_jax.tract()
    with pytest.raises(ValueError, match=r"recorded for 'stem/bias'.*not a kernel gradient"):
        tx.update(grads, tx.init(PARAMS), tract_stats={'stem': {'bias': stats['stem']['kernel']}})


def test_something_else_than_statistics():
    grads, _ = _grads_and_stats()
    tx = tract_jax.tract()
    with pytest.raises(TypeError, match="ndarray at 'stem/kernel', which is not a TrAct statistic"):
        tx.update(grads, tx.init(PARAMS), tract_stats={'stem': {'kernel': np.eye(27)}})


def test_traced_lambda_not_above_zero_passes_the_plain_gradient_and_is_counted():
    grads, stats = _grads_and_stats()
    tx = tract_jax.tract(optax.linear_schedule(0.1, -0.1, 2))  # λ = 0.1, 0, -0.1, -0.1
    step = jax.jit(lambda state: tx.update(grads, state, tract_stats=stats))
    updates, state = step(tx.init(PARAMS))
    # float32, a jitted solve with a traced λ against an eager one: rounding differs.
    chex.assert_trees_all_close(
        updates['stem']['kernel'], _expected_stem(grads, stats, 0.1), rtol=1e-5
    )
    for fallbacks in (1, 2):
        updates, state = step(state)
        chex.assert_trees_all_equal(updates, grads)
        assert int(state.fallbacks) == fallbacks

    injected = optax.inject_hyperparams(tract_jax.tract)(lam=-0.5)
    state = jax.jit(injected.init)(PARAMS)  # traced: no error here, as in a jitted init
    updates, state = jax.jit(lambda s: injected.update(grads, s, tract_stats=stats))(state)
    chex.assert_trees_all_equal(updates, grads)
    assert int(state.inner_state.fallbacks) == 1


def test_concrete_lambda_not_above_zero_raises():
    grads, stats = _grads_and_stats()
    for lam in (0.0, -0.1, float('nan'), float('inf')):
        with pytest.raises(ValueError, match=r'tract_jax.tract: lam must be a finite number > 0'):
            tract_jax.tract(lam)
    tx = tract_jax.tract(optax.linear_schedule(0.1, 0.0, 1))
    _, state = tx.update(grads, tx.init(PARAMS), tract_stats=stats)  # eager: λ is concrete
    with pytest.raises(ValueError, match=r'got 0\.0\.'):
        tx.update(grads, state, tract_stats=stats)
