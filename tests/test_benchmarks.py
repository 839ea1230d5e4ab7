"""Smoke tests: the benchmark scripts run end to end and write what the README says.

Their figures are measured by running them (see the README, "Cost per step"), never
asserted here; these runs are one tiny pair each, only to keep the scripts working.
"""

import json

import jax
import numpy as np
import pytest

from benchmarks import choices, compiled, first_layer, micro, overhead, precision, profile
from tract_jax._src import choice, statistics, unfold


def test_overhead_writes_json_markdown_and_chart(tmp_path):
    overhead.main(
        ['--models', 'smoke_cnn', '--pairs', '2', '--warmup', '0', '--batch', '2',
         '--no-torch', '--out', str(tmp_path)]
    )  # fmt: skip
    row = json.loads((tmp_path / 'overhead.json').read_text())['rows'][0]
    assert row['model'] == 'smoke_cnn' and row['jax']['pairs'] == 2
    assert row['jax']['extra_flops_pct'] > 0  # TrAct's statistic and solve are counted
    assert '| smoke_cnn | 2 |' in (tmp_path / 'overhead.md').read_text()
    assert (tmp_path / 'overhead.png').stat().st_size > 0


def test_a_plan_change_reaches_the_tract_step_only_and_only_within_it():
    """``--plan-change``: the TrAct step is lowered under the changed plan of the platform
    it runs on (on CPU the native Cholesky: no leaf loop, so no ``while``)."""
    if jax.default_backend() != 'cpu':
        pytest.skip('the change is one the CPU plan would see')

    def loops(changes):
        runs, _, _ = overhead.compile_steps('smoke_cnn', 2, changes)
        return ['while' in runs[kind][0].as_text() for kind in ('plain', 'tract')]

    assert loops(overhead.plan_changes(['native_cholesky=true'])) == [False, False]
    assert loops(None) == [False, True]  # the CPU plan's own, back after the change


def test_plan_changes_parse_every_kind_of_field_and_refuse_the_rest():
    changes = overhead.plan_changes(
        ['segments=true', 'gram_block=none', 'chunk_bytes=1024', 'precision=high']
    )
    assert changes == {
        'segments': True,
        'gram_block': None,
        'chunk_bytes': 1024,
        'precision': jax.lax.Precision.HIGH,
    }
    preset = overhead.plan_changes(['kernel=true', 'precision=tf32_tf32_f32_x3'])
    assert preset == {'kernel': True, 'precision': jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3}
    wave = overhead.plan_changes(['kernel=true', 'kernel_programs=480'])  # gpu_check kernel_wave
    assert wave == {'kernel': True, 'kernel_programs': 480}
    with pytest.raises(ValueError, match='a Plan field is one of'):
        overhead.plan_changes(['segment=true'])
    with pytest.raises(ValueError, match='no value a Plan field takes'):
        overhead.plan_changes(['segments=yes'])
    with pytest.raises(SystemExit):  # the plan's own results are never overwritten
        overhead.main(['--models', 'smoke_cnn', '--no-torch', '--plan-change', 'segments=true'])


def test_profile_lists_the_ops_only_tract_runs(tmp_path, capsys):
    profile.main(['--model', 'smoke_cnn', '--steps', '1', '--out', str(tmp_path)])
    out = capsys.readouterr().out
    assert '| op only in the TrAct step |' in out
    if jax.default_backend() == 'cpu':
        assert 'while' in out  # the Cholesky leaf loop of the CPU solve


def test_micro_writes_its_table(tmp_path):
    micro.main(['--runs', '1', '--layers', 'vit_tiny4 patch embed', '--out', str(tmp_path)])
    lines = (tmp_path / 'micro.md').read_text().splitlines()
    statistic, solve = (line.split('|') for line in lines if '| vit_tiny4 patch embed |' in line)
    assert len(statistic) == 13 and statistic[10].strip() == 'patches'  # what 'auto' picked
    assert len(solve) == 8


def test_first_layer_writes_its_table(tmp_path):
    rows = first_layer.main(
        ['--runs', '2', '--layers', 'vit_tiny4 patch embed', '--no-torch', '--out', str(tmp_path)]
    )
    assert rows[0]['jax']['tract_ms'] > 0 and 'torch' not in rows[0]
    q1, median, q3 = rows[0]['jax']['extra_ms_quartiles']
    assert q1 <= median <= q3
    assert '| vit_tiny4 patch embed |' in (tmp_path / 'first_layer.md').read_text()


def test_choices_times_and_checks_each_alternative(tmp_path):
    result = choices.main(
        ['--runs', '1', '--layers', 'vit_tiny4 patch embed', '--check-images', '1',
         '--out', str(tmp_path)]
    )  # fmt: skip
    row = result['rows'][0]
    assert {'native Cholesky', 'XLA-built Cholesky', 'shifts, HIGHEST'} <= set(row['ms'])
    assert 'segments, HIGHEST' in row['ms']
    exact = {k: v for k, v in row['relative_error'].items() if 'HIGHEST' in k or 'Cholesky' in k}
    assert all(error < 1e-5 for error in exact.values()), row  # float32 products and solves
    plan = result['meta']['plan']
    assert '* |' in (tmp_path / f'choices_{plan}.md').read_text()  # the plan's own choice


SCOPE = 'metadata={op_name="jit(step)/tract_statistic/dot_general"}'
TPU_HLO = '\n'.join(
    [
        'HloModule jit_step',
        '',
        '%fused_computation.1 (p: f32[8,27]) -> f32[27,27] {',
        '  %p = f32[8,27]{1,0} parameter(0)',
        f'  ROOT %dot.9 = f32[27,27]{{1,0}} dot(%p, %p), {SCOPE}',
        '}',
        '',
        'ENTRY %main (x: f32[8,27]) -> f32[27,27] {',
        '  %x = f32[8,27]{1,0} parameter(0)',
        '  %copy.3 = f32[8,27]{1,0} copy(%x), metadata={op_name="jit(step)/stem/conv"}, '
        'backend_config={"window_config":{"estimated_cycles":"100"}}',
        '  %fusion.7 = f32[27,27]{1,0} fusion(%copy.3), kind=kOutput, '
        f'calls=%fused_computation.1, {SCOPE}, '
        'backend_config={"window_config":{"estimated_cycles":"40"}}',
        '  ROOT %w = (f32[27,27]{1,0}, s32[]) while(%fusion.7), condition=%c, body=%b',
        '}',
    ]
)


COLLECTIVE_HLO = '\n'.join(
    [
        'ENTRY %main (x: f32[2,27]) -> f32[27,27] {',
        '  %x = f32[2,27]{1,0} parameter(0)',
        f'  %ag = (f32[2,27]{{1,0}}, f32[16,27]{{1,0}}) all-gather-start(%x), {SCOPE}',
        f'  %agd = f32[16,27]{{1,0}} all-gather-done(%ag), {SCOPE}',
        f'  %ar = f32[27,27]{{1,0}} all-reduce(%d), to_apply=%add, {SCOPE}',
        '  %g = f32[64,10]{1,0} all-reduce-start(%h), to_apply=%add, '
        'metadata={op_name="jit(step)/transpose(jvp(head))/dot_general"}',
        '  %cp = bf16[4,8]{1,0} collective-permute(%y), source_target_pairs={{0,1}}',
        '  %c = (f32[10]{0}, f32[48,48]{1,0}) all-reduce(%p, %q), to_apply=%add',
        '}',
    ]
)


def test_compiled_reads_collectives_their_bytes_and_who_sent_them():
    """A collective counts what it delivers, once: a gather's start its result, a combined
    all-reduce every array it sums."""
    found = compiled.collectives(COLLECTIVE_HLO)
    assert [(c.kind, c.bytes, c.tract) for c in found] == [
        ('all-gather', 16 * 27 * 4, True),
        ('all-reduce', 27 * 27 * 4, True),
        ('all-reduce', 64 * 10 * 4, False),
        ('collective-permute', 4 * 8 * 2, False),
        ('all-reduce', (10 + 48 * 48) * 4, False),  # XLA:TPU's combined all-reduce
    ]
    assert compiled.collective_bytes(found, tract=True) == {
        'all-gather': [1, 16 * 27 * 4],
        'all-reduce': [1, 27 * 27 * 4],
    }
    assert compiled.collective_bytes(found, tract=False) == {
        'all-reduce': [2, (64 * 10 + 10 + 48 * 48) * 4],
        'collective-permute': [1, 64],
    }


def test_compiled_reads_instructions_cycles_and_tract_scopes():
    found = {i.name: i for i in compiled.instructions(TPU_HLO)}
    assert set(found) == {'x', 'copy.3', 'fusion.7', 'w'}  # not the fusion's body
    assert (found['copy.3'].cycles, found['copy.3'].tract) == (100, False)
    assert (found['fusion.7'].cycles, found['fusion.7'].tract) == (40, True)
    assert found['fusion.7'].bytes == 27 * 27 * 4 + 8 * 27 * 4
    assert compiled.control_flow(list(found.values())) == {'while': 1, 'conditional': 0}


def test_compiled_finds_the_price_of_a_loop_fusion_and_tracts_fusions_at_it():
    def fusion(name, kind, cycles, scope):
        return (
            f'  %{name} = f32[27]{{0}} fusion(%x), kind={kind}, calls=%f, '
            f'metadata={{op_name="jit(step)/{scope}/add"}}, '
            f'backend_config={{"window_config":{{"estimated_cycles":"{cycles}"}}}}'
        )

    hlo = '\n'.join(
        [
            'ENTRY %main (x: f32[27]) -> f32[27] {',
            '  %x = f32[27]{0} parameter(0)',
            fusion('product', 'kOutput', 300, 'tract_solve'),  # a product's: below the floor
            fusion('model', 'kLoop', 1825, 'stem'),
            fusion('small', 'kLoop', 1900, 'tract_solve'),  # at the floor (within 10%)
            fusion('large', 'kLoop', 9000, 'tract_statistic'),  # priced by its work
            '}',
        ]
    )
    found = compiled.instructions(hlo)
    assert [i.kind for i in found] == ['', 'kOutput', 'kLoop', 'kLoop', 'kLoop']
    assert compiled.loop_floor(found) == 1825
    assert [i.name for i in compiled.at_floor(found, 1825)] == ['model', 'small']
    report = {'loop_floor': 1825, 'tract_at_floor': 1, 'tract_at_floor_cycles': 1900}
    assert compiled.at_floor_cell(report, 190_000) == '1 × 1,825 = 1.00%'


def test_compiled_counts_the_statistics_multiply_adds_as_the_plan_sums_them():
    """ViT-S/16's 768-column Gram over 128 x 196 rows: one product the full square, the
    TPU's 3 bands of 256 the upper blocks (6 of 9), against the upper triangle."""
    rows, n = 128 * 196, 768
    one = compiled.statistic_work('vit_s16_imagenet', 128, choice.GPU)
    bands = compiled.statistic_work('vit_s16_imagenet', 128, choice.TPU)
    assert one['multiply_adds'] == rows * n * n
    assert bands['multiply_adds'] == rows * 6 * 256 * 256
    assert one['least_multiply_adds'] == bands['least_multiply_adds'] == rows * n * (n + 1) // 2


def test_compiled_reads_the_thunks_xla_gpu_launches():
    metadata = """thunk_metadata {
  thunk_info {
    profile_annotation: "gemm_fusion_dot.1"
    thunk_id: 2
  }
  thunk_kind: "kCustomKernel"
}
thunk_metadata {
  thunk_info {
    profile_annotation: "custom-call.3"
    thunk_id: 3
  }
  thunk_kind: "kCustomCall"
}
"""
    assert compiled.thunks(metadata) == [
        ('kCustomKernel', 'gemm_fusion_dot.1'),
        ('kCustomCall', 'custom-call.3'),
    ]


def test_compiled_reads_the_release_of_a_libtpu_it_is_pointed_at(tmp_path, monkeypatch):
    """``TPU_LIBRARY_PATH`` at a ``libtpu.so`` unpacked from its wheel: that release is the
    one the results name (and the one a model's skip is checked against)."""
    (tmp_path / 'libtpu').mkdir()
    (tmp_path / 'libtpu-0.0.52.dist-info').mkdir()
    monkeypatch.setenv('TPU_LIBRARY_PATH', str(tmp_path / 'libtpu' / 'libtpu.so'))
    assert compiled.versions()['libtpu'] == '0.0.52'
    monkeypatch.delenv('TPU_LIBRARY_PATH')
    assert compiled.versions()['libtpu'] != '0.0.52'


def test_a_tract_step_names_its_statistic_and_solve():
    """The scopes compiled.py counts TrAct's instructions by survive into XLA's program."""
    step, args = compiled.abstract_step('smoke_cnn', 4, True, None)
    hlo = step.trace(*args).lower().compile().as_text()
    ops = [i for i in compiled.instructions(hlo) if i.tract]
    names = ' '.join(i.op_name for i in ops)
    assert 'tract_statistic' in names and 'tract_solve' in names


def test_precision_reports_every_pass_count(tmp_path):
    report = precision.main(['--dataset', 'digits', '--out', str(tmp_path)])
    rows = [line for line in report.splitlines() if line.startswith('| digits')]
    assert len(rows) == 8 and all(line.count('worst') == 3 for line in rows)
    assert (tmp_path / 'precision_digits.md').read_text().endswith(report)


def test_precision_training_sums_the_statistic_in_emulated_passes():
    """Inside the context a statistic traced anew is the emulated one: far from float64
    where float32 is close (values bfloat16 cannot hold); the library's own after it."""
    x = jax.random.normal(jax.random.key(0), (16, 12, 12, 1)) * 3 + 1
    geometry = statistics.ConvGeometry((3, 3), 1, 1)
    rows = np.asarray(unfold.conv_rows(x, geometry), np.float64)
    exact = rows.T @ rows

    def error():  # a new function each time: jit traces it anew
        gram = jax.jit(lambda x: statistics.geometry_statistic(x, geometry).gram)(x)
        return np.abs(np.asarray(gram, np.float64) - exact).max() / np.abs(exact).max()

    float32 = error()
    for passes, at_least in ((1, 1e-4), (3, 1e-6)):
        with precision.statistic_in_passes(passes) as traced:
            assert error() > max(at_least, 10 * float32)
        assert traced == [9]
    assert error() == float32
