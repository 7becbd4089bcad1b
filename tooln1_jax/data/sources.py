"""Load xLAM / ToolACE rows from local JSON / JSONL / parquet files or a hub name.

`source` is a file, a folder of such files, a list of files, or a hub dataset name
(`Salesforce/xlam-function-calling-60k`, `Team-ACE/ToolACE`), which needs a connection.
Local JSON / JSONL is read with `json` (so a bad line is named, dropped and counted, where
`datasets` fails the whole load); parquet and the hub go through `datasets`. A file with no
usable row (empty, `[]`, truncated JSON, every line bad) raises DataFileError naming it.
"""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Sequence

from tooln1_jax.data import toolace, xlam
from tooln1_jax.data.json_files import DataFileError, json_values
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


def _json_rows(path: str, drops: DropCounts) -> list[dict]:
    """The rows of a JSON list or JSON-lines file. Bad rows (a line that is not JSON, an item
    that is not an object) are dropped, counted in `drops` and named in one warning."""
    is_list, values, bad_lines = json_values(path)
    bad = []  # (position, why), in file order
    for number, error in bad_lines:
        drops["bad_json_line"] += 1
        bad.append((number, f"line {number}: not JSON ({error})"))
    rows = []
    for position, item in values:
        if isinstance(item, dict):
            rows.append(item)
        else:
            drops["not_an_object"] += 1
            bad.append((position, f"{'row' if is_list else 'line'} {position}: a {type(item).__name__}, not an object"))
    bad = [why for _, why in sorted(bad)]
    if not rows:
        raise DataFileError(f"{path}: no usable row; {bad[0]}")
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        warnings.warn(
            f"{path}: dropped {len(bad)} bad row(s): " + "; ".join(bad[:3]) + more, RuntimeWarning, stacklevel=3
        )
    return rows


def _check_parquet(path: str) -> None:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_metadata(path).num_rows
    except Exception as e:  # ArrowInvalid on an empty or truncated file
        raise DataFileError(
            f"{path}: not a readable parquet file ({str(e).splitlines()[0] if str(e) else e!r})"
        ) from None
    if rows == 0:
        raise DataFileError(f"{path}: no rows")


def load_rows(
    source: str | Sequence[str], *, split: str = "train", cache_dir: str | None = None, drops: DropCounts | None = None
):
    """Raw rows from local files (JSON / JSONL: a list of dicts; parquet: a `datasets.Dataset`)
    or the hub (a `datasets.Dataset`). Bad JSON rows are dropped and counted in `drops`; a
    missing or unusable file, or an unreachable hub, is one clear error."""
    import datasets  # heavy: only when data is actually loaded

    files = _local_files(source)
    if files is not None:
        missing = [p for p in files if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"data file not found: {missing[0]}")
        kinds = {_FORMATS.get(os.path.splitext(p)[1]) for p in files}
        if None in kinds or len(kinds) != 1:
            raise ValueError(f"data files must all be .json/.jsonl or all .parquet, got {files}")
        if kinds.pop() == "json":
            drops = DropCounts() if drops is None else drops
            return [row for path in files for row in _json_rows(path, drops)]
        for path in files:
            _check_parquet(path)
        return datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache_dir)
    try:
        return datasets.load_dataset(source, split=split, cache_dir=cache_dir)
    except Exception as e:  # offline, unknown name, no access: one line, not a long traceback
        raise RuntimeError(
            f"cannot load dataset {source!r} (split {split!r}) from the Hugging Face hub: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} -- offline? "
            "pass local .json/.jsonl/.parquet files instead"
        ) from None


def _load(convert, name: str, source: str | Sequence[str], **kwargs) -> tuple[list[ToolRecord], DropCounts]:
    drops = DropCounts()
    records, converted = convert(load_rows(source, drops=drops, **kwargs))
    drops.update(converted)
    drops.report(f"{name} ({source})", len(records))
    return records, drops


def load_xlam(source: str | Sequence[str] = XLAM_HUB, **kwargs) -> tuple[list[ToolRecord], DropCounts]:
    return _load(xlam.convert_rows, "xlam", source, **kwargs)


def load_toolace(source: str | Sequence[str] = TOOLACE_HUB, **kwargs) -> tuple[list[ToolRecord], DropCounts]:
    return _load(toolace.convert_rows, "toolace", source, **kwargs)


def load_tool_n1_mix(
    xlam_source: str | Sequence[str] | None = XLAM_HUB,
    toolace_source: str | Sequence[str] | None = TOOLACE_HUB,
    **kwargs,
) -> tuple[list[ToolRecord], DropCounts]:
    """The paper's training pool: xLAM + ToolACE records (either source may be None)."""
    records, drops = [], DropCounts()
    for loader, source, name in ((load_xlam, xlam_source, "xlam"), (load_toolace, toolace_source, "toolace")):
        if source is None:
            continue
        got, dropped = loader(source, **kwargs)
        records.extend(got)
        drops.update({f"{name}/{k}": v for k, v in dropped.items()})
    return records, drops
