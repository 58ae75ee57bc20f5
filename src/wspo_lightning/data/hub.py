"""Data read through the `datasets` library: a `save_to_disk` folder, a local folder in the Hub's layout
(`data/{split}-00000-of-00001.parquet`, or the `configs:` of its README), or a Hugging Face Hub id.

A path that exists locally is local; a path that looks like a file (`.jsonl`, `./x`, `/x`) but is missing
is "file not found"; anything else is a Hub id. Offline, a Hub id is one clear error saying what to
download. Every problem is an `InputError` naming the path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wspo_lightning.errors import located

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def is_hub_id(path: str | Path) -> bool:
    """Whether `path` names a Hub dataset: not a local path, nor shaped like one (a file suffix, `./`, `/`, `~`)."""
    text = str(path)
    if Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or "\\" in text:
        return False
    return not text.lower().endswith(FILE_SUFFIXES) and text.count("/") <= 1 and bool(text.strip())


def pick_split(available: Sequence[str], split: str | Sequence[str] | None, path: str | Path) -> str | None:
    """The split to read: the first of `split` (a name or candidates) present in `available`; with no
    `split`, the only one there is. None when `available` is empty (a plain, unsplit dataset)."""
    if not available:
        return None
    wanted = [split] if isinstance(split, str) else list(split or [])
    present = [s for s in wanted if s in available] if wanted else list(available)
    if not present or (not wanted and len(present) > 1):
        asked = f"none of them {wanted}" if wanted else "and no split was named"
        raise located(
            path,
            None,
            None,
            f"the dataset has splits {sorted(available)}, {asked}. Name the one to read with "
            "data.train_split / val_split / test_split.",
        )
    return present[0]


def read_dataset_rows(
    path: str | Path,
    split: str | Sequence[str] | None,
    config: str | None = None,
    revision: str | None = None,
) -> list[tuple[str, str, Any]]:
    """(where, default id, raw record) of every row of the chosen split of a dataset folder or Hub id.

    `config`: the subset (`name=` of `datasets.load_dataset`); `revision`: a Hub branch, tag or commit."""
    import datasets

    local = Path(path).expanduser().exists()
    if local and _is_saved(Path(path)):
        ds = _load_saved(Path(path))
        name = None
        if isinstance(ds, datasets.DatasetDict):
            name = pick_split(list(ds), split, path)
            ds = ds[name]
    else:
        kwargs = {"revision": revision} if revision and not local else {}
        try:
            available = datasets.get_dataset_split_names(str(path), config_name=config, **kwargs)
            name = pick_split(available, split, path)
            ds = datasets.load_dataset(str(path), name=config, split=name, **kwargs)
        except Exception as err:  # noqa: BLE001 - datasets raises many types; the user gets one line
            raise _explain(path, err, local, config) from None
    tag = f"[{name}]" if name else ""
    base = Path(str(path)).name
    return [(f"{path}{tag}:record {i}", f"{base}{tag}:{i}", raw) for i, raw in enumerate(ds.to_list())]


def _is_saved(path: Path) -> bool:
    """A folder written by `save_to_disk` (a Dataset's state.json, or a DatasetDict's dataset_dict.json)."""
    return path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())


def _load_saved(path: Path):
    import datasets

    try:
        return datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - a damaged folder: datasets raises several types
        raise located(path, None, None, f"cannot read this save_to_disk folder ({err}). Save it again.") from None


def _explain(path: str | Path, err: Exception, local: bool, config: str | None):
    from wspo_lightning.errors import InputError

    if isinstance(err, InputError):
        return err
    reason = " ".join(str(err).split()) or type(err).__name__
    if config and "config" in reason.lower():
        return located(path, None, "dataset_config", f"{reason}. Set data.dataset_config to one of the subsets.")
    if local:
        return located(
            path,
            None,
            None,
            f"cannot read this folder as a dataset ({reason}). Give a .jsonl/.json/.parquet file, a save_to_disk "
            "folder, or a folder in the Hub's layout (data/{split}-00000-of-00001.parquet).",
        )
    if isinstance(err, ConnectionError) or "offline" in reason.lower():
        return located(
            path,
            None,
            None,
            "is not a local path, so it was read as a Hugging Face Hub dataset id, and the Hub cannot be reached "
            f"({reason}). Download it where the Hub is reachable: `hf download {path} --repo-type dataset "
            f"--local-dir DIR` (or `datasets.load_dataset('{path}').save_to_disk('DIR')`), then point the "
            "data path at DIR.",
        )
    return located(
        path,
        None,
        None,
        f"cannot load it as a Hugging Face Hub dataset ({reason}). Check the id, or give a local path.",
    )
