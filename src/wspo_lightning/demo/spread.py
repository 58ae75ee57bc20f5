"""`wspo demo-spread`: how much a demo's rows move between seeds.

One seed's intervals cover the sampling of its evaluation, not the training: the weak pair, the pairs and
every fit change with the seed. This reads the `results.json` of runs that differ only in `seed` (the
held-out prompts stay the same, see `DemoSettings.prompt_seed`) and tabulates each row's paired
difference vs its baseline and its KL per seed, with their mean and range.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from wspo_lightning.commands import parse
from wspo_lightning.errors import InputError
from wspo_lightning.io import atomic_path

# Settings that may differ between the runs compared; any other difference makes the spread meaningless.
VARYING = {"seed"}


def load_run(folder: Path) -> tuple[dict, list[dict]]:
    """A finished demo run's settings and result rows."""
    settings, results = folder / "settings.json", folder / "results.json"
    for path in (settings, results):
        if not path.is_file():
            raise InputError(f"{path}: not found; is {folder} a finished `wspo demo --out` folder?")
    return json.loads(settings.read_text()), json.loads(results.read_text())


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:+.3f}"


def spread_table(runs: list[tuple[Path, dict, list[dict]]]) -> str:
    """Markdown: one line per row of the first run, the paired difference (and KL) per seed, mean and range."""
    seeds = [settings["seed"] for _, settings, _ in runs]
    by_run = [{row["name"]: row for row in rows} for _, _, rows in runs]
    head = "| row | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | min .. max | KL per seed |"
    lines = [head, "|---" * (len(seeds) + 4) + "|"]
    for name, first in by_run[0].items():
        if first.get("diff_vs_baseline") is None or name == first.get("baseline"):
            continue
        diffs = [run.get(name, {}).get("diff_vs_baseline") for run in by_run]
        cis = [run.get(name, {}).get("diff_vs_baseline_ci") for run in by_run]
        cells = [
            f"{_fmt(d)} [{_fmt(c[0])}, {_fmt(c[1])}]" if d is not None and c else _fmt(d) for d, c in zip(diffs, cis)
        ]
        seen = [d for d in diffs if d is not None]
        kls = ", ".join("-" if run.get(name, {}).get("kl") is None else f"{run[name]['kl']:.2f}" for run in by_run)
        lines.append(
            f"| {name} (vs {first['baseline']}) | " + " | ".join(cells) + f" | {_fmt(statistics.fmean(seen))} | "
            f"{_fmt(min(seen))} .. {_fmt(max(seen))} | {kls} |"
        )
    return "\n".join(lines)


def demo_spread(folders: list[str], out: str | None = None) -> str:
    """Compare finished demo runs that differ only in their seed; write the table to `out` if given.

    Args:
        folders: finished `wspo demo --out` folders, the first one is the reference.
        out: also write the table to this markdown file.
    """
    if len(folders) < 2:
        raise InputError("demo-spread: give at least two `wspo demo --out` folders (runs with different seeds)")
    runs = [(Path(f), *load_run(Path(f))) for f in folders]
    first_path, first, _ = runs[0]
    for path, settings, _ in runs[1:]:
        differ = sorted(k for k in first.keys() | settings.keys() if first.get(k) != settings.get(k))
        if set(differ) - VARYING:
            raise InputError(
                f"{path / 'settings.json'}: differs from {first_path / 'settings.json'} in "
                f"{', '.join(sorted(set(differ) - VARYING))}; runs compared may differ only in seed"
            )
    table = spread_table(runs)
    if out:
        with atomic_path(Path(out)) as tmp:
            tmp.write_text(table + "\n")
    return table


def main(argv: list[str] | None = None) -> int:
    """`wspo demo-spread RUN RUN [RUN ...] [--out FILE.md]`: print the table."""
    print(demo_spread(**parse(demo_spread, argv, "wspo demo-spread", positional=["folders"])))
    return 0
