"""FSDP2 for the policy: Lightning's ModelParallelStrategy, plus `fully_shard` per decoder layer.

`FSDP2Strategy` is Lightning's `ModelParallelStrategy` with the data-parallel size defaulting to the
world size (pure FSDP2, any number of nodes); `PreferenceModule.configure_model` calls `shard_policy`
whenever the strategy sets a device mesh. A QLoRA policy (4-bit base, bitsandbytes) is sharded too: its packed
weights are stored in a float dtype (`bnb_4bit_quant_storage`). Frozen roles are replicated on every rank unless
`FSDP2Strategy(frozen_roles=...)` shards them (`shard_frozen`) or keeps their shards in CPU memory. YAML:
configs/strategies/.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from wspo_lightning.errors import InputError

log = logging.getLogger(__name__)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a transformers model, in order: the modules of the classes its `_no_split_modules`
    names (the units transformers never splits between devices), found inside wrappers such as peft's too; [] when
    it names none. FSDP2 shards each block as a unit; `wspo distill` keeps some of them."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def data_parallel_mesh(device_mesh):
    """The mesh's data-parallel dimension (the whole mesh when it names none); a tensor-parallel one is refused."""
    if "tensor_parallel" in (device_mesh.mesh_dim_names or ()) and device_mesh["tensor_parallel"].size() > 1:
        raise InputError(
            "the policy is sharded with FSDP2 only (no tensor-parallel plan): set the strategy's "
            "tensor_parallel_size: 1 and data_parallel_size to devices x num_nodes, "
            "or use wspo_lightning.strategies.FSDP2Strategy"
        )
    return device_mesh["data_parallel"] if "data_parallel" in (device_mesh.mesh_dim_names or ()) else device_mesh


def shard_policy(
    model: nn.Module, device_mesh, precision: str | None = None, reshard_after_forward: bool = True
) -> nn.Module:
    """`fully_shard` each decoder layer, then the whole model, over the mesh's data-parallel dimension.

    With `precision` "bf16-mixed" parameters are all-gathered and computed in bf16 and gradients
    reduced in float32 (FSDP2's MixedPrecisionPolicy); the sharded master weights stay in their dtype.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = data_parallel_mesh(device_mesh)
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if precision is not None and precision.startswith("bf16-mixed"):
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    packed = check_quantized_shardable(model, kwargs.get("mp_policy"))
    layers = _shard_units(model)
    names = ", ".join(sorted({type(m).__name__ for m in layers}))  # before fully_shard renames their classes
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    log.info(
        "FSDP2: sharded %d decoder layers (%s) over %d ranks%s",
        len(layers),
        names,
        mesh.size(),
        f", {packed} of their weights in 4-bit (bitsandbytes)" if packed else "",
    )
    return model


def _shard_units(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks FSDP2 shards one by one; a model that names none is sharded as one unit, with a warning."""
    layers = decoder_layers(model)
    if not layers:
        log.warning("%s names no decoder layers (_no_split_modules): FSDP2 shards it as one unit", type(model).__name__)
    return layers


FrozenPlacement = Literal["replicate", "shard", "offload"]


def shard_frozen(model: nn.Module, device_mesh, offload: bool = False) -> nn.Module:
    """`fully_shard` a frozen role (run without gradients) over the mesh's data-parallel ranks, so each rank holds
    1/world of its weights instead of a copy. Units: each decoder layer, the input embeddings and an untied
    lm_head (large with a large vocabulary), then the model (which holds a tied embedding and lm_head); each is
    gathered for its own forward and freed after it. With `offload` the shards live in CPU memory and each unit is
    copied to the device when it runs (FSDP2's CPUOffloadPolicy). A bitsandbytes-quantized role stays whole (a
    quarter of its bf16 size already)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    mesh = data_parallel_mesh(device_mesh)
    if getattr(model, "is_quantized", False):
        log.info("FSDP2: a frozen %s in bitsandbytes precision stays whole on every rank", type(model).__name__)
        return model
    kwargs = {"mesh": mesh, "reshard_after_forward": True}
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda")
    name = type(model).__name__
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    units = _shard_units(model)
    if head is None or head.weight is not embeddings.weight:
        units += [embeddings] + ([head] if head is not None else [])
    # else the tied weight is one unit with the root: sharded with one of its modules alone, the other would keep
    # the whole weight unsharded
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    local = sum(p.to_local().numel() for p in model.parameters())
    log.info(
        "FSDP2: a frozen %s sharded over %d ranks%s: %d of its %d weights on this rank",
        name,
        mesh.size(),
        " (in CPU memory)" if offload else "",
        local,
        sum(p.numel() for p in model.parameters()),
    )
    return model


def check_quantized_shardable(model: nn.Module, mp_policy=None) -> int:
    """How many bitsandbytes 4-bit weights `model` holds, after checking FSDP2 can shard them: each is packed
    bytes viewed as a float dtype (`bnb_4bit_quant_storage`), which FSDP2 splits and gathers like any weight,
    and bitsandbytes re-attaches its quantization state at each forward. FSDP2 must not cast them: under
    bf16-mixed their storage dtype must be bfloat16. 8-bit weights (int8) cannot be sharded."""
    quantized = [p for p in model.parameters() if type(p).__name__ in ("Params4bit", "Int8Params")]
    for module in model.modules():
        # bitsandbytes' CPU kernels repack a 4-bit weight in place at its first inference forward and mark its
        # quantization state so; FSDP2 gathers the shards as stored at every forward, so no repacking
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    if any(type(p).__name__ == "Int8Params" for p in quantized):
        raise InputError(
            "an 8-bit (bitsandbytes) policy cannot be sharded with FSDP2: use quantization: 4bit (QLoRA), "
            "or DDP (configs/strategies/ddp.yaml)"
        )
    cast = getattr(mp_policy, "param_dtype", None)
    wrong = {p.dtype for p in quantized} - {cast} if cast is not None else set()
    if quantized and (wrong or not all(p.dtype.is_floating_point for p in quantized)):
        raise InputError(
            f"the policy's 4-bit weights are stored as {sorted(map(str, {p.dtype for p in quantized}))}, but FSDP2 "
            f"would gather them as {cast}: set model.policy.dtype: bfloat16 under precision bf16-mixed "
            "(the 4-bit weights are stored in the policy's dtype)"
        )
    return len(quantized)


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy as pure FSDP2: every process is one data-parallel shard.

    The module shards the policy in `configure_model` (each decoder layer, then the model); a
    checkpoint is a folder with one file per rank (torch.distributed.checkpoint), which resumes
    with `--ckpt_path`. Activation checkpointing: `model.policy.gradient_checkpointing: true`.

    Args:
        data_parallel_size: shards; "auto" means the world size (devices x num_nodes).
        save_distributed_checkpoint: each rank writes its shard (else rank 0 writes a full checkpoint).
        process_group_backend: "nccl", "gloo" (CPU); None picks by device.
        timeout: collective timeout.
        frozen_roles: where the frozen roles (reference, weak pair) live: "replicate", a whole copy on every
            device; "shard", 1/world of each on every device (`shard_frozen`), gathered one unit at a time for
            their forwards; "offload", those shards in CPU memory, copied to the device unit by unit.
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        frozen_roles: FrozenPlacement = "replicate",
    ) -> None:
        if frozen_roles not in ("replicate", "shard", "offload"):
            raise InputError(f"frozen_roles must be replicate, shard or offload, got {frozen_roles!r}")
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.frozen_roles = frozen_roles

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
