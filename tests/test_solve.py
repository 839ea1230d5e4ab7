"""The TrAct update against independent solutions of TrAct's two steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import cpu_only, two_step_update, unfold

import tract_jax
from tract_jax._src import solve, statistic


def _grads_and_stats(layer, x, target):
    variables = layer.init(jax.random.key(1), x)

    def loss_fn(params):
        z, state = layer.apply({'params': params}, x, mutable=['tract'])
        return jnp.mean(jnp.sin(z) * target), (z, state['tract'])

    grads, (z, stats) = jax.grad(loss_fn, has_aux=True)(variables['params'])
    dz = jax.grad(lambda z: jnp.mean(jnp.sin(z) * target))(z)
    return variables['params'], grads, stats, z, dz


@pytest.mark.parametrize('rows, n, lam', [(40, 6, 0.1), (5, 12, 0.1), (30, 30, 2.0), (3, 3, 1e-3)])
def test_dense_update_is_two_step_least_squares(rows, n, lam, x64):
    x = jax.random.normal(jax.random.key(0), (rows, n), jnp.float64) * 3 + 1
    target = jax.random.normal(jax.random.key(2), (rows, 4), jnp.float64)
    params, grads, stats, z, dz = _grads_and_stats(
        tract_jax.Dense(4, param_dtype=jnp.float64), x, target
    )
    tx = tract_jax.tract(lam)
    updates, _ = tx.update(grads, tx.init(params), tract_stats=stats)
    expected = two_step_update(x, z, dz, params['kernel'], params['bias'], lam)
    np.testing.assert_allclose(updates['kernel'], expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(updates['bias'], grads['bias'])


@pytest.mark.parametrize(
    'kernel_size, strides, padding, batch',
    [((3, 3), (1, 1), 'SAME', 2), ((3, 3), (2, 2), 'CIRCULAR', 1), ((5, 5), (3, 3), 'VALID', 1)],
)
def test_conv_update_is_two_step_least_squares(kernel_size, strides, padding, batch, x64):
    x = jax.random.uniform(jax.random.key(0), (batch, 9, 9, 3), jnp.float64)
    layer = tract_jax.Conv(
        4, kernel_size, strides=strides, padding=padding, param_dtype=jnp.float64
    )
    z_shape = jax.eval_shape(lambda: layer.apply(layer.init(jax.random.key(1), x), x)).shape
    target = jax.random.normal(jax.random.key(2), z_shape, jnp.float64)
    params, grads, stats, z, dz = _grads_and_stats(layer, x, target)
    tx = tract_jax.tract(0.1)
    updates, _ = tx.update(grads, tx.init(params), tract_stats=stats)
    patches = unfold(x, kernel_size, strides, padding, (1, 1), (1, 1))
    expected = two_step_update(
        patches,
        z.reshape(-1, 4),
        dz.reshape(-1, 4),
        params['kernel'].reshape(-1, 4),
        params['bias'],
        0.1,
    )
    np.testing.assert_allclose(updates['kernel'].reshape(-1, 4), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('rows, n', [(3, 10), (9, 10), (1, 4)])
def test_gram_and_woodbury_forms_agree(rows, n, x64):
    x = jax.random.normal(jax.random.key(0), (rows, n), jnp.float64)
    g = jax.random.normal(jax.random.key(1), (n, 3), jnp.float64)
    woodbury = tract_jax.tract_solve(tract_jax.RowStatistic(x), g, 0.3)
    gram = tract_jax.tract_solve(statistic.to_gram(tract_jax.RowStatistic(x)), g, 0.3)
    np.testing.assert_allclose(woodbury, gram, rtol=1e-10, atol=1e-12)
    direct = np.linalg.solve(np.asarray(x).T @ np.asarray(x) / rows + 0.3 * np.eye(n), g)
    np.testing.assert_allclose(gram, direct, rtol=1e-10)


@pytest.mark.parametrize('form', ['gram', 'rows'])
def test_large_lambda_tends_to_the_plain_gradient(form, x64):
    x = jax.random.normal(jax.random.key(0), (6 if form == 'rows' else 40, 8), jnp.float64)
    stat = statistic.from_rows(x)
    assert isinstance(stat, tract_jax.RowStatistic if form == 'rows' else tract_jax.GramStatistic)
    g = jax.random.normal(jax.random.key(1), (8, 5), jnp.float64)
    errors = [
        float(jnp.max(jnp.abs(lam * tract_jax.tract_solve(stat, g, lam) - g)))
        for lam in (1e1, 1e3, 1e5)
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-4
    np.testing.assert_allclose(errors[1] / errors[2], 100, rtol=0.05)  # O(1/lam)


def test_conv_kernel_shape_and_dtype_are_kept():
    x = jax.random.normal(jax.random.key(0), (64, 27))
    g = jax.random.normal(jax.random.key(1), (3, 3, 3, 16), jnp.bfloat16)
    new = tract_jax.tract_solve(statistic.from_rows(x), g, 0.1)
    assert new.shape == g.shape and new.dtype == jnp.bfloat16


def test_update_of_a_jitted_chain_matches_the_formula():
    x = jax.random.normal(jax.random.key(0), (32, 6))
    layer = tract_jax.Dense(3)
    params = layer.init(jax.random.key(1), x)['params']
    tx = optax.chain(tract_jax.tract(0.2), optax.sgd(1.0))

    @jax.jit
    def step(params):
        def loss_fn(p):
            y, state = layer.apply({'params': p}, x, mutable=['tract'])
            return jnp.mean(y**2), state['tract']

        grads, stats = jax.grad(loss_fn, has_aux=True)(params)
        updates, _ = tx.update(grads, tx.init(params), params, tract_stats=stats)
        return updates, grads

    updates, grads = step(params)
    x = np.asarray(x, np.float64)  # a numpy reference: a jax matmul is TF32 on a GPU
    expected = -np.linalg.solve(x.T @ x / 32 + 0.2 * np.eye(6), grads['kernel'])
    np.testing.assert_allclose(updates['kernel'], expected, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(updates['bias'], -grads['bias'])


def _spd(n, seed, dtype=jnp.float64):
    """A Gram of correlated pixel-like rows plus a ridge: TrAct's kind of matrix."""
    x = np.random.default_rng(seed).normal(size=(2 * n + 3, n)).cumsum(1)
    return jnp.asarray(x.T @ x / len(x) + 0.1 * np.eye(n), dtype)


@pytest.mark.parametrize('n', [1, 7, 64, 65, 147, 300])
@pytest.mark.parametrize('branch', ['xla', 'native'])
def test_cholesky_solve_branches_match_numpy(n, branch, x64):
    # The CPU branch (recursive blocked Cholesky from XLA ops) and the GPU/TPU branch
    # (LAPACK-style cho_solve), both run here, against numpy's LU solve.
    a = _spd(n, seed=n)
    rhs = jnp.asarray(np.random.default_rng(1).normal(size=(n, 5)))
    fn = {'xla': solve._xla_cholesky_solve, 'native': solve._native_cholesky_solve}[branch]
    expected = np.linalg.solve(a, rhs)
    error = np.linalg.norm(jax.jit(fn)(a, rhs) - expected) / np.linalg.norm(expected)
    assert error < 10 * np.linalg.cond(a) * np.finfo(np.float64).eps  # backward stable


@pytest.mark.parametrize('n', [5, 64, 130])
def test_inverse_cholesky_is_the_inverse_lower_factor(n, x64):
    a = _spd(n, seed=3)
    inverse = np.asarray(jax.jit(solve._inverse_cholesky)(a))
    np.testing.assert_array_equal(inverse, np.tril(inverse))
    np.testing.assert_allclose(inverse, np.linalg.inv(np.linalg.cholesky(a)), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('n', [3, 100])
def test_cholesky_breakdown_is_nan_not_a_wrong_solution(n):
    a = _spd(n, seed=4, dtype=jnp.float32).at[n // 2, n // 2].set(-1.0)
    assert np.isnan(jax.jit(solve._xla_cholesky_solve)(a, jnp.ones((n, 2)))).any()


@cpu_only
def test_cpu_step_calls_no_lapack():
    # On CPU, jaxlib's LAPACK runs on OpenBLAS threads that contend with XLA's thread
    # pool inside a training step (benchmarks/overhead.py measured +5% on ViT-S/16);
    # the compiled solve must be XLA operations only.
    stat = statistic.from_rows(jax.random.normal(jax.random.key(0), (200, 48)))
    grad = jnp.ones((48, 8))
    hlo = jax.jit(tract_jax.tract_solve).lower(stat, grad, 0.1).compile().as_text()
    assert 'potrf' not in hlo and 'trsm' not in hlo
    assert 'syevd' not in hlo and 'conditional' not in hlo  # a select is the fallback


def test_solve_under_vmap_and_grad(x64):
    # An ensemble of models (vmap) and meta-gradients through the update (grad w.r.t. λ)
    # both go through the CPU solve's loops, its shift floor and its fallback select.
    x = jax.random.normal(jax.random.key(0), (3, 200, 100))
    g = jax.random.normal(jax.random.key(1), (3, 100, 4))
    stats = jax.vmap(statistic.from_rows)(x)
    out = jax.jit(jax.vmap(lambda s, g: tract_jax.tract_solve(s, g, 0.1)))(stats, g)
    eye = np.eye(100)
    for xi, gi, oi in zip(x, g, out, strict=True):
        np.testing.assert_allclose(oi, np.linalg.solve(xi.T @ xi / 200 + 0.1 * eye, gi), rtol=1e-10)

    a = np.asarray(x[0].T @ x[0] / 200) + 0.1 * eye
    d_lam = -np.linalg.solve(a, np.linalg.solve(a, g[0])).sum()  # d/dλ of sum((A+λI)⁻¹G)
    stat = statistic.from_rows(x[0])
    grad = jax.grad(lambda lam: tract_jax.tract_solve(stat, g[0], lam).sum())(0.1)
    np.testing.assert_allclose(grad, d_lam, rtol=1e-10)
