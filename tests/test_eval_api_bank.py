"""API-Bank level-1 (call mode): parsing the expected requests with `ast` literals, prompts,
exact-match scoring on oracle and perturbed completions, and the CLI on prediction files."""

import ast
import json
import os

import pytest

from tooln1_jax.data.prompt import build_messages
from tooln1_jax.evaluation import api_bank

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "api-bank", "level-1-api.json")


def score_argv(predictions, limit: int, output) -> list[str]:
    """`evaluate api_bank` scoring a predictions file against the first `limit` items."""
    return [
        "api_bank",
        "--predictions",
        str(predictions),
        "--data",
        DATA,
        "--limit",
        str(limit),
        "--output",
        str(output),
    ]


@pytest.fixture(scope="module")
def items():
    return api_bank.load_api_bank(DATA)


def test_loads_all_items_and_the_multi_turn_split(items):
    assert len(items) == 399
    assert len({i.id for i in items}) == 399
    multi = [i for i in items if i.multi_turn]
    assert len(multi) == 187
    # the rule picks exactly the calls that are not the first of their dialogue
    assert all(not i.id.endswith(":0") for i in multi)
    assert all(i.id.endswith(":0") for i in items if not i.multi_turn)


def test_parse_api_request():
    assert api_bank.parse_api_request("API-Request: [ToolSearcher(keywords='bank, token', n=3)]") == (
        "ToolSearcher",
        {"keywords": "bank, token", "n": 3},
    )
    assert api_bank.parse_api_request("[A(x=\"it's\")]->{'ok': 1}") == ("A", {"x": "it's"})
    # the dataset's quoted list literal with clashing inner quotes
    name, args = api_bank.parse_api_request(
        "API-Request: [RecordHealthData(user_id='1', health_data='[{'name': 'bp', 'value': '120/80'}]', t='x')]"
    )
    assert name == "RecordHealthData" and args["user_id"] == "1" and args["t"] == "x"
    assert api_bank.canonical_value(args["health_data"]) == [{"name": "bp", "value": "120/80"}]
    # never evaluated: calls and names are not literals
    assert api_bank.parse_api_request("[A(x=__import__('os').system('echo hi'))]") is None
    assert api_bank.parse_api_request("[A(x=y)]") is None
    assert api_bank.parse_api_request("no request here") is None
    assert api_bank.parse_api_request(None) is None


def test_every_expected_request_parses_to_strings(items):
    assert all(isinstance(i.expected_name, str) and isinstance(i.expected_arguments, dict) for i in items)
    assert sum(not i.expected_arguments for i in items) == 6  # GetToday() takes no arguments
    assert all(isinstance(v, str) for i in items for v in i.expected_arguments.values())
    rows = json.load(open(DATA))
    quirky = []
    for item, row in zip(items, rows):
        try:
            ast.parse(row["expected_output"][len("API-Request: ") :], mode="eval")
        except SyntaxError:
            quirky.append(item)
    # 31 requests quote a list literal that has quotes inside; each still splits into its keys,
    # and the quoted list keeps its structure
    assert len(quirky) == 31
    for item in quirky:
        listy = [v for v in item.expected_arguments.values() if v.startswith("[")]
        assert listy and all(isinstance(api_bank.canonical_value(v), list) for v in listy)


def test_prompt_record(items):
    item = next(i for i in items if i.multi_turn)
    record = api_bank.prompt_record(item)
    assert record.system == "The current year is 2023."
    assert {t["name"] for t in record.tools} == {a["name"] for a in item.apis}
    assert all(set(t) == {"name", "description", "parameters"} for t in record.tools)
    roles = [t["role"] for t in record.conversations]
    assert roles[0] == "user" and "tool" in roles
    earlier_call = record.conversations[roles.index("tool") - 1]["content"]
    assert earlier_call.startswith("<tool_call>") and earlier_call.endswith("</tool_call>")
    messages = build_messages(record, for_eval=True)
    assert "<tool_call>[]</tool_call>" in messages[0]["content"]
    assert not any("Generate API Request" in m["content"] for m in messages)


def test_oracle_scores_100_and_perturbations_0(items):
    summary = api_bank.summarize([api_bank.score_item(i, api_bank.oracle_completion(i)) for i in items])
    assert summary["api_bank"] == {
        "accuracy": 100.0,
        "correct": 212,
        "total": 212,
        "covers": "items whose dialogue has no earlier API call",
    }
    assert summary["api_bank_all"]["correct"] == 399

    def perturbed(item, how):
        call = {"name": item.expected_name, "arguments": dict(item.expected_arguments)}
        if how in ("wrong_value", "missing_argument") and not call["arguments"]:
            call["arguments"]["unexpected"] = "x"  # GetToday(): the only way to get its arguments wrong
        elif how == "wrong_value":
            key = sorted(call["arguments"])[0]
            call["arguments"][key] = str(call["arguments"][key]) + "x"
        elif how == "wrong_name":
            call["name"] += "X"
        elif how == "missing_argument":
            call["arguments"].pop(sorted(call["arguments"])[0])
        calls = [] if how == "missing_call" else [call]
        body = json.dumps(calls)
        if how == "broken_json":
            body = body[:-1]
        return f"<think>x</think><tool_call>{body}</tool_call>"

    for how in ("wrong_value", "wrong_name", "missing_argument", "missing_call", "broken_json"):
        results = [api_bank.score_item(i, perturbed(i, how)) for i in items]
        assert sum(r.valid for r in results) == 0, how
    # two calls where one is expected is wrong too
    item = items[0]
    two = api_bank.oracle_completion(item).replace(
        "]\n</tool_call>",
        ", " + json.dumps({"name": item.expected_name, "arguments": item.expected_arguments}) + "]\n</tool_call>",
    )
    assert api_bank.score_item(item, two).error_type == "wrong_call_count"


def test_value_forms(items):
    item = next(i for i in items if "health_data" in i.expected_arguments)
    structured = dict(item.expected_arguments)
    structured["health_data"] = api_bank.canonical_value(structured["health_data"])  # a real JSON list
    text = f"<tool_call>{json.dumps([{'name': item.expected_name, 'arguments': structured}])}</tool_call>"
    assert api_bank.score_item(item, text).valid
    # API-Bank writes numbers and booleans as strings: a JSON number / bool matches its Python text
    assert api_bank.canonical_value(3) == api_bank.canonical_value("3")
    assert api_bank.canonical_value(True) == api_bank.canonical_value("True")
    assert api_bank.canonical_value("true") != api_bank.canonical_value("True")
    assert api_bank.canonical_value("3.0") != api_bank.canonical_value(3)


def test_cli_predictions(items, tmp_path, capsys):
    from tooln1_jax.evaluate import main

    rows = [json.dumps({"id": i.id, "completion": api_bank.oracle_completion(i)}) for i in items[:30]]
    rows[3] = json.dumps({"id": items[3].id, "completion": "no call"})
    rows.append("garbage line")
    (tmp_path / "p.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert main(score_argv(tmp_path / "p.jsonl", 40, out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    first_call = [i for i in items[:40] if not i.multi_turn]
    assert summary["api_bank"]["total"] == len(first_call)
    assert summary["api_bank_all"] == {"accuracy": 72.5, "correct": 29, "total": 40, "covers": "all items"}
    assert summary["run"]["missing_prediction"] == 10
    assert summary["run"]["skipped_lines"] == {"non_json_line": 1}
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(results) == 40 and results[3]["error_type"] == "no_valid_tool_call"
    # each line carries the text scored (None where there was no prediction), next to its verdict
    written = {json.loads(r)["id"]: json.loads(r)["completion"] for r in rows[:30]}
    assert results[3]["completion"] == "no call"
    assert [r["completion"] for r in results] == [written.get(i.id) for i in items[:40]]
    assert "api_bank_all" in capsys.readouterr().out
    assert main(["api_bank", "--predictions", str(tmp_path / "p.jsonl"), "--data", str(tmp_path / "none.json")]) == 2


def test_bad_data_file_names_the_item(tmp_path):
    rows = json.load(open(DATA))[:3]
    rows[1]["expected_output"] = "API-Request: nothing"
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"d.json: item 1: cannot parse expected_output"):
        api_bank.load_api_bank(str(tmp_path / "d.json"))


def test_api_bank_needs_no_nvidia_bfcl(items, tmp_path, monkeypatch):
    """`nvidia-bfcl` is not in the base install: API-Bank scoring works without it, and BFCL says
    in one line what to install."""
    import sys

    import tooln1_jax.evaluation
    from tooln1_jax.evaluate import main

    # `import bfcl` (and of any submodule) fails as if the package were not installed
    for name in [m for m in sys.modules if m == "bfcl" or m.startswith("bfcl.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bfcl", None)
    monkeypatch.delitem(sys.modules, "tooln1_jax.evaluation.bfcl", raising=False)
    monkeypatch.delattr(tooln1_jax.evaluation, "bfcl", raising=False)
    (tmp_path / "p.jsonl").write_text(
        json.dumps({"id": items[0].id, "completion": api_bank.oracle_completion(items[0])})
    )
    assert main(score_argv(tmp_path / "p.jsonl", 1, tmp_path / "out")) == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["api_bank_all"]["correct"] == 1
    with pytest.raises(SystemExit, match=r"pip install --no-deps nvidia-bfcl"):
        main(["bfcl", "--predictions", str(tmp_path / "p.jsonl"), "--output", str(tmp_path / "b")])


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty file, no API-Bank items"),
        ("[]", "no API-Bank items"),
        ("\n\n", "empty file"),
        ('[{"file": "a.jsonl", "id": 0,\n "instruction": "x', r"line 2 column 17: not valid JSON .*truncated\?"),
        ("[5]", "item 0: a JSON int, not an item object"),
    ],
)
def test_unusable_data_file_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "level-1-api.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{path}: .*{message}"):
        api_bank.load_api_bank(str(path))
