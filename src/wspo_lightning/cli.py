"""The `wspo` command.

`wspo fit|validate|test --config X.yaml` is LightningCLI over our modules and data module;
the other subcommands (tiny, generate, precompute, demo and the demo's stages) are small
jsonargparse programs of their own, imported only when called.

What the user can fix (bad data, config, paths) ends as one `wspo: error:` line and exit code 2;
a run stopped on purpose (a non-finite loss) as one line and exit code 1; no traceback for either.
Every Lightning run writes checkpoints atomically and stops on non-finite losses unless its
config chooses otherwise, and loads checkpoints with `weights_only`.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI

from wspo_lightning.errors import InputError, TrainingStopped

# subcommand -> "module:function(argv) -> int"
COMMANDS = {
    "tiny": "wspo_lightning.cli:tiny_main",
    "generate": "wspo_lightning.decoding.command:main",
    "precompute": "wspo_lightning.precompute:main",
    "demo": "wspo_lightning.demo.command:main",
    "sample": "wspo_lightning.pipeline.sample:main",
    "score": "wspo_lightning.pipeline.score:main",
    "pairs": "wspo_lightning.pipeline.pairs:main",
    "evaluate": "wspo_lightning.pipeline.evaluate:main",
    "convert": "wspo_lightning.pipeline.convert:main",
    "distill": "wspo_lightning.pipeline.distill:main",
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


class WSPOLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # One tokenizer for data and models: the policy's (a link, so data.tokenizer is never set on its own).
        parser.link_arguments("model.init_args.policy.path", "data.tokenizer", apply_on="parse")

    def instantiate_trainer(self, **kwargs: Any):
        trainer = super().instantiate_trainer(**kwargs)
        add_fault_defaults(trainer)
        return trainer

    def before_fit(self) -> None:
        self._check_checkpoint_arguments()

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
        elif ckpt_path and ckpt_path not in ("best", "hpc", "registry") and "://" not in str(ckpt_path) \
                and not Path(ckpt_path).exists():
            raise InputError(f"ckpt_path: {ckpt_path} does not exist. Give a checkpoint file, or `last` to resume "
                             "from the newest last checkpoint.")


def add_fault_defaults(trainer) -> None:
    """Atomic checkpoint writes and a NonFiniteGuard(action=stop), unless the config chose its own."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    from wspo_lightning.callbacks.faults import AtomicCheckpointIO, NonFiniteGuard

    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default writer, not a user's
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    if not any(isinstance(callback, NonFiniteGuard) for callback in trainer.callbacks):
        trainer.callbacks.append(NonFiniteGuard(action="stop"))


def check_last_is_findable(trainer) -> None:
    """`--ckpt_path last` looks in each ModelCheckpoint's folder: fail when no run could ever have saved there."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    savers = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.save_last]
    if not savers:
        raise InputError("ckpt_path=last: no ModelCheckpoint writes a last checkpoint. Add one with save_last: true "
                         "(and a dirpath) to trainer.callbacks, or give the checkpoint file.")
    logger = trainer.loggers[0] if trainer.loggers else None
    # CSV/TensorBoard loggers take `version`, W&B `id`: unset, every run gets a new folder
    versioned = logger is not None and all(getattr(logger, name, None) is None for name in ("_version", "_id"))
    if versioned and all(cb.dirpath is None for cb in savers):
        raise InputError("ckpt_path=last cannot find the checkpoints of an earlier run: ModelCheckpoint has no "
                         "dirpath, so each run saves under a new logger version folder. Set dirpath on the "
                         "ModelCheckpoint (e.g. runs/NAME/checkpoints) for runs you want to resume, or give the "
                         "checkpoint file.")


def run_cli(args: Sequence[str] | None = None, run: bool = True, exit_on_error: bool = True) -> WSPOLightningCLI:
    """LightningCLI over WSPO/DPO modules and the preference data module (usable in-process).

    `exit_on_error=False` raises jsonargparse's ArgumentError on a bad config instead of printing
    the usage and exiting (`main` turns it into one line).
    """
    from wspo_lightning.data import PreferenceDataModule
    from wspo_lightning.module import PreferenceModule

    parser_kwargs: dict[str, Any] = {}
    if not exit_on_error:
        parser_kwargs = {"exit_on_error": False, **{name: {"exit_on_error": False} for name in LIGHTNING_COMMANDS}}
    with warnings.catch_warnings():
        # we always pass args; LightningCLI warns when sys.argv holds flags too, as it does under `wspo`
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return WSPOLightningCLI(
            PreferenceModule,
            PreferenceDataModule,
            subclass_mode_model=True,
            args=list(args) if args is not None else None,
            run=run,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_kwargs=parser_kwargs,
        )


def tiny_main(argv: Sequence[str] | None = None) -> int:
    """`wspo tiny --out DIR`: a tiny random policy, weak pair and toy data, for trying the CLI offline."""
    from jsonargparse import ArgumentParser

    from wspo_lightning.tiny import write_tiny_world

    parser = ArgumentParser(prog="wspo tiny", description=tiny_main.__doc__)
    parser.add_argument("--out", required=True, help="folder to write policy/, weak_base/, weak_aligned/, *.jsonl")
    parser.add_argument("--arch", default="llama", choices=["llama", "qwen2", "gpt2"])
    parser.add_argument("--n_train", type=int, default=64)
    parser.add_argument("--n_val", type=int, default=16)
    cfg = parser.parse_args(argv)
    out = write_tiny_world(cfg.out, arch=cfg.arch, n_train=cfg.n_train, n_val=cfg.n_val)
    print(f"wrote a tiny {cfg.arch} world to {out}")
    return 0


def _call(target: str, argv: list[str]) -> int:
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise SystemExit(f"wspo: this installation has no `{module_name}` (subcommand not available)")
        raise
    return int(getattr(module, func_name)(argv) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if argv and argv[0] in COMMANDS:
            return _call(COMMANDS[argv[0]], argv[1:])
        if argv and not argv[0].startswith("-") and argv[0] not in LIGHTNING_COMMANDS:
            names = ", ".join(list(LIGHTNING_COMMANDS) + list(COMMANDS))
            print(f"wspo: unknown command {argv[0]!r}; expected one of: {names}", file=sys.stderr)
            return 2
        run_cli(argv, exit_on_error=False)
        return 0
    except ArgumentError as err:  # a config with unknown keys or wrong types
        command = argv[0] if argv and argv[0] in LIGHTNING_COMMANDS else "fit"
        print(f"wspo: error: config: {parser_message(str(err))} (wspo {command} --help lists every key)",
              file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"wspo: error: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        found = input_error_in(err)
        if found is None:
            raise
        print(f"wspo: error: {found}", file=sys.stderr)  # the user's to fix: one line, no traceback
        return 2


def input_error_in(err: BaseException) -> InputError | None:
    """The InputError `err` is or wraps: jsonargparse wraps errors raised while it instantiates classes."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, InputError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


_NOISE = re.compile(r"^(- )?(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value|"
                    r"Expected a <class 'NoneType'>|Problem with given class_path|Parser key )")


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


if __name__ == "__main__":
    sys.exit(main())
