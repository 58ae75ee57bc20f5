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
