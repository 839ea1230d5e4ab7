"""A jitted TrAct training step lowers for GPU and TPU, and adds no control flow there.

No accelerator runs this suite, so this is what keeps a CPU-only construct (a CPU
custom call, a host callback) from slipping into the step unseen, and what keeps the
step free of data-dependent control flow: on a GPU a ``lax.cond`` copies its predicate
to the host and waits for the device, and a ``while`` splits CUDA graphs. The steps
are exported from abstract shapes (``jax.export`` lowers without the hardware).

``lax.platform_dependent`` (how ``choice.py`` picks each platform's plan) lowers to a
``stablehlo.case`` on a constant index, which XLA folds away when it compiles (a test
below compiles for this CPU and finds no conditional); those are not counted.
"""

import re

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax import export

import tract_jax
import tract_jax.equinox
from tract_jax._src import choice, statistics

PLATFORMS = ['cuda', 'tpu']
STEMS = {  # (input shape NHWC, stem): a stem is a conv (kernel, stride, padding) or 'dense'
    'conv stem, overlapping windows': ((4, 64, 64, 3), ((7, 7), 2, 3)),
    'patch embedding': ((4, 64, 64, 3), ((16, 16), 16, 'VALID')),
    'dense stem': ((4, 8, 8, 3), 'dense'),
}


def data_dependent_control_flow(mlir: str) -> dict[str, int]:
    """Counts of ``while`` and of ``case`` ops whose index is not a compile-time constant.

    A case is static when its index is a constant (MLIR names constants ``%c...``) or
    the result of a static case: ``platform_dependent`` nests two such cases.
    """
    counts = {'case': 0, 'while': len(re.findall(r'\bstablehlo\.while\b', mlir))}
    static: set[str] = set()
    for line in mlir.splitlines():
        if 'func.func' in line:
            static = set()
        match = re.search(r'(%[\w#]+)(?::\d+)? = "stablehlo\.case"\((%[\w#]+)\)', line)
        if match:
            result, index = match.groups()
            if index.startswith('%c') or index.split('#')[0] in static:
                static.add(result)
            else:
                counts['case'] += 1
    return counts


def _cross_entropy(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


class _LinenNet(nn.Module):
    stem: object
    tract: bool

    @nn.compact
    def __call__(self, x):
        if self.stem == 'dense':
            layer = tract_jax.Dense if self.tract else nn.Dense
            h = layer(16)(x.reshape(x.shape[0], -1))
        else:
            kernel, strides, padding = self.stem
            layer = tract_jax.Conv if self.tract else nn.Conv
            h = layer(16, kernel, strides, padding)(x).mean(axis=(1, 2))
        return nn.Dense(10)(nn.relu(h))


def _linen_step(shape, stem, tract):
    model = _LinenNet(stem, tract)
    tx = optax.chain(tract_jax.tract(0.1), optax.adam(1e-3)) if tract else optax.adam(1e-3)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape))['params'])

    def step(params, opt_state, x, y):
        def loss_fn(params):
            logits, state = model.apply({'params': params}, x, mutable=['tract'])
            return _cross_entropy(logits, y), state.get('tract')

        grads, stats = jax.grad(loss_fn, has_aux=True)(params)
        extra = {'tract_stats': stats} if tract else {}
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return optax.apply_updates(params, updates), opt_state

    return step, (params, jax.eval_shape(tx.init, params), x)


class _NnxNet(nnx.Module):
    def __init__(self, shape, stem, tract, rngs):
        self.stem = stem
        if stem == 'dense':
            layer = tract_jax.nnx.Linear if tract else nnx.Linear
            self.first = layer(shape[1] * shape[2] * shape[3], 16, rngs=rngs)
        else:
            kernel, strides, padding = stem
            layer = tract_jax.nnx.Conv if tract else nnx.Conv
            self.first = layer(3, 16, kernel, strides=strides, padding=padding, rngs=rngs)
        self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        if self.stem == 'dense':
            h = self.first(x.reshape(x.shape[0], -1))
        else:
            h = self.first(x).mean(axis=(1, 2))
        return self.head(nnx.relu(h))


def _nnx_step(shape, stem, tract):
    graphdef, params = nnx.split(_NnxNet(shape, stem, tract, nnx.Rngs(0)), nnx.Param)
    tx = optax.chain(tract_jax.tract(0.1), optax.adam(1e-3)) if tract else optax.adam(1e-3)

    def step(params, opt_state, x, y):
        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            loss = _cross_entropy(model(x), y)
            return loss, tract_jax.nnx.pop_stats(model) if tract else None

        grads, stats = jax.grad(loss_fn, has_aux=True)(params)
        extra = {'tract_stats': stats} if tract else {}
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return optax.apply_updates(params, updates), opt_state

    return step, (params, tx.init(params), jax.ShapeDtypeStruct(shape, jnp.float32))


def _equinox_step(shape, stem, tract):
    key = jax.random.key(0)
    if stem == 'dense':
        first = eqx.nn.Linear(shape[1] * shape[2] * shape[3], 16, key=key)
        layers = [eqx.nn.Lambda(jnp.ravel), first, eqx.nn.Lambda(jax.nn.relu)]
        where = lambda m: m.layers[1]  # noqa: E731
    else:
        kernel, strides, padding = stem
        first = eqx.nn.Conv2d(3, 16, kernel, strides, padding, key=key)
        layers = [first, eqx.nn.Lambda(lambda h: jax.nn.relu(h).mean(axis=(1, 2)))]
        where = lambda m: m.layers[0]  # noqa: E731
    model = eqx.nn.Sequential([*layers, eqx.nn.Linear(16, 10, key=key)])
    if tract:
        model = tract_jax.equinox.convert(model, where)
    tx = optax.chain(tract_jax.tract(0.1), optax.adam(1e-3)) if tract else optax.adam(1e-3)
    params, static = eqx.partition(model, eqx.is_array)

    def step(params, opt_state, x, y):
        def loss_fn(params):
            return _cross_entropy(jax.vmap(eqx.combine(params, static))(x), y)

        grads = jax.grad(loss_fn)(params)
        extra = {}
        if tract:
            grads, extra['tract_stats'] = tract_jax.equinox.split_stats(grads)
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return eqx.apply_updates(params, updates), opt_state

    nchw = (shape[0], shape[3], shape[1], shape[2])
    return step, (params, tx.init(params), jax.ShapeDtypeStruct(nchw, jnp.float32))


FRONT_ENDS = {'linen': _linen_step, 'nnx': _nnx_step, 'equinox': _equinox_step}


def _export(make_step, shape, stem, tract, platform):
    step, args = make_step(shape, stem, tract)
    y = jax.ShapeDtypeStruct((shape[0],), jnp.int32)
    return export.export(jax.jit(step), platforms=[platform])(*args, y)


@pytest.mark.parametrize('platform', PLATFORMS)
@pytest.mark.parametrize('stem', STEMS)
@pytest.mark.parametrize('front_end', FRONT_ENDS)
def test_step_adds_no_control_flow_on_accelerators(front_end, stem, platform):
    shape, layer = STEMS[stem]
    tract, plain = (
        _export(FRONT_ENDS[front_end], shape, layer, use_tract, platform)
        for use_tract in (True, False)
    )
    assert tract.platforms == (platform,)
    text = tract.mlir_module()
    assert data_dependent_control_flow(text) == data_dependent_control_flow(plain.mlir_module())
    assert 'callback' not in text.lower()
    if platform == 'cuda':  # the native solve: cuSOLVER's Cholesky, no eigensolver
        # jax 0.10 exports the potrf call; jax 0.7 a stablehlo.cholesky, which XLA:GPU
        # compiles to the same cuSOLVER potrf.
        assert ('potrf' in text or 'stablehlo.cholesky' in text) and 'syevd' not in text


@pytest.mark.parametrize('platform', PLATFORMS)
def test_a_large_batch_is_chunked_without_a_loop_on_accelerators(platform):
    """A ResNet-50 stem at batch 256 holds 1.9 GB of patches: chunks, unrolled."""
    shape, stem = (256, 224, 224, 3), ((7, 7), 2, 3)
    exported = _export(_linen_step, shape, stem, True, platform)
    assert data_dependent_control_flow(exported.mlir_module()) == {'case': 0, 'while': 0}


def test_platform_cases_are_folded_by_the_compiler():
    """The constant-index cases of platform_dependent are gone once XLA compiles."""
    step, args = _linen_step(*STEMS['conv stem, overlapping windows'], True)
    concrete = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), args)
    y = jnp.zeros((4,), jnp.int32)
    mlir = jax.jit(step).lower(*concrete, y).as_text()
    assert 'stablehlo.case' in mlir  # the platform choice, before XLA
    assert data_dependent_control_flow(mlir)['case'] == 0
    hlo = jax.jit(step).lower(*concrete, y).compile().as_text()
    assert 'conditional' not in hlo


def test_the_counter_sees_a_data_dependent_cond():
    def f(x):
        return jax.lax.cond(x.sum() > 0, lambda: x, lambda: -x)

    text = export.export(jax.jit(f), platforms=['cuda'])(jnp.ones(3)).mlir_module()
    assert data_dependent_control_flow(text)['case'] == 1


STATISTIC_CASES = {  # (input shape, (kernel, strides, padding), method)
    'shifts, correlated phases (conv)': ((2, 64, 64, 3), ((7, 7), 2, 3), 'shifts'),
    'shifts, short phases (matmuls)': ((2, 8, 20, 20, 3), ((3, 7, 7), (1, 2, 2), 1), 'shifts'),
    'patch embedding': ((200, 32, 32, 3), ((16, 16), 16, 'VALID'), 'patches'),
    'segments': ((2, 64, 64, 3), ((7, 7), 2, 3), 'segments'),
}


@pytest.mark.parametrize('platform', PLATFORMS)
@pytest.mark.parametrize('case', STATISTIC_CASES)
def test_statistics_lower_at_the_plans_precision(case, platform):
    """Never DEFAULT: on TPU that rounds inputs to bfloat16, on GPU to TF32."""
    shape, fields, method = STATISTIC_CASES[case]
    geometry = statistics.ConvGeometry(*fields)
    fn = jax.jit(lambda x: statistics.geometry_statistic(x, geometry, method=method).gram)
    text = export.export(fn, platforms=[platform])(jax.ShapeDtypeStruct(shape, jnp.float32))
    products = [
        line
        for line in text.mlir_module().splitlines()
        if ('stablehlo.dot_general' in line or 'stablehlo.convolution' in line)
        and not line.startswith('#loc')
    ]
    assert products
    precision = str(choice.PLANS[platform].precision).split('.')[-1]  # HIGHEST or HIGH
    found = [re.findall(r'\b(DEFAULT|HIGHEST|HIGH)\b', line) for line in products]
    assert [precision, precision] in found, products
    # The segments' 0/1 picks run at HIGHEST, where picking is exact.
    assert all(names in ([precision] * 2, ['HIGHEST'] * 2) for names in found), products
