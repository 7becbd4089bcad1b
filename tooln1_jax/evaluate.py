"""Evaluate a model, or a file of its outputs, on BFCL v3 or API-Bank level-1.

    python -m tooln1_jax.evaluate bfcl --checkpoint PATH [--limit N] [--categories simple java ...]
    python -m tooln1_jax.evaluate api_bank --predictions FILE [--data level-1-api.json]

Generation (`--checkpoint`: an HF folder, or a training run's orbax checkpoint) decodes greedily
in batches through the project's sampler; scoring (`--predictions`) reads JSON lines
`{"id", "completion"}` made anywhere (ids: BFCL's own, API-Bank `<file stem>:<id>`).
`--output DIR` (default `eval_<benchmark>_<UTC time>`) receives summary.json, summary.md and
results.jsonl (each item's verdict and completion; plus predictions.jsonl when generating); the table
is printed at the end. BFCL needs `nvidia-bfcl` (not in the base install); API-Bank does not.
Generation runs on every device; with `--distributed` it runs as one process per host (all
with the same arguments), each process scores every item, and process 0 writes the files.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

from tooln1_jax import distributed
from tooln1_jax.data.bfcl import KNOWN_CATEGORIES
from tooln1_jax.evaluation import api_bank, bfcl
from tooln1_jax.evaluation.generation import generate_completions, is_hf_folder, load_model
from tooln1_jax.evaluation.predictions import read_predictions
from tooln1_jax.sharding import make_mesh

DEFAULT_API_BANK = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "api-bank", "level-1-api.json"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tooln1_jax.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("benchmark", choices=("bfcl", "api_bank"))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="HF folder or orbax run/checkpoint folder to generate with")
    src.add_argument("--predictions", help="JSONL of {id, completion} to score")
    p.add_argument("--limit", type=int, default=None, help="first N items of each category (BFCL) or of the file")
    p.add_argument(
        "--categories", nargs="+", default=None, help=f"BFCL categories (default: all of {' '.join(KNOWN_CATEGORIES)})"
    )
    p.add_argument("--data", default=None, help="API-Bank level-1-api.json (default: ../shared/data/api-bank/)")
    p.add_argument("--output", default=None, help="output folder (default: a new timestamped one)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--max-prompt-length", type=int, default=4096)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint folder)")
    p.add_argument("--step", type=int, default=None, help="orbax checkpoint step (default: latest)")
    p.add_argument(
        "--tool-docs",
        choices=("bfcl", "raw"),
        default="bfcl",
        help="BFCL prompts: tool docs as BFCL's pipeline rewrites them (language hints; Java/JS "
        "parameters as strings), or exactly as shipped",
    )
    p.add_argument("--no-progress", action="store_true")
    distributed.add_arguments(p)
    return p


# ---- the two benchmarks as (records, scorer, summary) ------------------------------------------


def _require_bfcl_checker() -> None:
    """BFCL needs `nvidia-bfcl` (its data and official checker), which the base install lacks:
    when it is missing, one line says what to install, before any work."""
    try:
        bfcl.checker()
    except ModuleNotFoundError as e:
        if e.name != "bfcl" and not (e.name or "").startswith("bfcl."):
            raise
        raise SystemExit(
            "error: BFCL needs the package 'nvidia-bfcl' (its data and official checker): "
            "pip install --no-deps nvidia-bfcl==26.3"
        ) from e


def _bfcl_task(args) -> tuple[list, Callable, Callable, dict]:
    _require_bfcl_checker()
    categories = args.categories or list(bfcl.ALL_CATEGORIES)
    items, quirks = bfcl.load_items(categories, limit=args.limit)
    flat = [it for cat in categories for it in items[cat]]
    by_id = {it.id: it for it in flat}
    records = [bfcl.prompt_record(it, bfcl_tool_docs=args.tool_docs == "bfcl") for it in flat]

    def score(item_id: str, completion: str | None, missing: str):
        item = by_id[item_id]
        if completion is None:
            return bfcl.ItemResult(item.id, item.category, False, None, missing)
        return bfcl.score_item(item, completion)

    def summarize(results) -> dict:
        per_cat = bfcl.category_scores(results)
        return {**per_cat, **bfcl.summarize(per_cat)}

    meta = {"categories": categories, "tool_docs": args.tool_docs, "data_id_quirks": quirks}
    return records, score, summarize, meta


def _api_bank_task(args) -> tuple[list, Callable, Callable, dict]:
    path = args.data or os.path.normpath(DEFAULT_API_BANK)
    items = api_bank.load_api_bank(path)
    if args.limit:
        items = items[: args.limit]
    by_id = api_bank.items_by_id(items)
    records = [api_bank.prompt_record(it) for it in items]

    def score(item_id: str, completion: str | None, missing: str):
        item = by_id[item_id]
        if completion is None:
            return api_bank.ApiBankResult(item.id, item.multi_turn, False, None, missing)
        return api_bank.score_item(item, completion)

    return records, score, api_bank.summarize, {"data": os.path.abspath(path)}


# ---- output -------------------------------------------------------------------------------------


def _table(summary: dict) -> str:
    rows = ["| name | accuracy | correct / total | covers |", "|---|---|---|---|"]
    for name, v in summary.items():
        if not isinstance(v, dict) or "accuracy" not in v:
            continue
        acc = "N/A" if v["accuracy"] is None else f"{v['accuracy']:.2f}"
        count = f"{v['correct']} / {v['total']}" if "correct" in v else f"({v['total']} items)"
        covers = v.get("covers", "")
        covers = ", ".join(covers) if isinstance(covers, list) else covers
        how = f" ({v['how']})" if "how" in v else ""
        rows.append(f"| {name} | {acc} | {count} | {covers}{how} |")
    return "\n".join(rows)


def _write(out_dir: str, results: list, summary: dict, completions: dict | None) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.jsonl"), "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r.to_dict(), ensure_ascii=False, default=str) + "\n")
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False, default=str)
    notes = summary.get("run", {})
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(f"# {notes.get('benchmark')} evaluation\n\n{_table(summary)}\n\n")
        f.write("```json\n" + json.dumps(notes, indent=2, default=str) + "\n```\n")
    if completions is not None:
        with open(os.path.join(out_dir, "predictions.jsonl"), "w", encoding="utf-8") as f:
            for item_id, completion in completions.items():
                f.write(json.dumps({"id": item_id, "completion": completion}, ensure_ascii=False) + "\n")


def _generate(args, records) -> tuple[dict[str, str], dict]:
    tok_dir = args.tokenizer or args.checkpoint
    if not args.tokenizer and not is_hf_folder(args.checkpoint):
        raise SystemExit("--tokenizer is required with an orbax checkpoint (it holds no tokenizer files)")
    from transformers import AutoTokenizer  # at its one point of use: it imports torch

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    mesh = make_mesh()
    config, params = load_model(args.checkpoint, step=args.step, mesh=mesh)
    completions, drops = generate_completions(
        config,
        params,
        tokenizer,
        records,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        max_prompt_length=args.max_prompt_length,
        mesh=mesh,
        progress=not args.no_progress and distributed.is_main(),
    )
    return completions, dict(drops)


def run(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise SystemExit("--limit must be >= 1")
    distributed.initialize_from_args(args)
    out_dir = args.output or f"eval_{args.benchmark}_{datetime.datetime.now(datetime.UTC):%Y%m%d_%H%M%S}"
    # Fail in seconds, not after generating: the output folder must be writable.
    distributed.all_or_none(
        "output setup", lambda: distributed.check_writable(out_dir, "--output") if distributed.is_main() else None
    )
    task = _bfcl_task if args.benchmark == "bfcl" else _api_bank_task
    records, score, summarize, meta = task(args)
    ids = [r.id for r in records]
    run_notes: dict[str, Any] = {
        "benchmark": "bfcl_v3" if args.benchmark == "bfcl" else "api_bank_level1_call",
        "limit": args.limit,
        **meta,
    }
    generated = None
    if args.predictions:
        preds = read_predictions(args.predictions, ids)
        completions = preds.completions
        run_notes.update(
            mode="scoring",
            predictions=os.path.abspath(args.predictions),
            skipped_lines=dict(preds.skipped),
            problems=preds.problems,
        )
    else:
        completions, drops = _generate(args, records)
        generated = completions
        run_notes.update(
            mode="generation",
            checkpoint=os.path.abspath(args.checkpoint),
            prompt_drops=drops,
            max_new_tokens=args.max_new_tokens,
            decoding="greedy",
        )
    # An item without a completion is scored wrong, never dropped from the totals.
    missing_reason = "missing_prediction" if args.predictions else "prompt_too_long"
    results = [score(i, completions.get(i), missing_reason) for i in ids]
    missing = Counter(r.error_type for r in results)[missing_reason]
    run_notes[missing_reason] = missing
    summary = {**summarize(results), "run": run_notes}
    if not distributed.is_main():
        return summary
    _write(out_dir, results, summary, generated)
    print(_table(summary))
    for line in run_notes.get("problems", [])[:10]:
        print("skipped:", line, file=sys.stderr)
    if missing:
        print(f"warning: {missing} items had no completion ({missing_reason}) and are scored wrong", file=sys.stderr)
    print(f"wrote {os.path.abspath(out_dir)}/summary.json, summary.md, results.jsonl")
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except (ValueError, OSError) as e:  # bad input files or folders: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
