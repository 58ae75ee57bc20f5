"""Stage `extrapolate`: ExPO (arXiv 2404.16792), a trained model pushed past its reference, no training.

    theta = theta_R + (1 + alpha) (theta_M - theta_R)

for a trained model M and its reference R (alpha = 0 returns M; alpha = -1 returns R, up to float32 rounding).
Full weights are streamed tensor by tensor from the safetensors files (one tensor of each model and one output
shard in memory), computed in float32 as theta_M + alpha (theta_M - theta_R), so alpha = 0 gives M back bit for
bit. A LoRA-trained M (a peft adapter folder) gives an adapter whose update B @ A * scaling is scaled by
1 + alpha: lora_B is scaled, lora_A and the adapter config are kept.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from wspo_lightning.commands import run_function
from wspo_lightning.errors import InputError
from wspo_lightning.io import atomic_path, parse_json, read_text
from wspo_lightning.models import DTYPES, ModelSpec, hub_unreachable, local_folder
from wspo_lightning.pipeline.stage import RUNS, done, say

log = logging.getLogger(__name__)

PROVENANCE = "extrapolation.json"
INDEX = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# files of M that describe the model rather than its training: copied next to the new weights
COPIED = {
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
}
COPIED_SUFFIXES = (".jinja", ".model", ".tiktoken", ".py")  # chat templates, sentencepiece, remote code
_LORA = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|base_layer)\b"
)


def _check_spec(spec: ModelSpec, role: str) -> None:
    """The weights are read as the files store them: loading options that would change them are refused."""
    if spec.quantization != "none":
        raise InputError(f"{role}.quantization: extrapolation reads the stored weights; set quantization: none")
    if spec.gguf_file:
        raise InputError(f"{role}.gguf_file: convert the GGUF file once (wspo convert) and give that folder")
    if spec.lora is not None:
        raise InputError(f"{role}.lora: a LoRA-trained model is given as its adapter folder (adapter_config.json)")
    if spec.dtype != "float32":
        raise InputError(
            f"{role}.dtype: extrapolation always computes in float32 and writes the model's stored dtype; "
            "set the output's with --dtype instead"
        )


def _folder(spec: ModelSpec, role: str) -> Path:
    """The local folder of `spec`: its path, or a Hub id's snapshot (weights as safetensors only)."""
    folder = local_folder(spec.path)
    if folder is not None:
        if not folder.is_dir():
            raise InputError(f"{role}.path: {spec.path} is not a folder; give a model or adapter folder")
        return folder
    from huggingface_hub import snapshot_download

    reason = hub_unreachable()
    patterns = ["*.json", "*.safetensors", "*.txt", *(f"*{suffix}" for suffix in COPIED_SUFFIXES)]
    try:
        offline = reason is not None
        return Path(
            snapshot_download(spec.path, revision=spec.revision, allow_patterns=patterns, local_files_only=offline)
        )
    except Exception as err:  # noqa: BLE001 - not cached, not on the Hub, no network: all the same to the user
        why = reason or " ".join(str(err).split())[:200]
        raise InputError(
            f"{role}.path: {spec.path} is not a local folder, nor a Hub id that can be read ({why})"
        ) from None


def _weight_files(folder: Path, role: str, adapter: bool) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index save_pretrained writes beside shards, or the one file."""
    if adapter:
        single = folder / ADAPTER_WEIGHTS
        if not single.is_file():
            raise InputError(f"{role}.path: {folder} has adapter_config.json but no {ADAPTER_WEIGHTS}")
    elif (folder / INDEX).is_file():
        weight_map = parse_json(read_text(folder / INDEX), folder / INDEX).get("weight_map", {})
        missing = sorted({file for file in weight_map.values() if not (folder / file).is_file()})
        if missing:
            raise InputError(f"{role}.path: {folder / INDEX} names {missing[0]}, which is not in the folder")
        return {name: folder / file for name, file in weight_map.items()}
    else:
        single = folder / "model.safetensors"
        if not single.is_file():
            raise InputError(
                f"{role}.path: {folder} holds no model.safetensors (nor {INDEX}); expected a save_pretrained "
                "folder with safetensors weights (wspo never unpickles *.bin)"
            )
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        return dict.fromkeys(f.keys(), single)


def _open(files: dict[str, Path], stack: ExitStack) -> dict[str, object]:
    """Tensor name -> an open safetensors handle (memory-mapped: nothing is read until a tensor is asked for)."""
    from safetensors import safe_open

    handles = {file: stack.enter_context(safe_open(file, "pt")) for file in dict.fromkeys(files.values())}
    return {name: handles[file] for name, file in files.items()}


def _shapes(handles: dict[str, object]) -> dict[str, list[int]]:
    return {name: list(handle.get_slice(name).get_shape()) for name, handle in handles.items()}


def first_mismatch(reference: dict[str, list[int]], model: dict[str, list[int]]) -> str | None:
    """The first tensor (in name order) missing from one side or shaped differently, in words; None if none."""
    for name in sorted(reference.keys() | model.keys()):
        if name not in model:
            return f"{name} is in the reference but not in the model"
        if name not in reference:
            return f"{name} is in the model but not in the reference"
        if reference[name] != model[name]:
            return f"{name} has shape {reference[name]} in the reference and {model[name]} in the model"
    return None


def parse_size(size: str | int) -> int:
    """Bytes of a size written as save_pretrained's max_shard_size is: 5GB, 500MB, 2GiB or a number of bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    if not found or found.group(2).upper() not in units or float(found.group(1)) <= 0:
        raise InputError(f"extrapolate: max_shard_size must be a size such as 5GB or 500MB, got {size!r}")
    return int(float(found.group(1)) * units[found.group(2).upper()])


class ShardWriter:
    """Tensors in, safetensors shards out: a shard is written as soon as the next tensor would overflow it, then
    named as save_pretrained names them (`model-00001-of-00003.safetensors` + index, or `single` alone)."""

    def __init__(self, folder: Path, max_bytes: int, single: str = "model.safetensors") -> None:
        self.folder, self.max_bytes, self.single = folder, max_bytes, single
        self.shard: dict[str, torch.Tensor] = {}
        self.size = self.total = 0
        self.files: list[list[str]] = []  # tensor names per written shard

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.shard and self.size + nbytes > self.max_bytes:
            self._flush()
        self.shard[name], self.size, self.total = tensor.contiguous(), self.size + nbytes, self.total + nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.shard, self.folder / f".shard-{len(self.files)}", metadata={"format": "pt"})
        self.files.append(list(self.shard))
        self.shard, self.size = {}, 0

    def finish(self) -> None:
        if self.shard or not self.files:
            self._flush()
        if len(self.files) == 1:
            (self.folder / ".shard-0").rename(self.folder / self.single)
            return
        weight_map = {}
        for i, names in enumerate(self.files):
            name = f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors"
            (self.folder / f".shard-{i}").rename(self.folder / name)
            weight_map.update(dict.fromkeys(names, name))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None, name: str, alpha: float) -> torch.Tensor:
    """`tensor` (float32) in the dtype written; a value that does not fit it (float16 overflow) is refused."""
    cast = tensor.to(dtype)
    if not torch.isfinite(cast).all():
        raise InputError(
            f"extrapolate: {name} is not finite in {str(dtype).removeprefix('torch.')} at alpha {alpha} "
            "(an overflow, or non-finite inputs); write float32 or bfloat16 (--dtype) or take a smaller alpha"
        )
    return cast


def _full(
    reference: dict[str, object], model: dict[str, object], alpha: float, dtype: torch.dtype | None, writer: ShardWriter
) -> None:
    """theta_M + alpha (theta_M - theta_R), tensor by tensor in the model's order; integer tensors are M's."""
    for name in tqdm(list(model), desc="extrapolate", unit="tensor", dynamic_ncols=True):
        m = model[name].get_tensor(name)
        if not m.is_floating_point():
            writer.add(name, m)
            continue
        m32 = m.float()
        r32 = reference[name].get_tensor(name).float()
        writer.add(name, _cast(m32 + alpha * (m32 - r32), dtype or m.dtype, name, alpha))
        del m, m32, r32


def _adapter(adapter: dict[str, object], alpha: float, dtype: torch.dtype | None, writer: ShardWriter) -> None:
    """lora_B (and lora_embedding_B) times 1 + alpha; lora_A as it is. The update B @ A * scaling of every adapted
    module scales with it, whatever r, lora_alpha, rslora or a rank pattern make its scaling."""
    for name in tqdm(list(adapter), desc="extrapolate", unit="tensor", dynamic_ncols=True):
        tensor = adapter[name].get_tensor(name)
        if _LORA.match(name).group("part").endswith("B"):
            writer.add(name, _cast(tensor.float() * (1 + alpha), dtype or tensor.dtype, name, alpha))
        else:
            writer.add(name, tensor.to(dtype) if dtype is not None else tensor)


def _check_adapter(folder: Path, adapter: dict[str, object], reference: dict[str, object]) -> str | None:
    """Refuse what scaling lora_B would get wrong; check that each adapted weight is in R with the size B @ A has,
    and that a base layer the adapter carries (peft saves adapted embeddings') is R's. Returns the base it names."""
    names, shapes = _shapes(adapter), _shapes(reference)
    config = parse_json(read_text(folder / "adapter_config.json"), folder / "adapter_config.json")
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        kind = "DoRA" if config.get("use_dora") else config.get("peft_type")
        raise InputError(
            f"model.path: {folder} is a {kind} adapter; only plain LoRA extrapolates by scaling lora_B. Merge it "
            "into the weights (merge_and_unload, or HFExport merge_lora: true) and extrapolate the full weights"
        )
    for name, shape in sorted(names.items()):
        found = _LORA.match(name)
        if found is None:
            raise InputError(
                f"model.path: {folder / ADAPTER_WEIGHTS} holds {name}, neither a LoRA matrix nor a base layer (a "
                "modules_to_save copy, a bias or trainable tokens): merge the adapter into the weights "
                "(HFExport merge_lora: true) and extrapolate the full weights"
            )
        part, base = found.group("part"), f"{found.group('module')}.weight"
        if base not in shapes:
            raise InputError(
                f"reference.path: the adapter adapts {base}, which the reference does not hold; give the adapter's "
                "base model as the reference"
            )
        if part == "base_layer" and not torch.equal(
            adapter[name].get_tensor(name).float(), reference[base].get_tensor(base).float()
        ):
            raise InputError(
                f"reference.path: the adapter carries its base's {base}, which differs from the reference's: the "
                "reference is not the adapter's base; give that base as the reference"
            )
        partner = name.replace(part, part[:-1] + "B")
        if not part.endswith("A") or partner not in names:
            continue
        update = names[partner][0] * math.prod(shape[1:])  # B @ A: [out, in, ...]
        if update != math.prod(shapes[base]):
            raise InputError(
                f"reference.path: {base} has shape {shapes[base]} in the reference, but the adapter's update of it "
                f"has {update} values; give the adapter's base model as the reference"
            )
    return config.get("base_model_name_or_path")


def _note_base(base: str | None, reference: ModelSpec, reference_folder: Path) -> None:
    """A warning when the adapter names a local base folder other than R (a copy of the base elsewhere is fine:
    the written adapter never reads R, whose shapes were checked)."""
    base_folder = local_folder(base) if base else None
    if base_folder is None:
        return
    if not base_folder.exists() or base_folder.resolve() != reference_folder.resolve():
        log.warning(
            "the adapter was trained on %s, not on the reference %s: the written adapter extrapolates from the "
            "base it is applied to (the reference's shapes fit it)",
            base,
            reference.path,
        )


def _check_out(out: Path, inputs: dict[str, Path]) -> None:
    for role, folder in inputs.items():
        if out.resolve() == folder.resolve() or out.resolve() in folder.resolve().parents:
            raise InputError(f"extrapolate: out {out} would replace the {role} ({folder}); choose another folder")
    if out.is_file():
        raise InputError(f"extrapolate: out {out} is a file; give a folder")


def _copy_files(source: Path, target: Path, dtype: torch.dtype | None) -> None:
    for path in sorted(source.iterdir()):
        if path.is_file() and (path.name in COPIED or path.suffix in COPIED_SUFFIXES):
            shutil.copy2(path, target / path.name)
    config = target / "config.json"
    if dtype is not None and config.is_file():  # name the dtype the weights are now in
        values = json.loads(config.read_text())
        name = str(dtype).removeprefix("torch.")
        values.update({"dtype": name}, **({"torch_dtype": name} if "torch_dtype" in values else {}))
        config.write_text(json.dumps(values, indent=2) + "\n")


def extrapolate(
    reference: ModelSpec,
    model: ModelSpec,
    alpha: float,
    out: str,
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
    max_shard_size: str = "5GB",
    force: bool = False,
) -> Path:
    """ExPO: write theta_R + (1 + alpha)(theta_M - theta_R) for a trained model M and its reference R.

    Args:
        reference: R, the model M was trained from (full weights; for a LoRA-trained M, the adapter's base).
        model: M, the trained model: a full-weight folder, or a peft LoRA adapter folder (then `out` is an adapter
            whose update is scaled by 1 + alpha; the adapter's base should be the reference: another local base
            folder gets a warning).
        alpha: how far past M, along M - R (e.g. 0.3; choose it on tuning prompts): 0 returns M, -1 returns R.
        out: output folder: weights (sharded like save_pretrained above max_shard_size), M's config and tokenizer
            files, and extrapolation.json (reference, model, alpha).
        dtype: dtype of the written weights (float32 | bfloat16 | float16); null: each tensor's dtype in M.
        max_shard_size: largest weight file written, e.g. 5GB: bounds the memory used (one shard at a time).
        force: replace an existing `out`; without it, an `out` from the same reference, model, alpha and dtype is
            kept (skipped) and any other non-empty `out` is refused.
    """
    if not math.isfinite(alpha):
        raise InputError(f"extrapolate: alpha must be a finite number, got {alpha}")
    max_bytes = parse_size(max_shard_size)
    for role, spec in (("reference", reference), ("model", model)):
        _check_spec(spec, role)
    reference_folder, model_folder = _folder(reference, "reference"), _folder(model, "model")
    target = Path(out)
    _check_out(target, {"reference": reference_folder, "model": model_folder})
    provenance = {"reference": reference.path, "model": model.path, "alpha": alpha, "dtype": dtype}
    if target.is_dir() and any(target.iterdir()) and not force:
        written = target / PROVENANCE
        if written.is_file() and {k: parse_json(read_text(written), written).get(k) for k in provenance} == provenance:
            done("extrapolate", target, force)  # the same extrapolation, already written: skip
            return target
        raise InputError(
            f"extrapolate: out {target} is not empty"
            + (f" (its {PROVENANCE} records another extrapolation)" if written.is_file() else "")
            + "; pass --force to replace it, or choose another folder"
        )
    if (reference_folder / "adapter_config.json").is_file():
        raise InputError(f"reference.path: {reference.path} is an adapter; give the full weights of its base model")
    is_adapter = (model_folder / "adapter_config.json").is_file()
    write_dtype = DTYPES[dtype] if dtype is not None else None
    with ExitStack() as stack:
        r_handles = _open(_weight_files(reference_folder, "reference", adapter=False), stack)
        m_handles = _open(_weight_files(model_folder, "model", adapter=is_adapter), stack)
        if is_adapter:
            base = _check_adapter(model_folder, m_handles, r_handles)
            _note_base(base, reference, reference_folder)
            provenance.update(kind="LoRA adapter, lora_B scaled by 1 + alpha", adapter_base=base)
        else:
            mismatch = first_mismatch(_shapes(r_handles), _shapes(m_handles))
            if mismatch is not None:
                raise InputError(
                    f"extrapolate: {reference.path} and {model.path} do not hold the same tensors: {mismatch}. "
                    "ExPO needs a model and the reference it was trained from"
                )
            provenance.update(kind="full weights")
        RUNS["ran"] += 1  # for a Timer of a chain of stages: this one did its work
        say("extrapolate", f"{model.path} + {alpha} x ({model.path} - {reference.path}) -> {out}")
        with atomic_path(target) as tmp:
            tmp.mkdir()
            if is_adapter:  # one file, as peft writes and reads adapters
                writer = ShardWriter(tmp, math.inf, ADAPTER_WEIGHTS)
                _adapter(m_handles, alpha, write_dtype, writer)
            else:
                writer = ShardWriter(tmp, max_bytes)
                _full(r_handles, m_handles, alpha, write_dtype, writer)
            writer.finish()
            _copy_files(model_folder, tmp, write_dtype)
            formula = "theta_R + (1 + alpha) * (theta_M - theta_R)"
            (tmp / PROVENANCE).write_text(json.dumps({"method": "ExPO", "formula": formula, **provenance}, indent=2))
    say("extrapolate", f"wrote {out}")
    return target


def main(argv: list[str] | None = None) -> int:
    return run_function(extrapolate, argv, "wspo extrapolate")
