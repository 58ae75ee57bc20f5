"""Tiny random models, a locally trained tokenizer and a toy preference dataset.

Everything here is built offline in seconds, so tests, CI and a first `wspo fit` need no hub.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from wspo_lightning.commands import run_function
from wspo_lightning.errors import InputError
from wspo_lightning.io import write_jsonl  # re-exported: tests write toy data with it

# ChatML, the template family of Qwen2 and SmolLM2, so the tiny world exercises the same path.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen2's own template: ChatML with a default system turn.
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama 3's: BOS in the template, turns end with <|eot_id|>, contents trimmed of whitespace.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<pad>", "<|im_start|>", "<|im_end|>"]

# Tokenizer shapes people train with: special tokens, eos / bos / pad, chat template, whether the
# tokenizer itself adds a BOS.
SHAPES = {
    # SmolLM2-like: ChatML, and eos is the end-of-turn <|im_end|>
    "chatml": dict(
        special=SPECIAL_TOKENS,
        eos="<|im_end|>",
        bos="<|endoftext|>",
        pad="<pad>",
        template=CHATML_TEMPLATE,
        add_bos=False,
    ),
    # Qwen2 base: ChatML turns end with <|im_end|>, but eos is <|endoftext|>
    "qwen2_base": dict(
        special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        eos="<|endoftext|>",
        bos=None,
        pad="<|endoftext|>",
        template=QWEN2_TEMPLATE,
        add_bos=False,
    ),
    # Llama 3: turns end with <|eot_id|>, eos is <|end_of_text|>, the tokenizer adds <|begin_of_text|>
    "llama3": dict(
        special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        eos="<|end_of_text|>",
        bos="<|begin_of_text|>",
        pad=None,
        template=LLAMA3_TEMPLATE,
        add_bos=True,
    ),
    # no chat template, a BOS added by the tokenizer (Llama 2 base style)
    "plain": dict(special=["<s>", "</s>", "<unk>"], eos="</s>", bos="<s>", pad=None, template=None, add_bos=True),
}

_SUBJECTS = ["The film", "This movie", "The acting", "The plot", "The soundtrack", "The ending", "The director"]
_GOOD = ["was wonderful", "felt warm and funny", "is a delight", "left me smiling", "was brilliant"]
_BAD = ["was dull", "felt cold and slow", "is a mess", "left me bored", "was awful"]
_TAILS = ["from start to finish.", "and I would say so again.", "in every scene.", "for most of the night."]


def _sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_GOOD + _BAD)} {rng.choice(_TAILS)}" for _ in range(n)]


def build_tokenizer(
    vocab_size: int = 300, chat_template: bool = True, shape: str = "chatml", model: str = "bpe"
) -> PreTrainedTokenizerFast:
    """Train a tokenizer of one of the `SHAPES` on a small built-in corpus (deterministic).

    `model`: "bpe", byte-level BPE (GPT-2 / Llama 3 style), or "unigram", SentencePiece style (a Unigram
    model over Metaspace "▁" pieces, characters it never saw become <unk>; for a weak pair of another family).
    `chat_template=False` (chatml shape only): no template and eos <|endoftext|>."""
    if shape not in SHAPES:
        raise ValueError(f"unknown tokenizer shape {shape!r}: expected one of {sorted(SHAPES)}")
    spec = SHAPES[shape]
    if model == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=spec["special"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif model == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        special = spec["special"] + ["<unk>"] * ("<unk>" not in spec["special"])
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size,
            special_tokens=special,
            unk_token="<unk>",
            initial_alphabet=[chr(c) for c in range(32, 127)] + ["\n"],  # printable ASCII is never <unk>
            show_progress=False,
        )
    else:
        raise ValueError(f"unknown tokenizer model {model!r}: expected bpe or unigram")
    tok.train_from_iterator(_sentences(400, seed=0) + ["user assistant system\n"], trainer=trainer)
    if spec["add_bos"]:
        bos = spec["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    names = {
        "eos_token": "<|endoftext|>" if shape == "chatml" else spec["eos"],
        "bos_token": spec["bos"],
        "pad_token": spec["pad"],
        "unk_token": "<unk>" if model == "unigram" else None,
    }
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=2048, **{k: v for k, v in names.items() if v is not None}
    )
    if spec["template"] and chat_template:
        fast.chat_template = spec["template"]
        fast.eos_token = spec["eos"]
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
    if arch in ("llama", "qwen2"):  # the same decoder shape; Qwen2 adds biases to q, k and v
        config = (LlamaConfig if arch == "llama" else Qwen2Config)(
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **common,
        )
    elif arch == "gpt2":
        config = GPT2Config(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=4,
            n_positions=512,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}: expected llama, qwen2 or gpt2")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def write_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    seed: int = 0,
    num_layers: int = 2,
    hidden_size: int = 32,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> Path:
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
        records.append(
            {
                "id": f"toy-{seed}-{i}",
                "prompt": f"Write one line about {subject.lower()}.",
                "chosen": f"{subject} {rng.choice(_GOOD)} {rng.choice(_TAILS)}",
                "rejected": f"{subject} {rng.choice(_BAD)} {rng.choice(_TAILS)}",
            }
        )
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


def tiny(out: str, arch: str = "llama", n_train: int = 64, n_val: int = 16) -> Path:
    """Write a tiny random policy, weak pair and toy preference data, for trying the CLI offline.

    Args:
        out: folder to write policy/, weak_base/, weak_aligned/, train.jsonl and val.jsonl to.
        arch: llama, qwen2 or gpt2.
        n_train: training records.
        n_val: validation records.
    """
    if arch not in ("llama", "qwen2", "gpt2"):
        raise InputError(f"tiny: arch must be llama, qwen2 or gpt2, got {arch!r}")
    path = write_tiny_world(out, arch=arch, n_train=n_train, n_val=n_val)
    print(f"wrote a tiny {arch} world to {path}")
    return path


def ultrafeedback_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows shaped as HuggingFaceH4/ultrafeedback_binarized's: a prompt string beside whole conversations."""
    rows = []
    for r in preference_records(n, seed):
        user = {"role": "user", "content": r["prompt"]}
        chosen = [user, {"role": "assistant", "content": r["chosen"]}]
        rejected = [user, {"role": "assistant", "content": r["rejected"]}]
        rows.append(
            {"prompt": r["prompt"], "prompt_id": r["id"], "chosen": chosen, "rejected": rejected, "messages": chosen}
            | {"score_chosen": 8.0, "score_rejected": 3.5}
        )
    return rows


def write_hub_layout(folder: Path, splits: dict[str, list[dict]], subset: str | None = None) -> Path:
    """A dataset folder as `hf download --repo-type dataset` leaves it: data/{split}-00000-of-00001.parquet
    (under data/{subset}/ with a README declaring the subsets when `subset` is given)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = folder / "data" / (subset or "")
    data.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        pq.write_table(pa.Table.from_pylist(rows), data / f"{split}-00000-of-00001.parquet")
    return folder


def main(argv: list[str] | None = None) -> int:
    """`wspo tiny --out DIR [--arch llama|qwen2|gpt2] [--n_train N] [--n_val N]`."""
    return run_function(tiny, argv, "wspo tiny")
