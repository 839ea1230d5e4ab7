"""Data-parallel training with TrAct on a device mesh: one host or a whole pod.

    python examples/distributed.py                 # here: 8 simulated CPU devices
    python examples/distributed.py --steps 200

The same code runs on a GPU/TPU pod: start one process per host with
``jax.distributed.initialize()`` (done below when JAX_COORDINATOR_ADDRESS or a
cluster environment is present), build the mesh over ``jax.devices()`` and feed each
host its slice of the global batch. The batch is sharded over the ``'data'`` axis and
the parameters are replicated; under ``jax.jit`` XLA sums the per-device parts of
TrAct's statistic (a Gram matrix and a row count) across the mesh, so the update is
exactly the one for the global batch. No ``axis_name`` is needed with ``jax.jit``;
under ``shard_map``/``pmap`` pass ``tract(lam, axis_name='data')`` instead.
"""

import argparse
import os
import sys

if 'JAX_COORDINATOR_ADDRESS' not in os.environ and '--real-devices' not in sys.argv:
    os.environ['XLA_FLAGS'] = (
        os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
    )

import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples import data, models, steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--steps', type=int, default=100)
    parser.add_argument('--batch', type=int, default=128, help='global batch size')
    parser.add_argument('--lam', type=float, default=0.1)
    parser.add_argument('--real-devices', action='store_true', help='do not simulate 8 CPUs')
    args = parser.parse_args(argv)

    if 'JAX_COORDINATOR_ADDRESS' in os.environ:
        jax.distributed.initialize()  # one process per host; reads the cluster environment
    mesh = jax.make_mesh((jax.device_count(),), ('data',), axis_types=(AxisType.Auto,))
    print(f'devices: {jax.device_count()}, processes: {jax.process_count()}')
    batch_sharding = NamedSharding(mesh, P('data'))
    replicated = NamedSharding(mesh, P())

    train, _ = data.load('digits')
    model = models.SmallCNN(num_classes=10)
    variables = model.init(jax.random.key(0), train.images[:1])
    tx = steps.make_optimizer(optax.adam(3e-3), args.lam)
    params = jax.device_put(variables['params'], replicated)
    batch_stats = jax.device_put(variables['batch_stats'], replicated)
    opt_state = jax.device_put(tx.init(params), replicated)
    step = steps.make_train_step(model, tx, use_tract=True)

    rng = np.random.default_rng(0)
    for i in range(args.steps):
        idx = rng.choice(len(train.images), args.batch, replace=False)
        # On a pod each host would put only its own rows (make_array_from_process_local_data).
        x = jax.device_put(train.images[idx], batch_sharding)
        y = jax.device_put(train.labels[idx], batch_sharding)
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, x, y)
        if i == 0:
            print(f'first loss {float(loss):.4f}')
    print(f'last loss {float(loss):.4f}')


if __name__ == '__main__':
    main()
