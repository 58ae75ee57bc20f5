"""`FrozenRoles`: the frozen models of an objective (the reference and the weak pair): load, place, run.

They live in a plain dict, not as submodules of the LightningModule: strategies never wrap, shard or
checkpoint them, and quantized weights never meet FSDP. A LoRA policy needs no reference model: its
base with the adapters disabled is the reference.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from wspo_lightning.crossvocab.batch import has_weak_rows, to_policy_tokens, weak_rows
from wspo_lightning.logprobs import response_logps, response_mask
from wspo_lightning.models import ModelSpec, load_model


class FrozenRoles:
    """Frozen models by role ("reference", "weak_base", "weak_aligned"), run without gradients."""

    def __init__(self) -> None:
        self.models: dict[str, nn.Module] = {}

    def __contains__(self, role: str) -> bool:
        return role in self.models

    def __iter__(self) -> Iterator[str]:
        return iter(self.models)

    def __getitem__(self, role: str) -> nn.Module:
        return self.models[role]

    def load(self, specs: dict[str, ModelSpec], device: torch.device | str | None = None) -> None:
        """Load the roles of `specs` not loaded yet (quantized ones straight onto `device`)."""
        for role, spec in specs.items():
            if role not in self.models:
                self.models[role] = load_model(spec, trainable=False, device=device)

    def add(self, role: str, model: nn.Module) -> None:
        self.models[role] = model

    def place(self, device: torch.device | str) -> None:
        """Move every float model to `device` (bitsandbytes weights stay where they were loaded, and FSDP2 keeps
        sharded models' weights where it placed them)."""
        from torch.distributed.fsdp import FSDPModule

        for model in self.models.values():
            if not getattr(model, "is_quantized", False) and not isinstance(model, FSDPModule):
                model.to(device)

    @torch.no_grad()
    def logps(self, role: str, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """[B, T'] float32 log-probs of the response tokens under `role` (see `logprobs.response_logps`)."""
        return response_logps(self.models[role], input_ids, attention_mask, labels)[0]

    @torch.no_grad()
    def reference_logps(
        self, policy: nn.Module | None, input_ids: Tensor, attention_mask: Tensor, labels: Tensor
    ) -> Tensor:
        """The reference's log-probs; without a reference model, the LoRA `policy` with its adapters disabled."""
        if "reference" in self.models:
            return self.logps("reference", input_ids, attention_mask, labels)
        if policy is None or not hasattr(policy, "disable_adapter"):
            raise RuntimeError("no reference model is loaded and the policy has no LoRA adapters to disable")
        with policy.disable_adapter():
            return response_logps(policy, input_ids, attention_mask, labels)[0]

    @torch.no_grad()
    def delta_weak(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """delta_weak(t) = l_weak_aligned(t) - l_weak_base(t), [B, T'] float32."""
        return self.logps("weak_aligned", input_ids, attention_mask, labels) - self.logps(
            "weak_base", input_ids, attention_mask, labels
        )

    @torch.no_grad()
    def step_delta_weak(self, batch: dict, sides: Sequence[str], rows: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """delta_weak of a step's policy `rows` (input_ids, attention_mask, labels of `sides`, concatenated),
        [rows, T'] float32 in the layout of `response_logps` on them.

        A weak pair sharing the policy's tokens runs on those rows. One with its own tokenizer runs on the
        batch's weak rows (its rendering of the same text) and each weak token's value is added onto the
        policy token it lands on (`crossvocab`, docs/cross-tokenizer.md)."""
        if not has_weak_rows(batch):
            return self.delta_weak(*rows)
        *weak, weak_map = weak_rows(batch, sides)
        return to_policy_tokens(self.delta_weak(*weak), weak[2], weak_map, response_mask(rows[2]))
