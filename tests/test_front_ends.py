"""NNX layers, the converter, linen capture and TrainState: one update for all styles."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import tract_jax

X = np.random.default_rng(0).normal(size=(6, 9, 9, 3))
Y = np.arange(6) % 4


class LinenNet(nn.Module):
    """Plain Flax: what a user cannot edit (a model zoo's ResNet, say)."""

    conv: type = nn.Conv

    @nn.compact
    def __call__(self, x):
        x = self.conv(5, (3, 3), strides=2, padding='SAME', name='conv_init', param_dtype=x.dtype)(
            x
        )
        return nn.Dense(4, name='head', param_dtype=x.dtype)(nn.relu(x).mean(axis=(1, 2)))


class NnxNet(nnx.Module):
    def __init__(self, conv, dtype, rngs):
        self.conv_init = conv(3, 5, (3, 3), strides=2, padding='SAME', param_dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(5, 4, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.conv_init(x)).mean(axis=(1, 2)))


def _loss(logits):
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(Y)).mean()


def _tract_update(grads, stats, params):
    tx = tract_jax.tract(0.1)
    return tx.update(grads, tx.init(params), params, tract_stats=stats)[0]


def _linen_update(model, params, x, capture=()):
    def loss_fn(p):
        with tract_jax.capture(*capture):
            logits, state = model.apply({'params': p}, x, mutable=['tract'])
        return _loss(logits), state['tract']

    grads, stats = jax.grad(loss_fn, has_aux=True)(params)
    return _tract_update(grads, stats, params)


def test_nnx_linen_and_captured_linen_give_the_same_update(x64):
    x = jnp.asarray(X)
    ours = LinenNet(conv=tract_jax.Conv)
    params = ours.init(jax.random.key(0), x)['params']
    linen_update = _linen_update(ours, params, x)
    captured_update = _linen_update(LinenNet(), params, x, capture=('conv_init',))

    model = NnxNet(tract_jax.nnx.Conv, jnp.float64, nnx.Rngs(0))
    model.conv_init.kernel[...] = params['conv_init']['kernel']
    model.conv_init.bias[...] = params['conv_init']['bias']
    model.head.kernel[...] = params['head']['kernel']
    model.head.bias[...] = params['head']['bias']
    grads = nnx.grad(lambda m: _loss(m(x)))(model)
    stats = tract_jax.nnx.pop_stats(model)
    nnx_update = _tract_update(grads, stats, nnx.state(model, nnx.Param))

    for update in (captured_update, nnx.to_pure_dict(nnx_update)):
        for layer in ('conv_init', 'head'):
            for leaf in ('kernel', 'bias'):
                np.testing.assert_allclose(
                    update[layer][leaf], linen_update[layer][leaf], rtol=1e-12, atol=1e-14
                )
    assert not np.allclose(linen_update['conv_init']['kernel'], 0)


def test_converter_keeps_weights_and_outputs():
    model = NnxNet(nnx.Conv, jnp.float32, nnx.Rngs(1))
    kernel = model.conv_init.kernel
    before = model(jnp.asarray(X, jnp.float32))
    assert tract_jax.nnx.convert(model.conv_init) is model.conv_init
    assert isinstance(model.conv_init, tract_jax.nnx.Conv)
    assert model.conv_init.kernel is kernel
    np.testing.assert_array_equal(model(jnp.asarray(X, jnp.float32)), before)
    assert tract_jax.nnx.pop_stats(model) == {}  # a forward alone records nothing
    nnx.grad(lambda m: _loss(m(jnp.asarray(X, jnp.float32))))(model)
    stats = tract_jax.nnx.pop_stats(model)
    assert stats['conv_init']['kernel'].count == 6 * 5 * 5
    linear = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    assert isinstance(tract_jax.nnx.convert(linear), tract_jax.nnx.Linear)


def test_converter_rejects_other_layers():
    with pytest.raises(TypeError, match=r'got a BatchNorm; TrAct applies to an nnx.Linear'):
        tract_jax.nnx.convert(nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
    grouped = nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match='feature_group_count=2'):
        tract_jax.nnx.convert(grouped)


def test_nnx_eval_mode_records_nothing_and_statistics_avoid_param_filters():
    model = NnxNet(tract_jax.nnx.Conv, jnp.float32, nnx.Rngs(0))
    x = jnp.asarray(X, jnp.float32)
    grad = nnx.grad(lambda m: _loss(m(x)) + _loss(m(x)))  # calls the stem twice
    grad(model)
    assert nnx.state(model, tract_jax.nnx.TractStatistics)  # recorded
    assert 'tract_stats' not in nnx.to_pure_dict(nnx.state(model, nnx.Param))['conv_init']
    assert tract_jax.nnx.pop_stats(model)['conv_init']['kernel'].count == 2 * 6 * 25
    model.eval()
    grad(model)
    assert tract_jax.nnx.pop_stats(model) == {}
    model.train()
    nnx.grad(lambda m: _loss(m(x)))(model)
    assert tract_jax.nnx.pop_stats(model)['conv_init']['kernel'].count == 6 * 25


def test_nnx_split_merge_and_pure_jit():
    model = NnxNet(tract_jax.nnx.Conv, jnp.float32, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.chain(tract_jax.tract(0.1), optax.sgd(0.1))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x):
        def loss_fn(params):
            m = nnx.merge(graphdef, params)
            return _loss(m(x)), tract_jax.nnx.pop_stats(m)

        grads, stats = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params, tract_stats=stats)
        return optax.apply_updates(params, updates), opt_state, stats

    new_params, _, stats = step(params, opt_state, jnp.asarray(X, jnp.float32))
    assert stats['conv_init']['kernel'].count == 150
    delta = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new_params, params)
    assert all(d > 0 for d in jax.tree.leaves(delta))


def test_nnx_optimizer_training_loop_lowers_the_loss():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = jnp.asarray((digits.images[..., None] / 16.0 - 0.3) / 0.4, jnp.float32)
    y = jnp.asarray(digits.target)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.stem = tract_jax.nnx.Conv(1, 16, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(16, rngs=rngs)
            self.conv = nnx.Conv(16, 32, (3, 3), rngs=rngs)
            self.head = nnx.Linear(32, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.max_pool(nnx.relu(self.bn(self.stem(x))), (2, 2), (2, 2))
            return self.head(nnx.relu(self.conv(x)).mean(axis=(1, 2)))

    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(
        model, optax.chain(tract_jax.tract(0.1), optax.adam(1e-2)), wrt=nnx.Param
    )

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads, tract_stats=tract_jax.nnx.pop_stats(model))
        return loss

    rng = np.random.default_rng(0)
    losses = []
    for _ in range(80):
        idx = rng.choice(len(x), 64, replace=False)
        losses.append(float(step(model, optimizer, x[idx], y[idx])))
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10]), losses


def test_capture_errors_name_the_layers():
    model = LinenNet()
    x = jnp.asarray(X, jnp.float32)
    variables = model.init(jax.random.key(0), x)
    with (
        pytest.raises(ValueError, match=r"no layer \['conv_int'\].*\['conv_init', 'head'\]"),
        tract_jax.capture('conv_int'),
    ):
        model.apply(variables, x, mutable=['tract'])

    class WithNorm(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.LayerNorm(name='norm')(nn.Conv(2, (3, 3), name='conv')(x))

    norm_model = WithNorm()
    variables = norm_model.init(jax.random.key(0), x)
    with pytest.raises(TypeError, match=r"'norm' is a LayerNorm"), tract_jax.capture('norm'):
        norm_model.apply(variables, x, mutable=['tract'])


def test_capture_inside_jit_and_nested_paths():
    class Backbone(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(4, (3, 3), name='stem')(x)

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Backbone(name='backbone')(x).mean()

    model, x = Outer(), jnp.asarray(X, jnp.float32)
    variables = model.init(jax.random.key(0), x)

    @jax.jit
    def stats(variables, x):
        with tract_jax.capture('backbone/stem'):
            return model.apply(variables, x, mutable=['tract'])[1]['tract']

    assert stats(variables, x)['backbone']['stem']['kernel'].count == 6 * 81


def test_train_state_applies_tract():
    model = LinenNet(conv=tract_jax.Conv)
    x = jnp.asarray(X, jnp.float32)
    params = model.init(jax.random.key(0), x)['params']
    state = tract_jax.TrainState.create(
        apply_fn=model.apply, params=params, tx=optax.chain(tract_jax.tract(0.1), optax.sgd(1.0))
    )

    def loss_fn(p):
        logits, s = state.apply_fn({'params': p}, x, mutable=['tract'])
        return _loss(logits), s['tract']

    grads, stats = jax.grad(loss_fn, has_aux=True)(params)
    new = jax.jit(lambda s, g, t: s.apply_gradients(grads=g, tract_stats=t))(state, grads, stats)
    expected = _tract_update(grads, stats, params)
    np.testing.assert_allclose(
        params['conv_init']['kernel'] - new.params['conv_init']['kernel'],
        expected['conv_init']['kernel'],
        rtol=1e-5,
        atol=1e-6,
    )
    assert int(new.step) == 1
