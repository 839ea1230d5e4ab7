"""TrAct steps compiled by XLA:TPU (libtpu) and XLA:GPU (the CUDA plugin), no device needed.

These need the accelerator compilers, which the main environment does not install
(libtpu is ~700 MB, and both plugins look for their devices when jax starts): `.ci/run`
runs this file in `.venv-aot` (`benchmarks/aot_env.sh`) with TRACT_JAX_REQUIRE_AOT=1,
where a missing compiler fails instead of skipping. Elsewhere they skip, saying why.

What they hold the library to (issue 25; `benchmarks/compiled.py` prices every model):
on GPU a TrAct step adds no `conditional` or `while` and at most 24 thunks; on TPU the
instructions TrAct adds to a small ViT's step cost at most 1% of its estimated cycles, and
to a CIFAR ResNet-18's (whose stem is summed from segments of image rows) at most 3%.
"""

import importlib.util
import os

import pytest


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


REQUIRED = os.environ.get('TRACT_JAX_REQUIRE_AOT') == '1'
MISSING = [m for m in ('libtpu', 'jax_plugins.xla_cuda12') if not _installed(m)]
if MISSING and REQUIRED:
    raise RuntimeError(f'TRACT_JAX_REQUIRE_AOT=1 but {MISSING} are not installed')
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f'no accelerator compiler ({", ".join(MISSING)}): see aot_env.sh'
)


@pytest.fixture(scope='module')
def compiled():
    import jax

    from benchmarks import compiled

    jax.config.update('jax_platforms', 'cpu')
    return compiled


@pytest.mark.parametrize('model', ['resnet18_cifar', 'vit_tiny4_cifar'])
def test_gpu_step_adds_no_control_flow_and_few_thunks(compiled, model):
    target = compiled.TARGETS['h100']
    small = compiled.dataclasses.replace(target, batches={model: 32})
    row = compiled.compile_model(small, model, compiled.sharding(target))
    plain, tract = row['plain'], row['tract']
    assert (tract['conditional'], tract['while']) == (plain['conditional'], plain['while'])
    assert 0 < tract['thunks'] - plain['thunks'] <= 24
    kinds = {thunk['kind'] for thunk in tract['tract_thunks']}
    assert 'kCustomCall' in kinds or 'kCholesky' in kinds  # the native factorization
    assert tract['temp_bytes'] <= 1.01 * plain['temp_bytes'] + 2**20


def test_tpu_step_of_a_small_vit_adds_at_most_1_percent_of_its_cycles(compiled):
    target = compiled.TARGETS['v5e']
    row = compiled.compile_model(target, 'vit_tiny4_cifar', compiled.sharding(target))
    plain, tract = row['plain'], row['tract']
    assert tract['while'] == plain['while'] and tract['conditional'] == plain['conditional']
    assert tract['tract_ops'], 'no instruction of the TrAct step is named tract_statistic/solve'
    assert tract['tract_cycles'] <= 0.01 * plain['cycles']
    assert tract['cycles'] <= 1.01 * plain['cycles']


def test_tpu_resnet_stem_statistic_reads_the_image_in_place(compiled):
    """The CIFAR ResNet-18 stem from segments of image rows (the TPU plan): TrAct's own
    instructions at most 3% of the step's estimated cycles (2.4% priced with libtpu
    0.0.42.1; by patches, before, 5.5%: the patches' copy alone was 80k of 129k cycles),
    and at most 10 of them loop fusions priced at the cost model's floor (9 with 0.0.42.1
    and 0.0.52, 1,825 cycles each: what most of that 2.4% is)."""
    target = compiled.TARGETS['v5e']
    step, args = compiled.abstract_step('resnet18_cifar', 128, True, compiled.sharding(target))
    report = compiled.tpu_report(step.trace(*args).lower().compile())
    assert any('tract_statistic' in op['op_name'] for op in report['tract_ops'])
    assert report['tract_cycles'] <= 0.03 * report['cycles']
    assert 1700 <= report['loop_floor'] <= 2000, 'the floor moved: reprice (benchmarks.compiled)'
    assert 0 < report['tract_at_floor'] <= 10


def test_gpu_step_with_the_kernel_statistic_compiles_to_one_triton_kernel(compiled):
    """The GPU plan with ``kernel=True`` (off by default until timed on a GPU): XLA:GPU
    compiles the Pallas kernel through Triton for sm_90 and launches the statistic as
    that one kernel, with no control flow; the patches are gone."""
    from tract_jax._src import choice

    target = compiled.TARGETS['h100']
    small = compiled.dataclasses.replace(target, batches={'resnet18_cifar': 32})
    with choice.changed('cuda', kernel=True):
        row = compiled.compile_model(small, 'resnet18_cifar', compiled.sharding(target))
    plain, tract = row['plain'], row['tract']
    assert row['statistic']['method'] == 'kernel'
    assert (tract['conditional'], tract['while']) == (plain['conditional'], plain['while'])
    assert 0 < tract['thunks'] - plain['thunks'] <= 24
    statistic = [t for t in tract['tract_thunks'] if t['kind'] == 'kCustomKernel']
    assert any(t['name'].startswith('pallas_call') for t in statistic), statistic


def test_the_kernels_the_gpu_only_tests_run_compile_for_an_h100(compiled):
    """Every kernel tests/test_gram_by_kernel.py runs on a GPU (geometries, grids, HIGHEST
    and TF32x3) compiles through Triton for sm_90 here, so that a lent GPU's device time
    goes to its numbers, not to a kernel that does not compile."""
    import numpy as np
    import test_gram_by_kernel as kernel_tests

    jax = compiled.jax
    where = compiled.sharding(compiled.TARGETS['h100'])
    count = 0
    for precision in kernel_tests.TRITON_PRECISIONS:
        for geometry, shape, grids in kernel_tests.triton_cases():
            x = jax.ShapeDtypeStruct(shape, np.float32, sharding=where)
            for grid in grids:
                kernel = kernel_tests.triton_kernel(geometry, precision, *grid)
                hlo = kernel.trace(x).lower(lowering_platforms=('cuda',)).compile().as_text()
                assert 'xla.gpu.triton' in hlo, (geometry, shape, grid, precision)
                count += 1
    assert count == 2 * (2 * len(kernel_tests.CASES) + 3 * len(kernel_tests.REAL_STEMS))


def test_the_kernel_splits_a_sharded_batch_across_h100s(compiled):
    """Two H100s, the batch sharded by jit: each device's kernel sums its own 32 images
    and the sums are all-reduced. Left to XLA, a Pallas call is not split: the images
    were all-gathered and each device summed all 64 (before gram_by_kernel said how)."""
    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec

    from tract_jax._src import choice, statistics

    jax = compiled.jax
    topology = topologies.get_topology_desc(
        platform='cuda', topology='1x2x1', target_config=compiled.H100_SXM
    )
    mesh = jax.sharding.Mesh(np.array(topology.devices[:2]), ('data',))
    images = jax.ShapeDtypeStruct(
        (64, 224, 224, 3), np.float32, sharding=NamedSharding(mesh, PartitionSpec('data'))
    )
    stem = statistics.ConvGeometry((7, 7), 2, 3)
    with choice.changed('cuda', kernel=True):
        statistic = jax.jit(
            lambda x: statistics.geometry_statistic(x, stem).gram,
            out_shardings=NamedSharding(mesh, PartitionSpec()),
        )
        hlo = statistic.trace(images).lower().compile().as_text()
    kernels = [line for line in hlo.splitlines() if 'custom-call' in line and 'triton' in line]
    assert len(kernels) == 1 and 'f32[15,32,32,32]' in kernels[0]  # 15 blocks x 32 images
    assert 'all-gather' not in hlo and 'all-reduce' in hlo


def test_a_data_parallel_tpu_step_sums_tracts_statistic_where_the_images_lie(compiled):
    """TPU v5e 2x2, the batch split over its 4 chips (issue 40): TrAct adds no collective
    of a new kind to a small ViT's step (its Gram joins the gradient's all-reduce) and at
    most 1% of the step's collective bytes, and gathers nothing. Then the statistic alone
    of the stems whose images or patches the partitioner gathered before (ResNet-50's
    under the CPU plan, ViT-B/16's images-minor patches under the TPU's)."""
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from tract_jax._src import choice, statistics

    jax = compiled.jax
    target = compiled.dataclasses.replace(
        compiled.MULTI_CHIP['v5e_2x2'], batches={'vit_tiny4_cifar': 32}
    )
    where = compiled.sharding(target)
    split = NamedSharding(where.mesh, PartitionSpec('x'))
    step, args = compiled.abstract_step('vit_tiny4_cifar', 128, True, where, split)
    report = compiled.collectives_report(step.trace(*args).lower().compile().as_text())
    sent = compiled.step_collectives(report)
    # The plain step's collectives are its gradient's all-reduce (and the loss's).
    gradient = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(args[0]))
    assert set(sent) == {'all-reduce'}, sent
    assert gradient < sent['all-reduce'][1] <= 1.01 * gradient, (sent, gradient)

    for stem, plan in (('resnet50_imagenet', choice.CPU), ('vit_b16_imagenet', choice.TPU)):
        images = jax.ShapeDtypeStruct((128, 224, 224, 3), np.float32, sharding=split)
        geometry = compiled.STEMS[stem]
        statistic = jax.jit(
            lambda x, g=geometry, p=plan: statistics.geometry_statistic(x, g, plan=p).gram,
            out_shardings=where,
        )
        found = compiled.collectives(statistic.trace(images).lower().compile().as_text())
        sent = compiled.collective_bytes(found, tract=True)
        n = np.prod(geometry.kernel_size) * 3
        assert set(sent) == {'all-reduce'} and sent['all-reduce'][1] <= 16 * n * n, (stem, sent)
