"""Tiny random models, a locally trained tokenizer and a toy preference dataset.

Everything here is built offline in seconds, so tests, CI and a first `wspo fit` need no hub.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from wspo_lightning.pipeline.stage import write_jsonl  # re-exported: tests write toy data with it

# ChatML, the template family of Qwen2 and SmolLM2, so the tiny world exercises the same path.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<pad>", "<|im_start|>", "<|im_end|>"]

_SUBJECTS = ["The film", "This movie", "The acting", "The plot", "The soundtrack", "The ending", "The director"]
_GOOD = ["was wonderful", "felt warm and funny", "is a delight", "left me smiling", "was brilliant"]
_BAD = ["was dull", "felt cold and slow", "is a mess", "left me bored", "was awful"]
_TAILS = ["from start to finish.", "and I would say so again.", "in every scene.", "for most of the night."]


def _sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        f"{rng.choice(_SUBJECTS)} {rng.choice(_GOOD + _BAD)} {rng.choice(_TAILS)}" for _ in range(n)
    ]


def build_tokenizer(vocab_size: int = 300, chat_template: bool = True) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on a small built-in corpus (deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_sentences(400, seed=0) + ["user assistant system\n"], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<pad>",
        model_max_length=2048,
    )
    if chat_template:
        fast.chat_template = CHATML_TEMPLATE
        fast.eos_token = "<|im_end|>"  # chat models end a turn with <|im_end|>, as SmolLM2 does
    return fast


def build_tiny_model(
    arch: str,
    tokenizer: PreTrainedTokenizerFast,
    seed: int = 0,
    num_layers: int = 2,
    hidden_size: int = 32,
) -> PreTrainedModel:
    """A randomly initialised causal LM of `arch` (llama, qwen2 or gpt2) over `tokenizer`'s vocabulary."""
    common = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    if arch == "llama":
        config = LlamaConfig(
            hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **common,
        )
    elif arch == "qwen2":
        config = Qwen2Config(
            hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **common,
        )
    elif arch == "gpt2":
        config = GPT2Config(
            n_embd=hidden_size, n_layer=num_layers, n_head=4, n_positions=512,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}: expected llama, qwen2 or gpt2")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def write_tiny_model(out_dir: str | Path, arch: str = "llama", seed: int = 0, num_layers: int = 2,
                     hidden_size: int = 32, tokenizer: PreTrainedTokenizerFast | None = None) -> Path:
    """Write a tiny random model and its tokenizer to `out_dir` (loadable by `from_pretrained`)."""
    out = Path(out_dir)
    tokenizer = tokenizer or build_tokenizer()
    model = build_tiny_model(arch, tokenizer, seed=seed, num_layers=num_layers, hidden_size=hidden_size)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def preference_records(n: int, seed: int = 0) -> list[dict]:
    """Toy movie-review preferences: the chosen response is the positive one."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        subject = rng.choice(_SUBJECTS)
        records.append({
            "id": f"toy-{seed}-{i}",
            "prompt": f"Write one line about {subject.lower()}.",
            "chosen": f"{subject} {rng.choice(_GOOD)} {rng.choice(_TAILS)}",
            "rejected": f"{subject} {rng.choice(_BAD)} {rng.choice(_TAILS)}",
        })
    return records




def write_tiny_world(out_dir: str | Path, arch: str = "llama", n_train: int = 64, n_val: int = 16) -> Path:
    """Write everything `configs/tiny_cpu.yaml` reads: a policy, a weak pair and toy data.

    Layout: policy/, weak_base/, weak_aligned/, train.jsonl, val.jsonl. The weak pair is
    one architecture at two seeds, so its log-ratio is a fixed random signal to track.
    """
    out = Path(out_dir)
    tokenizer = build_tokenizer()
    write_tiny_model(out / "policy", arch, seed=0, num_layers=2, hidden_size=64, tokenizer=tokenizer)
    # hidden 64: bitsandbytes' CPU 4-bit kernels need dimensions of at least one quantization block
    write_tiny_model(out / "weak_base", arch, seed=1, num_layers=1, hidden_size=64, tokenizer=tokenizer)
    write_tiny_model(out / "weak_aligned", arch, seed=2, num_layers=1, hidden_size=64, tokenizer=tokenizer)
    write_jsonl(out / "train.jsonl", preference_records(n_train, seed=0))
    write_jsonl(out / "val.jsonl", preference_records(n_val, seed=1))
    return out
