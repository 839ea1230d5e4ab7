"""The Gram in one Pallas kernel (gram_by_kernel.py) against unfolded patches.

The kernel runs here in Pallas's interpreter (these machines have no GPU); that it
compiles for an H100, one kernel and no control flow, is tests/test_compiled.py's.
"""

import dataclasses
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import CASES_2D, gpu_only, unfold

import tract_jax
from tract_jax._src import choice, gram_by_kernel, statistics
from tract_jax._src import unfold as unfold_module

CASES = [  # the ResNet stem among them: 147 entries in 5 blocks
    *CASES_2D,
    ((2, 2), (1, 1), CROPPING := ((-1, 2), (1, -2)), (1, 1), (1, 1), (8, 9)),
]


def _patches(x, case):
    """The loops' patches (tests/helpers.py), or lax.pad's where the padding crops,
    which the loops' np.pad cannot."""
    if case[2] == CROPPING:
        return unfold_module.conv_rows(x, statistics.ConvGeometry(*case[:-1]))
    return unfold(x, *case[:-1])


@pytest.mark.parametrize('programs, rows', [(1, 1), (3, 1), (1000, 1), (1000, 50)])
@pytest.mark.parametrize('case', CASES, ids=str)
def test_the_kernel_gives_the_gram_of_unfolded_patches(case, programs, rows, x64):
    """One chunk, chunks that leave the last one short (3 images in 2), one image each,
    or as many as make ``rows`` rows."""
    x = jax.random.normal(jax.random.key(3), (3, *case[-1], 2), jnp.float64) + 0.5
    geometry = statistics.ConvGeometry(*case[:-1])
    images, zeros = statistics._unpadded(x, geometry)
    got = gram_by_kernel.gram_by_kernel(
        images,
        unfold_module.Window.of(geometry),
        pads=zeros,
        programs=programs,
        rows=rows,
        precision=jax.lax.Precision.HIGHEST,
        interpret=True,
    )
    patches = _patches(x, case)
    np.testing.assert_allclose(got, patches.T @ patches, rtol=1e-12, atol=1e-12)


REAL_STEMS = {  # what the GPU plan would run the kernel on
    'resnet50': (statistics.ConvGeometry((7, 7), 2, 3), (4, 224, 224, 3)),
    'resnet18_cifar': (statistics.ConvGeometry((3, 3), 1, 'SAME'), (64, 32, 32, 3)),
    'vit4_cifar': (statistics.ConvGeometry((4, 4), 4, 'VALID'), (64, 32, 32, 3)),
}
TRITON_PRECISIONS = {'highest': 'highest', 'tf32x3': jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3}


def triton_cases():
    """``(geometry, images' shape, grids)`` on which the GPU-only tests run the kernel as
    Triton compiles it, ``grids`` its ``(programs, rows)``: every geometry above in one
    chunk and in chunks of one image; whole stems at the plan's grid (ResNet-50: a chunk
    an image; CIFAR: 32 chunks of 2 images, or 2 of 32 for the patch embedding), in two
    chunks and in one. ``tests/test_compiled.py`` compiles each for an H100 here."""
    for case in CASES:
        yield statistics.ConvGeometry(*case[:-1]), (3, *case[-1], 2), [(1, 1), (1000, 1)]
    plan = (choice.GPU.kernel_programs, choice.GPU.kernel_rows)
    for geometry, shape in REAL_STEMS.values():
        pairs = gram_by_kernel.upper_blocks(math.prod(geometry.kernel_size) * shape[-1])
        yield geometry, shape, [plan, (2 * pairs, 1), (1, 1)]


def triton_kernel(geometry, precision, programs, rows):
    """The kernel as Triton compiles it: a jitted function of a conv's input to its Gram,
    the input's zero padding left to the kernel as the layers leave it
    (``statistics._unpadded``)."""

    def gram(x):
        images, zeros = statistics._unpadded(x, geometry)
        return gram_by_kernel.gram_by_kernel(
            images,
            unfold_module.Window.of(geometry),
            pads=zeros,
            programs=programs,
            rows=rows,
            precision=TRITON_PRECISIONS[precision],
            interpret=False,
        )

    return jax.jit(gram)


def _assert_close(got, want, **kwargs):
    """Within 1e-5 of the largest entry: float32 sums; a wrong gather or mask is off by
    an entry's order."""
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), **kwargs)


@gpu_only
@pytest.mark.parametrize('precision', TRITON_PRECISIONS)
def test_the_kernel_triton_compiles_gives_the_gram_of_the_patches(precision):
    """On a GPU, compiled (not interpreted), float32 against float64 NumPy, every case
    of :func:`triton_cases`."""
    for number, (geometry, shape, grids) in enumerate(triton_cases()):
        x = jax.random.normal(jax.random.key(number), shape) + 0.5
        # The library's unfolding: slices, exact copies (tests/test_unfold.py checks it).
        patches = np.asarray(unfold_module.conv_rows(x, geometry), np.float64)
        for grid in grids:
            got = triton_kernel(geometry, precision, *grid)(x)
            message = f'{geometry}, images {shape}, (programs, rows) {grid}'
            _assert_close(np.asarray(got, np.float64), patches.T @ patches, err_msg=message)


@gpu_only
def test_the_gpu_plan_with_the_kernel_gives_the_patches_statistic():
    """The statistic as the layers call it, jitted, on the GPU plan changed to take the
    kernel (compiled by Triton), against the GPU plan's own (patches)."""
    x = jax.random.uniform(jax.random.key(0), (16, 64, 64, 3)) * 255
    geometry = statistics.ConvGeometry((7, 7), 2, 3)
    with choice.changed('cuda', kernel=True) as plan:
        assert statistics.chosen_method(x.shape, geometry, plan=plan) == 'kernel'
        by_kernel = jax.jit(lambda x: statistics.geometry_statistic(x, geometry))(x)
    by_patches = jax.jit(lambda x: statistics.geometry_statistic(x, geometry))(x)
    _assert_close(np.asarray(by_kernel.gram), np.asarray(by_patches.gram, np.float64))
    assert by_kernel.count == by_patches.count


def test_a_batch_past_int32_indices_is_summed_in_parts(monkeypatch, x64):
    """With the limit lowered to 700 values, 5 images of 8x9x3 (216 each) go in parts
    of at most 3 images, and sum to the whole Gram; one image past it is refused."""
    monkeypatch.setattr(gram_by_kernel, 'INDEX_LIMIT', 700)
    x = jax.random.normal(jax.random.key(2), (5, 8, 9, 3), jnp.float64)
    geometry = statistics.ConvGeometry((3, 3), 1, 1)
    images, zeros = statistics._unpadded(x, geometry)
    args = dict(pads=zeros, programs=8, rows=1, precision='highest', interpret=True)
    window = unfold_module.Window.of(geometry)
    got = gram_by_kernel.gram_by_kernel(images, window, **args)
    patches = unfold(x, (3, 3), (1, 1), 1, (1, 1), (1, 1))
    np.testing.assert_allclose(got, patches.T @ patches, rtol=1e-12)
    with pytest.raises(ValueError, match='more values or output positions than int32'):
        gram_by_kernel.gram_by_kernel(jnp.zeros((1, 20, 20, 3)), window, **args)


def test_the_statistic_by_the_kernel_is_the_patches_one(x64):
    """As the layers call it, jitted; the count is the rows'."""
    x = jax.random.normal(jax.random.key(0), (5, 12, 11, 3), jnp.float64) + 1.0
    geometry = statistics.ConvGeometry((3, 3), 2, 'SAME')
    stat = jax.jit(lambda x: statistics.geometry_statistic(x, geometry, method='kernel'))(x)
    patches = unfold(x, (3, 3), (2, 2), 'SAME', (1, 1), (1, 1))
    np.testing.assert_allclose(stat.gram, patches.T @ patches, rtol=1e-12)
    assert stat.count == patches.shape[0]


def test_a_plan_that_takes_the_kernel_takes_it_for_2d_convolutions_only():
    kernel_plan = dataclasses.replace(choice.GPU, kernel=True)
    stem = statistics.ConvGeometry((7, 7), 2, 3)
    assert statistics.chosen_method((64, 224, 224, 3), stem, plan=kernel_plan) == 'kernel'
    assert statistics.chosen_method((64, 224, 224, 3), stem, plan=choice.GPU) == 'patches'
    video = statistics.ConvGeometry((3, 7, 7), (1, 2, 2), 1)
    assert statistics.chosen_method((2, 8, 32, 32, 3), video, plan=kernel_plan) == 'patches'
    with pytest.raises(ValueError, match="method='kernel' sums the Gram of 2-D"):
        statistics.geometry_statistic(jnp.ones((2, 8, 16, 16, 3)), video, method='kernel')


def test_the_kernel_multiplies_the_upper_blocks_only():
    """ResNet-50's stem: 147 entries in 5 blocks of 32, 15 upper blocks, 1.41x the
    triangle's multiply-adds; a CIFAR stem's 27 in 2 blocks of 16 (3 upper: 2.03x the
    triangle's 27·28/2 = 378, where the square alone is 1.93x), a CIFAR patch
    embedding's 48 in 3 (1.31x)."""
    assert gram_by_kernel.blocks(147) == 5
    assert gram_by_kernel.multiply_adds(10, 147) == 10 * 15 * 32 * 32
    assert gram_by_kernel.multiply_adds(10, 27) == 10 * 3 * 16 * 16
    assert gram_by_kernel.multiply_adds(10, 48) == 10 * 6 * 16 * 16
    cost = statistics.gram_cost((1, 224, 224, 3), statistics.ConvGeometry((7, 7), 2, 3))
    assert cost.of('kernel') == (112 * 112 * 15 * 32 * 32, 0)


@pytest.mark.parametrize(
    'images, positions, n, expected',
    [
        (64, 112 * 112, 147, (64, 1)),  # ResNet-50: an image a chunk, 15 x 64 programs
        (128, 32 * 32, 27, (64, 2)),  # CIFAR ResNet-18: 2048 rows make 2 images
        (128, 8 * 8, 48, (4, 32)),  # CIFAR ViT/4: 32 images of 64 rows, 6 x 4 programs
        (64, 14 * 14, 768, (4, 16)),  # ViT-S/16: 300 upper blocks, 4 chunks: 1200 programs
        (3, 10, 27, (1, 3)),  # fewer rows than a program's least: one chunk
    ],
)
def test_chunks_keep_programs_busy_and_partial_sums_small(images, positions, n, expected):
    got = gram_by_kernel.chunks(
        images, positions, n, choice.GPU.kernel_programs, choice.GPU.kernel_rows
    )
    assert got == expected


def test_the_plan_sizes_the_kernels_grid():
    """``kernel_programs`` and ``kernel_rows`` reach the kernel from the plan (so that
    ``--plan-change kernel_programs=480`` times ResNet-50's grid in one wave), and only the
    kernel: the other methods' sums stay alike, so plans that differ there share a branch."""
    shape, geometry = (64, 224, 224, 3), statistics.ConvGeometry((7, 7), 2, 3)
    cost = statistics.gram_cost(shape, geometry)
    wave = dataclasses.replace(choice.GPU, kernel=True, kernel_programs=480, kernel_rows=4096)
    how = statistics._sum_for(wave, cost, 64, 'auto', None)
    assert (how.method, how.programs, how.rows) == ('kernel', 480, 4096)
    assert gram_by_kernel.chunks(64, 112 * 112, 147, how.programs, how.rows) == (32, 2)
    patches = statistics._sum_for(wave, cost, 64, 'patches', None)
    assert patches == statistics._sum_for(choice.GPU, cost, 64, 'patches', None)
    assert (patches.programs, patches.rows) == (0, 0)


def test_a_training_step_with_the_kernel_takes_the_patches_step():
    """The README's linen step, jitted, with the CPU plan changed to take the kernel
    (interpreted here), against the same step on the CPU's own plan."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = tract_jax.Conv(8, (3, 3), strides=2, use_bias=False)(x)
            return nn.Dense(3)(nn.relu(x).mean(axis=(1, 2)))

    model = Net()
    x = jax.random.uniform(jax.random.key(1), (4, 15, 14, 3)) * 255
    y = jnp.arange(4) % 3
    params = model.init(jax.random.key(0), x)['params']
    tx = optax.chain(tract_jax.tract(lam=0.1), optax.sgd(1.0))

    def updates():
        def loss_fn(params):
            logits, state = model.apply({'params': params}, x, mutable=['tract'])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, state['tract']

        @jax.jit
        def step(params):
            grads, stats = jax.grad(loss_fn, has_aux=True)(params)
            return tx.update(grads, tx.init(params), params, tract_stats=stats)[0]

        return step(params)

    with choice.changed('cpu', kernel=True):
        by_kernel = updates()
    chex.assert_trees_all_close(by_kernel, updates(), rtol=2e-5, atol=1e-7)
