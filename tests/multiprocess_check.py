"""One of two processes on localhost, one CPU device each, run by tests/test_distributed.py.

    python tests/multiprocess_check.py COORDINATOR PROCESS_ID   # twice, ids 0 and 1,
                                                                # as examples/launch.py runs it

The processes join with ``jax.distributed.initialize`` and gloo's CPU collectives;
each feeds only its own rows of the global batch
(``jax.make_array_from_process_local_data``), as on a pod. Each check compares, in
float64, TrAct's update under ``jit`` over all devices and under ``shard_map``
with ``axis_name`` with the update this process computes alone on the whole batch,
and prints 'ok <name>'. The last check shows that the comparison would fail if one
process's statistic were left out.
"""

import functools
import sys

import jax
import numpy as np
from distributed_problem import check, loss_and_stats, problem, reference, update_with
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import tract_jax
from examples import launch

COORDINATOR, PROCESS = sys.argv[1], int(sys.argv[2])
launch.fail_fast()  # a failed check ends the job at once, not at the shutdown's timeout
jax.config.update('jax_enable_x64', True)
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(COORDINATOR, num_processes=2, process_id=PROCESS)
# One device a process as examples/launch.py starts it (with two, gloo's collectives
# deadlock now and then; benchmarks/multiprocess_stress.py counts it with --devices 2).
assert jax.process_count() == 2

MESH = jax.make_mesh((jax.device_count(),), ('data',), axis_types=(AxisType.Auto,))


def own_rows(array):
    """This process's half of the global batch, as one global array over the mesh."""
    rows = np.asarray(array)
    half = rows.shape[0] // 2
    own = rows[PROCESS * half : (PROCESS + 1) * half]
    return jax.make_array_from_process_local_data(NamedSharding(MESH, P('data')), own)


def replicated(tree):
    """The same values on every device of both processes."""
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(NamedSharding(MESH, P()), np.asarray(a)),
        tree,
    )


def local(tree):
    """A replicated global result, as this process's copy."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


def jit_over_processes(stem, batch):
    model, params, x, y = problem(stem, batch)
    want = reference(model, params, x, y)
    step = jax.jit(functools.partial(update_with, tract_jax.tract(0.1), model))
    got = step(replicated(params), own_rows(x), own_rows(y))
    check(f'jit, {stem} stem, batch {batch} over 2 processes', local(got), want)


def shard_map_over_processes(stem, batch):
    model, params, x, y = problem(stem, batch)
    want = reference(model, params, x, y)

    def per_shard(params, x, y):
        # The gradient of replicated params is summed over the axis already; the
        # statistics are summed by tract() over axis_name.
        grads, stats = jax.grad(functools.partial(loss_and_stats, model), has_aux=True)(
            params, x, y
        )
        grads = jax.tree.map(lambda g: g / jax.device_count(), grads)
        tx = tract_jax.tract(0.1, axis_name='data')
        return tx.update(grads, tx.init(params), params, tract_stats=stats)[0]

    step = jax.jit(
        jax.shard_map(per_shard, mesh=MESH, in_specs=(P(), P('data'), P('data')), out_specs=P())
    )
    got = step(replicated(params), own_rows(x), own_rows(y))
    check(f'shard_map, {stem} stem, batch {batch} over 2 processes', local(got), want)


def one_process_left_out(stem, batch):
    """The whole-batch gradient preconditioned with process 0's rows alone is far from
    the whole-batch update: a left-out statistic fails the checks above."""
    model, params, x, y = problem(stem, batch)
    want = reference(model, params, x, y)
    grads = jax.grad(lambda p: loss_and_stats(model, p, x, y)[0])(params)
    _, stats = loss_and_stats(model, params, x[: batch // 2], y[: batch // 2])
    tx = tract_jax.tract(0.1)
    partial = tx.update(grads, tx.init(params), params, tract_stats=stats)[0]
    gap = np.max(np.abs(partial['stem']['kernel'] - want['stem']['kernel']))
    scale = np.max(np.abs(want['stem']['kernel']))
    assert gap > 1e-3 * scale, (gap, scale)  # the checks' tolerance is ~1e-10 of it
    print(f'ok {stem} stem: without process 1 the update moves by {gap / scale:.1e}', flush=True)


if __name__ == '__main__':
    for stem, batch in (('conv', 16), ('dense', 32)):
        jit_over_processes(stem, batch)
        shard_map_over_processes(stem, batch)
        one_process_left_out(stem, batch)
    print('all ok', flush=True)
    jax.distributed.shutdown()
