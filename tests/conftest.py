"""Shared fixtures: offline, quiet, tiny."""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import transformers  # noqa: E402

transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A tiny Llama policy, weak pair and toy preference files (see wspo_lightning.tiny)."""
    from wspo_lightning.tiny import write_tiny_world

    return write_tiny_world(tmp_path_factory.mktemp("tiny_world"), arch="llama")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run several times faster on one thread (two threads thrash on a busy 2-core box)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def world16(tmp_path_factory):
    """A tiny world of 16 training and 8 validation records: one step of batch 16 is a whole epoch, so runs on
    several ranks (each dealt its share by a distributed sampler) see the same records per step as one process.
    Responses of mixed lengths (1, 1, 2 or 6 toy sentences), so packed rows (`data.packing`, as wide as a batch's
    longest record) hold several records."""
    from wspo_lightning.io import read_jsonl, write_jsonl
    from wspo_lightning.tiny import write_tiny_world

    world = write_tiny_world(tmp_path_factory.mktemp("world16"), n_train=16, n_val=8)
    for split in ("train", "val"):
        records = read_jsonl(world / f"{split}.jsonl")
        for i, r in enumerate(records):
            r["chosen"], r["rejected"] = (" ".join([r[side]] * (1, 1, 2, 6)[i % 4]) for side in ("chosen", "rejected"))
        write_jsonl(world / f"{split}.jsonl", records)
    return world


@pytest.fixture(scope="session")
def single16(world16, tmp_path_factory):
    """One process, batch 16, 4 steps on `world16`: the reference curve and final policy weights."""
    from helpers import STEPS, metrics, strategy_config

    from wspo_lightning.lightning_cli import run_cli

    out = tmp_path_factory.mktemp("single")
    cli = run_cli(["fit", "--config", str(strategy_config(world16, out)), *STEPS, "--data.batch_size=16"])
    return metrics(cli), {n: p.detach().clone() for n, p in cli.model.policy.state_dict().items()}
