"""`wspo workspace`: a ready W&B workspace (saved view) for a project's runs, built with `wandb-workspaces`.

Its panels come from the metric names the runs wrote: read from a run's `metrics.csv` (CSVLogger) or, by
default, from the project's runs through the W&B API. Each name is sorted into a section by what it
measures (loss, margins, accuracies, gamma, the log-ratios delta_strong / delta_weak, margin quantiles,
the rest); a metric logged as `train/X` and `val/X` shares one plot. Tables come after: the sample table of
`SampleTable` and the results table and gold-reward-vs-KL plot of `wspo evaluate`.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from wspo_lightning.callbacks.logging import SampleTable
from wspo_lightning.commands import run_function
from wspo_lightning.errors import InputError
from wspo_lightning.pipeline.evaluate import PLOT_KEY, TABLE_KEY

STEP = "trainer/global_step"
"""The x-axis: Lightning's WandbLogger logs every metric against it."""
# (section, rule on a metric's name without its train/ val/ test/ prefix); the first rule that matches wins
SECTIONS: list[tuple[str, re.Pattern]] = [
    ("Margin quantiles", re.compile(r"margin_q\d+$")),
    ("Loss", re.compile(r"(^|/)loss$")),
    ("Margins", re.compile(r"margin")),
    ("Accuracies", re.compile(r"accurac")),
    ("Gamma", re.compile(r"gamma")),
    ("Log-ratios", re.compile(r"delta|residual|logratio|logps|rewards/")),
]
OTHER = "Other metrics"
TABLES = "Samples and evaluation"
SPLITS = ("train/", "val/", "test/")


def metric_names_from_csv(path: str | Path) -> list[str]:
    """The metric columns of a CSVLogger's metrics.csv (its `epoch` and `step` columns left out)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file (a CSVLogger's metrics.csv, e.g. runs/NAME/logs/wspo/version_0)")
    with path.open(newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    names = [name for name in header if name not in ("epoch", "step")]
    if not names:
        raise InputError(f"{path}: holds no metric columns")
    return names


def metric_names_from_wandb(entity: str | None, project: str, max_runs: int = 50) -> list[str]:
    """Numeric metric names of a project's newest runs, through the W&B API (needs the network)."""
    import wandb

    api = wandb.Api()
    names: set[str] = set()
    for run in api.runs(f"{entity or api.default_entity}/{project}", per_page=max_runs)[:max_runs]:
        names |= {k for k, v in run.summary.items() if isinstance(v, (int, float)) and not k.startswith("_")}
    return sorted(names)


def sections(names: list[str]) -> dict[str, list[list[str]]]:
    """Section -> plots, each plot the names it shows (`train/X` with `val/X`), in `SECTIONS` order."""
    by_suffix: dict[str, list[str]] = {}
    for name in names:
        if name == STEP or name.startswith("hist/") or "/hist/" in name:
            continue
        suffix = name[len(next((s for s in SPLITS if name.startswith(s)), "")) :]
        by_suffix.setdefault(suffix, []).append(name)
    out: dict[str, list[list[str]]] = {title: [] for title, _ in SECTIONS}
    out[OTHER] = []
    for suffix, group in by_suffix.items():
        title = next((title for title, rule in SECTIONS if rule.search(suffix)), OTHER)
        out[title].append(sorted(group))
    return {title: plots for title, plots in out.items() if plots}


def build_workspace(entity: str, project: str, names: list[str], name: str = "wspo-lightning"):
    """A `wandb_workspaces` Workspace: one section per kind of metric, then the tables."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError:
        raise InputError("wspo workspace needs wandb-workspaces: pip install 'wspo-lightning[dashboard]'") from None

    parts = [
        ws.Section(
            name=title,
            is_open=True,
            panels=[wr.LinePlot(title=" / ".join(plot), x=STEP, y=plot) for plot in plots],
        )
        for title, plots in sections(names).items()
    ]
    # wandb.plot.scatter logs its data as the table `<key>_table` and draws it with the chart wandb/scatter/v0
    scatter = wr.CustomChart.from_table(
        f"{PLOT_KEY}_table", chart_fields={"x": "kl", "y": "gold_reward"}, chart_strings={"title": "gold reward vs KL"}
    )
    scatter.chart_name = "wandb/scatter/v0"
    tables = [wr.WeavePanelSummaryTable(table_name=key) for key in (SampleTable.key, TABLE_KEY)]
    parts.append(ws.Section(name=TABLES, is_open=True, panels=[*tables, scatter]))
    return ws.Workspace(entity=entity, project=project, name=name, sections=parts)


def workspace(
    project: str,
    entity: str | None = None,
    metrics_csv: str | None = None,
    name: str = "wspo-lightning",
    save: bool = True,
) -> str:
    """Build a W&B workspace for a project's runs and save it as a new view; print its URL.

    Args:
        project: the W&B project the runs log to.
        entity: W&B user or team; None: your default entity.
        metrics_csv: take the metric names from this metrics.csv (a CSVLogger's) instead of the project's runs.
        name: the workspace's (view's) name.
        save: save it to W&B (needs the network and a login); false: print its sections and panels as JSON.
    """
    names = metric_names_from_csv(metrics_csv) if metrics_csv else metric_names_from_wandb(entity, project)
    if not save:
        plan = {title: plots for title, plots in sections(names).items()}
        plan[TABLES] = [[SampleTable.key], [TABLE_KEY], [f"{PLOT_KEY}_table"]]
        print(json.dumps(plan, indent=2))
        return ""
    if entity is None:
        import wandb

        entity = wandb.Api().default_entity
    built = build_workspace(entity, project, names, name)
    built.save()
    print(built.url)
    return built.url


def main(argv: list[str] | None = None) -> int:
    return run_function(workspace, argv, "wspo workspace")
