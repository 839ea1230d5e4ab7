"""Image datasets for the examples, from local files only (nothing is downloaded).

- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images; always available).
- ``fashion_mnist``: the IDX files of Debian's ``dataset-fashion-mnist``
  (``apt-get install dataset-fashion-mnist``), default /usr/share/datasets/fashion-mnist.
- ``cifar10`` / ``cifar100``: the standard "python version" pickle batches.
- ``npz``: your own data, one ``.npz`` file (``--data-dir``) with the arrays ``x_train``,
  ``y_train``, ``x_test``, ``y_test``; images (N, H, W) or (N, H, W, C), integer labels.

Images come as float32 NHWC arrays. ``standardize`` chooses per-channel standardization
with the training set's mean and std (the paper's setting), or the raw pixel scale
(``'raw255'``: values in [0, 255], where the paper reports TrAct robust and plain
training hurt).
"""

from __future__ import annotations

import gzip
import pathlib
import pickle
from typing import NamedTuple

import numpy as np

FASHION_MNIST_DIR = pathlib.Path('/usr/share/datasets/fashion-mnist')
FASHION_MNIST_FILES = {
    'train_images': 'train-images-idx3-ubyte',
    'train_labels': 'train-labels-idx1-ubyte',
    'test_images': 't10k-images-idx3-ubyte',
    'test_labels': 't10k-labels-idx1-ubyte',
}
CIFAR_FILES = {
    'cifar10': ('cifar-10-batches-py', [f'data_batch_{i}' for i in range(1, 6)], ['test_batch']),
    'cifar100': ('cifar-100-python', ['train'], ['test']),
}
DATASETS = ('digits', 'fashion_mnist', 'cifar10', 'cifar100', 'npz')
NUM_CLASSES = {'digits': 10, 'fashion_mnist': 10, 'cifar10': 10, 'cifar100': 100}


class Split(NamedTuple):
    images: np.ndarray  # (N, H, W, C) float32
    labels: np.ndarray  # (N,) int32


class MissingDataError(FileNotFoundError):
    """A dataset's files are not where they were looked for."""


def _missing(name: str, where: pathlib.Path, expected: list[str], how: str) -> MissingDataError:
    return MissingDataError(
        f'{name}: no data at {where}. Expected the files {", ".join(expected)} there '
        f'(gzipped or not). {how} Or pass --data-dir pointing at them.'
    )


def _open(path: pathlib.Path):
    for candidate in (path, path.with_name(path.name + '.gz')):
        if candidate.exists():
            return gzip.open(candidate) if candidate.suffix == '.gz' else open(candidate, 'rb')
    return None


def _read_idx(path: pathlib.Path) -> np.ndarray:
    with _open(path) as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], 'big') for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist(data_dir: pathlib.Path) -> tuple[Split, Split]:
    paths = {k: data_dir / v for k, v in FASHION_MNIST_FILES.items()}
    if any(_open(p) is None for p in paths.values()):
        raise _missing(
            'fashion_mnist',
            data_dir,
            list(FASHION_MNIST_FILES.values()),
            "On Debian: 'apt-get install dataset-fashion-mnist'.",
        )
    arrays = {k: _read_idx(p) for k, p in paths.items()}
    return (
        Split(arrays['train_images'][..., None].astype(np.float32), arrays['train_labels']),
        Split(arrays['test_images'][..., None].astype(np.float32), arrays['test_labels']),
    )


def _cifar(name: str, data_dir: pathlib.Path) -> tuple[Split, Split]:
    folder, train_files, test_files = CIFAR_FILES[name]
    root = data_dir / folder if (data_dir / folder).exists() else data_dir
    label_key = b'labels' if name == 'cifar10' else b'fine_labels'

    def load(files):
        images, labels = [], []
        for f in files:
            if not (root / f).exists():
                raise _missing(
                    name,
                    root,
                    train_files + test_files,
                    'Use the "CIFAR python version" archive, extracted.',
                )
            with open(root / f, 'rb') as fh:
                batch = pickle.load(fh, encoding='bytes')
            images.append(batch[b'data'].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[label_key]))
        return Split(np.concatenate(images).astype(np.float32), np.concatenate(labels))

    return load(train_files), load(test_files)


def _npz(path: pathlib.Path) -> tuple[Split, Split]:
    names = ['x_train', 'y_train', 'x_test', 'y_test']
    if not path.is_file():
        raise MissingDataError(
            f'npz: no file at {path}. Pass --data-dir pointing at one .npz file holding the '
            f'arrays {", ".join(names)}.'
        )
    with np.load(path) as arrays:
        absent = [k for k in names if k not in arrays]
        if absent:
            raise ValueError(f'{path} lacks the arrays {", ".join(absent)} (it needs {names})')
        x_train, y_train, x_test, y_test = (arrays[k] for k in names)

    def split(x, y):
        x = x[..., None] if x.ndim == 3 else x
        return Split(x.astype(np.float32), y.astype(np.int32).reshape(-1))

    return split(x_train, y_train), split(x_test, y_test)


def _digits() -> tuple[Split, Split]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[..., None] * (255.0 / 16.0)).astype(np.float32)  # to [0, 255]
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(labels))  # fixed train/test split
    train, test = order[:1400], order[1400:]
    return Split(images[train], labels[train]), Split(images[test], labels[test])


def load(
    name: str, data_dir: str | pathlib.Path | None = None, standardize: str = 'channel'
) -> tuple[Split, Split]:
    """Train and test splits of ``name``, as float32 NHWC images and int32 labels.

    Args:
      name: one of ``digits``, ``fashion_mnist``, ``cifar10``, ``cifar100``, ``npz``.
      data_dir: where the files are (for ``npz``, the file; not used for ``digits``).
      standardize: ``'channel'`` (per-channel mean/std of the training set) or
        ``'raw255'`` (pixel values in [0, 255], unstandardized).

    Raises:
      MissingDataError: the files are not there; the message names the files expected.
    """
    if name == 'digits':
        train, test = _digits()
    elif name == 'fashion_mnist':
        train, test = _fashion_mnist(pathlib.Path(data_dir or FASHION_MNIST_DIR))
    elif name == 'npz':
        if data_dir is None:
            raise MissingDataError('npz: pass --data-dir pointing at your .npz file.')
        train, test = _npz(pathlib.Path(data_dir))
    elif name in CIFAR_FILES:
        if data_dir is None:
            raise _missing(name, pathlib.Path('.'), CIFAR_FILES[name][1], 'No default location.')
        train, test = _cifar(name, pathlib.Path(data_dir))
    else:
        raise ValueError(f'unknown dataset {name!r}; choose from {", ".join(DATASETS)}')
    if standardize == 'channel':
        mean = train.images.mean(axis=(0, 1, 2))
        std = train.images.std(axis=(0, 1, 2))
        train, test = (Split((s.images - mean) / std, s.labels) for s in (train, test))
    elif standardize != 'raw255':
        raise ValueError(f"standardize must be 'channel' or 'raw255', got {standardize!r}")
    return (
        Split(train.images.astype(np.float32), train.labels.astype(np.int32)),
        Split(test.images.astype(np.float32), test.labels.astype(np.int32)),
    )
