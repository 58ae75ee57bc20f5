"""RewardMarginLogger on the reward dict WSPO's validation returns: margin quantiles to every logger, and W&B
histograms of each reward and of both margins, under the `val/hist/*` names docs/design.md lists."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import WandbLogger

from wspo_lightning.callbacks import RewardMarginLogger

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "design.md"
HISTOGRAMS = [
    "val/hist/weak_chosen",
    "val/hist/weak_rejected",
    "val/hist/strong_chosen",
    "val/hist/strong_rejected",
    "val/hist/weak_margin",
    "val/hist/strong_margin",
]


class _WandbRecorder(WandbLogger):
    """A WandbLogger without a run: records what the callback logs."""

    def __init__(self) -> None:  # no super().__init__: nothing starts
        self.logged: list[dict] = []
        self.metrics: dict[str, float] = {}

    @property
    def experiment(self):
        return types.SimpleNamespace(log=self.logged.append)

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)


def test_reward_margin_logger_logs_quantiles_and_the_documented_histograms_of_validation_rewards():
    recorder = _WandbRecorder()
    trainer = types.SimpleNamespace(sanity_checking=False, is_global_zero=True, loggers=[recorder], global_step=7)
    # one rank; quantiles go through the module's log_dict (Lightning logs them at its validation step)
    module = types.SimpleNamespace(
        all_gather=lambda t: t, log_dict=lambda metrics, **_: recorder.metrics.update(metrics)
    )
    callback = RewardMarginLogger()
    callback.on_validation_epoch_start(trainer, module)
    # two validation batches of WSPOModule.evaluate's dict; weak margins [1, -1] then [3], strong margins all 0
    batches = [
        {
            "weak_chosen": [1.0, 2.0],
            "weak_rejected": [0.0, 3.0],
            "strong_chosen": [0.5, 0.5],
            "strong_rejected": [0.5, 0.5],
        },
        {"weak_chosen": [4.0], "weak_rejected": [1.0], "strong_chosen": [-1.0], "strong_rejected": [-1.0]},
    ]
    for i, outputs in enumerate(batches):
        rewards = {name: torch.tensor(values) for name, values in outputs.items()}
        callback.on_validation_batch_end(trainer, module, rewards, None, i)
    callback.on_validation_epoch_end(trainer, module)

    # weak margins [1, -1, 3]: quantiles by linear interpolation, q10 = -1 + 0.2 * 2, q90 = 1 + 0.8 * 2
    assert recorder.metrics == pytest.approx(
        {
            "val/rewards/weak_margin_q10": -0.6,
            "val/rewards/weak_margin_q50": 1.0,
            "val/rewards/weak_margin_q90": 2.6,
            "val/rewards/strong_margin_q10": 0.0,
            "val/rewards/strong_margin_q50": 0.0,
            "val/rewards/strong_margin_q90": 0.0,
        }
    )
    (histograms,) = recorder.logged
    assert set(histograms) == {*HISTOGRAMS, "trainer/global_step"}
    assert histograms["trainer/global_step"] == 7
    assert all(sum(histograms[key].histogram) == 3 for key in HISTOGRAMS)  # every example of both batches
    design = DESIGN.read_text()
    assert all(f"`{key}`" in design for key in HISTOGRAMS)
