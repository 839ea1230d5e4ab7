"""One update for every front end: linen, NNX, Equinox and plain JAX, layouts transposed.

The same weights in each framework, the same inputs and loss, in float64: the TrAct
update of the first layer's kernel must be the same (Flax ``(*window, in, out)``,
Equinox and the plain-JAX ``lax.conv`` net ``(out, in, *window)``).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tract_jax
import tract_jax.equinox

# (kernel_size, strides, padding, kernel_dilation); padding in a form all four accept.
CONV_CASES = {
    '1d stride 2 SAME dilation 2': ((3,), (2,), 'SAME', (2,)),
    '2d stride (2, 1) pairs dilation (1, 2)': ((3, 2), (2, 1), ((1, 0), (2, 1)), (1, 2)),
    '3d stride 2 pairs': ((3, 1, 2), (2, 1, 2), ((1, 1), (0, 0), (1, 0)), (1, 1, 1)),
}
SPATIAL = {1: (9,), 2: (7, 6), 3: (5, 4, 6)}
IN, OUT, BATCH, LAM = 3, 4, 2, 0.1


def _to_features_first(kernel):
    """Flax (*window, in, out) to Equinox/OIHW (out, in, *window)."""
    rank = kernel.ndim - 2
    return jnp.transpose(kernel, (rank + 1, rank, *range(rank)))


def _loss(y, coefficients):  # y channels-last, as Flax returns it
    return jnp.sum(jnp.sin(y) * coefficients)


def _tract(grads, stats, params):
    tx = tract_jax.tract(LAM)
    return tx.update(grads, tx.init(params), params, tract_stats=stats)[0]


def _linen(layer, x, coefficients):
    variables = layer.init(jax.random.key(0), x)

    def loss_fn(params):
        y, state = layer.apply({'params': params}, x, mutable=['tract'])
        return _loss(y, coefficients), state['tract']

    grads, stats = jax.grad(loss_fn, has_aux=True)(variables['params'])
    return variables['params'], _tract(grads, stats, variables['params'])


def _nnx(layer, params, x, coefficients):
    layer.kernel[...] = params['kernel']
    layer.bias[...] = params['bias']
    grads = nnx.grad(lambda layer: _loss(layer(x), coefficients))(layer)
    stats = tract_jax.nnx.pop_stats(layer)
    return nnx.to_pure_dict(_tract(grads, stats, nnx.state(layer, nnx.Param)))


def _equinox(layer, params, x_first, coefficients, rank):
    weight = _to_features_first(params['kernel']) if rank else params['kernel'].T
    bias = params['bias'].reshape(-1, *([1] * rank))
    layer = eqx.tree_at(lambda c: (c.weight, c.bias), layer, (weight, bias))
    model = tract_jax.equinox.convert(layer, lambda m: m)

    def loss_fn(model):
        y = jax.vmap(model)(x_first)
        return _loss(jnp.moveaxis(y, 1, -1) if rank else y, coefficients)

    grads, stats = tract_jax.equinox.split_stats(eqx.filter_grad(loss_fn)(model))
    return _tract(grads, stats, eqx.filter(model, eqx.is_array))


@pytest.mark.parametrize('case', CONV_CASES, ids=list(CONV_CASES))
def test_conv_update_is_the_same_in_every_front_end(case, x64):
    kernel_size, strides, padding, dilation = CONV_CASES[case]
    rank = len(kernel_size)
    rng = np.random.default_rng(rank)
    x = jnp.asarray(rng.normal(size=(BATCH, *SPATIAL[rank], IN)))
    x_first = jnp.moveaxis(x, -1, 1)
    fields = dict(strides=strides, padding=padding, kernel_dilation=dilation)

    linen = tract_jax.Conv(OUT, kernel_size, param_dtype=jnp.float64, **fields)
    out_shape = jax.eval_shape(lambda: linen.init_with_output(jax.random.key(0), x)[0]).shape
    coefficients = jnp.asarray(rng.normal(size=out_shape))
    params, linen_update = _linen(linen, x, coefficients)
    want = linen_update['kernel']

    nnx_layer = tract_jax.nnx.Conv(
        IN, OUT, kernel_size, param_dtype=jnp.float64, rngs=nnx.Rngs(0), **fields
    )
    np.testing.assert_allclose(_nnx(nnx_layer, params, x, coefficients)['kernel'], want)

    eqx_layer = eqx.nn.Conv(
        rank, IN, OUT, kernel_size, strides, padding, dilation, dtype=jnp.float64,
        key=jax.random.key(1),
    )  # fmt: skip
    eqx_update = _equinox(eqx_layer, params, x_first, coefficients, rank)
    np.testing.assert_allclose(eqx_update.layer.weight, _to_features_first(want), rtol=1e-10)
    np.testing.assert_allclose(eqx_update.layer.bias.ravel(), linen_update['bias'], rtol=1e-12)

    # Plain JAX: a params dict and lax.conv in NCHW / OIHW, statistics by the public API.
    plain = {'w': _to_features_first(params['kernel']), 'b': params['bias']}

    def plain_loss(p):
        y = jax.lax.conv_general_dilated(
            x_first, p['w'], strides, padding, rhs_dilation=dilation
        ) + p['b'].reshape(-1, *([1] * rank))
        return _loss(jnp.moveaxis(y, 1, -1), coefficients)

    stats = {
        'w': tract_jax.conv_statistic(
            x_first, kernel_size, strides=strides, padding=padding, kernel_dilation=dilation,
            channels_last=False, layout='features_first',
        )
    }  # fmt: skip
    plain_update = _tract(jax.grad(plain_loss)(plain), stats, plain)
    np.testing.assert_allclose(plain_update['w'], _to_features_first(want), rtol=1e-10)
    assert not np.allclose(want, jax.grad(lambda p: 0.0)(params)['kernel'])


@pytest.mark.parametrize('batch', [3, 20], ids=['rows < n (Woodbury)', 'rows >= n'])
def test_dense_update_is_the_same_in_every_front_end(batch, x64):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, 2, 7)))  # leading dims: 2 * batch rows of n = 7
    coefficients = jnp.asarray(rng.normal(size=(batch, 2, OUT)))
    params, linen_update = _linen(tract_jax.Dense(OUT, param_dtype=jnp.float64), x, coefficients)
    want = linen_update['kernel']

    layer = tract_jax.nnx.Linear(7, OUT, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(_nnx(layer, params, x, coefficients)['kernel'], want, rtol=1e-10)

    eqx_layer = eqx.nn.Linear(7, OUT, dtype=jnp.float64, key=jax.random.key(1))
    eqx_update = _equinox(eqx_layer, params, x.reshape(-1, 7), coefficients.reshape(-1, OUT), 0)
    np.testing.assert_allclose(eqx_update.layer.weight, want.T, rtol=1e-10)

    plain = {'w': params['kernel'], 'b': params['bias']}
    stats = {'w': tract_jax.dense_statistic(x)}
    grads = jax.grad(lambda p: _loss(x @ p['w'] + p['b'], coefficients))(plain)
    np.testing.assert_allclose(_tract(grads, stats, plain)['w'], want, rtol=1e-10)


def test_a_statistic_of_the_wrong_layout_is_rejected():
    stat = tract_jax.conv_statistic(jnp.ones((2, 8, 8, 3)), (3, 3))  # features_last, n = 27
    grads = {'w': jnp.ones((4, 3, 3, 3))}  # an OIHW kernel: fan-in 27 only as features_first
    tx = tract_jax.tract(0.1)
    with pytest.raises(ValueError, match='would fit a features_first kernel'):
        tx.update(grads, tx.init(grads), tract_stats={'w': stat})
    with pytest.raises(ValueError, match="layout must be one of \\('features_last'"):
        tract_jax.dense_statistic(jnp.ones((2, 3)), layout='OIHW')


def test_public_statistics_match_the_linen_layers(x64):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 9, 9, 2)))
    layer = tract_jax.Conv(5, (3, 3), strides=2, padding='CIRCULAR', kernel_dilation=2)
    variables = layer.init(jax.random.key(0), x)
    recorded = layer.apply(variables, x, mutable=['tract'])[1]['tract']['kernel']
    public = tract_jax.conv_statistic(x, (3, 3), strides=2, padding='CIRCULAR', kernel_dilation=2)
    np.testing.assert_array_equal(public.gram, recorded.gram)
    np.testing.assert_array_equal(public.count, recorded.count)
    first = tract_jax.conv_statistic(
        jnp.moveaxis(x, -1, 1), (3, 3), strides=2, padding='CIRCULAR', kernel_dilation=2,
        channels_last=False, layout='features_first',
    )  # fmt: skip
    # Column (offset, channel) of the Flax order is column (channel, offset) of OIHW's.
    order = np.arange(18).reshape(3, 3, 2).transpose(2, 0, 1).ravel()
    np.testing.assert_allclose(first.gram, public.gram[np.ix_(order, order)])
