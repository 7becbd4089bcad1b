"""The unified tool-calling record every source converts into, drop counting, and the split."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ToolRecord:
    """One training / evaluation sample.

    source: dataset name ("xlam", "toolace", "bfcl", "synthetic", ...); id: unique within source;
    system: the dataset's own system text ("" if none); tools: tool schemas
    (`{name, description, parameters}`); conversations: `{role, content}` turns before the call
    (user / assistant / tool); answer: the expected calls, `[{"name", "arguments"}]`.
    """

    source: str
    id: str
    system: str
    tools: list[dict]
    conversations: list[dict]
    answer: list[dict]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> ToolRecord:
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in row]
        if missing:
            raise KeyError(f"record {row.get('id', '?')!r} lacks fields {missing}")
        return cls(
            source=str(row["source"]),
            id=str(row["id"]),
            system=str(row["system"] or ""),
            tools=list(row["tools"]),
            conversations=list(row["conversations"]),
            answer=list(row["answer"]),
        )


class DropCounts(Counter):
    """Counted skips by reason (`counts["no_tools"] += 1`). `report()` logs, prints and returns a line."""

    def report(self, what: str, kept: int, echo: bool = True) -> str:
        total = kept + sum(self.values())
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.items())) or "none"
        line = f"{what}: kept {kept} of {total}; dropped: {reasons}"
        logger.info(line)
        if echo:
            print(line, flush=True)
        return line

    def merged(self, other: DropCounts) -> DropCounts:
        out = DropCounts(self)
        out.update(other)
        return out


def unknown_tool_names(answer: Iterable[dict], tools: Sequence[dict]) -> list[str]:
    """Names in `answer` that no tool in `tools` defines (the paper's filter)."""
    names = {t.get("name") for t in tools if isinstance(t, dict)}
    return [c.get("name") for c in answer if c.get("name") not in names]


def train_val_split(records: Sequence[Any], seed: int, val_fraction: float = 0.1) -> tuple[list, list]:
    """Seeded shuffle, then the first `round(n * val_fraction)` go to validation.
    Returns (train, val); the same seed and input give the same split."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(records) * val_fraction))
    val = [records[i] for i in order[:n_val]]
    train = [records[i] for i in order[n_val:]]
    return train, val


def tool_call_block(calls: Sequence[dict]) -> str:
    """`<tool_call>\\n[...]\\n</tool_call>`: calls as one JSON list, the Tool-N1 answer format."""
    body = json.dumps([{"name": c["name"], "arguments": c["arguments"]} for c in calls], ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"
