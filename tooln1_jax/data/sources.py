"""Load xLAM / ToolACE through `datasets`, from local JSON / JSONL / parquet files or a hub name.

`source` is a file, a folder of such files, a list of files, or a hub dataset name
(`Salesforce/xlam-function-calling-60k`, `Team-ACE/ToolACE`), which needs a connection.
"""
from __future__ import annotations

import glob
import os
from typing import Sequence

from tooln1_jax.data import toolace, xlam
from tooln1_jax.data.records import DropCounts, ToolRecord

XLAM_HUB = "Salesforce/xlam-function-calling-60k"
TOOLACE_HUB = "Team-ACE/ToolACE"
_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _local_files(source: str | Sequence[str]) -> list[str] | None:
    """The data files `source` names locally, or None when it is not a local path."""
    if isinstance(source, (list, tuple)):
        return [os.fspath(p) for p in source]
    source = os.fspath(source)
    if os.path.isdir(source):
        files = sorted(p for p in glob.glob(os.path.join(source, "*")) if os.path.splitext(p)[1] in _FORMATS)
        if not files:
            raise FileNotFoundError(f"{source}: no .json, .jsonl or .parquet files in this folder")
        return files
    if os.path.exists(source) or os.path.splitext(source)[1] in _FORMATS:
        return [source]
    return None


def load_rows(source: str | Sequence[str], *, split: str = "train", cache_dir: str | None = None):
    """A `datasets.Dataset` of raw rows from local files or the hub; a clear one-line error if
    a local file is missing or the hub cannot be reached."""
    import datasets  # heavy: only when data is actually loaded

    files = _local_files(source)
    if files is not None:
        missing = [p for p in files if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"data file not found: {missing[0]}")
        kinds = {_FORMATS.get(os.path.splitext(p)[1]) for p in files}
        if None in kinds or len(kinds) != 1:
            raise ValueError(f"data files must all be .json/.jsonl or all .parquet, got {files}")
        return datasets.load_dataset(kinds.pop(), data_files=files, split="train", cache_dir=cache_dir)
    try:
        return datasets.load_dataset(source, split=split, cache_dir=cache_dir)
    except Exception as e:  # offline, unknown name, no access: one line, not a long traceback
        raise RuntimeError(f"cannot load dataset {source!r} (split {split!r}) from the Hugging Face hub: "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} -- offline? "
                           "pass local .json/.jsonl/.parquet files instead") from None


def load_xlam(source: str | Sequence[str] = XLAM_HUB, **kwargs) -> tuple[list[ToolRecord], DropCounts]:
    records, drops = xlam.convert_rows(load_rows(source, **kwargs))
    drops.report(f"xlam ({source})", len(records))
    return records, drops


def load_toolace(source: str | Sequence[str] = TOOLACE_HUB, **kwargs) -> tuple[list[ToolRecord], DropCounts]:
    records, drops = toolace.convert_rows(load_rows(source, **kwargs))
    drops.report(f"toolace ({source})", len(records))
    return records, drops


def load_tool_n1_mix(xlam_source: str | Sequence[str] | None = XLAM_HUB,
                     toolace_source: str | Sequence[str] | None = TOOLACE_HUB,
                     **kwargs) -> tuple[list[ToolRecord], DropCounts]:
    """The paper's training pool: xLAM + ToolACE records (either source may be None)."""
    records, drops = [], DropCounts()
    for loader, source, name in ((load_xlam, xlam_source, "xlam"), (load_toolace, toolace_source, "toolace")):
        if source is None:
            continue
        got, dropped = loader(source, **kwargs)
        records.extend(got)
        drops.update({f"{name}/{k}": v for k, v in dropped.items()})
    return records, drops
