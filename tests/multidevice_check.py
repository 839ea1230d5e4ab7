"""Run by tests/test_distributed.py in a subprocess with 8 simulated CPU devices.

XLA_FLAGS must be set before jax is imported, so this is a script of its own. Each
check compares a distributed TrAct update with the single-device update on the
whole batch, in float64, and prints 'ok <name>'; any mismatch raises.
"""

import os

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from distributed_problem import check, loss_and_stats, problem, reference
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import tract_jax
from benchmarks import compiled
from tract_jax._src import choice, statistics

# The mesh context: jax.set_mesh where it exists (jax 0.10), jax.sharding.use_mesh on 0.7.0.
mesh_context = getattr(jax, 'set_mesh', None) or jax.sharding.use_mesh

jax.config.update('jax_enable_x64', True)
assert jax.device_count() == 8, jax.devices()


def jitted_update(model, tx):
    """A jitted TrAct update of a fresh function: a step traced under a changed plan must
    not find the trace of another in jax's caches (they are keyed by the function)."""

    def update(params, x, y):
        grads, stats = jax.grad(functools.partial(loss_and_stats, model), has_aux=True)(
            params, x, y
        )
        return tx.update(grads, tx.init(params), params, tract_stats=stats)[0]

    return jax.jit(update)


def jit_over_mesh():
    model, params, x, y = problem('conv', 16)
    want = reference(model, params, x, y)
    tx = tract_jax.tract(0.1)
    update = jitted_update(model, tx)
    data = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
    xs = jax.device_put(x, NamedSharding(data, P('data')))
    ys = jax.device_put(y, NamedSharding(data, P('data')))
    check('jit, data mesh (8)', update(params, xs, ys), want)

    # The statistic in the Pallas kernel (Pallas's interpreter here): each device sums
    # its own images and the sums are added over the mesh (gram_by_kernel's partitioning;
    # without that sum the update is wrong). That the compiled kernel reads no gathered
    # batch is test_compiled.py's, for H100s.
    with choice.changed('cpu', kernel=True):
        check('jit, data mesh (8), Pallas kernel', jitted_update(model, tx)(params, xs, ys), want)

    mixed = jax.make_mesh((4, 2), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
    xs = jax.device_put(x, NamedSharding(mixed, P('data')))
    ys = jax.device_put(y, NamedSharding(mixed, P('data')))
    shardings = {
        'stem': jax.tree.map(lambda _: NamedSharding(mixed, P()), params['stem']),
        'head': {
            'kernel': NamedSharding(mixed, P(None, 'model')),
            'bias': NamedSharding(mixed, P('model')),
        },
    }
    params = jax.device_put(params, shardings)
    check('jit, data x model mesh (4x2)', update(params, xs, ys), want)


def explicit_sharding():
    """jax.make_mesh's default axis type: the recorded statistics are still global."""
    for stem, batch in (('conv', 16), ('dense', 16), ('dense', 32)):
        model, params, x, y = problem(stem, batch)
        _, want = jax.jit(loss_and_stats, static_argnums=0)(model, params, x, y)
        mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Explicit,))
        xs = jax.device_put(x, NamedSharding(mesh, P('data')))
        with mesh_context(mesh):
            got = jax.jit(lambda p, x, m=model: m.apply({'params': p}, x, mutable=['tract'])[1])(
                params, xs
            )['tract']
        check(f'explicit sharding, {stem} stem, batch {batch}: statistics', got, want)


def shard_map_and_pmap(stem, batch):
    model, params, x, y = problem(stem, batch)
    want = reference(model, params, x, y)
    tx = tract_jax.tract(0.1, axis_name='data')

    def per_shard(reduce_grads, params, x, y):
        grads, stats = jax.grad(functools.partial(loss_and_stats, model), has_aux=True)(
            params, x, y
        )
        grads = reduce_grads(grads)  # the global-batch mean gradient, on every device
        return tx.update(grads, tx.init(params), params, tract_stats=stats)[0]

    # shard_map: the gradient of replicated params is summed over the axis already.
    def shard_map_step(params, x, y):
        return per_shard(lambda g: jax.tree.map(lambda a: a / 8, g), params, x, y)

    # pmap: per-device gradients, averaged explicitly.
    def pmap_step(params, x, y):
        return per_shard(lambda g: jax.lax.pmean(g, 'data'), params, x, y)

    mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
    sharded = jax.jit(
        jax.shard_map(
            shard_map_step, mesh=mesh, in_specs=(P(), P('data'), P('data')), out_specs=P()
        )
    )
    check(f'shard_map, {stem} stem, {batch // 8} per device', sharded(params, x, y), want)

    pmapped = jax.pmap(pmap_step, axis_name='data', in_axes=(None, 0, 0))
    got = pmapped(params, x.reshape(8, -1, *x.shape[1:]), y.reshape(8, -1))
    check(f'pmap, {stem} stem, {batch // 8} per device', jax.tree.map(lambda a: a[0], got), want)


SMALL_STEMS = {  # float64 values: every plan and method, sharded against one device
    '3x3/1': ((16, 12, 12, 3), statistics.ConvGeometry((3, 3), 1, 1)),
    '7x7/2': ((16, 20, 20, 3), statistics.ConvGeometry((7, 7), 2, 3)),
    '4x4/4': ((16, 16, 16, 3), statistics.ConvGeometry((4, 4), 4, 'VALID')),
    '3x3x3/1x2x2': ((8, 4, 10, 10, 3), statistics.ConvGeometry((3, 3, 3), (1, 2, 2), 'SAME')),
}
REAL_STEMS = {  # compiled only: what the partitioner moves between devices
    'ResNet-50': ((16, 224, 224, 3), statistics.ConvGeometry((7, 7), 2, 3)),
    'ViT-B/16': ((16, 224, 224, 3), statistics.ConvGeometry((16, 16), 16, 'VALID')),
    'CIFAR': ((16, 32, 32, 3), statistics.ConvGeometry((3, 3), 1, 1)),
    'video': ((8, 16, 112, 112, 3), statistics.ConvGeometry((3, 7, 7), (1, 2, 2), 'SAME')),
}
PLANS = {'cpu': choice.CPU, 'gpu': choice.GPU, 'tpu': choice.TPU}


def statistic_of(geometry, plan, method='auto', max_chunk_bytes=None):
    def gram(images):
        stat = statistics.geometry_statistic(
            images, geometry, plan=plan, method=method, max_chunk_bytes=max_chunk_bytes
        )
        return stat.gram

    return gram


def plans_sum_where_the_images_lie():
    """Every plan, forced, with the batch sharded: the statistic is the one-device one
    (float64; by patches, shifts and segments, in one chunk and in chunks of one image,
    over one mesh axis and two), and it is summed where the images lie: compiled for
    8 devices, TrAct's code sends one all-reduce of the Gram and gathers nothing."""
    data = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
    two = jax.make_mesh((4, 2), ('data', 'fsdp'), axis_types=(AxisType.Auto,) * 2)
    rng = np.random.default_rng(0)
    for name, (shape, geometry) in SMALL_STEMS.items():
        images = jnp.asarray(rng.normal(size=shape) + 0.5)
        methods = ['patches', 'shifts'] + ['segments'] * (len(shape) == 4)
        for plan, method in itertools.product(PLANS.values(), methods):
            want = jax.jit(statistic_of(geometry, plan, method))(images)
            for mesh, spec, chunk in ((data, P('data'), None), (two, P(('data', 'fsdp')), 1)):
                got = jax.jit(statistic_of(geometry, plan, method, chunk))(
                    jax.device_put(images, NamedSharding(mesh, spec))
                )
                np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
        print(f'ok every plan sharded, {name}: statistics', flush=True)

    for name, (shape, geometry) in REAL_STEMS.items():
        images = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(data, P('data')))
        n = math.prod(geometry.kernel_size) * shape[-1]
        for plan_name, plan in PLANS.items():
            hlo = (
                jax.jit(statistic_of(geometry, plan), out_shardings=NamedSharding(data, P()))
                .lower(images)
                .compile()
                .as_text()
            )
            sent = compiled.collective_bytes(compiled.collectives(hlo), tract=True)
            # The Gram's blocks, summed: a few n x n floats at most (segments reduce
            # their blocks of segment values before picking the Gram out of them).
            assert set(sent) == {'all-reduce'}, (name, plan_name, sent)
            assert sent['all-reduce'][1] <= max(4 * 4 * n * n, 2**20), (name, plan_name, sent)
        print(f'ok every plan, 8 devices, {name}: all-reduces, no gather', flush=True)


def equinox_sharded_jit():
    """Equinox: the statistic rides in the gradient, which a sharded jit reduces globally."""
    import equinox as eqx

    import tract_jax.equinox

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 3, 8, 8)) * 2 + 0.5)
    y = jnp.asarray(rng.integers(0, 4, 16))
    k1, k2 = jax.random.split(jax.random.key(0))
    model = eqx.nn.Sequential(
        [
            eqx.nn.Conv2d(3, 6, 3, stride=2, dtype=jnp.float64, key=k1),
            eqx.nn.Lambda(lambda h: jax.nn.relu(h).mean(axis=(1, 2))),
            eqx.nn.Linear(6, 4, dtype=jnp.float64, key=k2),
        ]
    )
    model = tract_jax.equinox.convert(model, lambda m: m.layers[0])
    tx = tract_jax.tract(0.1)

    @eqx.filter_jit
    def update(model, x, y):
        def loss_fn(model):
            logits = jax.vmap(model)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads, stats = tract_jax.equinox.split_stats(eqx.filter_grad(loss_fn)(model))
        params = eqx.filter(model, eqx.is_array)
        return tx.update(grads, tx.init(params), params, tract_stats=stats)[0]

    want = update(model, x, y)
    mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
    xs = jax.device_put(x, NamedSharding(mesh, P('data')))
    ys = jax.device_put(y, NamedSharding(mesh, P('data')))
    check('equinox, jit, data mesh (8)', update(model, xs, ys), want)


if __name__ == '__main__':
    plans_sum_where_the_images_lie()
    equinox_sharded_jit()
    jit_over_mesh()
    explicit_sharding()
    shard_map_and_pmap('conv', 16)  # Gram statistics, summed
    shard_map_and_pmap('dense', 16)  # 2 rows per device, 16 global < n = 20: rows gathered
    shard_map_and_pmap('dense', 32)  # 4 rows per device < 20, 32 global >= 20: gathered -> Gram
    print('all ok')
