"""The per-platform choices (choice.py): what 'auto' picks, blocks, chunks, plans."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import unfold

import tract_jax
from tract_jax._src import choice, gram, solve, statistic, statistics


@pytest.mark.parametrize(
    ('kernel', 'strides', 'dilation', 'side', 'picks'),
    [
        ((7, 7), 2, 1, 224, 'shifts'),  # a ResNet stem: windows overlap
        ((3, 3), 1, 1, 224, 'shifts'),
        ((3, 3), 1, 1, 32, 'patches'),  # small images: the patches' one matmul is faster
        ((3, 7, 7), (1, 2, 2), 1, 64, 'shifts'),  # a video stem
        ((16, 16), 16, 1, 224, 'patches'),  # a patch embedding: no overlap, nothing shared
        ((4, 4), 4, 1, 224, 'patches'),
        ((2, 3), 3, 2, 224, 'patches'),  # (2 - 1) * 2 < 3: no overlap along the first axis
    ],
)
def test_auto_picks_shifts_where_windows_overlap(kernel, strides, dilation, side, picks):
    geometry = statistics.ConvGeometry(kernel, strides, 'SAME', 1, dilation)
    shape = (4, *([side] * len(kernel)), 3)
    assert statistics.chosen_method(shape, geometry) == picks


@pytest.mark.parametrize(
    ('n', 'products'),
    [(575, 1), (576, 3 * 4 // 2), (767, 3 * 4 // 2), (768, 4 * 5 // 2), (4000, 8 * 9 // 2)],
)
def test_large_gram_is_summed_in_upper_blocks(n, products, x64):
    """Against numpy's XᵀX, with the number of products the docstring gives."""
    x = jax.random.normal(jax.random.key(n), (50, n), jnp.float64)
    expected = np.asarray(x).T @ np.asarray(x)
    np.testing.assert_allclose(jax.jit(choice.gram_matrix)(x), expected, atol=1e-12)
    hlo = jax.jit(choice.gram_matrix).lower(x).as_text()
    assert hlo.count('stablehlo.dot_general') == products


@pytest.mark.parametrize(
    ('n', 'bands'), [(767, 1), (768, 3), (1000, 3), (1024, 4), (4000, 8), (2049, 8)]
)
def test_tpu_sums_a_large_gram_in_upper_bands(n, bands, x64):
    """The TPU plan's Gram: one product per band of 256 columns (at most 8, at least 3),
    exactly numpy's XᵀX, lower blocks the upper ones' transposes."""
    x = jax.random.normal(jax.random.key(n), (40, n), jnp.float64)
    expected = np.asarray(x).T @ np.asarray(x)
    gram_of = jax.jit(functools.partial(choice.gram_matrix, plan=choice.TPU))
    got = np.asarray(gram_of(x))
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-11)
    if bands > 1:  # the blocks below the diagonal are copies
        edge = n // bands
        np.testing.assert_array_equal(got[edge:, :edge], got[:edge, edge:].T)
    hlo = gram_of.lower(x).as_text()
    assert hlo.count('stablehlo.dot_general') == bands
    by_blocks = gram.gram_of_rows(x, parts=bands, precision='highest')
    np.testing.assert_allclose(got, by_blocks, rtol=1e-13, atol=1e-11)
    stat = statistic.to_gram(statistic.RowStatistic(x))  # every Gram statistic's way
    np.testing.assert_allclose(stat.gram, expected, atol=1e-12)


@pytest.mark.parametrize(
    'padding, batch, budget_images',
    [('SAME', 7, 2), ('CIRCULAR', 5, 3), ('REFLECT', 4, 1), ((2, 1), 6, 4), ('VALID', 9, 5)],
)
@pytest.mark.parametrize('method', ['patches', 'shifts', 'segments'])
def test_chunked_statistic_equals_one_shot(padding, batch, budget_images, method, x64):
    x = jax.random.normal(jax.random.key(0), (batch, 11, 10, 3), jnp.float64) + 2.0
    args = (statistics.ConvGeometry((3, 3), 2, padding),)
    one_shot = statistics.geometry_statistic(x, *args, max_chunk_bytes=2**40, method='patches')
    cost = statistics.gram_cost(x.shape, *args, x.dtype)
    per_image = cost.of(method)[1]
    chunked = statistics.geometry_statistic(
        x, *args, max_chunk_bytes=budget_images * per_image, method=method
    )
    assert isinstance(chunked, tract_jax.GramStatistic)
    np.testing.assert_allclose(chunked.gram, one_shot.gram, rtol=1e-12)
    assert chunked.count == one_shot.count


@pytest.mark.parametrize(
    'batch, split, most, chunk',
    [
        (64, 1, 64, 64),  # fits: one chunk
        (100, 1, 30, 25),  # 4 chunks of 25, not 30, 30, 30 and 10
        (16, 8, 1, 8),  # 8 devices, 2 images each: 2 chunks of one image a device
        (512, 8, 20, 128),  # 64 images a device, 20 at a time: 4 chunks of 16 a device
        (127, 1, 30, 30),  # a prime batch: chunks of 30, the last padded, not 127 of one
    ],
)
def test_chunks_split_alike_on_every_device(batch, split, most, chunk):
    """A chunk holds the same number of images of each device's share of the batch (so
    that jit keeps the batch split, each device summing its own), at most ``most``."""
    got = statistics._chunk(batch, split, most)
    assert got == chunk
    if batch % got == 0:
        assert (batch // split) % (batch // got) == 0  # chunks divide each device's share
    assert got // split <= most or got == batch // split


def test_chunking_bounds_the_memory_of_the_statistic():
    """XLA's memory analysis: the chunked statistic never holds all patches at once."""
    x = jax.ShapeDtypeStruct((32, 112, 112, 3), jnp.float32)
    args = (statistics.ConvGeometry((7, 7), 2, 3),)
    patches_bytes = 32 * 56 * 56 * 147 * 4  # 59 MiB if held at once

    def temp_bytes(budget):
        fn = jax.jit(
            lambda x: statistics.geometry_statistic(
                x, *args, max_chunk_bytes=budget, method='patches', plan=choice.CPU
            )
        )
        return fn.lower(x).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(2**40) >= patches_bytes
    assert temp_bytes(patches_bytes // 8) < patches_bytes / 3


@pytest.mark.parametrize('plan', [choice.CPU, choice.GPU, choice.TPU], ids=lambda p: p.name)
@pytest.mark.parametrize(
    'fields, shape',
    [
        (((7, 7), 2, 3), (5, 40, 36, 3)),  # overlapping: by shifts (CPU), segments (TPU)
        (((4, 4), 4, 'VALID'), (3, 16, 16, 2)),  # a patch embedding
        (((8, 8), 8, 'VALID'), (20, 17, 40, 3)),  # 192 columns: images minor on TPU
        (((16, 16), 16, 'VALID'), (9, 160, 145, 3)),  # 768 columns: blocks, bands on TPU
        (((3, 3), 1, 'CIRCULAR'), (4, 9, 9, 2)),
    ],
    ids=['stem', 'patch embedding', 'wide patch embedding', 'ViT-S/16 embedding', 'circular'],
)
@pytest.mark.parametrize('chunk_images', [None, 2])
def test_every_plan_gives_the_gram_of_the_patches(plan, fields, shape, chunk_images, x64):
    """Each platform's plan, run here in float64: chunked (scanned or unrolled) or not."""
    x = jax.random.normal(jax.random.key(0), shape, jnp.float64) + 0.3
    geometry = statistics.ConvGeometry(*fields)
    cost = statistics.gram_cost(shape, geometry, x.dtype)
    budget = None
    if chunk_images is not None:
        method = statistics.chosen_method(shape, geometry, plan=plan)
        per_image = cost.of(method)[1]
        budget = chunk_images * per_image
    stat = statistics.geometry_statistic(x, geometry, plan=plan, max_chunk_bytes=budget)
    patches = unfold(x, *_fields(fields))
    np.testing.assert_allclose(stat.gram, patches.T @ patches, rtol=1e-12, atol=1e-12)
    assert stat.count == patches.shape[0]


def _fields(fields):
    """(kernel_size, strides, padding, input_dilation, kernel_dilation) for helpers.unfold."""
    kernel, strides, padding = fields
    rank = len(kernel)
    return kernel, (strides,) * rank, padding, (1,) * rank, (1,) * rank


@pytest.mark.parametrize(
    'plan, resnet50, cifar, precision',
    [
        (choice.CPU, 'shifts', 'patches', jax.lax.Precision.HIGHEST),  # benchmarks.micro
        (choice.GPU, 'patches', 'patches', jax.lax.Precision.HIGHEST),  # the first H100 run
        # benchmarks.compiled, XLA:TPU v5e; a video stem, 3-D, still goes by shifts there
        (choice.TPU, 'segments', 'segments', jax.lax.Precision.HIGH),
    ],
    ids=lambda v: getattr(v, 'name', str(v)),
)
def test_each_plan_picks_what_its_platform_measured(plan, resnet50, cifar, precision):
    """The choices the benchmarks made, pinned: a plan that stops making them fails here
    (re-measure, then change both)."""
    stem = statistics.ConvGeometry((7, 7), 2, 3)
    assert statistics.chosen_method((128, 224, 224, 3), stem, plan=plan) == resnet50
    cifar_stem = statistics.ConvGeometry((3, 3), 1, 1)
    assert statistics.chosen_method((128, 32, 32, 3), cifar_stem, plan=plan) == cifar
    embedding = statistics.ConvGeometry((16, 16), 16, 'VALID')
    assert statistics.chosen_method((128, 224, 224, 3), embedding, plan=plan) == 'patches'
    video = statistics.ConvGeometry((3, 7, 7), (1, 2, 2), 1)
    video_method = statistics.chosen_method((8, 16, 64, 64, 3), video, plan=plan)
    assert video_method == ('patches' if plan is choice.GPU else 'shifts')
    assert plan.precision == precision
    assert not plan.kernel  # no GPU has timed gram_by_kernel yet (gpu_check.sh kernel)
    assert choice.SEGMENT_LANES == 128
    # benchmarks.compiled on v5e: ViT-S/16's embedding (768) images-minor, ViT-Tiny/4's (48) not
    assert plan.images_minor_from == (128 if plan is choice.TPU else None)
    # ViT-S/16's Gram (768 columns): CPU 4 blocks (benchmarks.micro's timing), v5e/v6e 3
    # bands of 256 (benchmarks.compiled), the GPU one GEMM
    parts, bands = {'cpu': (4, False), 'gpu': (1, False), 'tpu': (3, True)}[plan.name]
    for side, patch, minor in ((224, 16, plan is choice.TPU), (32, 4, False)):
        geometry = statistics.ConvGeometry((patch, patch), patch, 'VALID')
        cost = statistics.gram_cost((128, side, side, 3), geometry)
        how = statistics._sum_for(plan, cost, 128, 'auto', None)
        assert how.images_minor == minor
        if side == 224:
            assert (how.parts, how.bands) == (parts, bands)


def test_a_changed_plan_holds_within_its_context_for_the_platforms_sharing_it():
    stem = statistics.ConvGeometry((7, 7), 2, 3)
    shape = (64, 224, 224, 3)
    with pytest.raises(RuntimeError), choice.changed('cuda', segments=True) as plan:
        assert choice.plan_of('cuda') is plan and choice.plan_of('rocm') is plan
        assert choice.plan_of('tpu') is choice.TPU and plan.name == 'gpu'
        assert statistics.chosen_method(shape, stem, plan=choice.plan_of('cuda')) == 'segments'
        raise RuntimeError  # the plans come back all the same
    assert choice.PLANS == {
        'cpu': choice.CPU,
        'cuda': choice.GPU,
        'rocm': choice.GPU,
        'tpu': choice.TPU,
    }
    assert statistics.chosen_method(shape, stem, plan=choice.plan_of('cuda')) == 'patches'
    with choice.changed('cuda') as plan:  # no changes: the plan itself, untouched
        assert plan is choice.GPU and choice.plan_of('rocm') is choice.GPU


def test_accelerator_plans_chunk_without_a_loop():
    x = jax.ShapeDtypeStruct((9, 32, 32, 3), jnp.float32)
    geometry = statistics.ConvGeometry((3, 3), 1, 'SAME')
    per_image = statistics.gram_cost(x.shape, geometry).patches_bytes

    def lowered(plan):
        fn = jax.jit(
            lambda x: statistics.geometry_statistic(
                x, geometry, plan=plan, method='patches', max_chunk_bytes=2 * per_image
            )
        )
        return fn.lower(x).as_text()

    assert 'stablehlo.while' in lowered(choice.CPU)  # a scan over 5 chunks
    unrolled = lowered(choice.GPU)
    assert 'stablehlo.while' not in unrolled
    assert unrolled.count('stablehlo.dot_general') == 5


def test_ridge_solve_takes_the_majorant_where_the_factorization_still_fails():
    """Not a statistic (no Gram is indefinite), but the select must hold all the same."""
    moment = -10.0 * jnp.eye(4)
    rhs = jnp.ones((4, 2))
    out = jax.jit(solve.ridge_solve)(moment, rhs, jnp.asarray(0.1))
    np.testing.assert_allclose(out, rhs / (0.1 + jnp.trace(moment)), rtol=1e-6)


def test_ridge_solve_floors_the_shift_at_the_statistics_resolution(x64):
    """Below eps · trace the shift is the floor: the solve of moment + floor · I."""
    rows = jax.random.normal(jax.random.key(0), (50, 6), jnp.float64) * 1e6
    rows = rows.at[:, -1].set(0.0)  # a channel that never varies: a zero eigenvalue
    moment = rows.T @ rows / 50
    rhs = jnp.ones((6, 1), jnp.float64)
    floor = float(jnp.finfo(jnp.float64).eps * jnp.trace(moment))
    for shift, effective in ((1e-30, floor), (10 * floor, 10 * floor)):
        expected = np.linalg.solve(np.asarray(moment) + effective * np.eye(6), np.asarray(rhs))
        out = solve.ridge_solve(moment, rhs, jnp.asarray(shift, jnp.float64))
        np.testing.assert_allclose(out, expected, rtol=1e-9)
