"""`wspo demo-spread`: rows' paired differences per seed, their mean and range, from finished runs."""

from __future__ import annotations

import json

from wspo_lightning.cli import main as wspo
from wspo_lightning.demo.settings import DemoSettings
from wspo_lightning.demo.spread import demo_spread


def write_run(folder, seed: int, lifts: dict[str, float], **settings) -> None:
    folder.mkdir(parents=True)
    values = {**DemoSettings().__dict__, "seed": seed, **settings}
    (folder / "settings.json").write_text(json.dumps(values))
    rows = [{"name": "strong base", "baseline": "strong base", "diff_vs_baseline": 0.0, "kl": 0.0}]
    rows += [
        {
            "name": name,
            "baseline": "strong base",
            "diff_vs_baseline": d,
            "diff_vs_baseline_ci": [d - 0.1, d + 0.1],
            "kl": 10 * d,
        }
        for name, d in lifts.items()
    ]
    (folder / "results.json").write_text(json.dumps(rows))


def test_spread_tabulates_each_seed_with_mean_and_range(tmp_path):
    write_run(tmp_path / "s0", 0, {"wspo": 0.30, "dpo": -0.05})
    write_run(tmp_path / "s1", 1, {"wspo": 0.10, "dpo": 0.05})
    write_run(tmp_path / "s2", 2, {"wspo": 0.20})  # a row missing from one run shows as "-"
    table = demo_spread([str(tmp_path / f"s{i}") for i in range(3)], out=str(tmp_path / "seeds.md"))
    lines = {line.split(" |")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert set(lines) == {"wspo (vs strong base)", "dpo (vs strong base)"}  # the baseline row is left out
    wspo_cells = [c.strip() for c in lines["wspo (vs strong base)"].split("|")[1:-1]]
    assert wspo_cells[1:4] == ["+0.300 [+0.200, +0.400]", "+0.100 [+0.000, +0.200]", "+0.200 [+0.100, +0.300]"]
    assert wspo_cells[4] == "+0.200"  # (0.3 + 0.1 + 0.2) / 3
    assert wspo_cells[5] == "+0.100 .. +0.300"
    assert wspo_cells[6] == "3.00, 1.00, 2.00"
    dpo_cells = [c.strip() for c in lines["dpo (vs strong base)"].split("|")[1:-1]]
    assert dpo_cells[3] == "-" and dpo_cells[4] == "+0.000" and dpo_cells[5] == "-0.050 .. +0.050"
    assert (tmp_path / "seeds.md").read_text() == table + "\n"
    assert "| seed 0 | seed 1 | seed 2 |" in table.splitlines()[0]


def test_spread_command_takes_the_runs_one_by_one_and_prints_the_table(tmp_path, capsys):
    for seed in range(3):
        write_run(tmp_path / f"s{seed}", seed, {"wspo": 0.1 * seed})
    runs = [str(tmp_path / f"s{seed}") for seed in range(3)]
    assert wspo(["demo-spread", *runs, "--out", str(tmp_path / "seeds.md")]) == 0
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "seeds.md").read_text() == demo_spread(runs) + "\n"
    assert "| seed 0 | seed 1 | seed 2 |" in printed


def test_spread_refuses_runs_that_differ_in_more_than_the_seed(tmp_path, capsys):
    write_run(tmp_path / "a", 0, {"wspo": 0.3})
    write_run(tmp_path / "b", 1, {"wspo": 0.1}, gammas=[1.0, 3.0])
    assert wspo(["demo-spread", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "b/settings.json" in err and "gammas" in err and "only in seed" in err


def test_spread_names_a_folder_that_is_not_a_finished_run(tmp_path, capsys):
    write_run(tmp_path / "a", 0, {"wspo": 0.3})
    (tmp_path / "b").mkdir()
    assert wspo(["demo-spread", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "b/settings.json: not found" in capsys.readouterr().err


def test_spread_needs_two_runs(capsys):
    assert wspo(["demo-spread", "only_one"]) == 2
    assert "at least two" in capsys.readouterr().err
