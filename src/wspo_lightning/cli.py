"""The `wspo` command.

`wspo fit|validate|test --config X.yaml` is LightningCLI over our modules and data module;
the other subcommands (tiny, generate, precompute, demo and the demo's stages) are small
jsonargparse programs of their own, imported only when called.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Sequence

from lightning.pytorch.cli import LightningCLI

from wspo_lightning.errors import InputError

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
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


class WSPOLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # One tokenizer for data and models: the policy's, unless data.tokenizer is given.
        parser.link_arguments("model.init_args.policy.path", "data.tokenizer", apply_on="parse")


def run_cli(args: Sequence[str] | None = None, run: bool = True) -> WSPOLightningCLI:
    """LightningCLI over WSPO/DPO modules and the preference data module (usable in-process)."""
    from wspo_lightning.data import PreferenceDataModule
    from wspo_lightning.module import PreferenceModule

    return WSPOLightningCLI(
        PreferenceModule,
        PreferenceDataModule,
        subclass_mode_model=True,
        args=list(args) if args is not None else None,
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
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
        run_cli(argv)
        return 0
    except InputError as err:  # the user's to fix: one line, no traceback
        print(f"wspo: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
