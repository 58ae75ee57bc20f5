"""`wspo plan --config X [--json]`: device memory per rank of a fit config, on paper. Every model is built from its
config.json on the meta device (no weights load) and placed as the config's strategy places it while training.

Per rank, in bytes. P: the policy's weights, Q: its trainable ones (LoRA: the adapters, float32), d: their dtype's
bytes; W: the shards (world size under FSDP2 and FSDP1 FULL_SHARD, devices per node under HYBRID_SHARD, else 1);
e: the compute dtype's bytes (2 under bf16/16 precisions, else 4), s: the hidden states' (e where FSDP gathers the
weights in e or the precision is *-true, else the policy's dtype); R rows of T = data.max_length tokens per micro-batch
(batch_size, x2 for objectives that train on pairs); V, h, q, kv, i: vocabulary, hidden, query, key-value and MLP
widths; n decoder layers.

    parameters   P d / W
    gradients    Q d / W                  (DDP without gradient_as_bucket_view: x2, its buckets)
    optimizer    Q d states / W           (AdamW: 2 states; bitsandbytes 8-bit optimizers: 2 bytes per weight)
    frozen       each frozen role that loads (not read from cache_dir): whole (replicate), / W (FSDP2 shard), 0
                 (offload: host memory); bitsandbytes 4-bit linears at 0.516 bytes per weight (NF4, double-quantized
                 absmax), 8-bit at 1 plus a float32 scale per row; a QLoRA base's other weights float32 (peft)
    activations  R T n L (with gradient checkpointing R T n s h, plus one layer's R T L recomputed), plus the logits:
                 saved in float32 (4 R T V), then at the start of backward their gradient (e R T V + 7 T V), or the
                 frozen forwards that run before it (their logits, e R T V + 8 T V), whichever is larger
    working      FSDP: the root unit (embeddings, lm_head, final norm) and two decoder layers gathered in e, and the
                 larger of the unsharded gradients in backward (the lm_head's and a layer's) and a sharded frozen role's
                 largest unit, gathered for its forward; bf16-mixed over float32 weights without FSDP: autocast's e
                 copies of the weights, saved for backward
    L = 2 (4 h + s h) + Y + e (2 q + 2 kv) + 4 heads + 4 e i
        Y: the normed inputs the linears save: 2 s h, or e h per projection under autocast. A padding mask (R > 1)
        repeats k and v to q heads and is saved per layer (+ e (2 q - 2 kv + T)); eager attention repeats them too
        and keeps the float32 softmax (and its 16-bit copy): + heads T (4 + e); a GPT-2 MLP saves 5 e i, not 4.

L is what autograd saves in a Llama/Qwen2 decoder layer (RMSNorm, RoPE, sdpa, gated MLP), tensor by tensor (checked in
tests/test_plan.py); other architectures get the same formula. Under accumulate_grad_batches 1 gradients and
activations peak apart, so the total is an upper bound. benchmarks/plan_accuracy.py measures it against CPU runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wspo_lightning.errors import InputError
from wspo_lightning.lightning_cli import PrecomputeCLI, run_cli
from wspo_lightning.models import ModelSpec, local_folder

SHIPPED = Path(__file__).resolve().parents[2] / "configs" / "recipes" / "models"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # packed weight, 8-bit absmax per 64, float32 absmax per 256 blocks
KEYS = ("parameters", "gradients", "optimizer", "frozen", "activations", "working")
GIB = 2**30


@dataclass
class Arch:
    """What memory depends on in one model, counted on its meta-device build."""

    params: int  # unique (a tied lm_head once)
    root: int  # outside the decoder layers: embeddings, untied lm_head, final norm
    layer: int  # the largest decoder layer
    linear: dict[str, tuple[int, int, int]]  # name -> (weights, in, out) of the linears bitsandbytes quantizes
    layers: int
    hidden: int
    q: int
    kv: int
    heads: int
    inter: int
    vocab: int
    gated: bool
    python_gelu: bool

    def bytes(self, dtype: str, quantization: str = "none", other: str | None = None) -> float:
        """Weights as stored: float, or bitsandbytes linears with the rest in `other` (default: `dtype`)."""
        if quantization == "none":
            return self.params * DTYPE_BYTES[dtype]
        quantized = sum(n for n, _, _ in self.linear.values())
        if quantization == "4bit":
            packed = quantized * NF4_BYTES
        else:  # int8 weights and a float32 scale per output row
            packed = quantized + 4 * sum(out for _, _, out in self.linear.values())
        return packed + (self.params - quantized) * DTYPE_BYTES[other or dtype]

    def lora(self, r: int, targets: list[str] | str) -> int:
        """peft's adapter weights: r (in + out) per targeted linear (all-linear: every one but the lm_head)."""
        chosen = [
            (i, o)
            for name, (_, i, o) in self.linear.items()
            if targets == "all-linear" or any(name == t or name.endswith("." + t) for t in targets)
        ]
        return sum(r * (i + o) for i, o in chosen)


def model_arch(spec: ModelSpec, role: str, config_dirs: list[Path]) -> tuple[Arch, str]:
    """The Arch of `spec`'s model, built on the meta device, and the folder its config.json came from."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from wspo_lightning.strategies import decoder_layers

    source = find_config(spec, role, config_dirs)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=spec.trust_remote_code, gguf_file=spec.gguf_file)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        problem = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"model.init_args.{role}.path: no causal LM from {source}'s config ({problem})") from None
    text, head = config.get_text_config(), model.get_output_embeddings()
    linear = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and module is not head:  # Conv1D: GPT-2's [in, out] linears
            i, o = (module.in_features, module.out_features) if isinstance(module, nn.Linear) else module.weight.shape
            linear[name] = (module.weight.numel(), i, o)
    layers = decoder_layers(model)
    sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers] or [0]
    hidden, heads = text.hidden_size, text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    params = sum(p.numel() for p in model.parameters())
    arch = Arch(
        params=params, root=params - sum(sizes), layer=max(sizes), linear=linear,
        layers=len(layers) or text.num_hidden_layers, hidden=hidden, heads=heads, q=heads * head_dim,
        kv=(getattr(text, "num_key_value_heads", None) or heads) * head_dim, vocab=text.vocab_size,
        inter=getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden,
        gated=any(name.endswith("gate_proj") for name in linear),
        python_gelu=getattr(text, "activation_function", None) == "gelu_new",
    )  # fmt: skip
    here = source.resolve().is_relative_to(Path.cwd())
    return arch, str(source.resolve().relative_to(Path.cwd()) if here else source)


def find_config(spec: ModelSpec, role: str, config_dirs: list[Path]) -> Path:
    """A local folder's config.json, else the copy shipped with the recipes (`ORG--NAME/config.json`), else the
    Hugging Face cache's; else one line saying what to do."""
    folder, key, wanted = local_folder(spec.path), f"model.init_args.{role}.path", spec.gguf_file or "config.json"
    if folder is not None:
        if (folder / wanted).is_file():
            return folder
        problem = "does not exist" if not folder.is_dir() else f"holds no {wanted}"
        raise InputError(f"{key}: {spec.path} {problem}; point it at a model folder (wspo plan reads its config.json)")
    for base in config_dirs:
        if (base / spec.path.replace("/", "--") / "config.json").is_file():
            return base / spec.path.replace("/", "--")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec.path, "config.json", revision=spec.revision)
    if isinstance(cached, str):
        return Path(cached).parent
    raise InputError(
        f"{key}: {spec.path} is not a local folder, not shipped in configs/recipes/models/ and not in the Hugging "
        f"Face cache; fetch its config.json (a few KB) where the Hub is reachable: `hf download {spec.path} "
        "config.json --local-dir DIR`, then set the path to DIR"
    )


@dataclass
class Placement:
    """How the config's strategy and precision place the policy and the frozen roles on each rank."""

    name: str
    world: int
    shards: int  # the policy's weights, gradients and optimizer state are split this many ways
    fsdp: bool
    frozen: str  # FSDP2's frozen_roles: replicate | shard | offload
    e: int  # compute dtype bytes
    true_dtype: str | None  # *-true precisions convert the policy to this dtype
    buckets: bool  # DDP keeps a second copy of the gradients in its buckets
    offload_policy: bool  # FSDP1 cpu_offload: the policy's shards live in host memory


def placement(trainer: Any, notes: list[str]) -> Placement:
    devices, nodes = trainer.devices, int(trainer.num_nodes or 1)
    if isinstance(devices, (list, tuple)):
        devices = len(devices)
    elif str(devices).isdigit() and int(devices) > 0:
        devices = int(devices)
    else:
        notes.append(f"trainer.devices: {devices} is counted when the run starts; planned for 1 (--trainer.devices N)")
        devices = 1
    world, strategy = devices * nodes, trainer.strategy
    name = str(getattr(strategy, "class_path", strategy)).rsplit(".", 1)[-1].replace("Strategy", "")
    args = dict(getattr(strategy, "init_args", None) or {})
    fsdp, shards, frozen = name.lower() in ("fsdp", "fsdp2", "modelparallel"), 1, "replicate"
    if name in ("FSDP2", "ModelParallel"):
        frozen = args.get("frozen_roles", "replicate")
        shards = world if args.get("data_parallel_size", "auto") == "auto" else int(args["data_parallel_size"])
    elif fsdp:
        sharding = str(args.get("sharding_strategy", "FULL_SHARD")).rsplit(".", 1)[-1]
        shards = {"NO_SHARD": 1, "HYBRID_SHARD": devices, "_HYBRID_SHARD_ZERO2": devices}.get(sharding, world)
        if sharding == "SHARD_GRAD_OP":
            notes.append("SHARD_GRAD_OP keeps the gathered weights from forward to backward: not in `working` here")
    precision = str(trainer.precision)
    return Placement(
        name=f"{name} over {shards} shards" if fsdp else name, world=world, shards=shards, fsdp=fsdp, frozen=frozen,
        e=4 if precision.startswith(("32", "64")) else 2,
        true_dtype={"bf16-true": "bfloat16", "16-true": "float16"}.get(precision),
        buckets=world > 1 and not fsdp and not args.get("gradient_as_bucket_view", False),
        offload_policy=bool(fsdp and args.get("cpu_offload")),
    )  # fmt: skip


def optimizer_bytes(config: Any, weight_bytes: int) -> tuple[float, str]:
    """Bytes of optimizer state per trainable weight, and the optimizer's name (no config: AdamW)."""
    if not config:
        return 2 * weight_bytes, "AdamW"
    cls, args = str(config.class_path), dict(config.get("init_args") or {})
    name = cls.rsplit(".", 1)[-1]
    if "8bit" in name:
        return 2 + 2 * 4 / 256, name  # two int8 states and their blockwise float32 scales
    states = {"SGD": 1 if args.get("momentum") else 0, "Lion": 1, "RMSprop": 1, "Adagrad": 1, "Adafactor": 0}
    count = states.get(name.removeprefix("Paged").removesuffix("32bit"), 3 if args.get("amsgrad") else 2)
    return count * (4 if "bitsandbytes" in cls else weight_bytes), name  # torch's states take the weight's dtype


def layer_bytes(arch: Arch, e: int, s: int, T: int, eager: bool, mask: bool) -> float:
    """Bytes autograd saves per token in one decoder layer: the docstring's L."""
    h, q, kv = arch.hidden, arch.q, arch.kv
    readers = 3 + (2 if arch.gated else 1)  # q, k and v read the first norm's output; the MLP's linears the second's
    normed = 2 * s * h if e == s else e * h * readers
    attention = e * (2 * q + (2 * q if mask or eager else 2 * kv)) + 4 * arch.heads
    if eager:
        attention += arch.heads * T * (4 + (e if e != 4 else 0))
    elif mask:
        attention += e * T
    mlp = e * arch.inter * (4 if arch.gated else 5 if arch.python_gelu else 2)
    return 2 * (4 * h + s * h) + normed + attention + mlp


def activations(policy: Arch, spec: ModelSpec, rows: int, T: int, e: int, s: int, frozen_vocab: list[int]) -> dict:
    """Peak bytes of the policy's step, with and without gradient checkpointing."""
    eager = spec.attn_implementation == "eager"
    L, V = layer_bytes(policy, e, s, T, eager, mask=rows > 1) * rows * T, policy.vocab
    logits = 4 * rows * T * V + max(
        [e * rows * T * v + 8 * T * v for v in frozen_vocab] + [e * rows * T * V + 7 * T * V]
    )
    final_norm = rows * T * (4 + 2 * s) * policy.hidden
    inputs = policy.layers * rows * T * s * policy.hidden + final_norm
    recompute = L + e * rows * T * policy.hidden  # one layer's activations again, and the gradient they pass on
    return {"without": policy.layers * L + final_norm + logits, "with": inputs + max(logits, recompute)}


def plan(argv: list[str]) -> dict:
    """The memory plan of the fit config `argv` names (`--config FILE ...`, overrides as `wspo fit` takes them)."""
    description = __doc__.split("\n\n")[0]
    cli = run_cli(argv, run=False, exit_on_error=False, cli_class=PlanCLI, prog="wspo plan", description=description)
    config, notes = cli.config, []
    module = _objective(config.model)
    where = placement(config.trainer, notes)
    data = config.data.get("init_args", config.data)
    rows, T = data.batch_size * (2 if module.trains_on_pairs else 1), data.max_length
    config_dirs = [Path(str(p)).resolve().parent / "models" for p in config.get("config") or []] + [SHIPPED]
    cached = _cached_roles(module)
    specs = {role: spec for role, spec in module.all_specs().items() if role not in cached}
    archs, sources = {}, {}
    for role, spec in specs.items():
        try:
            archs[role], sources[role] = model_arch(spec, role, config_dirs)
        except InputError:
            if role != "weak_aligned" or Path(spec.path).expanduser().exists() or local_folder(spec.path) is None:
                raise
            archs[role], sources[role] = archs["weak_base"], sources["weak_base"]  # the same model after alignment
            notes.append(f"weak_aligned {spec.path} does not exist yet: planned as weak_base's architecture")
    if cached:
        notes.append(f"{', '.join(sorted(cached))}: read from cache_dir {module.cache_dir}, not loaded")
    policy, pspec = archs["policy"], specs["policy"]
    if module.reference_spec is None and pspec.lora is None and "reference" not in cached:
        specs["reference"] = pspec  # a frozen copy of the policy as loaded, in its dtype
        archs["reference"], sources["reference"] = policy, "a copy of the policy"
    d = DTYPE_BYTES[where.true_dtype or pspec.dtype]  # the policy's float weights
    out, trainable, optimizer = _policy_bytes(policy, pspec, where, d, config.model.init_args.get("optimizer"))
    frozen = {role: spec for role, spec in specs.items() if role != "policy"}
    out["frozen"], largest_unit, lines = _frozen_bytes(frozen, archs, sources, where, out)
    s = where.e if (where.fsdp or where.true_dtype) else 4 if pspec.quantization != "none" else d
    acts = activations(policy, pspec, rows, T, where.e, s, [archs[role].vocab for role in frozen])
    out["activations"] = acts["with" if pspec.gradient_checkpointing else "without"]
    out["working"] = _working(policy, pspec, where, trainable, d, largest_unit)
    out["total"] = sum(out[k] for k in KEYS)
    out = {key: round(out[key]) for key in (*KEYS, "total", "host")}  # bytes
    return {
        "per_rank_bytes": out,
        "activations_with_checkpointing": round(acts["with"]),
        "activations_without_checkpointing": round(acts["without"]),
        "strategy": where.name, "world_size": where.world, "rows": rows, "tokens_per_row": T, "optimizer": optimizer,
        "policy": f"{_described(pspec, policy, sources['policy'])}; trains {trainable / 1e6:,.1f}M weights",
        "frozen_roles": lines, "notes": notes,
    }  # fmt: skip


def _policy_bytes(policy: Arch, spec: ModelSpec, where: Placement, d: int, optimizer: Any) -> tuple[dict, int, str]:
    """The policy's weights, gradients and optimizer state per rank; the weights it trains; the optimizer's name."""
    if spec.lora is not None:
        trainable, t_bytes = policy.lora(spec.lora.r, spec.lora.target_modules), 4  # peft keeps adapters in float32
        other = "float32" if spec.quantization != "none" else None  # peft's prepare_model_for_kbit_training
        weights = policy.bytes(where.true_dtype or spec.dtype, spec.quantization, other) + 4 * trainable
    else:
        trainable, t_bytes, weights = policy.params, d, policy.params * d
    per_weight, name = optimizer_bytes(optimizer, t_bytes)
    out = {
        "parameters": weights / where.shards,
        "gradients": trainable * t_bytes / where.shards * (2 if where.buckets else 1),
        "optimizer": trainable * per_weight / where.shards,
        "host": 0.0,
    }
    if where.offload_policy:
        out["host"] = out["parameters"] + out["gradients"] + out["optimizer"]
        out.update(parameters=0.0, gradients=0.0, optimizer=0.0)
    return out, trainable, name


def _frozen_bytes(specs: dict, archs: dict, sources: dict, where: Placement, out: dict) -> tuple[float, float, list]:
    """Per rank: the frozen roles' weights, the largest unit a sharded one gathers, and a line per role."""
    total, largest_unit, lines = 0.0, 0.0, []
    for role, spec in specs.items():
        arch = archs[role]
        size = arch.bytes(spec.dtype, spec.quantization)
        split = where.frozen if where.frozen != "replicate" and spec.quantization == "none" else None
        if split:  # units: each decoder layer, the embeddings, an untied lm_head, gathered one at a time
            out["host"] += size / where.shards if split == "offload" else 0
            size = 0.0 if split == "offload" else size / where.shards
            largest_unit = max(largest_unit, max(arch.layer, arch.vocab * arch.hidden) * DTYPE_BYTES[spec.dtype])
        total += size
        lines.append(f"{role}: {_described(spec, arch, sources[role])}, {split or 'replicated'}: {size / GIB:.2f} GiB")
    return total, largest_unit, lines


def _working(policy: Arch, spec: ModelSpec, where: Placement, trainable: int, d: int, frozen_unit: float) -> float:
    """Weights gathered (FSDP) or cast (autocast) for compute; under FSDP, the unsharded gradients of backward or a
    frozen role's unit gathered for its forward (not at once)."""
    if where.fsdp:
        grads = (policy.vocab * policy.hidden + policy.layer) * where.e * trainable / policy.params
        return (policy.root + 2 * policy.layer) * where.e + max(grads, frozen_unit)
    if where.e < d and spec.quantization == "none":  # autocast's casts, saved for backward
        kept = policy.layer if spec.gradient_checkpointing else policy.params - policy.root
        return (kept + policy.vocab * policy.hidden) * where.e
    return 0.0


def _described(spec: ModelSpec, arch: Arch, source: str) -> str:
    kind = spec.dtype if spec.quantization == "none" else f"{spec.quantization}, {spec.dtype} compute"
    return f"{spec.path} ({arch.params / 1e9:.2f}B, {kind}; config: {source})"


def _objective(model_config: Any):
    """The objective, built as fit builds it (its constructor loads no weights)."""
    from jsonargparse import ArgumentParser

    from wspo_lightning.module import PreferenceModule

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(PreferenceModule, "model")
    return parser.instantiate(parser.parse_object({"model": model_config.as_dict()})).model


def _cached_roles(module) -> set[str]:
    """Roles whose values come from cache_dir (its manifest's; without one, what `wspo precompute` writes)."""
    if not module.cache_dir:
        return set()
    manifest = Path(module.cache_dir) / "manifest.json"
    values = json.loads(manifest.read_text())["values"] if manifest.is_file() else module.cacheable_values()
    return set(module.cache_roles(values))


class PlanCLI(PrecomputeCLI):
    """A fit config parsed as `wspo fit` parses it (files, overrides), with nothing instantiated."""

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--json", action="store_true", help="print the plan as JSON, in bytes")

    def instantiate_classes(self) -> None:  # no trainer (it would need the config's devices), no data, no seed
        pass

    _set_seed = before_instantiate_classes = instantiate_classes


def render(result: dict) -> str:
    """The plan as a table, in GiB."""
    out, ckpt = result["per_rank_bytes"], (result[f"activations_{w}_checkpointing"] / GIB for w in ("with", "without"))
    what = {
        "parameters": f"the policy, {result['strategy']}",
        "gradients": "of the trained weights",
        "optimizer": result["optimizer"],
        "frozen": f"{len(result['frozen_roles'])} frozen role(s) loaded",
        "activations": f"{result['rows']} row(s) x {result['tokens_per_row']} tokens; with gradient checkpointing "
        "{:.2f}, without {:.2f}".format(*ckpt),
        "working": "weights gathered or cast for compute",
        "total": "device memory per rank",
    }
    lines = [f"policy: {result['policy']}", *(f"  {line}" for line in result["frozen_roles"])]
    lines += ["", f"{'per rank':<12} {'GiB':>7}"]
    lines += [f"{key:<12} {out[key] / GIB:>7.2f}  {what[key]}" for key in (*KEYS, "total")]
    if out["host"]:
        lines.append(f"{'host':<12} {out['host'] / GIB:>7.2f}  offloaded to CPU memory (not in the total)")
    return "\n".join(lines + [f"note: {note}" for note in result["notes"]])


def main(argv: list[str]) -> int:
    """`wspo plan --config FIT.yaml [--config MORE.yaml] [--KEY VALUE ...] [--json]`."""
    result = plan(list(argv))
    print(json.dumps(result, indent=1) if "--json" in argv else render(result))
    return 0
