"""Padding-free packing (`data.packing: true`): packed forwards give each record's own log-probs, in the padded
path's layout, with its gradients; a fit gives the padded losses, also resumed mid-run; a weak pair of another
tokenizer gives the padded mapped deltas. (Under DDP, with the cache's lookup and in `wspo precompute`:
tests/test_strategies.py.)"""

from __future__ import annotations

import pytest
import torch
from helpers import by_step, fit, strategy_config, tiny_config

from wspo_lightning import logprobs
from wspo_lightning.crossvocab.batch import has_weak_rows
from wspo_lightning.lightning_cli import run_cli
from wspo_lightning.logprobs import first_fit, packed_response_logps, response_logps, right_pad, use_packing
from wspo_lightning.module.base import step_rows
from wspo_lightning.tiny import build_tiny_model, build_tokenizer, write_tiny_model

# (prompt, response) lengths of mixed sizes: the batch is 31 wide, and packs into 3 rows
LENGTHS = [(3, 5), (10, 21), (2, 1), (7, 9), (15, 3), (4, 4)]


def batch(tokenizer, lengths=LENGTHS, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, 250, (p,), generator=generator).tolist() for p, _ in lengths]
    responses = [torch.randint(5, 250, (r,), generator=generator).tolist() for _, r in lengths]
    return prompts, responses, right_pad(prompts, responses, tokenizer.pad_token_id)


def test_first_fit_packs_longest_first_into_rows_of_the_capacity():
    assert first_fit([8, 31, 3, 16, 18, 8], 31) == [[1], [4, 0, 2], [3, 5]]
    assert first_fit([5, 5, 5], 100) == [[0, 1, 2]]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_packed_log_probs_are_each_records_own_in_the_padded_layout(arch, one_torch_thread):
    """Independent reference: each record run alone (no padding, no neighbours); and the padded batch."""
    tokenizer = build_tokenizer()
    model = build_tiny_model(arch, tokenizer, seed=0)
    prompts, responses, rows = batch(tokenizer)
    width = rows[0].shape[1]
    assert len(first_fit(rows[1].sum(dim=1).tolist(), width)) == 3  # 6 records in 3 rows: packing happens
    packed, mask = packed_response_logps(model, *rows)
    padded, padded_mask = response_logps(model, *rows)
    assert packed.shape == padded.shape and torch.equal(mask, padded_mask)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    assert torch.all(packed[~mask] == 0)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        alone, _ = response_logps(model, *right_pad([prompt], [response], tokenizer.pad_token_id))
        torch.testing.assert_close(packed[i][mask[i]], alone[0, -len(response) :], rtol=1e-5, atol=1e-5)


def test_packed_gradients_equal_the_padded_ones(one_torch_thread):
    tokenizer = build_tokenizer()
    model = build_tiny_model("llama", tokenizer, seed=0)
    rows = batch(tokenizer)[2]
    grads = []
    for forward in (response_logps, packed_response_logps):
        model.zero_grad()
        logps, mask = forward(model, *rows)
        (logps * mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_packed_row_keeps_records_apart():
    """Run as one record (no position restart, attention across), the same tokens give other log-probs."""
    tokenizer = build_tokenizer()
    model = build_tiny_model("llama", tokenizer, seed=0)
    prompts, responses, rows = batch(tokenizer, [(10, 8), (3, 5), (2, 3)])
    assert first_fit([18, 8, 5], 18) == [[0], [1, 2]]  # records 1 and 2 share the second row
    packed, mask = packed_response_logps(model, *rows)
    alone = response_logps(model, *right_pad([prompts[2]], [responses[2]], tokenizer.pad_token_id))[0]
    joined = right_pad([prompts[1] + responses[1] + prompts[2]], [responses[2]], tokenizer.pad_token_id)
    together = response_logps(model, *joined)[0]
    torch.testing.assert_close(packed[2][mask[2]], alone[0, -3:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(packed[2][mask[2]], together[0, -3:], atol=1e-3)


def test_a_packed_fit_gives_the_padded_losses_and_resumes_with_them(world16, tmp_path, monkeypatch):
    """WSPO, 8 steps on responses of mixed lengths: padded; packed (several records share rows); packed resumed
    from the packed run's checkpoint at step 4."""
    packed_rows = []

    def spy(lengths, capacity):
        rows = first_fit(lengths, capacity)
        packed_rows.append((len(lengths), len(rows)))
        return rows

    monkeypatch.setattr(logprobs, "first_fit", spy)
    steps = ["--trainer.max_steps=8", "--trainer.limit_val_batches=0", "--data.batch_size=4"]
    padded = by_step(fit(strategy_config(world16, tmp_path / "padded"), *steps))
    assert packed_rows == []
    packed = by_step(fit(strategy_config(world16, tmp_path / "packed", 4), *steps, "--data.packing=true"))
    # every forward packed: policy, reference and weak pair, 4 each step; records shared rows
    assert len(packed_rows) == 8 * 4 and sum(r for _, r in packed_rows) < sum(n for n, _ in packed_rows)
    assert len(padded) == 8
    torch.testing.assert_close(
        torch.tensor(list(packed.values())), torch.tensor(list(padded.values())), rtol=1e-4, atol=1e-7
    )

    checkpoint = tmp_path / "packed" / "ckpt" / "step=4.ckpt"  # written on the way
    config = strategy_config(world16, tmp_path / "resumed")
    tail = by_step(fit(config, *steps, "--data.packing=true", f"--ckpt_path={checkpoint}"))
    assert sorted(tail) == [4, 5, 6, 7]
    torch.testing.assert_close(
        torch.tensor([tail[s] for s in range(4, 8)]), torch.tensor([packed[s] for s in range(4, 8)])
    )


def test_a_weak_pair_of_another_tokenizer_gives_the_padded_mapped_deltas_packed(world16, tmp_path, monkeypatch):
    """Cross-tokenizer WSPO: the weak pair runs on its own rows; packed, the deltas mapped onto the policy's
    tokens are the padded ones."""
    world = tmp_path / "cross"
    world.mkdir()
    for name in ("policy", "train.jsonl", "val.jsonl"):
        (world / name).symlink_to(world16 / name)
    weak_tokenizer = build_tokenizer(shape="llama3", vocab_size=400)
    for seed, role in ((1, "weak_base"), (2, "weak_aligned")):
        write_tiny_model(world / role, "gpt2", seed=seed, num_layers=1, hidden_size=64, tokenizer=weak_tokenizer)
    cli = run_cli(["--config", str(tiny_config(world, tmp_path / "run")), "--data.batch_size=8"], run=False)
    cli.datamodule.setup("fit")
    cli.model.check_tokenizers(cli.datamodule)
    cli.model.frozen.load(cli.model.frozen_specs())
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert has_weak_rows(batch)
    sides, rows = step_rows(batch, pairs=True)
    padded = cli.model.frozen.step_delta_weak(batch, sides, rows)
    for role in cli.model.frozen:
        use_packing(cli.model.frozen[role])
    packed_rows = []
    monkeypatch.setattr(logprobs, "first_fit", lambda *a: packed_rows.append(first_fit(*a)) or packed_rows[-1])
    packed = cli.model.frozen.step_delta_weak(batch, sides, rows)
    assert len(packed_rows) == 2 and sum(map(len, packed_rows)) < 2 * 16  # weak_base, weak_aligned: records shared rows
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
