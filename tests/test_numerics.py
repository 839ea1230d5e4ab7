"""Hardening: mixed precision, ill-conditioned and non-finite statistics, checkpoints."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import tract_jax
from tract_jax._src import solve, statistic, statistics

DIGITS = load_digits().images[..., None]  # values 0..16


def _update(layer, params, x, lam=0.1):
    def loss_fn(p):
        y, state = layer.apply({'params': p}, x, mutable=['tract'])
        return jnp.mean(jnp.sin(y.astype(jnp.float32))), state['tract']

    grads, stats = jax.grad(loss_fn, has_aux=True)(params)
    tx = tract_jax.tract(lam)
    updates, state = tx.update(grads, tx.init(params), tract_stats=stats)
    return updates, stats, state


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_mixed_precision_model(dtype):
    x = jnp.asarray((DIGITS[:32] / 16 - 0.3) / 0.4, jnp.float32)
    low = tract_jax.Conv(8, (3, 3), dtype=dtype)
    full = tract_jax.Conv(8, (3, 3))
    params = full.init(jax.random.key(0), x)['params']
    # Outputs bit-identical to Flax's layer at that dtype, recording or not.
    y_flax = nn.Conv(8, (3, 3), dtype=dtype).apply({'params': params}, x)
    y_ours, state = low.apply({'params': params}, x, mutable=['tract'])
    np.testing.assert_array_equal(y_ours, y_flax)
    assert y_ours.dtype == dtype
    assert state['tract']['kernel'].gram.dtype == jnp.float32
    # The update matches the float32 model's to the low dtype's accuracy.
    up_low, *_ = _update(low, params, x)
    up_full, *_ = _update(full, params, x)
    assert up_low['kernel'].dtype == jnp.float32  # params stay float32
    rel = jnp.linalg.norm(up_low['kernel'] - up_full['kernel']) / jnp.linalg.norm(up_full['kernel'])
    assert rel < 2e-2, rel


def _relative_error(stat, n, lam=0.1):
    """The solve's relative error against float64 numpy on the same statistic."""
    g = np.random.default_rng(0).normal(size=(n, 5))
    got = np.asarray(tract_jax.tract_solve(stat, jnp.asarray(g, jnp.float32), lam), np.float64)
    if isinstance(stat, tract_jax.RowStatistic):
        rows = np.asarray(stat.rows, np.float64)
        a = rows.T @ rows / len(rows) + lam * np.eye(n)
    else:
        a = np.asarray(stat.gram, np.float64) / float(stat.count) + lam * np.eye(n)
    truth = np.linalg.solve(a, g)
    assert np.all(np.isfinite(got))
    return np.linalg.norm(got - truth) / np.linalg.norm(truth)


@pytest.mark.parametrize(
    'name, images, bound',
    [
        ('standardized', (DIGITS[:64] / 16 - 0.3) / 0.4, 1e-5),
        ('[0, 255]', DIGITS[:64] * (255 / 16), 1e-4),
        ('[0, 65535]', DIGITS[:64] * (65535 / 16), 1e-4),
        ('constant images', np.full((16, 8, 8, 1), 0.7), 1e-5),
        ('a single image', DIGITS[:1] / 16, 1e-5),
        ('zero-variance channel', np.concatenate([DIGITS[:32] / 16, 0 * DIGITS[:32]], -1), 1e-5),
        ('all zeros', np.zeros((4, 8, 8, 1)), 1e-6),
    ],
)
def test_ill_conditioned_statistics_stay_finite_and_accurate(name, images, bound):
    x = jnp.asarray(images, jnp.float32)
    stat = statistics.geometry_statistic(x, statistics.ConvGeometry((3, 3), 1, 'SAME'))
    assert _relative_error(stat, 9 * x.shape[-1]) < bound, name


def test_rows_fewer_than_fan_in_with_raw_pixels():
    x = jnp.asarray(DIGITS[:2] * (255 / 16), jnp.float32)  # 2 rows of n = 64
    stat = statistics.dense_statistic(x.reshape(2, -1))
    assert isinstance(stat, tract_jax.RowStatistic)
    assert _relative_error(stat, 64) < 1e-4


def test_float32_breakdown_gives_a_bounded_finite_update():
    """Large patches of unstandardized smooth images: cond ~ 1e8 breaks a float32
    Cholesky at λ = 0.1; the shift floored at eps · trace keeps the update finite and
    bounded by |g| / λ, with no control flow."""
    rng = np.random.default_rng(0)
    smooth = np.cumsum(np.cumsum(rng.normal(size=(8, 256, 256, 3)), 1), 2)
    smooth = 255 * (smooth - smooth.min()) / (smooth.max() - smooth.min())
    stat = jax.jit(statistics.geometry_statistic, static_argnums=1)(
        jnp.asarray(smooth, jnp.float32), statistics.ConvGeometry((16, 16), 16, 'VALID')
    )
    g = jnp.asarray(rng.normal(size=(768, 4)), jnp.float32)
    a = jnp.asarray(statistic.to_gram(stat).gram / stat.count) + 0.1 * jnp.eye(768)
    if jax.default_backend() == 'cpu':
        for cholesky in (solve._cholesky_solve, solve._native_cholesky_solve):
            # Both the factorization tract_solve runs here and LAPACK's break down at
            # the unfloored shift, so the floor is what is under test.
            assert not np.all(np.isfinite(jax.jit(cholesky)(a, g)))
    new = jax.jit(tract_jax.tract_solve)(stat, g, 0.1)
    assert np.all(np.isfinite(new))
    assert jnp.linalg.norm(new) <= jnp.linalg.norm(g) / 0.1 * 1.001


def test_non_finite_statistics_fall_back_to_the_plain_gradient_and_are_counted():
    grads = {'stem': {'kernel': jnp.ones((3, 3, 1, 4)), 'bias': jnp.ones(4)}}
    bad = tract_jax.GramStatistic(jnp.full((9, 9), jnp.inf), jnp.asarray(10.0))
    good = statistics.geometry_statistic(
        jnp.asarray(DIGITS[:4], jnp.float32), statistics.ConvGeometry((3, 3))
    )
    tx = tract_jax.tract(0.1)
    state = tx.init(grads)
    update = jax.jit(lambda g, s, t: tx.update(g, s, tract_stats=t))
    new, state = update(grads, state, {'stem': {'kernel': bad}})
    np.testing.assert_array_equal(new['stem']['kernel'], grads['stem']['kernel'])
    assert int(state.fallbacks) == 1
    new, state = update(grads, state, {'stem': {'kernel': good}})
    assert not np.allclose(new['stem']['kernel'], grads['stem']['kernel'])
    assert int(state.fallbacks) == 1 and int(state.count) == 2


def test_nan_batch_is_skipped_by_apply_if_finite():
    model = tract_jax.Conv(4, (3, 3))
    x = jnp.asarray(DIGITS[:8] / 16, jnp.float32)
    params = model.init(jax.random.key(0), x)['params']
    tx = optax.apply_if_finite(optax.chain(tract_jax.tract(0.1), optax.adam(1e-2)), 3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x):
        def loss_fn(p):
            y, s = model.apply({'params': p}, x, mutable=['tract'])
            return jnp.mean(y**2), s['tract']

        grads, stats = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params, tract_stats=stats)
        return optax.apply_updates(params, updates), opt_state

    poisoned = x.at[3, 4, 4, 0].set(jnp.nan)
    new_params, opt_state = step(params, opt_state, poisoned)
    jax.tree.map(np.testing.assert_array_equal, new_params, params)  # step skipped
    assert int(opt_state.notfinite_count) == 1
    new_params, opt_state = step(new_params, opt_state, x)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(new_params))
    assert not np.allclose(new_params['kernel'], params['kernel'])


def _train(params, opt_state, tx, model, batches):
    @jax.jit
    def step(params, opt_state, x):
        def loss_fn(p):
            y, s = model.apply({'params': p}, x, mutable=['tract'])
            return jnp.mean((y - 1.0) ** 2), s['tract']

        grads, stats = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params, tract_stats=stats)
        return optax.apply_updates(params, updates), opt_state

    for x in batches:
        params, opt_state = step(params, opt_state, x)
    return params, opt_state


@pytest.mark.parametrize('how', ['orbax', 'flax.serialization'])
def test_checkpoint_resume_is_bit_identical(how, tmp_path):
    model = tract_jax.Conv(4, (3, 3))
    batches = [jnp.asarray(DIGITS[i * 16 : (i + 1) * 16] / 16, jnp.float32) for i in range(6)]
    params = model.init(jax.random.key(0), batches[0])['params']
    tx = optax.chain(tract_jax.tract(optax.linear_schedule(0.1, 1.0, 6)), optax.adam(1e-2))
    straight = _train(params, tx.init(params), tx, model, batches)

    half = _train(params, tx.init(params), tx, model, batches[:3])
    if how == 'orbax':
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp_path / 'ckpt', half)
            checkpointer.wait_until_finished()
            restored = checkpointer.restore(tmp_path / 'ckpt', target=half)
    else:
        from flax import serialization

        restored = serialization.from_bytes(half, serialization.to_bytes(half))
    assert isinstance(restored[1][0], tract_jax.TractState)
    resumed = _train(*restored, tx, model, batches[3:])
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)
