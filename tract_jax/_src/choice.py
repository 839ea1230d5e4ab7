"""Which algorithm, precision and factorization each platform runs, and why.

Every tuning constant of tract_jax lives here, with the platform it was measured on.
A :class:`Plan` is one platform's choices; :func:`per_platform` runs a computation
with the plan of the platform it is lowered for (``lax.platform_dependent``: the
choice is made when the step is lowered, never at run time, so it adds no control
flow to a step; platforms whose plans decide alike for the shapes at hand share one
branch). ``geometry_statistic(..., plan=...)`` and the benchmarks can force a plan,
which is how each choice is measured and tested on any platform.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, Literal, NamedTuple

import jax

from tract_jax._src import gram, gram_by_kernel, gram_by_segments, gram_by_shifts, unfold

GramMethod = Literal['auto', 'patches', 'shifts', 'segments', 'kernel']
"""How a conv Gram is summed: over materialized patches, by shifts, from segments of
image rows (2-D convolutions), in one Pallas kernel that gathers the patches where they
lie (2-D convolutions; compiled on GPUs, interpreted elsewhere), or as the plan picks."""

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Plan:
    """One platform's way to build statistics and solve.

    Attributes:
      name: the platform (for messages and benchmark records).
      shifts: whether ``'auto'`` may sum an overlapping conv's Gram by shifts.
      segments: whether ``'auto'`` sums an overlapping 2-D conv's Gram from segments
        of image rows where a segment fits ``SEGMENT_LANES`` (before shifts).
      kernel: whether ``'auto'`` sums a 2-D conv's Gram in one Pallas kernel
        (``gram_by_kernel.py``; before everything else). Compiled by Triton for a GPU;
        another platform's plan that took it would run Pallas's interpreter.
      gram_block: columns per block from which a Gram of rows is summed in 3 to 8
        column blocks, the upper ones only; ``None`` for one product always.
      gram_bands: multiply those upper blocks a band (a block row) per product rather
        than a block per product (``gram.gram_of_rows``).
      precision: the precision of every product of a statistic.
      chunk_bytes: the most bytes of patches (or shifted rows) held at once; larger
        batches are summed in chunks of images.
      scan_chunks: sum the chunks in a ``lax.scan`` (a loop, compiled once) rather
        than unrolled (straight-line code: no ``while`` in the step).
      native_cholesky: factor with the platform's Cholesky (cuSOLVER ``potrf``,
        XLA:TPU's) rather than the recursive one built from XLA operations.
      images_minor_from: the fan-in from which the patches' rows run position-major,
        images minor, so that their Gram contracts over the images last
        (``unfold.conv_rows``); ``None`` for image-major rows always.
      kernel_programs: about how many programs of the Pallas kernel multiply a Gram's
        upper blocks (``gram_by_kernel.chunks``: the batch is cut into chunks of whole
        images for them).
      kernel_rows: the fewest rows (output positions) a kernel program multiplies, so
        that the partial sum it writes stays small next to what it reads.
    """

    name: str
    shifts: bool
    segments: bool
    kernel: bool
    gram_block: int | None
    gram_bands: bool
    precision: jax.lax.PrecisionLike
    chunk_bytes: int
    scan_chunks: bool
    native_cholesky: bool
    images_minor_from: int | None
    kernel_programs: int
    kernel_rows: int


CPU = Plan(
    name='cpu',
    # Measured on this project's 2-core x86-64 CPU (python -m benchmarks.micro): by shifts
    # a ResNet-50 stem's statistic (7x7/2, 224²) took 0.32x the patches' time.
    shifts=True,
    segments=False,  # lanes are a TPU's layout; not measured here
    kernel=False,  # Pallas on CPU is its interpreter: for tests only
    # ViT-S/16's patch embedding (n = 768): 8.8 ms in 4 or 8 blocks vs 12.3 ms in one
    # product, alternated with the conv forward; 2 blocks gained nothing (11.2 ms). A
    # 588-column Gram (14x14x3 patches, 8,192 rows) in 3 blocks: 0.82x one product's time
    # (13.0 vs 15.7 ms, medians of 21 alternated rounds).
    gram_block=192,
    # By bands, the 768-column Gram of 6,272 rows took 1.39x the blocks' time (23.8 vs
    # 17.5 ms): XLA:CPU copies each band's columns into a matmul operand.
    gram_bands=False,
    precision=_HIGHEST,  # XLA:CPU has no faster float32 product.
    # Patches of a 256-image ResNet-50 batch take 1.9 GB; 64 MiB chunks keep the
    # working set near the caches and the memory flat (benchmarks.memory).
    chunk_bytes=64 * 2**20,
    scan_chunks=True,  # a while loop costs nothing on CPU and compiles once.
    # jaxlib's LAPACK runs on OpenBLAS threads that fight XLA's pool inside a step: a
    # 768x768 potrf took 2 ms alone and up to 75 ms inside a ViT-S/16 step.
    native_cholesky=False,
    # ViT-S/16's patches + Gram (32 images, 4 blocks): 1.16x the time with the images
    # minor (41.4 vs 35.6 ms, one alternated run of 15 pairs).
    images_minor_from=None,
    kernel_programs=1024,  # the kernel is the interpreter here: the GPU's, for tests
    kernel_rows=2048,
)

GPU = Plan(
    name='gpu',
    # Not yet measured on a GPU (benchmarks/gpu_check.sh measures every alternative).
    # One product per Gram, over materialized patches, is what a GPU runs best: one
    # large GEMM; the shifts' many small correlations and the blocks' 10 GEMMs with
    # tiny outputs are CPU cache choices. The first H100 run counted 50x the FLOPs
    # for the shifts (cuDNN) and +20.7% step FLOPs with them on ResNet-18.
    shifts=False,
    segments=False,  # not priced for a GPU
    # One Pallas kernel (gram_by_kernel.py), compiled by Triton for sm_90a here (python -m
    # benchmarks.compiled --targets h100 --plan-change kernel=true): for the ResNet-50
    # stem 1.41x the least multiply-adds and 1.20x the least bytes (the patches: 1.99x
    # and 25x), +19 thunks (18), counted from its formulation; never run on a GPU. Off
    # until `bash benchmarks/gpu_check.sh kernel` has timed it against the patches.
    kernel=False,
    gram_block=None,
    gram_bands=False,
    # HIGHEST is true float32 on GPU (DEFAULT and HIGH are TF32, 10-bit mantissas).
    # A 3-pass TF32 preset may be as accurate and faster: measured by gpu_check.sh.
    precision=_HIGHEST,
    # A ResNet-50 stem at batch 64 holds 472 MB of patches: one chunk. Larger batches
    # take more chunks, unrolled (no while loop, which XLA:GPU may run with a host
    # round-trip and which splits CUDA graphs).
    chunk_bytes=512 * 2**20,
    scan_chunks=False,
    native_cholesky=True,  # cuSOLVER potrf; breakdown is NaN on the device, no sync.
    images_minor_from=None,  # row-major arrays: the same transpose either way; not measured
    # 8 programs per streaming multiprocessor of an H100 (132), each over at least 2,048
    # rows, so that the partial sum it writes (a block of 16x16 or 32x32 floats) stays
    # small next to the image it reads: chunks of one image of a ResNet-50 stem (12,544
    # rows), 2 of a CIFAR one (1,024), 32 of a CIFAR patch embedding (64). Not measured:
    # no GPU has run the kernel yet (nor its blocks of 16 or 32 entries and 64 rows at a
    # time, gram_by_kernel.block_size and ROWS). What ptxas says of the compiled kernel
    # (sm_90a, 128 threads a program, no spills): 72 registers a thread at HIGHEST, so at
    # most 7 programs an SM (924 on an H100) at once, and ResNet-50's 960 programs at
    # batch 64 take two waves, the second of 36; 126 at TF32x3 (4 an SM, 528: 528 + 432).
    # Below 960 its chunks hold two images (480 programs, one wave): a timing should
    # compare the two (--plan-change kernel_programs=480).
    kernel_programs=1024,
    kernel_rows=2048,
)

TPU = dataclasses.replace(
    GPU,
    name='tpu',
    # Priced by XLA:TPU's cost model for v5e (libtpu 0.0.42.1; python -m
    # benchmarks.compiled, whole training steps at batch 128). From segments of image
    # rows TrAct's instructions took 1.7M of the ResNet-50 step's estimated cycles (step
    # +1.7% over plain), by shifts 15.7M (+10.5%); the CIFAR ResNet-18 step's 56k (step
    # +8.5%) against 129k by patches (+10.2%). With the segments cut by a convolution
    # (gram_by_segments._cut): 1.31M (+0.84%) and 49k (+7.9%); CIFAR's by whole rows
    # (gram_by_segments.whole_rows): 50k (+2.65%). ResNet-50's with every offset of its
    # phases in one convolution: 1.52M (+0.98%) on v5e, 0.54M (+0.68%, from 0.97M and
    # +1.21% by a product per offset) on v6e (libtpu 0.0.52); with segments of 8 columns,
    # both phases in one 128-lane tile (gram_by_segments.segment_columns): 0.99M (+0.64%)
    # on v5e, 0.91M (+0.87%) on v6e, the better of the two on the worse chip.
    segments=True,
    # gram_by_kernel.py is Triton's (GPUs); XLA:TPU's cost model writes no estimated
    # cycles on a Pallas kernel, so a TPU one could not be priced here.
    kernel=False,
    # Where segments do not apply (3-D stems), shifts: the ResNet-50 stem's statistic
    # alone took 16.7M estimated cycles and 5.8 GB by shifts, 25.9M and 15.3 GB by patches.
    shifts=True,
    # ViT-S/16's patch embedding (768 columns) in 3 bands of 256 columns (0.67x the
    # multiply-adds): TrAct's instructions 0.64% of the v5e step's estimated cycles (from
    # 0.75% in one product), step +0.90% (from +1.02%); v6e 0.71% (0.73%), +0.89%
    # (+1.09%). In 6 bands of 128 (v5e's MXU tile, 0.58x) v5e's own went to 0.57% but
    # v6e's stayed at 0.75% (its MXU is 256 wide) and its step was +3.58%; in 21
    # blocks of 128 each product read the whole patches (v5e bytes +5.19%).
    gram_block=256,
    gram_bands=True,
    # HIGHEST is six bfloat16 MXU passes; HIGH is three (bf16_3x). Emulated on CPU
    # (hi/lo bfloat16 splits, float32 sums), 3 passes left a Dense update's relative
    # error at 3.3e-6 (6 passes: 7.6e-8) and a [0, 255] digits update's at 5.1e-7,
    # inside the float32 tests' tolerances (2e-4); 1 pass: 1.0e-3. The cost model
    # prices the passes little next to the patches' bytes: the ResNet-50 stem's
    # statistic took 23.9M / 25.9M / 26.3M cycles at DEFAULT / HIGH / HIGHEST by
    # patches, 14.5M / 16.7M by shifts at DEFAULT / HIGH. Not run on a TPU.
    precision=jax.lax.Precision.HIGH,
    # XLA:TPU keeps a batch of images images-minor (layout {0,2,3,1}); wide patches
    # whose rows run image-major are copied off that layout. Whole steps on v5e, batch
    # 128: ViT-S/16's patch embedding (fan-in 768) copied in 0.22M estimated cycles with
    # the images minor, 2.0M image-major (TrAct's instructions 1.06M against 2.82M);
    # ViT-Tiny/4's (fan-in 48) in 5.4k against 1.2k. From a lane tile (128) on, then.
    images_minor_from=128,
)

PLANS = {'cpu': CPU, 'cuda': GPU, 'rocm': GPU, 'tpu': TPU}
"""The plan of each platform ``lax.platform_dependent`` knows."""


def plan_of(platform: str) -> Plan:
    """The plan a step lowered for ``platform`` runs (the GPU's for any other platform,
    as :func:`per_platform` does)."""
    return PLANS.get(platform, GPU)


@contextlib.contextmanager
def changed(platform: str, **changes: Any) -> Iterator[Plan]:
    """Within the context, steps lowered for ``platform`` (and the platforms sharing its
    plan) run its plan with ``changes`` (``Plan`` fields): how the benchmarks time or
    price a choice before a plan takes it. Yields the changed plan (without changes,
    the plan itself, and nothing is touched)."""
    saved, old = dict(PLANS), plan_of(platform)
    if not changes:
        yield old
        return
    new = dataclasses.replace(old, **changes)
    PLANS.update({name: new for name, plan in saved.items() if plan is old})
    try:
        yield new
    finally:
        PLANS.update(saved)


def per_platform(decide: Callable[[Plan], Hashable], run: Callable[..., Any], *args: Any) -> Any:
    """``run(decide(plan), *args)`` for the plan of the platform the step is lowered for.

    ``decide`` reduces a plan to what ``run`` does with it for these shapes; platforms
    whose decisions agree share one branch, and where all agree no branch is staged at
    all (``lax.platform_dependent`` traces and lowers every branch it is given).
    """
    groups: dict[Hashable, list[str]] = {}
    for name, plan in PLANS.items():
        groups.setdefault(decide(plan), []).append(name)
    if len(groups) == 1:
        return run(next(iter(groups)), *args)
    branches, default = {}, None
    for decision, names in groups.items():
        branch = functools.partial(run, decision)
        if 'cuda' in names:  # also every platform without a plan of its own
            default = branch
        else:
            branches.update(dict.fromkeys(names, branch))
    return jax.lax.platform_dependent(*args, **branches, default=default)


def gram_blocks(n: int, plan: Plan) -> tuple[int, bool]:
    """``(parts, bands)``: how many column blocks ``plan`` sums a Gram of ``n`` columns in
    (1: one product), and whether it multiplies their upper blocks a band per product."""
    parts = 1 if plan.gram_block is None else min(n // plan.gram_block, 8)
    if parts < 3:
        return 1, False
    return parts, plan.gram_bands


def gram_matrix(rows: jax.Array, plan: Plan | None = None) -> jax.Array:
    """``XᵀX`` of ``rows`` as ``plan`` computes it (default: the platform's plan)."""

    def decide(plan: Plan) -> tuple[int, bool, jax.lax.PrecisionLike]:
        return *gram_blocks(rows.shape[1], plan), plan.precision

    def run(decision: tuple[int, bool, jax.lax.PrecisionLike], rows: jax.Array) -> jax.Array:
        parts, bands, precision = decision
        return gram.gram_of_rows(rows, parts=parts, precision=precision, bands=bands)

    if plan is None:
        return per_platform(decide, run, rows)
    return run(decide(plan), rows)


SEGMENT_LANES = 128
"""The lanes of a tile the segments of image rows are sized by (``gram_by_segments.py``;
``segment_columns`` picks the segments that leave the fewest such tiles to multiply).
Priced on v5e (whole ResNet-50 step): segments of up to 128 values left TrAct's own
instructions at 2.75M estimated cycles, up to 256 at 4.09M (larger tiles, fewer
segments; both with each phase padded to whole rows, which later went); with the phases
side by side, tiles of 128 gave 0.99M on v5e and 0.91M on v6e, segments of up to 128
values a phase 1.52M and 0.54M."""

CORRELATE_FROM = 32
"""Rows per phase from which the Gram by shifts correlates whole phases in one
``lax.conv``; shorter phases (a video stem's few frames) take one matmul per offset,
which XLA's CPU convolution runs far faster there (measured on CPU: 0.4 s vs 5.6 s)."""

SHIFTS_BELOW = 0.95
SHIFTS_FROM_BYTES = 2**20
"""Where a plan allows shifts, ``'auto'`` sums the Gram by shifts where windows overlap
along the first axis, that takes at most ``SHIFTS_BELOW`` of the patches'
multiply-adds, and an image's patches would take at least ``SHIFTS_FROM_BYTES``.
Measured on this project's CPU (``python -m benchmarks.micro``): a 3x7x7/1x2x2 video
stem by shifts 0.45x the patches' time, while a 3x3/1 stem on 32² images is faster
by patches (1.1 vs 1.4 ms); patch embeddings (no overlap) keep the patches."""


class GramCost(NamedTuple):
    """Multiply-adds per image of each way to a conv Gram, and the bytes each holds."""

    patches: int
    shifts: int
    segments: int  # 0 where a segment cannot fit SEGMENT_LANES (or the conv is not 2-D)
    kernel: int  # 0 where the conv is not 2-D
    patches_bytes: int
    shifts_bytes: int
    segments_bytes: int
    overlap: bool  # whether windows overlap along the first axis, so that rows are shared
    rows: int  # rows of X per image
    fan_in: int

    def of(self, method: str) -> tuple[int, int]:
        """Multiply-adds and bytes held per image by ``method``."""
        return {
            'patches': (self.patches, self.patches_bytes),
            'shifts': (self.shifts, self.shifts_bytes),
            'segments': (self.segments, self.segments_bytes),
            'kernel': (self.kernel, 0),  # no patch is held: the kernel reads the image
        }[method]


def gram_cost(
    padded: Sequence[int],
    window: unfold.Window,
    channels: int,
    itemsize: int,
    zeros: Sequence[tuple[int, int]] | None = None,
) -> GramCost:
    """What each formulation costs for one padded image of spatial size ``padded``, whose
    padding holds ``zeros`` zeros (``(low, high)`` per spatial dim) if given."""
    padded = list(padded)
    out = window.out(padded)
    k0, d0, s0 = window.kernel_size[0], window.dilation[0], window.strides[0]
    n = math.prod(window.kernel_size) * channels
    segments = (0, 0)  # multiply-adds, bytes
    if gram_by_segments.fits(window, channels, SEGMENT_LANES) and math.prod(out) > 0:
        segments = gram_by_segments.cost(
            padded, window, channels, SEGMENT_LANES, itemsize, pads=zeros
        )
    return GramCost(
        patches=math.prod(out) * n * n,
        shifts=gram_by_shifts.multiply_adds(padded, window, channels),
        segments=segments[0],
        kernel=gram_by_kernel.multiply_adds(math.prod(out), n) if len(padded) == 2 else 0,
        patches_bytes=math.prod(out) * n * itemsize,
        shifts_bytes=gram_by_shifts.bytes_held(padded, window, channels, itemsize),
        segments_bytes=segments[1],
        overlap=(k0 - 1) * d0 >= s0,
        rows=math.prod(out),
        fan_in=n,
    )


def method(cost: GramCost, plan: Plan) -> str:
    """The formulation ``'auto'`` takes under ``plan`` for a conv of this cost."""
    if plan.kernel and cost.kernel:
        return 'kernel'
    if plan.segments and cost.segments and cost.overlap:
        return 'segments'
    shifts = (
        plan.shifts
        and cost.overlap
        and cost.shifts <= SHIFTS_BELOW * cost.patches
        and cost.patches_bytes >= SHIFTS_FROM_BYTES
    )
    return 'shifts' if shifts else 'patches'
