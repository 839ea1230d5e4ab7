"""Markdown tables of test accuracy (mean ± std over seeds), from train.py and study.py runs.

python -m examples.summarize examples/runs/*/results.json     # per epoch, train.py
python -m examples.summarize examples/runs/study/*/study.json  # per budget, with paired CIs
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


def study_rows(path: pathlib.Path) -> list[str]:
    """A row per TrAct arm and budget of a study.json: both arms' means and the paired Δ."""
    report = json.loads(path.read_text())
    runs, n = report['runs'], len(report['args']['seeds'])
    out = []
    for arm, summary in report['summary']['arms'].items():
        for budget, p in summary['paired'].items():
            plain, tract = (np.array(runs[a][budget]['test_acc']) for a in ('plain', arm))
            last = budget == max(summary['paired'], key=int)
            speedup = (
                (f'{summary["speedup"]:g}×' if summary['speedup'] else 'not reached')
                if last
                else ''
            )
            out.append(
                f'| {report["describe"]} | {arm} | {n} | {budget} | {plain.mean():.2f} | '
                f'{tract.mean():.2f} | {p["mean"]:+.2f} [{p["low"]:+.2f}, {p["high"]:+.2f}] | '
                f'{speedup} |'
            )
    return out


def main(paths: list[str]) -> None:
    studies = [pathlib.Path(p) for p in paths if pathlib.Path(p).name == 'study.json']
    trains = [pathlib.Path(p) for p in paths if pathlib.Path(p).name != 'study.json']
    if trains:
        print('| setting | seeds | epoch | plain test acc % | TrAct test acc % | Δ |')
        print('|---|---|---|---|---|---|')
        for path in trains:
            print('\n'.join(rows(path)))
    if studies:
        print('| setting | arm | seeds | epochs | plain % | TrAct % | Δ [95% CI] | speedup |')
        print('|---|---|---|---|---|---|---|---|')
        for path in studies:
            print('\n'.join(study_rows(path)))


if __name__ == '__main__':
    main(sys.argv[1:])
