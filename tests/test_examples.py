"""Smoke tests of the examples: they run, train, and fail clearly on missing data."""

import json
import math
import re

import pytest

from examples import data, train


def test_train_runs_both_arms_on_digits(tmp_path):
    report = train.main(
        ['--epochs', '2', '--max-steps-per-epoch', '5', '--seeds', '0', '--out', str(tmp_path)]
    )  # fmt: skip
    assert set(report['runs']) == {'baseline', 'tract'}
    saved = json.loads((tmp_path / 'results.json').read_text())
    assert len(saved['runs']['tract']['0']) == 2
    assert saved['args']['lr'] == 1e-3 and saved['args']['seeds'] == [0]  # typed, not strings
    assert (tmp_path / 'accuracy.png').stat().st_size > 0


def test_tract_arm_trains_the_first_layer_differently(tmp_path):
    """Same init and batches (same seed), yet the TrAct arm's first layer moves differently."""
    argv = ['--epochs', '1', '--max-steps-per-epoch', '3', '--seeds', '0', '--out', str(tmp_path)]
    report = train.main(argv)
    base, tract = report['runs']['baseline']['0'][0], report['runs']['tract']['0'][0]
    assert base['loss'] != tract['loss']  # the first layer really is trained differently


def test_missing_data_dir_names_the_expected_files(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(['--dataset', 'fashion_mnist', '--data-dir', str(tmp_path / 'nowhere')])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert 'train-images-idx3-ubyte' in err and 'dataset-fashion-mnist' in err


def test_cifar_reader_and_augmentation(tmp_path):
    import pickle

    import numpy as np

    folder = tmp_path / 'cifar-10-batches-py'
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        batch = {
            b'data': rng.integers(0, 256, (4, 3072), dtype=np.uint8),
            b'labels': list(rng.integers(0, 10, 4)),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    tr, te = data.load('cifar10', tmp_path, standardize='raw255')
    assert tr.images.shape == (20, 32, 32, 3) and te.images.shape == (4, 32, 32, 3)
    out = train.augment(tr.images, np.random.default_rng(0))
    assert out.shape == tr.images.shape


def test_plain_jax_example_trains_with_the_public_statistics_api():
    from examples import plain_jax

    result = plain_jax.main(['--steps', '150'])
    assert result['last_loss'] < 0.5 * result['first_loss']


def test_study_arms_equal_the_train_example_and_seeds_train_independently(tmp_path):
    """The study's vmapped, scanned epoch is the train example's loop: seed 1 trained
    beside seed 0 gives the loss the train example gets for seed 1 alone, in both arms."""
    from examples import study

    common = ['--dataset', 'digits', '--model', 'cnn', '--optimizer', 'adam', '--lr', '1e-3']
    common += ['--batch-size', '64']
    report = study.main(
        [*common, '--budgets', '1', '--seeds', '0', '1', '--lams', '0.1', '--out', str(tmp_path)]
    )
    alone = train.main([*common, '--epochs', '1', '--seeds', '1', '--out', str(tmp_path / 't')])
    for arm, label in (('plain', 'baseline'), ('TrAct λ=0.1', 'tract')):
        loss = report['runs'][arm][1]['final_loss'][1]
        assert loss == pytest.approx(alone['runs'][label]['1'][0]['loss'], rel=1e-4)
        acc = report['runs'][arm][1]['test_acc'][1]
        assert acc == pytest.approx(100 * alone['runs'][label]['1'][0]['test_acc'], abs=0.6)
    assert (
        report['runs']['plain'][1]['final_loss'] != report['runs']['TrAct λ=0.1'][1]['final_loss']
    )
    for name in ('study.json', 'study.md', 'study.png'):
        assert (tmp_path / name).stat().st_size > 0
    assert '| 1 |' in (tmp_path / 'study.md').read_text()


def test_study_scan_over_vmapped_seeds_equals_a_step_per_seed(tmp_path, monkeypatch):
    """The ViTs' loop (seeds vmapped, a lax.scan over batches) trains each seed as the
    CNNs' loop (a jitted step per seed and batch) does, which the test above ties to
    the train example. On a one-block ViT: the loops, not the depth, are under test,
    and compiling the study's four blocks four times was most of this test's time."""
    from examples import models, study

    monkeypatch.setitem(
        models.BUILDERS, 'vit', lambda patch, classes: models.ViT(patch, 16, 1, 2, classes)
    )
    common = ['--dataset', 'digits', '--train-size', '320', '--model', 'vit', '--patch', '4']
    common += ['--budgets', '1']
    common += ['--batch-size', '64', '--lams', '0.1']
    scan = study.main([*common, '--loop', 'scan', '--seeds', '0', '1', '--out', str(tmp_path)])
    step = study.main([*common, '--loop', 'python', '--seeds', '1', '--out', str(tmp_path)])
    for arm in ('plain', 'TrAct λ=0.1'):
        loss = scan['runs'][arm][1]['final_loss'][1]
        assert loss == pytest.approx(step['runs'][arm][1]['final_loss'][0], rel=1e-4)


def test_study_paired_interval_and_speedup():
    from examples import study

    p = study.paired([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    t = (2 * 0.95**2 / (1 - 0.95**2)) ** 0.5  # t(0.975) for 2 degrees of freedom, closed form
    half = t / 3**0.5  # t · sd / √n, sd = 1
    assert p['mean'] == 2.0
    assert (p['low'], p['high']) == pytest.approx((2 - half, 2 + half), rel=1e-12)
    runs = {
        'plain': {b: {'test_acc': [a, a]} for b, a in ((1, 70.0), (2, 75.0), (4, 80.0))},
        'TrAct': {b: {'test_acc': [a, a + 1]} for b, a in ((1, 72.0), (2, 80.0), (4, 81.0))},
    }
    summary = study.summarize(runs, [1, 2, 4])['arms']['TrAct']
    assert summary['reaches_plain_at_largest_budget_at'] == 2 and summary['speedup'] == 2.0
    assert summary['paired'][1]['mean'] == 2.5


def test_npz_dataset(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path / 'mine.npz'
    np.savez(
        path,
        x_train=rng.integers(0, 256, (6, 5, 5), dtype=np.uint8),
        y_train=np.arange(6) % 2,
        x_test=rng.integers(0, 256, (2, 5, 5), dtype=np.uint8),
        y_test=np.array([0, 1]),
    )
    tr, te = data.load('npz', path, standardize='raw255')
    assert tr.images.shape == (6, 5, 5, 1) and tr.images.dtype == np.float32
    assert te.labels.tolist() == [0, 1]
    with pytest.raises(data.MissingDataError, match='x_train'):
        data.load('npz', tmp_path / 'absent.npz')


@pytest.mark.parametrize(
    'script', ['reproduce_cifar10.sh', 'experiments.sh', 'study_grid.sh'], ids=str
)
def test_every_command_of_the_example_scripts_parses(script, tmp_path):
    """Runs a script with ``python`` recording its arguments instead of training, then
    parses each command with the module's own parser: options and choices must exist."""
    import os
    import pathlib
    import subprocess

    from examples import study, trend

    bin_dir, calls = tmp_path / 'bin', tmp_path / 'calls'
    bin_dir.mkdir()
    calls.mkdir()
    (bin_dir / 'python').write_text(f'#!/bin/sh\nprintf "%s\\0" "$@" > $(mktemp {calls}/XXXXXX)\n')
    (bin_dir / 'python').chmod(0o755)
    env = {**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'DATA': str(tmp_path)}
    env.update(OUT=str(tmp_path / 'runs'), SEEDS='0 1')
    root = pathlib.Path(__file__).parent.parent
    text = (root / 'examples' / script).read_text()
    for stage in re.findall(r'"\$STAGE" = (\w+)', text) or ['']:  # study_grid.sh has stages
        subprocess.run(
            ['bash', str(root / 'examples' / script)], check=True, env={**env, 'STAGE': stage}
        )
    commands = [f.read_text().split('\0')[:-1] for f in calls.iterdir()]
    assert len(commands) >= 4
    parsers = {
        'examples.train': train.build_parser(),
        'examples.study': study.build_parser(),
        'examples.trend': trend.build_parser(),
    }
    for command in commands:
        assert command[0] == '-m' and command[1] in parsers, command
        parsers[command[1]].parse_args(command[2:])  # exits (SystemExit) on a bad option


def test_study_merges_runs_of_other_seeds(tmp_path):
    from examples import study

    def report(seeds, accs, name):
        args = vars(study.build_parser().parse_args(['--seeds', *map(str, seeds)]))
        runs = {
            arm: {'1': {'test_acc': [a + shift for a in accs], 'final_loss': [0.5] * len(accs)}}
            for arm, shift in (('plain', 0.0), ('TrAct λ=0.1', 1.0))
        }
        path = tmp_path / name
        path.write_text(json.dumps({'args': {**args, 'out': name}, 'runs': runs, 'seconds': 2}))
        return path

    merged = study.main(
        ['--merge', str(report([0, 1], [70, 72], 'a')), str(report([2], [71], 'b')),
         '--out', str(tmp_path / 'm')]
    )  # fmt: skip
    assert merged['args']['seeds'] == [0, 1, 2] and merged['seconds'] == 4
    assert merged['runs']['plain'][1]['test_acc'] == [70, 72, 71]
    assert merged['summary']['arms']['TrAct λ=0.1']['paired'][1]['mean'] == 1.0
    with pytest.raises(ValueError, match='seed appears twice'):
        study.main(['--merge', str(tmp_path / 'a'), str(tmp_path / 'a'), '--out', str(tmp_path)])


def test_trend_reads_one_setting_across_studies_and_pairs_e_with_2e(tmp_path):
    """Budgets of one setting come from several studies, each from the one with the most
    seeds; other settings stay apart; 'E vs 2E' pairs TrAct at E with plain at 2E on the
    seeds both budgets ran."""
    from examples import trend

    def report(name, describe, seeds, budgets):  # accuracy: 70 + budget + seed (+1 for TrAct)
        runs = {
            arm: {
                str(b): {
                    'test_acc': [70.0 + b + s + shift for s in seeds],
                    'final_loss': [1.0 / b - shift / 10 for _ in seeds],
                }
                for b in budgets
            }
            for arm, shift in (('plain', 0.0), ('TrAct λ=0.1', 1.0))
        }
        path = tmp_path / f'{name}.json'
        path.write_text(json.dumps({'args': {'seeds': seeds}, 'describe': describe, 'runs': runs}))
        return path

    paths = [
        report('short', 'A', [0, 1, 2, 3, 4], [1, 2, 4]),
        report('long', 'A', [0, 1, 2], [1, 2, 4, 8]),
        report('other', 'B', [0, 1], [1, 2]),
        report('other seeds', 'B', [5, 6, 7], [2]),
    ]
    found = trend.main([*map(str, paths), '--labels', 'first', '--out', str(tmp_path / 't')])
    assert list(found) == ['A', 'B']
    assert {b: len(c.seeds) for b, c in found['A'].items()} == {1: 5, 2: 5, 4: 5, 8: 3}
    assert found['A'][1].delta('acc')['mean'] == pytest.approx(1.0)
    assert found['A'][1].delta('loss')['mean'] == pytest.approx(-0.1)
    double = trend.reaches_double(found['A'])
    assert double[1]['mean'] == pytest.approx(0.0) and double[1]['se'] == 0.0  # 71+s vs 72+s−1
    assert double[4]['mean'] == pytest.approx(75 - 78) and double[4]['se'] == 0.0  # seeds 0-2
    apart = trend.reaches_double(found['B'])[1]  # no seed in common: the means, no interval
    assert apart['mean'] == pytest.approx(72.5 - 78) and math.isnan(apart['low'])
    table = (tmp_path / 't' / 'trend.md').read_text()
    assert '| first | 8 | 3 |' in table and '| B | 2 | 3 |' in table
    assert (tmp_path / 't' / 'trend.png').stat().st_size > 0
