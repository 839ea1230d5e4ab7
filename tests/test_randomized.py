"""Randomized shapes (hypothesis): the closed form, Gram/Woodbury agreement, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import unfold
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import tract_jax
from tract_jax._src import statistic

SETTINGS = settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@st.composite
def conv_configs(draw):
    rank = draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    strides = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    padding = draw(
        st.sampled_from(
            ['SAME', 'VALID', 'CIRCULAR', 1, 'CAUSAL']
            if rank == 1
            else ['SAME', 'VALID', 'CIRCULAR', 'REFLECT', 1, ((1, 0), (2, 1))]
        )
    )
    if padding == 'REFLECT':
        dilation = (1,) * rank  # reflect needs the pad to be smaller than the input
    spatial = tuple(draw(st.integers(4, 7)) for _ in range(rank))
    if padding == 'VALID':  # a window larger than the input leaves no output at all
        assume(all((k - 1) * d < s for k, d, s in zip(kernel, dilation, spatial, strict=True)))
    return dict(
        kernel_size=kernel,
        strides=strides,
        padding=padding,
        kernel_dilation=dilation,
        spatial=spatial,
        channels=draw(st.integers(1, 3)),
        batch=draw(st.integers(1, 3)),
        features=draw(st.integers(1, 4)),
        lam=draw(st.floats(1e-2, 10.0)),
    )


@SETTINGS
@given(conv_configs())
def test_conv_update_is_the_closed_form(x64, config):
    c = config
    shape = (c['batch'], *c['spatial'], c['channels'])
    x = jax.random.normal(jax.random.key(0), shape, jnp.float64) + 1.0
    layer = tract_jax.Conv(
        c['features'],
        c['kernel_size'],
        strides=c['strides'],
        padding=c['padding'],
        kernel_dilation=c['kernel_dilation'],
        param_dtype=jnp.float64,
    )

    @jax.jit  # one compile per example instead of one per operation
    def grads_and_update(x):
        params = layer.init(jax.random.key(1), x)['params']

        def loss_fn(p):
            y, state = layer.apply({'params': p}, x, mutable=['tract'])
            return jnp.sum(jnp.sin(y)), state['tract']

        grads, stats = jax.grad(loss_fn, has_aux=True)(params)
        tx = tract_jax.tract(c['lam'])
        return grads, tx.update(grads, tx.init(params), tract_stats=stats)[0]

    grads, updates = grads_and_update(x)
    patches = unfold(
        x,
        c['kernel_size'],
        c['strides'],
        c['padding'],
        (1,) * len(c['spatial']),
        c['kernel_dilation'],
    )
    b, n = patches.shape
    g = np.asarray(grads['kernel']).reshape(n, -1)
    expected = np.linalg.solve(patches.T @ patches / b + c['lam'] * np.eye(n), g)
    np.testing.assert_allclose(updates['kernel'].reshape(n, -1), expected, rtol=1e-8, atol=1e-10)


@SETTINGS
@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 3), st.floats(1e-3, 1e3))
def test_gram_and_woodbury_agree(x64, rows, n, m, lam):
    x = jax.random.normal(jax.random.key(rows * 100 + n), (rows, n), jnp.float64)
    g = jax.random.normal(jax.random.key(7), (n, m), jnp.float64)

    @jax.jit  # one compile per example instead of one per operation
    def both(x, g):
        stat = tract_jax.RowStatistic(x)
        return (
            tract_jax.tract_solve(stat, g, lam),
            tract_jax.tract_solve(statistic.to_gram(stat), g, lam),
        )

    woodbury, gram = both(x, g)
    np.testing.assert_allclose(woodbury, gram, rtol=1e-8, atol=1e-12 / lam)


GRADS = {
    'stem': {'kernel': jnp.ones((3, 3, 2, 4)), 'bias': jnp.ones(4)},
    'head': {'kernel': jnp.ones((4, 2))},
}


@st.composite
def bad_statistics(draw):
    """Statistics that do not fit GRADS: wrong fan-in, wrong place, or not statistics."""
    n = draw(st.integers(1, 30).filter(lambda k: k != 18))
    wrong_fan_in = draw(
        st.sampled_from(
            [
                tract_jax.GramStatistic(jnp.eye(n), jnp.asarray(5.0)),
                tract_jax.RowStatistic(jnp.ones((1, n))),
            ]
        )
    )
    fitting = tract_jax.GramStatistic(jnp.eye(18), jnp.asarray(5.0))
    key = draw(st.text('abcxyz_', min_size=1, max_size=6))
    return draw(
        st.sampled_from(
            [
                {'stem': {'kernel': wrong_fan_in}},
                {'tract': {'stem': {'kernel': fitting}}},
                {key: {'kernel': fitting}},
                {'stem': fitting},
                {'stem': {'bias': fitting}},
                {'stem': {'kernel': {'gram': jnp.eye(18), 'count': 5.0}}},
                {'stem': {'kernel': jnp.eye(18)}},
                {},
            ]
        )
    )


@settings(max_examples=40, deadline=None)
@given(bad_statistics())
def test_bad_statistics_always_raise_a_clear_error(stats):
    tx = tract_jax.tract(0.1)
    with pytest.raises((ValueError, TypeError), match=r'tract_jax\.tract: '):
        jax.jit(lambda g, t: tx.update(g, tx.init(g), tract_stats=t))(GRADS, stats)
