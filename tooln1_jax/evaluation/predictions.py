"""Reading a prediction file made anywhere: JSON lines `{"id": ..., "completion": "..."}`.

Bad lines never crash a run and never pass silently: a line that is not JSON, not an object,
or lacks a string `id` / `completion` is skipped and counted (with its file:line in `problems`);
an id outside the evaluated set is counted as `unknown_id`; the same id twice with the same
completion is counted as `duplicate_id`, and with a different completion it is an error naming
both lines (there is no right answer to pick). Items with no prediction are scored wrong by the
caller and counted as `missing_prediction`.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Collection


@dataclasses.dataclass(frozen=True)
class Predictions:
    completions: dict[str, str]
    skipped: Counter  # reason -> count
    problems: list[str]  # "file:line: what", the first few of each kind


# Problem lines kept per skip reason.
_MAX_PROBLEMS = 20


def read_predictions(path: str, known_ids: Collection[str] | None = None) -> Predictions:
    known = set(known_ids) if known_ids is not None else None
    completions: dict[str, str] = {}
    first_line: dict[str, int] = {}
    skipped: Counter = Counter()
    problems: list[str] = []

    def skip(reason: str, line_no: int, what: str) -> None:
        skipped[reason] += 1
        if skipped[reason] <= _MAX_PROBLEMS:
            problems.append(f"{path}:{line_no}: {what}")

    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                skip("non_json_line", line_no, f"not JSON ({e})")
                continue
            if not isinstance(row, dict):
                skip("not_an_object", line_no, "not a JSON object")
                continue
            item_id, completion = row.get("id"), row.get("completion")
            if not isinstance(item_id, str) or not item_id:
                skip("missing_id", line_no, "no string 'id'")
                continue
            if not isinstance(completion, str):
                skip("missing_completion", line_no, f"id {item_id!r}: no string 'completion'")
                continue
            if known is not None and item_id not in known:
                skip("unknown_id", line_no, f"id {item_id!r} is not in the evaluated items")
                continue
            if item_id in completions:
                if completions[item_id] != completion:
                    raise ValueError(
                        f"{path}:{line_no}: id {item_id!r} appears again (first at line "
                        f"{first_line[item_id]}) with a different completion"
                    )
                skip("duplicate_id", line_no, f"id {item_id!r} repeats line {first_line[item_id]}")
                continue
            completions[item_id] = completion
            first_line[item_id] = line_no
    return Predictions(completions=completions, skipped=skipped, problems=problems)
