"""TrAct's cost on TPU and GPU, priced by their own compilers on a machine without either.

    bash benchmarks/aot_env.sh                     # once: .venv-aot with libtpu and the
                                                   # CUDA plugin (no GPU libraries needed)
    .venv-aot/bin/python -m benchmarks.compiled    # every model, TPU v5e and v6e, H100
    .venv-aot/bin/python -m benchmarks.compiled --targets v5e --models resnet18_cifar
    .venv-aot/bin/python -m benchmarks.compiled --targets v5e v6e --models resnet18_cifar \
        --batch 512 --out benchmarks/results/compiled_resnet18_batch512   # another batch
    .venv-aot/bin/python -m benchmarks.compiled --targets h100 --models resnet50_imagenet \
        --plan-change segments=true --out /tmp/segments   # a plan's alternative, priced
    # another libtpu release: its wheel unpacked, jax pointed at its libtpu.so
    pip download --no-deps -d /tmp/libtpu libtpu==0.0.52
    python -m zipfile -e /tmp/libtpu/libtpu-0.0.52-*.whl /tmp/libtpu/x
    TPU_LIBRARY_PATH=/tmp/libtpu/x/libtpu/libtpu.so .venv-aot/bin/python -m \
        benchmarks.compiled --targets v5e v6e --out benchmarks/results/compiled_libtpu_0.0.52

For each model and target it compiles the plain and the TrAct training step
(``benchmarks/overhead.py``'s steps: Adam, float32, the same model with and without
TrAct's statistic) with XLA's own compiler for that chip, from abstract shapes, and
reads what the compiler reports:

- TPU (XLA:TPU in libtpu; v5e and v6e, one chip): the sum of the estimated cycles that
  XLA:TPU's cost model writes on every scheduled instruction, ``cost_analysis()``'s
  flops and bytes accessed, ``memory_analysis()``'s temporary bytes, the number of
  ``while``/``conditional`` instructions, and the *loop-fusion floor*: the fewest cycles
  the model charges any loop fusion of the step (elementwise work, reductions; however
  little it does), with the step's and TrAct's loop fusions priced at it (within 10%),
  what the number of instructions costs apart from their work. Each instruction is
  counted once: a ``while`` body's, once, not once a trip (the ViTs' one loop, in XLA:TPU's
  triangular solve of TrAct's 768-column system, takes 7.7k cycles a trip for 6 trips:
  38.7k left out, 0.03% of the ViT-S/16 step on v5e);
- GPU (XLA:GPU in the CUDA plugin; an H100 SXM, sm_90): the thunk sequence XLA would
  launch (every kernel and library call), ``conditional``/``while`` thunks and
  temporary bytes (XLA:GPU gives no cost analysis without a device).

TrAct's own instructions are found by their op names: the statistic and the solve run
under ``jax.named_scope`` (``tract_statistic``, ``tract_solve``), which XLA keeps in
each instruction's metadata. Per model the report lists them: estimated cycles and
bytes per TPU instruction, kernel or library call per GPU thunk.

Writes ``benchmarks/results/compiled.{json,md}`` (with the jax and libtpu versions
and the date); ``docs/results/benchmarks.md`` includes the table.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import math
import os
import pathlib
import re
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks import overhead
from examples import steps
from tract_jax._src import choice, gram, gram_by_kernel, statistic, statistics, unfold

RESULTS = pathlib.Path(__file__).parent / 'results'
SCOPES = (statistic.STATISTIC_SCOPE, statistic.SOLVE_SCOPE)

# NVIDIA H100 SXM5 80 GB as XLA:GPU's target description: the limits CUDA reports for
# compute capability 9.0 and the data sheet's figures (132 SMs, 1.98 GHz boost,
# 3.35 TB/s HBM3, 50 MiB L2). Written here, so no GPU and no XLA source is needed.
H100_SXM = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability { major: 9 minor: 0 }
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


@dataclasses.dataclass(frozen=True)
class Target:
    """A chip to compile for: its platform and how to get its topology."""

    name: str
    platform: str  # 'tpu' or 'cuda'
    topology: str
    batches: dict[str, int]  # per model; models missing here are not compiled for it
    # model: (the libtpu release that cannot compile it, why)
    skipped: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    chips: int = 1  # more: a data-parallel step, the batch split over them (batches per chip)


_TPU_BATCH = 128  # per chip
_GPU_BATCHES = {  # the first H100 run's protocol (issue 19)
    'resnet18_cifar': 128,
    'vit_tiny4_cifar': 128,
    'resnet50_imagenet': 64,
    'vit_s16_imagenet': 64,
    'vit_b16_imagenet': 64,
}
MODELS = list(_GPU_BATCHES)
TARGETS = {
    'v5e': Target('v5e', 'tpu', 'v5e:1x1', dict.fromkeys(MODELS, _TPU_BATCH)),
    'v6e': Target(
        'v6e',
        'tpu',
        'v6e:1x1',
        dict.fromkeys(MODELS, _TPU_BATCH),
        # With libtpu 0.0.42.1 (jax[tpu] 0.10.2's) a compiler thread's stack overflows on
        # the ResNet-50 step, plain and TrAct alike, whatever `ulimit -s`; libtpu 0.0.52
        # compiles it (TPU_LIBRARY_PATH, see versions()).
        skipped={'resnet50_imagenet': ('0.0.42.1', 'its compiler stack overflows on it for v6e')},
    ),
    'h100': Target('h100', 'cuda', '1x1x1', dict(_GPU_BATCHES)),
}
MULTI_CHIP = {
    # The slices whose collectives `--targets` prices next to the gradient's (issue 40).
    'v5e_2x2': dataclasses.replace(TARGETS['v5e'], name='v5e 2x2', topology='v5e:2x2', chips=4),
    'v6e_2x2': dataclasses.replace(TARGETS['v6e'], name='v6e 2x2', topology='v6e:2x2', chips=4),
    'h100_x8': dataclasses.replace(TARGETS['h100'], name='8 H100', topology='1x8x1', chips=8),
}
TARGETS.update(MULTI_CHIP)


def sharding(target: Target) -> NamedSharding:
    """A replicated sharding on ``target``'s chips (none needed here): one chip, or the
    chips of a slice."""
    from jax.experimental import topologies

    if target.platform == 'tpu':
        bounds = {'chips_per_host_bounds': (1, 1, 1)} if target.chips == 1 else {}
        topology = topologies.get_topology_desc(
            topology_name=target.topology, platform='tpu', **bounds
        )
    else:
        topology = topologies.get_topology_desc(
            platform='cuda', topology=target.topology, target_config=H100_SXM
        )
    mesh = jax.sharding.Mesh(np.array(topology.devices[: target.chips]), ('x',))
    return NamedSharding(mesh, P())


def abstract_step(
    model_name: str,
    batch: int,
    use_tract: bool,
    where: NamedSharding,
    batch_where: NamedSharding | None = None,
):
    """``(step, args)``: a model's jitted training step and abstract arguments on ``where``
    (the images and labels on ``batch_where``, default ``where``)."""
    factory, side, *_ = overhead.MODELS[model_name]
    model = factory()
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, side, side, 3)), train=False)
    )
    tx = steps.make_optimizer(optax.adam(1e-3), 0.1 if use_tract else None)
    step = steps.make_train_step(model, tx, use_tract=use_tract)

    def placed(tree):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where), tree)

    args = (
        placed(variables['params']),
        placed(variables.get('batch_stats', {})),
        placed(jax.eval_shape(tx.init, variables['params'])),
        jax.ShapeDtypeStruct((batch, side, side, 3), jnp.float32, sharding=batch_where or where),
        jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_where or where),
    )
    return step, args


# --- reading XLA:TPU's program ---------------------------------------------------------

_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%(\S+) = (.*?) ([\w-]+)\(')
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_KIND = re.compile(r'\bkind=(k\w+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_SHAPE = re.compile(r'\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]')
_ITEMSIZE = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'bf16': 2, 'f16': 2}


def shape_bytes(text: str) -> int:
    """Bytes of every array shape written in ``text`` (an HLO result or operand list)."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        size = math.prod(int(d) for d in dims.split(',') if d)
        total += size * _ITEMSIZE.get(dtype, 8 if dtype.endswith('64') else 4)
    return total


@dataclasses.dataclass
class Instruction:
    """One scheduled instruction of an optimized HLO module."""

    name: str
    opcode: str
    cycles: int  # XLA:TPU's estimate; 0 where none is written
    op_name: str
    bytes: int  # of its result and operands, as written in the instruction
    kind: str = ''  # a fusion's: kLoop (elementwise, reductions), kOutput (a product's), ...

    @property
    def tract(self) -> bool:
        return any(scope in self.op_name for scope in SCOPES)


def instructions(hlo: str) -> list[Instruction]:
    """Every instruction of the optimized module's computations (fusion bodies excluded:
    their work is the fusion's). Bytes are those of its result and its operands."""
    found, results, fused = [], {}, False
    for line in hlo.splitlines():
        if line and not line[0].isspace():
            fused = line.startswith('%fused') or ' fused_computation' in line
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, result, opcode = match.groups()
        results[name] = shape_bytes(result)
        if fused:
            continue
        cycles = _CYCLES.search(line)
        op_name = _OP_NAME.search(line)
        kind = _KIND.search(line)
        operands = line[match.end() :].split(')')[0]
        found.append(
            Instruction(
                name,
                opcode,
                int(cycles.group(1)) if cycles else 0,
                op_name.group(1) if op_name else '',
                results[name] + sum(results.get(o, 0) for o in re.findall(r'%([\w.-]+)', operands)),
                kind.group(1) if kind and opcode == 'fusion' else '',
            )
        )
    return found


COLLECTIVES = ('all-gather', 'all-reduce', 'all-to-all', 'collective-permute', 'reduce-scatter')
"""What devices send each other; a statistic should need one all-reduce, no gather."""


@dataclasses.dataclass
class Collective:
    """One collective of an optimized module: its kind, the bytes it delivers to each
    device (its result; a gather's gathered array), and whether TrAct's code sent it."""

    kind: str
    bytes: int
    tract: bool


def collectives(hlo: str) -> list[Collective]:
    """Every collective of an optimized module, an asynchronous one once (its start).
    Its bytes are those of the arrays it delivers: every array of its result, or of an
    asynchronous start's ``(operands, results)`` the results (XLA:TPU combines a step's
    all-reduces into one whose result holds every array it sums)."""
    found = []
    for line in hlo.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        _, result, opcode = match.groups()
        kind = opcode.removesuffix('-start')
        if kind not in COLLECTIVES:
            continue
        sizes = [shape_bytes(f'{dtype}[{dims}]') for dtype, dims in _SHAPE.findall(result)]
        if opcode.endswith('-start') and kind != 'all-reduce' and len(sizes) > 1:
            sizes = sizes[len(sizes) // 2 :]
        op_name = _OP_NAME.search(line)
        tract = any(scope in (op_name.group(1) if op_name else '') for scope in SCOPES)
        found.append(Collective(kind, sum(sizes), tract))
    return found


def collective_bytes(found: list[Collective], tract: bool) -> dict[str, list[int]]:
    """``kind: [count, bytes]`` of TrAct's collectives (``tract``) or the others."""
    out: dict[str, list[int]] = {}
    for c in found:
        if c.tract == tract:
            count = out.setdefault(c.kind, [0, 0])
            count[0] += 1
            count[1] += c.bytes
    return out


def loop_floor(found: list[Instruction]) -> int:
    """The fewest estimated cycles XLA:TPU's cost model charges any loop fusion
    (elementwise work and reductions, ``kind=kLoop``) of the module: whatever the fusion
    does, it pays about this much (v5e: 1,825, for a 109-byte reduction as for a 1 KB
    multiply; v6e: 2,120; libtpu 0.0.42.1), where a product's fusion may cost 300. 0
    where there is none."""
    return min((i.cycles for i in found if i.kind == 'kLoop' and i.cycles > 0), default=0)


def at_floor(found: list[Instruction], floor: int) -> list[Instruction]:
    """The loop fusions priced at the floor (within 10% of it): each stands for the
    cost model's price of one more loop fusion, not for its work."""
    return [i for i in found if i.kind == 'kLoop' and 0 < i.cycles <= 1.1 * floor]


def control_flow(found: list[Instruction]) -> dict[str, int]:
    """``while`` and ``conditional`` instructions among an optimized module's."""
    ops = collections.Counter(i.opcode for i in found)
    return {'while': ops['while'], 'conditional': ops['conditional']}


def tpu_report(compiled: Any) -> dict[str, Any]:
    hlo = compiled.as_text()
    found = instructions(hlo)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    tract = sorted((i for i in found if i.tract), key=lambda i: -i.cycles)
    floor = loop_floor(found)
    floored = at_floor(found, floor)
    return {
        'cycles': sum(i.cycles for i in found),
        'loop_floor': floor,
        'at_floor': len(floored),
        'at_floor_cycles': sum(i.cycles for i in floored),
        'tract_at_floor': sum(i.tract for i in floored),
        'tract_at_floor_cycles': sum(i.cycles for i in floored if i.tract),
        'flops': float(cost.get('flops', np.nan)),
        'bytes': float(cost.get('bytes accessed', np.nan)),
        'temp_bytes': int(compiled.memory_analysis().temp_size_in_bytes),
        **control_flow(found),
        'tract_cycles': sum(i.cycles for i in tract),
        'tract_ops': [dataclasses.asdict(i) for i in tract],
        **collectives_report(hlo),
    }


def collectives_report(hlo: str) -> dict[str, Any]:
    """TrAct's collectives and the rest of the step's, ``kind: [count, bytes]``."""
    found = collectives(hlo)
    return {
        'collectives': collective_bytes(found, tract=False),
        'tract_collectives': collective_bytes(found, tract=True),
    }


# --- reading XLA:GPU's program ---------------------------------------------------------

_THUNK = re.compile(r'profile_annotation: "([^"]*)"[^}]*}\s*thunk_kind: "(\w+)"')


def thunks(metadata: str) -> list[tuple[str, str]]:
    """``(kind, instruction)`` of every thunk in a ``*.thunk_metadata.txt`` dump: each
    kernel launch or library call, with the HLO instruction it runs."""
    return [(kind, name) for name, kind in _THUNK.findall(metadata)]


def gpu_report(lowered: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as dump:
        # Without a device XLA:GPU cannot autotune, and its default Triton tilings fail
        # to compile some GEMMs (ViT-S/16's attention output): cuBLAS takes them all.
        options = {'xla_dump_to': dump, 'xla_gpu_enable_triton_gemm': False}
        compiled = lowered.compile(compiler_options=options)
        (metadata,) = pathlib.Path(dump).glob('*.thunk_metadata.txt')
        launched = thunks(metadata.read_text())
    hlo = compiled.as_text()
    found = instructions(hlo)
    flow = control_flow(found)
    op_names = {i.name: i.op_name for i in found}
    kinds = collections.Counter(kind for kind, _ in launched)
    tract = [
        {'kind': kind, 'name': name}
        for kind, name in launched
        if any(scope in op_names.get(name, '') for scope in SCOPES)
    ]
    return {
        'thunks': len(launched),
        'kinds': dict(sorted(kinds.items())),
        'while': max(kinds['kWhile'], flow['while']),
        'conditional': max(kinds['kConditional'], flow['conditional']),
        'temp_bytes': int(compiled.memory_analysis().temp_size_in_bytes),
        'tract_thunks': tract,
        **collectives_report(hlo),
    }


STEMS = {  # the first layer of each benchmark model (examples/models.py)
    'resnet18_cifar': unfold.ConvGeometry((3, 3), 1, 1),
    'vit_tiny4_cifar': unfold.ConvGeometry((4, 4), 4, 'VALID'),
    'resnet50_imagenet': unfold.ConvGeometry((7, 7), 2, 3),
    'vit_s16_imagenet': unfold.ConvGeometry((16, 16), 16, 'VALID'),
    'vit_b16_imagenet': unfold.ConvGeometry((16, 16), 16, 'VALID'),
}


def statistic_work(model: str, batch: int, plan: choice.Plan) -> dict[str, Any]:
    """The statistic's multiply-adds and bytes under ``plan`` for ``model``'s stem, next to
    the least the layer needs: the upper triangle of ``XᵀX`` (``b·n(n+1)/2``) and one read
    of the input plus one write of the Gram. Counted from the formulation, float32 (XLA:GPU
    gives no cost analysis without a device)."""
    side = overhead.MODELS[model][1]
    shape = (batch, side, side, 3)
    geometry = STEMS[model]
    cost = statistics.gram_cost(shape, geometry)
    method = statistics.chosen_method(shape, geometry, plan=plan)
    rows, n = batch * cost.rows, cost.fan_in
    read, gram_bytes = 4 * math.prod(shape), 4 * n * n
    work, held = cost.of(method)
    work *= batch
    if method == 'patches':  # in the plan's column blocks, the upper ones only
        work = gram.multiply_adds(rows, n, choice.gram_blocks(n, plan)[0])
    written = batch * held  # the rows (patches, shifted rows, segments)
    if method == 'kernel':  # no rows: the programs' partial sums
        written = gram_by_kernel.partials_bytes(
            batch, cost.rows, n, plan.kernel_programs, plan.kernel_rows
        )
    return {
        'method': method,
        'multiply_adds': work,
        'least_multiply_adds': rows * n * (n + 1) // 2,
        'bytes': read + 2 * written + gram_bytes,  # written once, read once
        'least_bytes': read + gram_bytes,
    }


def compile_model(target: Target, model: str, where: NamedSharding) -> dict[str, Any]:
    """Both steps of ``model`` compiled for ``target`` on ``where``'s chips, with the
    compiler's report of each (on several chips, the data-parallel step: parameters
    replicated, ``chips`` times the batch split over them)."""
    batch = target.batches[model]
    result = {'model': model, 'target': target.name, 'batch': batch * target.chips}
    result['chips'] = target.chips
    result['statistic'] = statistic_work(model, batch, choice.plan_of(target.platform))
    split = NamedSharding(where.mesh, P('x'))
    for kind, use_tract in (('plain', False), ('tract', True)):
        step, args = abstract_step(model, batch * target.chips, use_tract, where, split)
        lowered = step.trace(*args).lower()
        if target.platform == 'tpu':
            result[kind] = tpu_report(lowered.compile())
        else:
            result[kind] = gpu_report(lowered)
    return result


def pct(tract: float, plain: float) -> float:
    return 100 * (tract - plain) / plain if plain else float('nan')


def at_floor_cell(tract: dict[str, Any], plain_cycles: float) -> str:
    """``N × floor = share`` of the plain step: TrAct's loop fusions priced at the
    cost model's floor."""
    share = 100 * tract['tract_at_floor_cycles'] / plain_cycles
    return f'{tract["tract_at_floor"]} × {tract["loop_floor"]:,} = {share:.2f}%'


def step_collectives(report: dict[str, Any]) -> dict[str, list[int]]:
    """``kind: [count, bytes]`` of every collective of a step, TrAct's and the rest."""
    out = {kind: list(v) for kind, v in report['collectives'].items()}
    for kind, (n, b) in report['tract_collectives'].items():
        count = out.setdefault(kind, [0, 0])
        count[0] += n
        count[1] += b
    return out


def collectives_cell(found: dict[str, list[int]]) -> str:
    """``kind count × bytes`` for each kind of collective, or a dash."""
    return (
        ', '.join(f'{kind} {n} × {b / n / 2**20:.2f} MiB' for kind, (n, b) in found.items()) or '–'
    )


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The markdown report: one table per platform, then TrAct's instructions per model."""
    out = []
    tpu = [r for r in rows if 'cycles' in r['plain']]
    gpu = [r for r in rows if 'thunks' in r['plain']]
    if tpu:
        out += [
            '| TPU | model | batch | est. cycles | bytes accessed | flops | temp | `while` | '
            "TrAct's own cycles | TrAct's at the floor "
            '| loop fusions at the floor, plain → TrAct |',
            '|---|---|---|---|---|---|---|---|---|---|---|',
        ]
        for r in tpu:
            p, t = r['plain'], r['tract']
            out.append(
                f'| {r["target"]} | {r["model"]} | {r["batch"]} '
                f'| {pct(t["cycles"], p["cycles"]):+.2f}% | {pct(t["bytes"], p["bytes"]):+.2f}% '
                f'| {pct(t["flops"], p["flops"]):+.2f}% '
                f'| {pct(t["temp_bytes"], p["temp_bytes"]):+.2f}% '
                f'| {p["while"]} → {t["while"]} '
                f'| {100 * t["tract_cycles"] / p["cycles"]:.2f}% '
                f'| {at_floor_cell(t, p["cycles"])} '
                f'| {p["at_floor"]} → {t["at_floor"]} |'
            )
    if gpu:
        out += [
            '',
            '| GPU | model | batch | thunks | added | `conditional` | `while` | temp '
            '| statistic | multiply-adds / least | bytes / least |',
            '|---|---|---|---|---|---|---|---|---|---|---|',
        ]
        for r in gpu:
            p, t, w = r['plain'], r['tract'], r['statistic']
            out.append(
                f'| {r["target"]} | {r["model"]} | {r["batch"]} | {p["thunks"]} → {t["thunks"]} '
                f'| {t["thunks"] - p["thunks"]:+d} | {p["conditional"]} → {t["conditional"]} '
                f'| {p["while"]} → {t["while"]} '
                f'| {pct(t["temp_bytes"], p["temp_bytes"]):+.2f}% '
                f'| {w["method"]} | {w["multiply_adds"] / w["least_multiply_adds"]:.2f} '
                f'| {w["bytes"] / w["least_bytes"]:.2f} |'
            )
    sliced = [r for r in rows if r.get('chips', 1) > 1]
    if sliced:
        out += [
            '',
            "| slice | model | global batch | the plain step's collectives | the TrAct step's "
            "| added bytes | under TrAct's scopes |",
            '|---|---|---|---|---|---|---|',
        ]
        for r in sliced:
            plain, tract = (step_collectives(r[kind]) for kind in ('plain', 'tract'))
            plain_bytes, tract_bytes = (sum(b for _, b in c.values()) for c in (plain, tract))
            out.append(
                f'| {r["target"]} | {r["model"]} | {r["batch"]} | {collectives_cell(plain)} '
                f'| {collectives_cell(tract)} | {pct(tract_bytes, plain_bytes):+.2f}% '
                f'| {collectives_cell(r["tract"]["tract_collectives"])} |'
            )
    for r in tpu:
        ops = r['tract']['tract_ops']
        out += [
            '',
            f"TrAct's instructions, {r['model']} on {r['target']} (largest first, "
            f'{len(ops)} in all):',
            '',
            '| instruction | opcode | est. cycles | bytes | op name |',
            '|---|---|---|---|---|',
        ]
        for op in ops[:8]:
            where = op['op_name'].split('/')[-1]
            out.append(
                f'| {op["name"]} | {op["opcode"]} | {op["cycles"]} | {op["bytes"]} | {where} |'
            )
    for r in gpu:
        launched = collections.Counter(
            f'{t["kind"]} {t["name"]}' for t in r['tract']['tract_thunks']
        )
        out += ['', f"TrAct's thunks, {r['model']} on {r['target']}: " + ', '.join(launched)]
    return '\n'.join(out) + '\n'


def versions() -> dict[str, str]:
    """Versions of what compiles, and the date. Where ``TPU_LIBRARY_PATH`` points jax at
    another ``libtpu.so`` (one unpacked from its wheel), that one's release, read from
    the wheel's ``libtpu-*.dist-info`` beside it."""
    import importlib.metadata as metadata

    found = {'date': datetime.date.today().isoformat()}
    for name in ('jax', 'jaxlib', 'libtpu', 'jax-cuda12-plugin', 'flax', 'optax'):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = 'not installed'
    library = os.environ.get('TPU_LIBRARY_PATH')
    if library:
        wheel = pathlib.Path(library).resolve().parent.parent
        infos = sorted(wheel.glob('libtpu-*.dist-info'))
        found['libtpu'] = infos[0].name[len('libtpu-') : -len('.dist-info')] if infos else library
    return found


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument(
        '--targets',
        nargs='+',
        default=[name for name, target in TARGETS.items() if target.chips == 1],
        choices=list(TARGETS),
        help=f'one chip (default) or a data-parallel slice: {", ".join(MULTI_CHIP)}',
    )
    parser.add_argument('--models', nargs='+', default=MODELS, choices=list(overhead.MODELS))
    parser.add_argument('--out', type=pathlib.Path, default=RESULTS)
    parser.add_argument(
        '--batch', type=int, help="per-chip batch of every model (default: each target's)"
    )
    overhead.add_plan_change(parser, "each target's plan")
    args = parser.parse_args(argv)
    changes = overhead.parsed_plan_changes(parser, args)

    # Run nothing on an accelerator: the plugins' own device discovery is what fails on
    # a machine without one, while their compilers are reached through topologies.
    jax.config.update('jax_platforms', 'cpu')
    args.out.mkdir(parents=True, exist_ok=True)
    info = versions()
    header = (
        f'Compiled on {info["date"]} with jax {info["jax"]}, libtpu {info["libtpu"]}, '
        f'jax-cuda12-plugin {info["jax-cuda12-plugin"]} (`python -m benchmarks.compiled'
        + (f' --batch {args.batch}' if args.batch is not None else '')
        + ''.join(f' --plan-change {change}' for change in args.plan_change)
        + '`).\n\n'
    )
    rows, not_priced = [], []
    for name in args.targets:
        target = TARGETS[name]
        if args.batch is not None:
            target = dataclasses.replace(target, batches=dict.fromkeys(target.batches, args.batch))
        where = sharding(target)
        for model in [m for m in args.models if m in target.batches]:
            release, why = target.skipped.get(model, (None, ''))
            if release == info['libtpu']:
                not_priced.append(f'{name} {model}: not compiled (libtpu {release}: {why})')
            else:
                try:
                    with choice.changed(target.platform, **changes):
                        rows.append(compile_model(target, model, where))
                except Exception as error:  # say so, and price the rest
                    first = str(error).splitlines()[0][:200]
                    not_priced.append(f'{name} {model}: failed ({type(error).__name__}: {first})')
            print(f'{name} {model}: done', flush=True)
            # Written after every model: a long run keeps what it has priced.
            notes = ''.join(f'\n- {line}' for line in not_priced)
            (args.out / 'compiled.md').write_text(header + table(rows) + notes + '\n')
            (args.out / 'compiled.json').write_text(
                json.dumps({'versions': info, 'rows': rows, 'not_priced': not_priced}, indent=1)
                + '\n'
            )
    print(table(rows))
    return rows


if __name__ == '__main__':
    main()
