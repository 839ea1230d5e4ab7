"""Smoke tests: the benchmark scripts run end to end and write what the README says.

Their figures are measured by running them (see the README, "Cost per step"), never
asserted here; these runs are one tiny pair each, only to keep the scripts working.
"""

import json

import jax

from benchmarks import choices, first_layer, micro, overhead, profile


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
    exact = {k: v for k, v in row['relative_error'].items() if 'HIGHEST' in k or 'Cholesky' in k}
    assert all(error < 1e-5 for error in exact.values()), row  # float32 products and solves
    plan = result['meta']['plan']
    assert '* |' in (tmp_path / f'choices_{plan}.md').read_text()  # the plan's own choice
