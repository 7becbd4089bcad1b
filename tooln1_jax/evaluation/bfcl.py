"""BFCL v3 scoring with the official AST checker (from `nvidia-bfcl`, called in-process) and the
leaderboard's aggregation.

A completion is parsed like this: the FIRST `<tool_call>` block (`rewards.parse_tool_calls`),
turned into BFCL's `[{name: {arg: value}}]`. Then, as in the package's `eval_runner.py`:
- AST categories: no decodable block -> `ast_decoder:decoder_failed`; not a list of
  `{name: {args}}` -> `ast_decoder:decoder_wrong_output_format`; else `ast_checker(...)`.
- irrelevance / live_irrelevance: correct when there is no call (no block, bad JSON, `[]`, or
  anything `bfcl.utils.is_empty_output` calls empty); live_relevance: correct when there is one.

Prompts: BFCL's own generation pipeline rewrites the tool docs of every prompt-based model
(`func_doc_language_specific_pre_processing`: a language hint in each description; Java and
JavaScript parameters become "string" typed, since the checker wants their values as Java / JS
source text such as "true" or "new int[]{1, 2}"). `prompt_tools` does the same, so a model sees
what BFCL-evaluated models see. The data records (`tooln1_jax.data.bfcl`) keep the docs as shipped.

Aggregation mirrors `generate_leaderboard_csv` in `bfcl/eval_checker/eval_runner_helper.py`
(that module cannot be imported without the package's many optional SDKs, so its two small
averaging functions are mirrored here, and a test checks them against the package source).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from tooln1_jax.data.bfcl import AST_CATEGORIES, BfclItem, load_category, possible_answer_calls, to_record
from tooln1_jax.data.records import ToolRecord, tool_call_block
from tooln1_jax.rewards import parse_tool_calls

# The paper's eight AST categories (simple = Python simple; java and javascript join it in the
# leaderboard's "Simple"), then the extras.
PAPER_CATEGORIES = AST_CATEGORIES
EXTRA_CATEGORIES = ("irrelevance", "live_irrelevance", "live_relevance")
ALL_CATEGORIES = PAPER_CATEGORIES + EXTRA_CATEGORIES
# Not in UNDERSCORE_TO_DOT, so the checker keeps dotted function names as they are.
CHECKER_MODEL_NAME = "tooln1_jax"

SIMPLE_COVERS = ("simple", "java", "javascript")
NON_LIVE_COVERS = ("simple[python,java,javascript]", "multiple", "parallel", "parallel_multiple")
LIVE_COVERS = ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple")
LIVE_LEADERBOARD_COVERS = LIVE_COVERS + ("live_irrelevance", "live_relevance")


def checker() -> tuple[Callable, Callable, Callable]:
    """`(ast_checker, is_empty_output, is_function_calling_format_output)` from `nvidia-bfcl`.
    Imported on use, not with this module: the base install lacks the package, and API-Bank and
    the BFCL prompt helpers work without it. Raises ModuleNotFoundError (name "bfcl...") without it."""
    from bfcl.eval_checker.ast_eval.ast_checker import ast_checker
    from bfcl.utils import is_empty_output, is_function_calling_format_output

    return ast_checker, is_empty_output, is_function_calling_format_output


def language_of(category: str) -> str:
    """The checker's `language` argument, chosen as `eval_runner.runner` does."""
    if "javascript" in category:
        return "JavaScript"
    if "java" in category:
        return "Java"
    return "Python"


# ---- prompts -----------------------------------------------------------------------------------


def _language_hint(category: str) -> str:
    if category == "java":
        return " Note that the provided function is in Java 8 SDK syntax."
    if category == "javascript":
        return " Note that the provided function is in JavaScript syntax."
    return " Note that the provided function is in Python 3 syntax."


def prompt_tools(functions: Sequence[dict], category: str) -> list[dict]:
    """The tool docs as BFCL's prompt pipeline shows them (a copy; the input is not modified):
    same rules as `bfcl.model_handler.utils.func_doc_language_specific_pre_processing`."""
    functions = copy.deepcopy(list(functions))
    language = {"java": "Java", "javascript": "JavaScript"}.get(category)
    for doc in functions:
        doc["description"] = (doc.get("description") or "") + _language_hint(category)
        if language is None:
            continue
        for param in doc.get("parameters", {}).get("properties", {}).values():
            ptype = param.get("type")
            param["description"] = param.get("description") or ""
            if ptype == "any":
                param["description"] += (
                    f" This parameter can be of any type of {language} object in string representation."
                )
            else:
                param["description"] += f" This is {language} {ptype} type parameter in string representation."
            if ptype in (("ArrayList", "Array") if language == "Java" else ("array",)):
                element_type = (param.pop("items", None) or {}).get("type")
                param["description"] += (
                    f" The list elements are of type {element_type}; they are not in string representation."
                )
            if language == "JavaScript" and ptype == "dict" and "properties" in param:
                param["description"] += (
                    " The dictionary entries have the following schema; they are not "
                    f"in string representation. {json.dumps(param['properties'])}"
                )
                del param["properties"]
            param["type"] = "string"
    return functions


def prompt_record(item: BfclItem, *, bfcl_tool_docs: bool = True) -> ToolRecord:
    """The record a model is prompted with (render with `for_eval=True`). Tools: `prompt_tools`
    (BFCL's rewrite), or the docs as shipped with `bfcl_tool_docs=False`. Its `answer` is the
    oracle (first checker-accepted values) for reference only; scoring uses the checker."""
    answer = (
        []
        if item.ground_truth is None
        else (possible_answer_calls(item.ground_truth, strict=False, functions=item.functions) or [])
    )
    record = to_record(item, answer)
    if not bfcl_tool_docs:
        return record
    return dataclasses.replace(record, tools=prompt_tools(item.functions, item.category))


def load_items(
    categories: Iterable[str] = ALL_CATEGORIES, *, limit: int | None = None
) -> tuple[dict[str, list[BfclItem]], dict[str, dict]]:
    """{category: items} (the first `limit` of each when given), and the id quirks found:
    {category: {"id_mismatches": [...], "renamed_duplicates": [...]}}."""
    items, quirks = {}, {}
    for category in categories:
        if category not in ALL_CATEGORIES:
            raise ValueError(f"unknown BFCL category {category!r}; expected some of {ALL_CATEGORIES}")
        loaded = load_category(category)
        items[category] = loaded.items[:limit] if limit else loaded.items
        if loaded.id_mismatches or loaded.renamed_duplicates:
            quirks[category] = {"id_mismatches": loaded.id_mismatches, "renamed_duplicates": loaded.renamed_duplicates}
    return items, quirks


# ---- scoring ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ItemResult:
    id: str
    category: str
    valid: bool
    calls: list | None  # BFCL form [{name: {arg: value}}]; None when nothing decodable was found
    error_type: str | None  # the checker's own error type (None when valid)
    error: str | None = None
    completion: str | None = None  # the text scored, so a failure shows what the model wrote

    def to_dict(self) -> dict:
        """The fields, not deep-copied (`dataclasses.asdict` recurses into `calls`, which a model
        can nest as deep as `json` parses)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def completion_to_bfcl(completion: str) -> tuple[list | None, str | None]:
    """The first `<tool_call>` block -> (BFCL calls `[{name: arguments}]`, None), or
    (None, why) when there is no block or its JSON is not a list of {name, arguments}."""
    calls = parse_tool_calls(completion, block="first")
    if calls is None:
        if not isinstance(completion, str) or "<tool_call>" not in completion:
            return None, "no <tool_call> block"
        return None, "first <tool_call> block is not JSON calls [{name, arguments}]"
    out = []
    for call in calls:
        name = call["name"]
        if not isinstance(name, str):  # an unhashable or odd name cannot be a BFCL key
            return None, f"function name {name!r} is not a string"
        out.append({name: call["arguments"]})
    return out, None


def score_item(item: BfclItem, completion: str) -> ItemResult:
    """One item's verdict, as the package's file runners give it, carrying the completion.
    Never raises on model text."""
    return dataclasses.replace(_verdict(item, completion), completion=completion)


def _verdict(item: BfclItem, completion: str) -> ItemResult:
    ast_checker, is_empty_output, is_function_calling_format_output = checker()
    calls, why = completion_to_bfcl(completion)
    if item.category in EXTRA_CATEGORIES:
        has_call = calls is not None and not is_empty_output(calls)
        if "irrelevance" in item.category:
            ok, err = not has_call, "irrelevance_error:decoder_success"
        else:
            ok, err = has_call, "relevance_error:decoder_failed"
        return ItemResult(item.id, item.category, ok, calls, None if ok else err, None if ok else why)
    if calls is None:
        return ItemResult(item.id, item.category, False, None, "ast_decoder:decoder_failed", why)
    if not is_function_calling_format_output(calls):
        return ItemResult(
            item.id,
            item.category,
            False,
            calls,
            "ast_decoder:decoder_wrong_output_format",
            "arguments must be a JSON object",
        )
    try:
        verdict = ast_checker(
            item.functions, calls, item.ground_truth, language_of(item.category), item.category, CHECKER_MODEL_NAME
        )
    except Exception as e:  # the checker trusts its input types; odd model values can crash it
        return ItemResult(item.id, item.category, False, calls, f"checker_exception:{type(e).__name__}", str(e))
    if verdict["valid"]:
        return ItemResult(item.id, item.category, True, calls, None)
    error = verdict.get("error")
    return ItemResult(
        item.id,
        item.category,
        False,
        calls,
        verdict.get("error_type", "unknown"),
        json.dumps(error, default=str)[:2000] if error else None,
    )


# ---- aggregation (mirrors eval_runner_helper.calculate_*_accuracy) ------------------------------


def calculate_weighted_accuracy(accuracy_dict_list: Sequence[dict], display_na_if_category_missing=True) -> dict:
    """Mean weighted by `total_count`; entries: {"accuracy", "total_count", "display_accuracy"}."""
    has_na = any(d["display_accuracy"] == "N/A" for d in accuracy_dict_list)
    total_count = sum(d["total_count"] for d in accuracy_dict_list)
    if total_count == 0:
        result = {"accuracy": 0, "total_count": 0}
    else:
        result = {
            "accuracy": sum(d["accuracy"] * d["total_count"] for d in accuracy_dict_list) / total_count,
            "total_count": total_count,
        }
    result["display_accuracy"] = "N/A" if (has_na and display_na_if_category_missing) else result["accuracy"]
    return result


def calculate_unweighted_accuracy(accuracy_dict_list: Sequence[dict], display_na_if_category_missing=True) -> dict:
    """Plain mean of the accuracies (a missing category counts as 0 and marks the result N/A)."""
    has_na = any(d["display_accuracy"] == "N/A" for d in accuracy_dict_list)
    result = {
        "accuracy": sum(d["accuracy"] for d in accuracy_dict_list) / len(accuracy_dict_list),
        "total_count": sum(d["total_count"] for d in accuracy_dict_list),
    }
    result["display_accuracy"] = "N/A" if (has_na and display_na_if_category_missing) else result["accuracy"]
    return result


def _entry(scores: dict[str, dict], category: str) -> dict:
    """`get_category_score`: an evaluated category, or accuracy 0 marked N/A when missing."""
    if category in scores:
        s = scores[category]
        return {"accuracy": s["accuracy"], "total_count": s["total"], "display_accuracy": s["accuracy"]}
    return {"accuracy": 0, "total_count": 0, "display_accuracy": "N/A"}


def _summary(result: dict, covers: Sequence[str], how: str) -> dict:
    acc = result["display_accuracy"]
    return {
        "accuracy": None if acc == "N/A" else round(acc, 2),
        "total": result["total_count"],
        "covers": list(covers),
        "how": how,
    }


def summarize(scores: dict[str, dict]) -> dict:
    """Leaderboard summaries from per-category `{"accuracy": percent, "total": n}`.

    non_live_simple: mean of simple (Python), java, javascript; non_live: unweighted mean of
    that, multiple, parallel, parallel_multiple (the leaderboard's "Non-Live AST Summary");
    live: count-weighted mean of the four live AST categories ("Live AST Summary");
    live_leaderboard: the leaderboard's "Overall Live", which also weighs in live_irrelevance
    and live_relevance; overall: mean of non_live and live (the paper's "Overall").
    A summary with a category missing is None (the leaderboard prints N/A)."""
    simple = calculate_unweighted_accuracy([_entry(scores, c) for c in SIMPLE_COVERS])
    non_live = calculate_unweighted_accuracy(
        [simple] + [_entry(scores, c) for c in ("multiple", "parallel", "parallel_multiple")]
    )
    live = calculate_weighted_accuracy([_entry(scores, c) for c in LIVE_COVERS])
    live_lb = calculate_weighted_accuracy([_entry(scores, c) for c in LIVE_LEADERBOARD_COVERS])
    overall = calculate_unweighted_accuracy([non_live, live])
    return {
        "non_live_simple": _summary(simple, SIMPLE_COVERS, "unweighted mean"),
        "non_live": _summary(non_live, NON_LIVE_COVERS, "unweighted mean"),
        "live": _summary(live, LIVE_COVERS, "mean weighted by item count"),
        "live_leaderboard": _summary(live_lb, LIVE_LEADERBOARD_COVERS, "mean weighted by item count"),
        "overall": _summary(overall, ("non_live", "live"), "unweighted mean"),
    }


def category_scores(results: Iterable[ItemResult]) -> dict[str, dict]:
    """{category: {"accuracy": percent, "correct", "total"}} in `ALL_CATEGORIES` order."""
    counts: dict[str, list[int]] = {}
    for r in results:
        c = counts.setdefault(r.category, [0, 0])
        c[0] += int(r.valid)
        c[1] += 1
    return {
        cat: {
            "accuracy": round(100.0 * counts[cat][0] / counts[cat][1], 2) if counts[cat][1] else 0.0,
            "correct": counts[cat][0],
            "total": counts[cat][1],
        }
        for cat in ALL_CATEGORIES
        if cat in counts
    }


# ---- oracle completions (tests and sanity checks) -----------------------------------------------


def _java_source(value: Any, ptype: str, nested: str | None = None) -> str:
    """A possible-answer value as Java source text that `java_type_converter` reads back."""
    if isinstance(value, str):  # String / any, or a variable name standing for the value
        return value
    if ptype == "boolean":
        return "true" if value else "false"
    if ptype == "long":
        return f"{int(value)}L"
    if ptype == "float":
        return f"{value}f"
    if ptype in ("Array", "ArrayList"):
        # The ArrayList reader strips the quotes of String elements; the Array reader keeps them.
        quote = ptype == "ArrayList" and nested == "String"
        parts = [f'"{v}"' if quote else _java_source(v, nested or "any") for v in value]
        if ptype == "Array":
            return "new %s[]{%s}" % (nested or "Object", ", ".join(parts))
        return "new ArrayList<>(Arrays.asList(%s))" % ", ".join(parts)
    if ptype == "HashMap":
        puts = " ".join(f'put("{k}", {json.dumps(v)});' for k, v in value.items())
        return "new HashMap<String, Object>() {{ %s }}" % puts
    return json.dumps(value) if not isinstance(value, (int, float)) else str(value)


def _js_source(value: Any, ptype: str) -> str:
    """A possible-answer value as JavaScript source text that `js_type_converter` reads back."""
    if isinstance(value, str):
        return value
    if ptype == "Boolean" or isinstance(value, bool):
        return "true" if value else "false"
    if ptype == "Bigint":
        return f"{int(value)}n"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value)


def oracle_completion(item: BfclItem, reasoning: str = "oracle") -> str:
    """A completion the checker accepts when the data allows one: the first accepted values
    (Java / JavaScript values written as source text); `[]` for irrelevance items; any real
    call for live_relevance (the first tool, no arguments)."""
    if item.ground_truth is None:
        calls = [] if "irrelevance" in item.category else [{"name": item.functions[0]["name"], "arguments": {}}]
        return f"<think>{reasoning}</think>\n{tool_call_block(calls)}"
    calls = possible_answer_calls(item.ground_truth, strict=False, functions=item.functions) or []
    language = language_of(item.category)
    if language != "Python":
        docs = {f["name"]: f["parameters"]["properties"] for f in item.functions}
        for call in calls:
            props = docs.get(call["name"], {})
            for key, value in call["arguments"].items():
                spec = props.get(key, {})
                if language == "Java":
                    nested = spec.get("items", {}).get("type")
                    call["arguments"][key] = _java_source(value, spec.get("type", "any"), nested)
                else:
                    call["arguments"][key] = _js_source(value, spec.get("type", "any"))
    return f"<think>{reasoning}</think>\n{tool_call_block(calls)}"
