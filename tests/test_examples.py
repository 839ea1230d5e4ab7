"""Smoke tests of the examples: they run, train, and fail clearly on missing data."""

import json

import pytest

from examples import data, train


def test_train_runs_both_arms_on_digits(tmp_path):
    report = train.main(
        [
            '--epochs',
            '2',
            '--max-steps-per-epoch',
            '5',
            '--model',
            'vit_tiny',
            '--patch',
            '4',
            '--out',
            str(tmp_path),
        ]
    )
    assert set(report['runs']) == {'baseline', 'tract'}
    saved = json.loads((tmp_path / 'results.json').read_text())
    assert len(saved['runs']['tract']['0']) == 2
    assert saved['args']['lr'] == 1e-3 and saved['args']['seeds'] == [0]  # typed, not strings
    assert (tmp_path / 'accuracy.png').stat().st_size > 0


def test_tract_arm_trains_the_first_layer_differently(tmp_path):
    """Same init and batches (same seed), yet the TrAct arm's first layer moves differently."""
    report = train.main(['--epochs', '1', '--max-steps-per-epoch', '3', '--out', str(tmp_path)])
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
