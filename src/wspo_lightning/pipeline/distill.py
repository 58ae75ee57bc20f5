"""Stage `distill`: a genuinely smaller model that shares the teacher's tokenizer.

The student keeps some of the teacher's decoder layers (plus its final norm and
lm_head), trained on the teacher's own samples to recover language modelling: a top-k
soft-target loss against the teacher's next-token distribution plus the usual next-token
loss, with the embeddings (and so a tied lm_head) frozen. The teacher's top-k is computed
once before training. Prompts and responses are rendered as in training (`Renderer`); a sample keeps
its token ids as drawn, and a sample cut by the length limit is trained without an end-of-turn.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from wspo_lightning.commands import run_function
from wspo_lightning.data.tokenize import tokenize_records
from wspo_lightning.errors import InputError
from wspo_lightning.hardware import choose_precision
from wspo_lightning.io import atomic_path, read_jsonl
from wspo_lightning.logprobs import IGNORE_INDEX, response_start, right_pad
from wspo_lightning.models import ModelSpec, check_model_path, load_model, load_tokenizer
from wspo_lightning.pipeline.stage import done, say
from wspo_lightning.render import Renderer
from wspo_lightning.strategies import decoder_layers


def decoder_stack(model: nn.Module) -> nn.ModuleList:
    """The list that holds a causal LM's decoder blocks (`strategies.decoder_layers`), cut in place by `truncate`."""
    layers = decoder_layers(model)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and list(module) == layers:
            return module
    raise InputError(f"distill: cannot find the decoder layers of {type(model).__name__}")


def truncate(model: nn.Module, layers: int | list[int]) -> nn.Module:
    """Keep some decoder blocks (in place): the first `layers` ones, or those at the listed indices
    (e.g. [0, 1, 2, 28, 29]: the first and last blocks work better together than the first alone)."""
    blocks = decoder_stack(model)
    keep = list(range(layers)) if isinstance(layers, int) else sorted(set(layers))
    if not keep or keep[0] < 0 or keep[-1] >= len(blocks):
        raise InputError(f"distill: layers must pick from the {len(blocks)} decoder layers, got {layers}")
    kept = [blocks[i] for i in keep]
    del blocks[:]
    blocks.extend(kept)
    for index, block in enumerate(kept):  # the KV cache is indexed by each attention's layer_idx
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    for name in ("num_hidden_layers", "n_layer"):
        if hasattr(model.config, name):
            setattr(model.config, name, len(keep))
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return model


class DistillModule(pl.LightningModule):
    """Trains `student` on batches of (tokens, response labels, teacher top-k ids and log-probs).

    Args:
        student: the model to train (already built, e.g. a truncated copy of the teacher).
        learning_rate: peak AdamW learning rate (linear warm-up, then linear decay).
        warmup_ratio: fraction of the steps spent warming up.
        soft_weight: weight of the soft-target loss; the next-token loss gets 1 - soft_weight.
        freeze_embeddings: keep the input embeddings (and a tied lm_head) fixed.
    """

    def __init__(
        self,
        student: nn.Module,
        learning_rate: float = 3e-4,
        warmup_ratio: float = 0.1,
        soft_weight: float = 0.5,
        freeze_embeddings: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["student"])
        self.student = student
        if freeze_embeddings:
            student.get_input_embeddings().requires_grad_(False)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        labels = batch["labels"]  # [B, L]
        first = response_start(labels)
        logits = self.student(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            logits_to_keep=labels.shape[1] - first + 1,
            use_cache=False,
        ).logits
        logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, T', V]; position t predicts labels[t+1]
        targets = labels[:, first:]  # [B, T']
        mask = targets != IGNORE_INDEX
        nll = -logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, T']
        teacher_p = torch.softmax(batch["topk_logps"][:, first:].float(), dim=-1)  # [B, T', k], renormalised
        soft = -(teacher_p * logps.gather(-1, batch["topk_ids"][:, first:].long())).sum(-1)  # [B, T']
        n = mask.sum().clamp(min=1)
        nll, soft = (nll * mask).sum() / n, (soft * mask).sum() / n
        w = self.hparams.soft_weight
        loss = w * soft + (1 - w) * nll
        size = labels.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/distill/nll", nll, batch_size=size)
        self.log("train/distill/soft", soft, batch_size=size)
        return loss

    def configure_optimizers(self):
        from transformers import get_linear_schedule_with_warmup

        params = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=0.0)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = get_linear_schedule_with_warmup(optimizer, int(self.hparams.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _examples(renderer: Renderer, records: list[dict], source: str, max_length: int) -> list[dict]:
    """Token ids of each sample as training renders them (sampled ids kept when the renderer matches)."""
    normalised = [
        {
            "id": str(i),
            "source": f"{source}:{i + 1}",
            "prompt": r["prompt"],
            "chosen": r["response"],
            "rejected": None,
            "chosen_finished": r.get("finished", True),
            "chosen_ids": r.get("response_ids"),
            "tokenizer_fingerprint": r.get("tokenizer_fingerprint"),
        }
        for i, r in enumerate(records)
    ]
    examples = []
    for f in tokenize_records(normalised, renderer, max_length):
        input_ids, attention_mask, labels = right_pad([f["prompt_ids"]], [f["chosen_ids"]], 0)
        examples.append({"input_ids": input_ids[0], "labels": labels[0]})
    return examples


def _collate(examples: list[dict], pad_id: int) -> dict[str, Tensor]:
    """Right padding; teacher targets are [L, k] per example, padded with zeros."""
    length = max(len(e["input_ids"]) for e in examples)
    batch = {
        "input_ids": torch.full((len(examples), length), pad_id),
        "labels": torch.full((len(examples), length), IGNORE_INDEX),
        "attention_mask": torch.zeros(len(examples), length, dtype=torch.long),
    }
    k = examples[0]["topk_ids"].shape[-1]
    batch["topk_ids"] = torch.zeros(len(examples), length, k, dtype=torch.int32)
    batch["topk_logps"] = torch.zeros(len(examples), length, k, dtype=torch.float16)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][row, :n], batch["labels"][row, :n] = e["input_ids"], e["labels"]
        batch["attention_mask"][row, :n] = 1
        batch["topk_ids"][row, :n], batch["topk_logps"][row, :n] = e["topk_ids"], e["topk_logps"]
    return batch


@torch.no_grad()
def teacher_topk(teacher: nn.Module, examples: list[dict], top_k: int, pad_id: int, batch_size: int = 16) -> None:
    """Add `topk_ids`/`topk_logps` [L, k] to each example: the teacher's k most likely next tokens at
    each position whose label is a response token (aligned with the labels; zeros elsewhere)."""
    for first in tqdm(range(0, len(examples), batch_size), desc="teacher top-k", unit="batch", dynamic_ncols=True):
        chunk = examples[first : first + batch_size]
        for e in chunk:  # placeholders so _collate can pad
            e["topk_ids"] = torch.zeros(len(e["input_ids"]), top_k, dtype=torch.int32)
            e["topk_logps"] = torch.zeros(len(e["input_ids"]), top_k, dtype=torch.float16)
        batch = _collate(chunk, pad_id)
        device = next(teacher.parameters()).device
        ids_in, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = teacher(input_ids=ids_in, attention_mask=mask, use_cache=False).logits
        logps, ids = torch.log_softmax(logits.float(), dim=-1).topk(top_k, dim=-1)  # [B, L, k]
        for row, e in enumerate(chunk):
            n = len(e["input_ids"])
            # the logits at position t predict token t+1: shift right so row t holds the target for labels[t]
            e["topk_ids"][1:n] = ids[row, : n - 1].to("cpu", torch.int32)
            e["topk_logps"][1:n] = logps[row, : n - 1].to("cpu", torch.float16)


def distill(
    teacher: ModelSpec,
    samples: str,
    out: str,
    layers: int | list[int] = 4,
    top_k: int = 32,
    epochs: int = 3,
    batch_size: int = 8,
    learning_rate: float = 3e-4,
    soft_weight: float = 0.5,
    max_length: int = 256,
    precision: str = "auto",
    use_chat_template: bool = True,
    prompt_template: str = "{prompt}",
    seed: int = 0,
    log_dir: str | None = None,
    force: bool = False,
) -> Path:
    """Build a student from some of `teacher`'s layers, distil it on `samples`, save it to `out`.

    Args:
        teacher: the strong model (its tokenizer, embeddings and first layers seed the student).
        samples: JSONL with `prompt` and `response` (the teacher's own samples, from `wspo sample`).
        out: output folder of the student (save_pretrained layout, with the tokenizer).
        layers: decoder layers the student keeps: the first N, or a list of indices.
        top_k: teacher tokens per position in the soft targets.
        epochs: passes over `samples`.
        batch_size: sequences per optimiser step.
        learning_rate: peak AdamW learning rate.
        soft_weight: weight of the soft-target loss (the next-token loss gets the rest).
        max_length: truncate prompt + response to this many tokens.
        precision: Lightning precision of the student's training; "auto": bf16-mixed where the device runs
            bfloat16 natively, else 32-true (`hardware.choose_precision`). The teacher runs in the matching dtype.
        use_chat_template: render prompts with the tokenizer's chat template when it has one.
        prompt_template: plain template with a `{prompt}` field, used without a chat template.
        seed: seed for data order.
        log_dir: write a CSV log of the losses to `log_dir/logs/metrics.csv` (None: no log).
        force: redo even if `out` exists.
    """
    if done("distill", out, force):
        return Path(out)
    check_model_path(teacher, "teacher")
    records = read_jsonl(samples, required=["prompt", "response"])
    pl.seed_everything(seed, verbose=False)
    tokenizer = load_tokenizer(teacher)
    renderer = Renderer(tokenizer, use_chat_template, prompt_template, name=teacher.path)
    examples = _examples(renderer, records, samples, max_length)
    chosen = choose_precision()  # the device the student trains on (Lightning's "auto"); the teacher runs there too
    if precision == "auto":
        precision = chosen.trainer_precision
    teacher_dtype = "bfloat16" if precision.startswith("bf16") else "float32"
    frozen_teacher = load_model(replace(teacher, dtype=teacher_dtype), trainable=False, device=chosen.device)
    teacher_topk(frozen_teacher, examples, top_k, tokenizer.pad_token_id)
    del frozen_teacher
    student = truncate(load_model(replace(teacher, dtype="float32"), trainable=True), layers)
    size = sum(p.numel() for p in student.parameters())
    say(
        "distill",
        f"student: layers {layers} of {teacher.path}, {size / 1e6:.1f}M parameters; "
        f"{len(examples)} samples x {epochs} epochs; precision {precision}",
    )
    module = DistillModule(student, learning_rate=learning_rate, soft_weight=soft_weight)
    loader = torch.utils.data.DataLoader(
        examples,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=lambda b: _collate(b, tokenizer.pad_token_id),
        generator=torch.Generator().manual_seed(seed),
    )
    logger = False
    if log_dir is not None:
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(log_dir, name="logs", version="")  # -> log_dir/logs/metrics.csv
    trainer = pl.Trainer(
        max_epochs=epochs,
        precision=precision,
        logger=logger,
        enable_checkpointing=False,
        gradient_clip_val=1.0,
        log_every_n_steps=1,
        enable_model_summary=False,
        accelerator="auto",
        devices=1,
    )
    trainer.fit(module, train_dataloaders=loader)
    with atomic_path(out) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)  # float32: bf16-mixed keeps float32 weights
        tokenizer.save_pretrained(tmp)
    say("distill", f"wrote {out}")
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    return run_function(distill, argv, "wspo distill")
