"""TrAct − plain against the training budget, one line per setting, from study.json files.

    python -m examples.trend a/study.json b/study.json --labels 'short name' --out DIR

(``STAGE=trend bash examples/study_grid.sh`` runs it on the committed cells.)

A setting is what a study trained (its ``describe`` line) and one TrAct arm. Studies of one
setting run with other budgets or seeds are read together; at each budget the study with the
most seeds is taken. Per setting and budget it reports the difference in test accuracy paired by
seed with its 95% interval, the same for the last epoch's training loss (how fast TrAct
optimizes, apart from how well it generalizes), and whether TrAct at E epochs reached plain at
2E (paired on the seeds both budgets ran). Writes ``trend.md`` and
``trend.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
from dataclasses import dataclass

import numpy as np

from examples import study


@dataclass
class Cell:
    """One budget of one setting: per seed, both arms' test accuracy and final training loss."""

    seeds: list[int]
    plain_acc: list[float]
    tract_acc: list[float]
    plain_loss: list[float]
    tract_loss: list[float]

    def delta(self, of: str) -> dict:
        """TrAct − plain paired by seed, of ``'acc'`` (test accuracy) or ``'loss'``."""
        return study.paired(getattr(self, f'tract_{of}'), getattr(self, f'plain_{of}'))


def settings(paths: list[pathlib.Path], arm: str) -> dict[str, dict[int, Cell]]:
    """``{setting: {budget: Cell}}``, each budget from the study with the most seeds."""
    found: dict[str, dict[int, Cell]] = {}
    for path in paths:
        report = json.loads(path.read_text())
        if arm not in report['runs']:
            continue
        seeds = list(report['args']['seeds'])
        plain, tract = report['runs']['plain'], report['runs'][arm]
        cells = found.setdefault(report['describe'], {})
        for budget in plain:
            if int(budget) in cells and len(cells[int(budget)].seeds) >= len(seeds):
                continue
            cells[int(budget)] = Cell(
                seeds,
                plain[budget]['test_acc'],
                tract[budget]['test_acc'],
                plain[budget]['final_loss'],
                tract[budget]['final_loss'],
            )
    return {name: dict(sorted(cells.items())) for name, cells in found.items()}


def reaches_double(cells: dict[int, Cell]) -> dict[int, dict]:
    """TrAct at E − plain at 2E per budget E whose double was run, paired on the seeds both
    budgets ran (the difference of the means, with no interval, if fewer than two)."""
    out = {}
    for budget, cell in cells.items():
        double = cells.get(2 * budget)
        if double is None:
            continue
        common = [s for s in cell.seeds if s in double.seeds]
        tract = [cell.tract_acc[cell.seeds.index(s)] for s in common]
        plain = [double.plain_acc[double.seeds.index(s)] for s in common]
        if len(common) >= 2:
            out[budget] = study.paired(tract, plain)
        else:
            mean = float(np.mean(cell.tract_acc) - np.mean(double.plain_acc))
            out[budget] = {'mean': mean, 'low': math.nan, 'high': math.nan, 'se': math.nan}
    return out


def renamed(found: dict[str, dict[int, Cell]], labels: list[str]) -> dict[str, dict[int, Cell]]:
    """The settings under their short names where given (in the order first read)."""
    return {
        labels[i] if i < len(labels) else name: cells
        for i, (name, cells) in enumerate(found.items())
    }


def interval(p: dict, digits: int = 2) -> str:
    """``+1.37 [+0.88, +1.86]``, bold where the interval excludes zero."""
    text = f'{p["mean"]:+.{digits}f}'
    if math.isnan(p['low']):
        return text
    text += f' [{p["low"]:+.{digits}f}, {p["high"]:+.{digits}f}]'
    return f'**{text}**' if p['low'] > 0 or p['high'] < 0 else text


def markdown(found: dict[str, dict[int, Cell]], arm: str, labels: list[str]) -> str:
    lines = [
        f'{arm} − plain, paired by seed, with 95% intervals (bold: the interval excludes 0). '
        'Test accuracy in points; training loss is the last epoch mean (negative: TrAct '
        "optimized further); 'E vs 2E' is TrAct at E epochs − plain at 2E, on the seeds both ran.",
        '',
        '| setting | epochs | seeds | plain % | TrAct % | Δ test acc | Δ train loss | E vs 2E |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for name, cells in renamed(found, labels).items():
        double = reaches_double(cells)
        for budget, c in cells.items():
            means = f'{np.mean(c.plain_acc):.2f} | {np.mean(c.tract_acc):.2f}'
            deltas = f'{interval(c.delta("acc"))} | {interval(c.delta("loss"), 3)}'
            reach = interval(double[budget]) if budget in double else ''
            lines.append(f'| {name} | {budget} | {len(c.seeds)} | {means} | {deltas} | {reach} |')
    return '\n'.join(lines) + '\n'


def plot(found: dict[str, dict[int, Cell]], arm: str, path: pathlib.Path, labels: list[str]):
    """Left: Δ test accuracy per budget; right: Δ final training loss; 95% intervals."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4.2))
    budgets = sorted({b for cells in found.values() for b in cells})
    for i, (label, cells) in enumerate(renamed(found, labels).items()):
        x = np.array(list(cells)) * 2 ** (0.04 * (i - (len(found) - 1) / 2))  # side by side
        for ax, key in ((acc_ax, 'acc'), (loss_ax, 'loss')):
            study.errorbars(ax, x, [c.delta(key) for c in cells.values()], label=label)
    for ax in (acc_ax, loss_ax):
        ax.axhline(0, color='black', lw=0.8)
        study.budget_axis(ax, budgets)
    acc_ax.set_ylabel('test accuracy: TrAct − plain [points]')
    loss_ax.set_ylabel('last-epoch training loss: TrAct − plain')
    acc_ax.legend(fontsize=7)
    fig.suptitle(f'{arm} − plain, paired by seed, 95% intervals', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """The command line; a function so that scripts calling this one can be checked."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('studies', type=pathlib.Path, nargs='+', help='study.json files')
    parser.add_argument('--arm', default='TrAct λ=0.1', help='the TrAct arm to compare')
    parser.add_argument(
        '--labels',
        nargs='*',
        default=[],
        help='short names of the settings, in the order first read',
    )
    parser.add_argument('--out', type=pathlib.Path, default=pathlib.Path('examples/runs/trend'))
    return parser


def main(argv: list[str] | None = None) -> dict[str, dict[int, Cell]]:
    parser = build_parser()
    args = parser.parse_args(argv)
    found = settings(args.studies, args.arm)
    if not found:
        parser.error(f'no study has the arm {args.arm!r}')
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(found, args.arm, args.labels)
    print(table)
    (args.out / 'trend.md').write_text(table)
    plot(found, args.arm, args.out / 'trend.png', args.labels)
    return found


if __name__ == '__main__':
    main()
