"""Stage `precompute`: `wspo precompute` of a fit config behind the stage rules: skipped when its cache exists.

The cache holds the frozen roles' values (reference log-probs, delta_weak), so a fit of the same config loads
only the policy. The cache of a config whose weak pair is swapped (WSPO's sign control) is derived from the
cache in order without a forward pass (`cache.swap`). Each config is kept as `<run_dir>/precompute.yaml`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml

from wspo_lightning.io import atomic_path
from wspo_lightning.pipeline.stage import done


def precompute(config: dict, cache: Path, run_dir: Path, force: bool = False) -> Path:
    """`wspo precompute` of the fit `config` into `cache`, unless it exists (written aside, renamed when whole)."""
    from wspo_lightning.lightning_cli import precompute as precompute_cli

    if done("precompute", cache, force):
        return cache
    path, command = write_config(config, run_dir, cache)
    with atomic_path(cache) as tmp:
        precompute_cli(["--config", str(path), f"--model.init_args.cache_dir={tmp}"], command=command)
    return cache


def precompute_swapped(
    config: dict, cache: Path, run_dir: Path, in_order: Callable[[], Path], force: bool = False
) -> Path:
    """The cache of the fit `config`, whose weak pair is swapped, derived from the cache of the same config with
    the pair in order: `in_order()` returns that one (made on demand), asked only when `cache` does not exist."""
    from wspo_lightning.cache.swap import swap_weak_pair

    if done("precompute", cache, force):
        return cache
    source = in_order()
    _, command = write_config(config, run_dir, cache)
    swap_weak_pair(source, cache, command=command)
    return cache


def write_config(config: dict, run_dir: Path, cache: Path) -> tuple[Path, str]:
    """Save `config` as `run_dir/precompute.yaml`; return its path and the `wspo precompute` command that
    builds `cache` from it (kept in the cache's manifest)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "precompute.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, f"wspo precompute --config {path} --model.init_args.cache_dir {cache}"
