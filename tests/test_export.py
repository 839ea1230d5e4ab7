"""A jitted TrAct training step lowers for GPU and TPU without the hardware.

No accelerator runs this suite, so this is what keeps a CPU-only construct (a CPU
custom call, a host callback) from slipping into the step unseen. The CPU solve is
chosen by ``lax.platform_dependent``; for cuda and tpu the native Cholesky is lowered.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from helpers import linen_train_step

import tract_jax

X = jnp.ones((4, 16, 16, 3))
Y = jnp.zeros((4,), jnp.int32)
TX = optax.chain(tract_jax.tract(0.1), optax.adam(1e-3))


class _Linen(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = tract_jax.Conv(8, (3, 3), strides=2)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=False)(x)).mean(axis=(1, 2))
        return nn.Dense(10)(x)


def _linen_step():
    model = _Linen()
    variables = model.init(jax.random.key(0), X)

    step = linen_train_step(model, TX)
    return step, (variables, TX.init(variables['params']), X, Y)


class _Nnx(nnx.Module):
    def __init__(self, rngs):
        self.stem = tract_jax.nnx.Linear(48, 16, rngs=rngs)
        self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):  # a patch embedding: 4x4 patches of 3 channels
        patches = x.reshape(x.shape[0], 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5)
        h = self.stem(patches.reshape(x.shape[0], 16, 48))
        return self.head(nnx.gelu(h).mean(axis=1))


def _nnx_step():
    graphdef, params = nnx.split(_Nnx(nnx.Rngs(0)), nnx.Param)

    def step(params, opt_state, x, y):
        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            loss = optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
            return loss, tract_jax.nnx.pop_stats(model)

        grads, stats = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = TX.update(grads, opt_state, params, tract_stats=stats)
        return optax.apply_updates(params, updates), opt_state

    return step, (params, TX.init(params), X, Y)


@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
@pytest.mark.parametrize('make_step', [_linen_step, _nnx_step], ids=['linen', 'nnx'])
def test_training_step_lowers_for_accelerators(make_step, platform):
    step, args = make_step()
    exported = jax.export.export(jax.jit(step), platforms=[platform])(*args)
    assert exported.platforms == (platform,)
    text = exported.mlir_module()
    assert 'cholesky' in text.lower() or 'potrf' in text.lower()  # the native solve
    assert 'callback' not in text.lower()


STATISTIC_CASES = {  # (input shape, (kernel, strides, padding), method)
    'shifts, correlated phases (conv)': ((2, 64, 64, 3), ((7, 7), 2, 3), 'shifts'),
    'shifts, short phases (matmuls)': ((2, 8, 20, 20, 3), ((3, 7, 7), (1, 2, 2), 1), 'shifts'),
    'patch embedding, Gram in blocks': ((200, 32, 32, 3), ((16, 16), 16, 'VALID'), 'patches'),
}


@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
@pytest.mark.parametrize('case', STATISTIC_CASES)
def test_statistics_lower_with_float32_precision_everywhere(case, platform):
    """On TPU a default-precision product would round its inputs to bfloat16."""
    from tract_jax._src import statistics

    shape, fields, method = STATISTIC_CASES[case]
    geometry = statistics.ConvGeometry(*fields)
    fn = jax.jit(lambda x: statistics.geometry_statistic(x, geometry, method=method).gram)
    text = jax.export.export(fn, platforms=[platform])(jax.ShapeDtypeStruct(shape, jnp.float32))
    text = text.mlir_module()
    products = [
        line
        for line in text.splitlines()
        if 'stablehlo.dot_general' in line or 'convolution' in line
    ]
    assert products
    assert all('HIGHEST' in line for line in products), products
