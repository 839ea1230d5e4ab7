"""Data-parallel training with TrAct on a device mesh: one host or a whole pod.

    python examples/distributed.py                  # here: 8 simulated CPU devices
    python examples/distributed.py --steps 200
    python examples/distributed.py --processes 2    # 2 processes on localhost, a CPU each

The same code runs on a GPU/TPU pod: start one process per host with
``jax.distributed.initialize()`` (done below when JAX_COORDINATOR_ADDRESS or a
cluster environment is present), build the mesh over ``jax.devices()`` and feed each
process only its own rows of the global batch
(``jax.make_array_from_process_local_data``). The batch is sharded over the
``'data'`` axis and the parameters are replicated; under ``jax.jit`` XLA sums the
per-device parts of TrAct's statistic (a Gram matrix and a row count) across the
mesh, across processes too, so the update is exactly the one for the global batch.
No ``axis_name`` is needed with ``jax.jit``; under ``shard_map``/``pmap`` pass
``tract(lam, axis_name='data')`` instead.

``--processes N`` shows a multi-host run on this machine: it starts itself N times
on localhost (``examples/launch.py``), each process with one CPU device and gloo's CPU
collectives, joined by ``jax.distributed.initialize(coordinator, N, process_id)``;
every process prints its losses, which agree. A CPU demo (real hosts use NCCL or the
TPU interconnect): XLA:CPU's collectives between several CPU devices of a process
deadlock now and then when steps are queued, so on CPU devices each step is
waited for, the launcher gives each process one device, makes a collective that waits
over a minute an error, and stops the job at ``--deadline``.
"""

import argparse
import os
import sys

if not {'--process-id', '--real-devices'} & set(sys.argv) and (
    'JAX_COORDINATOR_ADDRESS' not in os.environ
):  # a process of --processes N has its flags from the launcher
    os.environ['XLA_FLAGS'] = (
        os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
    )

import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples import data, launch, models, steps

LAUNCHED = '--process-id' in sys.argv


def say(line: str) -> None:
    """Prints ``line`` in one write: the processes of a --processes run share stdout."""
    sys.stdout.write(line + '\n')
    sys.stdout.flush()


def start(processes: int, argv: list[str], deadline_s: float) -> int:
    """Runs this script ``processes`` times on localhost, as one job; its exit code."""
    address = launch.coordinator()

    def command(i: int) -> list[str]:
        return [sys.executable, __file__, *argv, '--coordinator', address, '--process-id', str(i)]

    try:
        launch.run(command, processes, deadline_s=deadline_s, capture=False)
    except launch.JobFailed as failed:
        print(f'error: {failed}', file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--steps', type=int, default=100)
    parser.add_argument('--batch', type=int, default=128, help='global batch size')
    parser.add_argument('--lam', type=float, default=0.1)
    parser.add_argument('--real-devices', action='store_true', help='do not simulate 8 CPUs')
    parser.add_argument(
        '--processes', type=int, default=1, help='processes on localhost, a CPU device each'
    )
    parser.add_argument(
        '--deadline', type=float, default=600, help='seconds a --processes job may take'
    )
    parser.add_argument('--coordinator', help=argparse.SUPPRESS)
    parser.add_argument('--process-id', type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.processes > 1 and not LAUNCHED:
        sys.exit(start(args.processes, sys.argv[1:] if argv is None else argv, args.deadline))
    if LAUNCHED:
        launch.fail_fast()  # an error ends this process, and so the job, at once
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
        jax.distributed.initialize(args.coordinator, args.processes, args.process_id)
    elif 'JAX_COORDINATOR_ADDRESS' in os.environ:
        jax.distributed.initialize()  # one process per host; reads the cluster environment
    mesh = jax.make_mesh((jax.device_count(),), ('data',), axis_types=(AxisType.Auto,))
    prefix = f'[process {jax.process_index()}] ' if jax.process_count() > 1 else ''
    say(f'{prefix}devices: {jax.device_count()}, processes: {jax.process_count()}')
    batch_sharding = NamedSharding(mesh, P('data'))

    def replicated(tree):  # the same values on every device of every process
        return jax.tree.map(
            lambda a: jax.make_array_from_process_local_data(
                NamedSharding(mesh, P()), np.asarray(a)
            ),
            tree,
        )

    def own_rows(rows):  # this process's slice of the global batch, as a global array
        per_process = len(rows) // jax.process_count()
        first = jax.process_index() * per_process
        own = rows[first : first + per_process]
        return jax.make_array_from_process_local_data(batch_sharding, own)

    train, _ = data.load('digits')
    model = models.SmallCNN(num_classes=10)
    variables = model.init(jax.random.key(0), train.images[:1])
    tx = steps.make_optimizer(optax.adam(3e-3), args.lam)
    params = replicated(variables['params'])
    batch_stats = replicated(variables['batch_stats'])
    opt_state = replicated(tx.init(variables['params']))
    step = steps.make_train_step(model, tx, use_tract=True)

    # XLA:CPU's collectives between a process's CPU devices deadlock now and then when
    # steps are queued without waiting for their results: wait for each step there. GPUs
    # and TPUs keep their steps queued.
    one_at_a_time = jax.devices()[0].platform == 'cpu' and jax.local_device_count() > 1
    rng = np.random.default_rng(0)  # the same global batches in every process
    for i in range(args.steps):
        idx = rng.choice(len(train.images), args.batch, replace=False)
        x, y = own_rows(train.images[idx]), own_rows(train.labels[idx])
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, x, y)
        if one_at_a_time:
            jax.block_until_ready(loss)
        if i == 0:
            say(f'{prefix}first loss {float(loss):.4f}')
    say(f'{prefix}last loss {float(loss):.4f}')
    if LAUNCHED:
        jax.distributed.shutdown()


if __name__ == '__main__':
    main()
