"""Markdown table of test accuracy (mean ± std over seeds) per epoch, from train.py runs.

python -m examples.summarize examples/runs/*/results.json
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np


def rows(path: pathlib.Path) -> list[str]:
    report = json.loads(path.read_text())
    args = report['args']
    name = (
        f'{args["dataset"]}, {args["model"]}, {args["optimizer"]} lr {args["lr"]}, '
        f'{args["standardize"]}'
    )
    acc = {
        label: np.array([[100 * r['test_acc'] for r in run] for run in runs.values()])
        for label, runs in report['runs'].items()
    }
    seeds = len(next(iter(acc.values())))
    out = []
    for epoch in range(acc['baseline'].shape[1]):
        base, tract = acc['baseline'][:, epoch], acc['tract'][:, epoch]
        out.append(
            f'| {name} | {seeds} | {epoch + 1} | {base.mean():.2f} ± {base.std():.2f} | '
            f'{tract.mean():.2f} ± {tract.std():.2f} | {tract.mean() - base.mean():+.2f} |'
        )
    return out


def main(paths: list[str]) -> None:
    print('| setting | seeds | epoch | plain test acc % | TrAct test acc % | Δ |')
    print('|---|---|---|---|---|---|')
    for path in paths:
        print('\n'.join(rows(pathlib.Path(path))))


if __name__ == '__main__':
    main(sys.argv[1:])
