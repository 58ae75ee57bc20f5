"""The LightningCLI programs: `wspo fit | validate | test` and `wspo precompute`, over one config format.

Every run writes checkpoints atomically and stops on non-finite losses unless its config chooses
otherwise, and loads checkpoints with `weights_only`. A config printed by any of these commands
(`--print_config`) feeds any other: `precompute` accepts fit's own keys (`ckpt_path`, `weights_only`)
and ignores them, and every command accepts the `precompute:` options and ignores them.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI

from wspo_lightning.callbacks.runs import continue_csv_logs
from wspo_lightning.data import PreferenceDataModule
from wspo_lightning.errors import InputError, input_error_in
from wspo_lightning.module import PreferenceModule
from wspo_lightning.resume import (
    check_model_paths,
    checkpoint_metadata,
    checkpoint_to_resume,
    continue_runs,
    fill_from_checkpoint,
    written_values,
)

log = logging.getLogger(__name__)
SUBCOMMANDS = ("fit", "validate", "test")


@dataclass
class PrecomputeOptions:
    """Options of `wspo precompute` (other commands ignore them)."""

    reference: bool = True
    """Also cache the reference's log-probs (false: fit computes them live)."""
    batch_size: int | None = None
    """Sequences per forward (null: data.eval_batch_size)."""


class WSPOLightningCLI(LightningCLI):
    """LightningCLI over the objectives (`PreferenceModule` subclasses) and `PreferenceDataModule`.

    `written`: the values the user wrote for the subcommand (config files and command line; no defaults,
    nothing restored from a checkpoint). On `--ckpt_path FILE` the checkpoint's hyperparameters fill only the
    model keys left unset (`wspo_lightning.resume`)."""

    written: Namespace

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: spec for name, spec in LightningCLI.subcommands().items() if name in SUBCOMMANDS}

    def add_arguments_to_parser(self, parser) -> None:
        # One tokenizer for data and models: the policy's (a link, so data.tokenizer is never set on its own).
        parser.link_arguments("model.init_args.policy.path", "data.tokenizer", apply_on="parse")
        parser.add_class_arguments(PrecomputeOptions, "precompute")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        self.written = written_values(parser, args, self.config.get("subcommand"))

    def _parse_ckpt_path(self) -> None:
        """Replaces LightningCLI's, under which the checkpoint's hyperparameters overrode the config."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not (ckpt_path and Path(ckpt_path).exists()):
            return  # `last`, `hpc`: the config gives every value (the module warns where they differ)
        hparams = checkpoint_metadata(ckpt_path).get("hyper_parameters")
        self.config = fill_from_checkpoint(self.parser, self.config, subcommand, hparams or {}, self.written)
        check_model_paths(self.config[subcommand], self.written, ckpt_path)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:  # a component's own check of its values (a loss's beta): the config's to fix
            found = input_error_in(err)
            if found is not None:
                raise found from None
            raise InputError(f"config: {parser_message(str(err))}") from err

    def before_instantiate_classes(self) -> None:
        # a resumed or requeued run logs into the W&B run and the CSV version folder it started
        self._continued_csv: tuple[list, int] | None = None
        if self.subcommand == "fit":
            checkpoint = checkpoint_to_resume(self.config.fit)
            if checkpoint is not None:
                saved = checkpoint_metadata(checkpoint)
                versions = continue_runs(self.config.fit, self.written, saved)
                self._continued_csv = (versions, int(saved.get("global_step", 0))) if versions else None

    def instantiate_trainer(self, **kwargs: Any):
        trainer = super().instantiate_trainer(**kwargs)
        if getattr(self, "_continued_csv", None):  # metrics.csv continues from the checkpoint's step
            continue_csv_logs(trainer, *self._continued_csv)
        add_fault_defaults(trainer)
        self._warn_slow_precision(trainer)
        self._warn_double_checkpointing(trainer)
        return trainer

    def _warn_double_checkpointing(self, trainer) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        spec = getattr(self.model, "policy_spec", None)
        strategy = trainer.strategy
        if isinstance(strategy, FSDPStrategy) and strategy._activation_checkpointing_kwargs and spec is not None:
            if spec.gradient_checkpointing:
                log.warning(
                    "FSDPStrategy.activation_checkpointing_policy and model.policy.gradient_checkpointing both "
                    "recompute activations: each layer would be recomputed twice; keep the policy's and drop the "
                    "strategy's"
                )

    def _warn_slow_precision(self, trainer) -> None:
        from lightning.pytorch.accelerators import CPUAccelerator

        from wspo_lightning.hardware import warn_if_slow_bf16

        if isinstance(trainer.accelerator, CPUAccelerator) and isinstance(self.model, PreferenceModule):
            specs = self.model.all_specs()
            warn_if_slow_bf16(str(trainer.precision), {role: spec.dtype for role, spec in specs.items()})

    def before_fit(self) -> None:
        self._check_checkpoint_arguments()
        self._check_one_gamma()

    def before_validate(self) -> None:
        self._check_checkpoint_arguments()

    def before_test(self) -> None:
        self._check_checkpoint_arguments()

    def _check_checkpoint_arguments(self) -> None:
        """`weights_only` on by default; a missing `ckpt_path`, or `last` that can never be found, is an input error."""
        config = self.config_init[self.subcommand]
        if config.get("weights_only", False) is None:
            config["weights_only"] = True  # checkpoints hold tensors and plain values only: never unpickle code
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            check_last_is_findable(self.trainer)
        elif (
            ckpt_path
            and ckpt_path not in ("best", "hpc", "registry")
            and "://" not in str(ckpt_path)
            and not Path(ckpt_path).exists()
        ):
            raise InputError(
                f"ckpt_path: {ckpt_path} does not exist. Give a checkpoint file, or `last` to resume "
                "from the newest last checkpoint."
            )

    def _check_one_gamma(self) -> None:
        """One source for gamma: a `model.gamma` and a GammaSchedule target, both written and different, is an
        error (unwritten, the schedule's target is the module's gamma)."""
        written = self.written.get("model.init_args.gamma")
        if written is None:
            return
        for callback in self.written.get("trainer.callbacks") or []:
            target = callback.get("init_args.value") if isinstance(callback, Namespace) else None
            if str(callback.get("class_path", "")).endswith("GammaSchedule") and target not in (None, written):
                raise InputError(
                    f"model.init_args.gamma is {written:g} but the GammaSchedule's value (its target) is {target:g}: "
                    "set one (without GammaSchedule.value the schedule's target is model.init_args.gamma)"
                )


class PrecomputeCLI(WSPOLightningCLI):
    """A fit config parsed without running it, for `wspo precompute`."""

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        # fit's own keys, as `wspo fit --print_config` writes them: accepted, unused
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="ignored (a key of fit's)")
        parser.add_argument("--weights_only", type=bool | None, default=None, help="ignored (a key of fit's)")


def model_keys_hint(command: str | None = "fit") -> str:
    """Where the objective's own keys are listed: `--help` shows only `--model CONFIG | CLASS_PATH_OR_NAME`."""
    command = command or "fit"
    return (
        f"The objective's keys (gamma, weak_base, weak_aligned, cache_dir, beta, ...) are listed by: "
        f"wspo {command} --model.help WSPOModule (or DPOModule, SFTModule)"
    )


def add_fault_defaults(trainer) -> None:
    """Atomic checkpoint writes, a NonFiniteGuard(action=stop), a RunIdentity (W&B run ids kept with the
    checkpoints) and StepBoundaryCheckpoints (pre-emption checkpoints resume exactly), unless the config chose
    its own."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    from wspo_lightning.callbacks.faults import AtomicCheckpointIO, NonFiniteGuard
    from wspo_lightning.callbacks.runs import RunIdentity, StepBoundaryCheckpoints

    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default writer, not a user's
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    if not any(isinstance(callback, NonFiniteGuard) for callback in trainer.callbacks):
        trainer.callbacks.append(NonFiniteGuard(action="stop"))
    for kind in (RunIdentity, StepBoundaryCheckpoints):
        if not any(isinstance(callback, kind) for callback in trainer.callbacks):
            trainer.callbacks.append(kind())


def check_last_is_findable(trainer) -> None:
    """`--ckpt_path last` looks in each ModelCheckpoint's folder: fail when no run could ever have saved there."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    savers = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.save_last]
    if not savers:
        raise InputError(
            "ckpt_path=last: no ModelCheckpoint writes a last checkpoint. Add one with save_last: true "
            "(and a dirpath) to trainer.callbacks, or give the checkpoint file."
        )
    logger = trainer.loggers[0] if trainer.loggers else None
    # CSV/TensorBoard loggers take `version`, W&B `id`: unset, every run gets a new folder
    versioned = logger is not None and all(getattr(logger, name, None) is None for name in ("_version", "_id"))
    if versioned and all(cb.dirpath is None for cb in savers):
        raise InputError(
            "ckpt_path=last cannot find the checkpoints of an earlier run: ModelCheckpoint has no "
            "dirpath, so each run saves under a new logger version folder. Set dirpath on the "
            "ModelCheckpoint (e.g. runs/NAME/checkpoints) for runs you want to resume, or give the "
            "checkpoint file."
        )


def run_cli(
    args: Sequence[str] | None = None,
    run: bool = True,
    exit_on_error: bool = True,
    cli_class: type[WSPOLightningCLI] = WSPOLightningCLI,
    description: str | None = None,
    prog: str | None = None,
) -> WSPOLightningCLI:
    """The LightningCLI program, usable in-process: `args` as on the command line (a subcommand first when
    `run`). `exit_on_error=False` raises jsonargparse's ArgumentError on a bad config instead of printing the
    usage and exiting (the `wspo` dispatcher turns it into one line)."""
    parser_kwargs: dict[str, Any] = {"description": description} if description else {}
    if prog:
        parser_kwargs["prog"] = prog
    command = prog.split()[-1] if prog else None
    parser_kwargs.update(
        {name: {"epilog": model_keys_hint(name)} for name in SUBCOMMANDS}, epilog=model_keys_hint(command)
    )
    if not exit_on_error:
        parser_kwargs["exit_on_error"] = False
        for name in SUBCOMMANDS:
            parser_kwargs[name]["exit_on_error"] = False
    with warnings.catch_warnings():
        # we always pass args; LightningCLI warns when sys.argv holds flags too, as it does under `wspo`
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return cli_class(
            PreferenceModule,
            PreferenceDataModule,
            subclass_mode_model=True,
            args=list(args) if args is not None else None,
            run=run,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_kwargs=parser_kwargs,
        )


def main(argv: Sequence[str]) -> int:
    """`wspo fit | validate | test ...`: `argv` starts with the subcommand."""
    run_cli(argv, exit_on_error=False)
    return 0


def precompute_main(argv: Sequence[str]) -> int:
    """`wspo precompute --config FIT.yaml ...`; see `precompute`."""
    precompute(argv)
    return 0


def precompute(argv: Sequence[str], command: str | None = None) -> Path:
    """`wspo precompute --config FIT.yaml [--precompute.reference false] [--precompute.batch_size N] [overrides]`:
    one pass of the frozen models of a fit config (weak pair, and the reference unless told otherwise) over
    its training, validation and test data, cached in model.cache_dir, so that `wspo fit` with the same config
    loads only the policy. `command`: how to rebuild the cache, for the manifest (default: `argv`'s command).
    Returns the cache folder."""
    from lightning.pytorch.cli import SaveConfigCallback
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from wspo_lightning.cache.precompute import build_cache

    argv = list(argv)
    # Frozen forwards need no sharding: plain data parallel ("auto": DDP on several devices). Not after a
    # `--KEY.help CLASS`, which prints its class's keys and takes no more arguments.
    asks_help = any(arg.split("=")[0].endswith(".help") for arg in argv)
    cli = run_cli(
        argv + ([] if asks_help else ["--trainer.strategy=auto", "--trainer.logger=false"]),
        run=False,
        exit_on_error=False,
        cli_class=PrecomputeCLI,
        prog="wspo precompute",
        description=" ".join(precompute.__doc__.split("`command`")[0].split()),
    )
    module, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    if not getattr(module, "cache_dir", None):
        raise InputError(
            "wspo precompute writes to model.cache_dir: set it in the config or pass --model.init_args.cache_dir DIR"
        )
    options = cli.config.precompute
    values = module.cacheable_values(reference=options.reference)
    folder = Path(module.cache_dir)
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, SaveConfigCallback)]
    if rank_zero_only.rank == 0:  # processes are not started yet: the rank comes from the launcher's environment
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(cli.parser.dump(cli.config, skip_none=False))
    return build_cache(
        module,
        datamodule,
        trainer,
        folder,
        values,
        options.batch_size,
        command=command or " ".join(["wspo", "precompute", *argv]),
    )


_NOISE = re.compile(
    r"^(- )?(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value|"
    r"Expected a <class 'NoneType'>|Problem with given class_path|Parser key )"
)


def parser_message(message: str) -> str:
    """jsonargparse's nested, multi-line error as one line: `key.path: the innermost problem`."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else message
    keys = []
    for key in re.findall(r'Parser key "([^"]+)"', message):
        if key not in keys:
            keys.append(key)
    problems = [line.lstrip("- ") for line in lines if not _NOISE.match(line)]
    problem = problems[0] if problems else lines[-1]
    return f"{'.'.join(keys)}: {problem}" if keys else problem
