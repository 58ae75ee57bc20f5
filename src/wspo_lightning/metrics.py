"""How the objectives log: step values as global-batch means under data parallelism, validation values
aggregated by torchmetrics, and training throughput."""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric


class ObjectiveMetrics:
    """Logging for a LightningModule whose steps produce `{name: (value, weight)}`: a scalar mean with its
    weight (rows or tokens), or a per-example vector (weight 1 each)."""

    metric_names: list[str] = []
    """Validation metrics (logged as val/NAME and test/NAME)."""

    _last_batch_start: float | None = None
    _last_batch_tokens = 0

    @staticmethod
    def make_metrics(names: list[str]) -> nn.ModuleDict:
        # torchmetrics aggregates over batches and syncs across devices at epoch end.
        return nn.ModuleDict({name.replace("/", "__"): MeanMetric() for name in names})

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_batch_start is not None and now > self._last_batch_start:
            rate = self._last_batch_tokens / (now - self._last_batch_start)
            self.log("train/tokens_per_second", rate, on_step=True, on_epoch=False)
        self._last_batch_start = now
        self._last_batch_tokens = int(batch["chosen_attention_mask"].sum()) * (2 if self.trains_on_pairs else 1)

    def _log_step(self, values: dict[str, tuple[Tensor, Tensor | float]], batch_size: int) -> None:
        """Log `train/` step values, each (scalar mean, weight) or a per-example vector, as means over the
        global batch: under DDP/FSDP one all-reduce of (sum, weight) pairs, so two ranks log what one
        process holding both halves would (a token-weighted mean stays token-weighted)."""
        means = {name: value.detach().float().mean() for name, (value, _) in values.items()}
        if self.trainer.world_size > 1:
            sums, weights = [], []
            for value, weight in values.values():
                value = value.detach().float()
                n = torch.as_tensor(value.numel() if value.dim() else weight, dtype=torch.float32, device=self.device)
                sums.append(value.sum() if value.dim() else value * n)
                weights.append(n)
            totals = self.trainer.strategy.reduce(
                torch.stack([torch.stack(sums), torch.stack(weights)]), reduce_op="sum"
            )  # [2, metrics]
            means = dict(zip(values, totals[0] / totals[1].clamp(min=1e-12)))
        for name, value in means.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=batch_size)

    def _update_and_log(self, prefix: str, values: dict[str, tuple[Tensor, Tensor | float]]) -> None:
        for name, (value, weight) in values.items():
            metric = self.val_metrics[name.replace("/", "__")]
            metric.update(value.detach().float(), weight)
            self.log(f"{prefix}/{name}", metric, on_step=False, on_epoch=True)
