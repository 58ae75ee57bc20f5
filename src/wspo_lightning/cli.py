"""The `wspo` command: every subcommand in one table, and one policy from errors to exit codes.

`fit | validate | test | precompute` are LightningCLI programs (`lightning_cli.py`); the others are
functions or dataclasses read by `commands.py`. Each is imported only when called. What the user can
fix (bad data, config, paths) ends as one `wspo: error:` line and exit code 2; a run stopped on
purpose (a non-finite loss) as one line and exit code 1; no traceback for either.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence

from wspo_lightning.errors import InputError, TrainingStopped, input_error_in

# name -> (import path of `main(argv) -> int`, one line of help). The only upward references of the
# package: the dispatcher names the programs built on everything else.
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("wspo_lightning.lightning_cli:main", "train a policy (WSPO, DPO or SFT) from a YAML config"),
    "validate": ("wspo_lightning.lightning_cli:main", "validate a policy (val/ metrics) from a YAML config"),
    "test": ("wspo_lightning.lightning_cli:main", "test a policy (test/ metrics) from a YAML config"),
    "precompute": (
        "wspo_lightning.lightning_cli:precompute_main",
        "cache the frozen roles' log-probs of a fit config, so fit loads only the policy",
    ),
    "generate": (
        "wspo_lightning.decoding.command:main",
        "decode prompts: sampling, proxy/EFT sampling, chunk-level beam search or best-of-N with a weak pair",
    ),
    "tiny": ("wspo_lightning.tiny:main", "write tiny random models and toy data, for trying the CLI offline"),
    "demo": ("wspo_lightning.demo.command:main", "the CPU demo: weak-to-strong alignment of SmolLM2, end to end"),
    "demo-spread": ("wspo_lightning.demo.spread:main", "how the demo's rows move between seeds (finished runs)"),
    "study": ("wspo_lightning.study.command:main", "the fair study: every method's reward-vs-KL frontier, one seed"),
    "sample": ("wspo_lightning.pipeline.sample:main", "stage: sample responses to prompts from one model"),
    "score": ("wspo_lightning.pipeline.score:main", "stage: add a gold reward to sampled responses"),
    "pairs": ("wspo_lightning.pipeline.pairs:main", "stage: preference pairs (best vs worst) from scored samples"),
    "distill": ("wspo_lightning.pipeline.distill:main", "stage: a smaller student of a model, on its own samples"),
    "evaluate": (
        "wspo_lightning.pipeline.evaluate:main",
        "stage: gold reward, KL and diversity per row of scored samples, with intervals",
    ),
    "convert": ("wspo_lightning.pipeline.convert:main", "stage: a GGUF checkpoint to a safetensors folder"),
    "extrapolate": ("wspo_lightning.pipeline.extrapolate:main", "stage: ExPO weights, R + (1 + alpha)(M - R)"),
    "push": ("wspo_lightning.callbacks.export:main", "upload an export folder to the Hugging Face Hub (or retry)"),
    "workspace": ("wspo_lightning.pipeline.workspace:main", "a ready W&B workspace (dashboard) for a project's runs"),
    "plan": ("wspo_lightning.plan:main", "memory per GPU of a fit config, on paper (no weights load)"),
}
LIGHTNING = ("fit", "validate", "test")


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return (
        "usage: wspo COMMAND [--help] [options]\n\nWeak-to-strong alignment of language models on PyTorch "
        "Lightning.\n\ncommands:\n" + "\n".join(lines) + "\n\n`wspo COMMAND --help` lists a command's options."
    )


def _load(target: str):
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise InputError(f"this installation has no `{module_name}` (subcommand not available)") from None
        raise
    return getattr(module, func_name)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name = argv[0]
    if name not in COMMANDS:
        print(f"wspo: unknown command {name!r}; expected one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from jsonargparse import ArgumentError

    finished = False
    try:
        code = int(_load(COMMANDS[name][0])(argv if name in LIGHTNING else argv[1:]) or 0)
        finished = True
        return code
    except ArgumentError as err:  # a config with unknown keys or wrong types
        from wspo_lightning.lightning_cli import parser_message

        where = f"wspo {name} --help lists every key"
        if name in (*LIGHTNING, "precompute"):  # the objective's keys are not in --help: say where they are
            where += f"; the objective's: wspo {name} --model.help WSPOModule"
        print(f"wspo: error: config: {parser_message(str(err))} ({where})", file=sys.stderr)
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
    finally:
        _end_distributed(finished)


def _end_distributed(finished: bool) -> None:
    """Destroy the process group a strategy left behind: left to interpreter exit, gloo's threads can be
    torn down while still joinable, and a rank that finished its work aborts ("terminate called without an
    active exception"), failing a run that succeeded. A rank that finished waits for the others first (rank 0
    may still be writing the export): a gloo group torn down while a peer still holds its connections can abort
    the same way. A rank that failed does not wait (its launcher stops the others)."""
    if "torch" not in sys.modules:  # nothing distributed ran; importing torch would only cost time
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            _ended_group.append(True)
            if finished:
                dist.barrier()
        dist.destroy_process_group()


_ended_group: list[bool] = []  # a process group of several ranks was torn down in this process


def entry() -> None:
    """The `wspo` console script and `python -m wspo_lightning.cli`: `main`, then the process's exit.

    After a run over several processes, the process leaves through `os._exit` once Python's exit handlers have
    run (W&B's, logging's, temporary folders'): C++ threads that torch's distributed backends leave to static
    destruction can abort a rank whose work succeeded ("terminate called without an active exception"), and the
    launcher then fails the whole run."""
    code = main()
    if _ended_group:
        import atexit
        import os

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
