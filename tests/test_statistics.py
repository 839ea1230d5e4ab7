"""The recorded statistics against explicitly unfolded patches, in kernel order."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CONV_CASES, unfold

import tract_jax


def _layer_kwargs(case):
    kernel_size, strides, padding, input_dilation, kernel_dilation, _ = case
    return dict(
        kernel_size=kernel_size,
        strides=strides,
        padding=padding,
        input_dilation=input_dilation,
        kernel_dilation=kernel_dilation,
    )


@pytest.mark.parametrize('case', CONV_CASES, ids=str)
def test_conv_statistic_is_gram_of_unfolded_patches(case, x64):
    channels, features = 2, 3
    x = jax.random.normal(jax.random.key(0), (2, *case[-1], channels), jnp.float64)
    layer = tract_jax.Conv(features, **_layer_kwargs(case))
    variables = layer.init(jax.random.key(1), x)
    y, state = layer.apply(variables, x, mutable=['tract'])

    patches = unfold(x, *case[:-1])
    stat = state['tract']['kernel']
    if patches.shape[0] < patches.shape[1]:
        np.testing.assert_array_equal(stat.rows, patches)
    else:
        np.testing.assert_allclose(stat.gram, patches.T @ patches, rtol=1e-12, atol=1e-12)
        assert stat.count == patches.shape[0]
    # The patches are in kernel order: they reproduce the layer's output.
    kernel = np.asarray(variables['params']['kernel']).reshape(-1, features)
    expected = patches @ kernel + np.asarray(variables['params']['bias'])
    np.testing.assert_allclose(y.reshape(-1, features), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('padding', ['SAME', 'VALID', 'CIRCULAR', 2])
def test_conv_outputs_and_params_identical_to_flax(padding):
    x = jax.random.normal(jax.random.key(0), (3, 10, 9, 4))
    kwargs = dict(features=5, kernel_size=(3, 3), strides=2, padding=padding)
    ours, theirs = tract_jax.Conv(**kwargs), nn.Conv(**kwargs)
    v_ours, v_theirs = ours.init(jax.random.key(1), x), theirs.init(jax.random.key(1), x)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), v_ours, v_theirs))
    y_plain = theirs.apply(v_theirs, x)
    y_recording, _ = ours.apply(v_ours, x, mutable=['tract'])
    np.testing.assert_array_equal(ours.apply(v_ours, x), y_plain)
    np.testing.assert_array_equal(y_recording, y_plain)


def test_dense_statistic_any_leading_dims(x64):
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5), jnp.float64)
    layer = tract_jax.Dense(7)
    variables = layer.init(jax.random.key(1), x)
    y, state = layer.apply(variables, x, mutable=['tract'])
    np.testing.assert_array_equal(y, nn.Dense(7).apply(variables, x))
    rows = np.asarray(x).reshape(-1, 5)
    stat = state['tract']['kernel']
    np.testing.assert_allclose(stat.gram, rows.T @ rows, rtol=1e-13)
    assert stat.count == 24


def test_few_rows_are_kept_as_rows():
    x = jax.random.normal(jax.random.key(0), (3, 10))
    layer = tract_jax.Dense(2)
    _, state = layer.apply(layer.init(jax.random.key(1), x), x, mutable=['tract'])
    stat = state['tract']['kernel']
    assert isinstance(stat, tract_jax.RowStatistic)
    np.testing.assert_array_equal(stat.rows, x)


class _SharedStem(nn.Module):
    """One stem applied to two crops: statistics must accumulate over both."""

    @nn.compact
    def __call__(self, a, b):
        stem = tract_jax.Dense(2, name='stem')
        return jnp.concatenate([stem(a), stem(b)])


@pytest.mark.parametrize('rows_a, rows_b', [(2, 3), (4, 5), (12, 9), (3, 9)])
def test_calls_in_one_pass_accumulate(rows_a, rows_b, x64):
    a = jax.random.normal(jax.random.key(0), (rows_a, 8), jnp.float64)
    b = jax.random.normal(jax.random.key(1), (rows_b, 8), jnp.float64)
    model = _SharedStem()
    variables = model.init(jax.random.key(2), a, b)
    _, state = model.apply(variables, a, b, mutable=['tract'])
    stat = state['tract']['stem']['kernel']
    both = np.concatenate([a, b])
    if rows_a + rows_b < 8:
        np.testing.assert_array_equal(stat.rows, both)
    else:
        np.testing.assert_allclose(stat.gram, both.T @ both, rtol=1e-13)
        assert stat.count == rows_a + rows_b


@pytest.mark.parametrize(
    'in_dtype, stat_dtype',
    [(jnp.bfloat16, jnp.float32), (jnp.float16, jnp.float32), (jnp.uint8, jnp.float32)],
)
def test_statistics_are_float32_or_wider(in_dtype, stat_dtype):
    x = (jax.random.uniform(jax.random.key(0), (4, 6, 6, 3)) * 200).astype(in_dtype)
    layer = tract_jax.Conv(4, (3, 3), dtype=jnp.float32)
    variables = layer.init(jax.random.key(1), x.astype(jnp.float32))
    _, state = layer.apply(variables, x, mutable=['tract'])
    assert state['tract']['kernel'].gram.dtype == stat_dtype


def test_float64_inputs_give_float64_statistics(x64):
    x = jnp.ones((4, 3), jnp.float64)
    layer = tract_jax.Dense(2)
    _, state = layer.apply(layer.init(jax.random.key(0), x), x, mutable=['tract'])
    assert state['tract']['kernel'].gram.dtype == jnp.float64


def test_nothing_recorded_or_computed_without_mutable_tract():
    x = jnp.ones((2, 8, 8, 3))
    ours, plain = tract_jax.Conv(4, (3, 3)), nn.Conv(4, (3, 3))
    variables = ours.init(jax.random.key(0), x)
    assert 'tract' not in variables  # init records nothing
    jaxpr_ours = jax.make_jaxpr(lambda v: ours.apply(v, x))(variables)
    jaxpr_plain = jax.make_jaxpr(lambda v: plain.apply(v, x))(variables)
    assert str(jaxpr_ours) == str(jaxpr_plain)


def test_statistics_carry_no_gradient():
    x = jax.random.normal(jax.random.key(0), (8, 5))
    layer = tract_jax.Dense(3)
    variables = layer.init(jax.random.key(1), x)

    def f(x):
        _, state = layer.apply(variables, x, mutable=['tract'])
        return state['tract']['kernel'].gram.sum()

    np.testing.assert_array_equal(jax.grad(f)(x), jnp.zeros_like(x))


@pytest.mark.parametrize(
    'kwargs, words',
    [
        (dict(feature_group_count=3), 'feature_group_count=3'),
        (dict(mask=jnp.ones((3, 3, 3, 6))), 'mask'),
    ],
)
def test_unsupported_conv_options_are_named(kwargs, words):
    layer = tract_jax.Conv(6, (3, 3), **kwargs)
    with pytest.raises(ValueError, match=words):
        layer.init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))
