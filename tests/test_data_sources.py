"""xLAM and ToolACE fixtures (JSON, JSONL, parquet) -> unified records, with the drop counts."""

import json
import os

import pytest

from tooln1_jax.data import toolace, xlam
from tooln1_jax.data.records import DropCounts, ToolRecord, tool_call_block, train_val_split
from tooln1_jax.data.sources import DataFileError, load_rows, load_tool_n1_mix, load_toolace, load_xlam

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
XLAM_DROPS = {"no_tools": 2, "bad_answer": 1, "unknown_tool": 1, "no_query": 1}
TOOLACE_DROPS = {"no_tools": 1, "unparseable_call": 2, "no_call_turn": 1, "unknown_tool": 1}


def _parquet_copy(jsonl_name: str, tmp_path) -> str:
    """The JSONL fixture written as parquet (pyarrow infers the nested ToolACE turn structs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(os.path.join(FIXTURES, jsonl_name)) as f:
        rows = [json.loads(line) for line in f]
    path = str(tmp_path / jsonl_name.replace(".jsonl", ".parquet"))
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _source(kind: str, stem: str, tmp_path) -> str:
    if kind == "parquet":
        return _parquet_copy(f"{stem}.jsonl", tmp_path)
    return os.path.join(FIXTURES, f"{stem}.{kind}")


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet"])
def test_xlam_fixture_loads(kind, tmp_path, capsys):
    records, drops = load_xlam(_source(kind, "xlam_sample", tmp_path), cache_dir=str(tmp_path / "hf"))
    assert dict(drops) == XLAM_DROPS
    assert "xlam" in capsys.readouterr().out  # the drop counts are printed
    assert [r.id for r in records] == ["1", "2", "3"]
    first = records[0].to_dict()
    assert first["source"] == "xlam" and first["system"] == ""
    assert first["conversations"] == [{"role": "user", "content": "What's the weather in Paris for the next 3 days?"}]
    assert first["answer"] == [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]
    assert [t["name"] for t in first["tools"]] == ["get_weather", "convert_currency"]
    assert first["tools"][0]["parameters"]["days"] == {"type": "int", "description": "Days ahead", "default": 1}
    # parallel calls, including two calls to one function, in their order
    assert records[1].answer == [
        {"name": "convert_currency", "arguments": {"amount": 100.0, "from": "USD", "to": "EUR"}},
        {"name": "get_weather", "arguments": {"city": "Rome"}},
    ]
    assert records[2].answer == [
        {"name": "mean", "arguments": {"numbers": [1, 2, 3]}},
        {"name": "mean", "arguments": {"numbers": [4.5, 5.5]}},
    ]


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet"])
def test_toolace_fixture_loads(kind, tmp_path):
    records, drops = load_toolace(_source(kind, "toolace_sample", tmp_path), cache_dir=str(tmp_path / "hf"))
    assert dict(drops) == TOOLACE_DROPS
    assert [r.id for r in records] == ["0-1", "1-1", "2-1", "2-5"]
    assert all(
        r.source == "toolace" and [t["name"] for t in r.tools] == ["Get Weather", "Stock Price", "convert.currency"]
        for r in records
    )
    single, parallel, turn1, turn2 = records
    assert single.conversations == [{"role": "user", "content": "Weather in Paris for 3 days, please."}]
    assert single.answer == [{"name": "Get Weather", "arguments": {"city": "Paris", "days": 3}}]
    assert parallel.answer == [
        {"name": "Stock Price", "arguments": {"symbol": "AAPL", "history": [1, 2]}},
        {"name": "Get Weather", "arguments": {"city": "Oslo, Norway", "units": {"temp": "C"}, "detailed": True}},
        {"name": "convert.currency", "arguments": {"amount": -12.5, "to": "EUR"}},
    ]
    # multi-turn: one sample per call turn, earlier turns as context (call -> assistant, output -> tool)
    assert turn1.conversations == [{"role": "user", "content": "How is the weather in Rome?"}]
    assert turn1.answer == [{"name": "Get Weather", "arguments": {"city": "Rome"}}]
    assert turn2.conversations == [
        {"role": "user", "content": "How is the weather in Rome?"},
        {"role": "assistant", "content": tool_call_block([{"name": "Get Weather", "arguments": {"city": "Rome"}}])},
        {"role": "tool", "content": '[{"name": "Get Weather", "results": {"temp": 21}}]'},
        {"role": "assistant", "content": "It is 21 degrees in Rome."},
        {"role": "user", "content": "And the TSLA price history (days 1 to 3)?"},
    ]
    assert turn2.answer == [{"name": "Stock Price", "arguments": {"symbol": "TSLA", "history": [1, 2, 3]}}]
    # the kept system text is the role description, without ToolACE's tool list or call syntax
    assert single.system.startswith("You are an expert in composing functions.")
    assert "Here is a list of functions" not in single.system and "func_name1(" not in single.system
    assert "[{" not in single.system


def test_mix_prefixes_drop_reasons(tmp_path):
    records, drops = load_tool_n1_mix(
        os.path.join(FIXTURES, "xlam_sample.jsonl"),
        os.path.join(FIXTURES, "toolace_sample.jsonl"),
        cache_dir=str(tmp_path),
    )
    assert len(records) == 7 and {r.source for r in records} == {"xlam", "toolace"}
    assert drops["xlam/no_tools"] == 2 and drops["toolace/unparseable_call"] == 2
    assert sum(drops.values()) == sum(XLAM_DROPS.values()) + sum(TOOLACE_DROPS.values())


def test_load_rows_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="no .json"):
        load_rows(str(tmp_path))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="must all be .json/.jsonl or all .parquet"):
        load_rows([os.path.join(FIXTURES, "xlam_sample.jsonl"), str(tmp_path / "x.csv")])


# ---------------------------------------------------------------- unusable data files


def _xlam_rows(n):
    tools = json.dumps([{"name": "f", "parameters": {}}])
    return [
        {"id": i, "query": f"q{i}", "tools": tools, "answers": json.dumps([{"name": "f", "arguments": {"i": i}}])}
        for i in range(n)
    ]


def _fixture_text(name):
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("empty.jsonl", "", "empty.jsonl: empty file, no rows"),
        ("blank.json", " \n\n", "blank.json: empty file, no rows"),
        ("list.json", "[]", r"list.json: no rows \(an empty JSON list\)"),
        (
            "truncated.json",
            _fixture_text("xlam_sample.json")[:1500],
            r"truncated.json: line 12 column 14: not valid JSON \(Unterminated string starting at\); truncated\?",
        ),
        ("lines.jsonl", "not json\n[1, 2]\n", "lines.jsonl: no usable row; line 1: not JSON"),
        ("scalars.json", "[1, 2]", "scalars.json: no usable row; row 0: a int, not an object"),
        ("empty.parquet", "", "empty.parquet: not a readable parquet file"),
    ],
)
@pytest.mark.parametrize("loader", [load_xlam, load_toolace])
def test_unusable_file_is_one_clear_error(tmp_path, name, text, message, loader):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataFileError, match=message) as info:
        loader(str(path), cache_dir=str(tmp_path / "hf"))
    assert isinstance(info.value, ValueError) and str(path) in str(info.value)


def test_truncated_parquet_names_the_file(tmp_path):
    whole = _source("parquet", "xlam_sample", tmp_path)
    data = open(whole, "rb").read()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFileError, match=f"{cut}: not a readable parquet file"):
        load_xlam(str(cut), cache_dir=str(tmp_path / "hf"))


def test_bad_lines_among_good_ones_are_dropped_and_counted(tmp_path, capsys):
    lines = [json.dumps(r) for r in _xlam_rows(30)]
    lines.insert(15, '{"id": 99, "query": "broken')  # line 16, torn
    lines.insert(20, '["a list"]')  # line 21, JSON but not a row
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(RuntimeWarning, match=r"x.jsonl: dropped 2 bad row\(s\): line 16: not JSON .*; line 21: a list"):
        records, drops = load_xlam(str(path))
    assert [r.id for r in records] == [str(i) for i in range(30)]
    assert dict(drops) == {"bad_json_line": 1, "not_an_object": 1}
    assert "kept 30 of 32; dropped: bad_json_line=1, not_an_object=1" in capsys.readouterr().out
    # the same in a JSON list: a row that is not an object is dropped, named by its index
    (tmp_path / "x.json").write_text(json.dumps(_xlam_rows(3)[:2] + ["oops"] + _xlam_rows(3)[2:]))
    with pytest.warns(RuntimeWarning, match=r"x.json: dropped 1 bad row\(s\): row 2: a str"):
        records, drops = load_xlam(str(tmp_path / "x.json"))
    assert len(records) == 3 and dict(drops) == {"not_an_object": 1}


def test_mix_counts_bad_lines_per_source(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join([json.dumps(r) for r in _xlam_rows(3)] + ["{"]) + "\n")
    with pytest.warns(RuntimeWarning, match="x.jsonl: dropped 1 bad row"):
        records, drops = load_tool_n1_mix(str(path), os.path.join(FIXTURES, "toolace_sample.jsonl"))
    assert drops["xlam/bad_json_line"] == 1 and len(records) == 3 + 4


def test_hub_load_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError) as info:
        load_rows("Team-ACE/ToolACE")
    message = str(info.value)
    assert "\n" not in message and "Team-ACE/ToolACE" in message and "local" in message


# ---------------------------------------------------------------- ToolACE call syntax


@pytest.mark.parametrize(
    "text, expected",
    [
        ('[Get Weather(city="Paris", days=3)]', [{"name": "Get Weather", "arguments": {"city": "Paris", "days": 3}}]),
        (
            "[ Multi Word Name Here ( a = 1 ) , f() ]",
            [{"name": "Multi Word Name Here", "arguments": {"a": 1}}, {"name": "f", "arguments": {}}],
        ),
        (
            '[F(s=\'a, b) = [c]\', t="it\'s \\"q\\"")]',
            [{"name": "F", "arguments": {"s": "a, b) = [c]", "t": 'it\'s "q"'}}],
        ),
        (
            "[F(x=(1, 2), y={'k': [None, True, False]}, z=-0.5, w=+3)]",
            [{"name": "F", "arguments": {"x": [1, 2], "y": {"k": [None, True, False]}, "z": -0.5, "w": 3}}],
        ),
        ("[F(a=true, b=false, c=null)]", [{"name": "F", "arguments": {"a": True, "b": False, "c": None}}]),
        ("[api.v2-search(q='x'),]", [{"name": "api.v2-search", "arguments": {"q": "x"}}]),
        ("[F(d={1: 'one'})]", [{"name": "F", "arguments": {"d": {"1": "one"}}}]),
    ],
)
def test_parse_python_calls(text, expected):
    assert toolace.looks_like_calls(text)
    assert toolace.parse_python_calls(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "[F(x=Paris)]",  # a bare name is not a literal
        "[F(1, 2)]",  # positional arguments
        "[F(**kw)]",
        "[F(x=f'{y}')]",
        "[F(x=g(1))]",  # a call inside the arguments
        "[F(x=a.b)]",
        "[F(x=1 + 2)]",
        "[F(x=b'raw')]",
        "[F(x=1j)]",
        "[F(x={1, 2})]",
        "[F(x=1] ",
        "[F(x=1) G(y=2)]",
        "[F(x='unclosed)]",
        "[F(x=[1, 2)]",
    ],
)
def test_parse_python_calls_rejects(text):
    with pytest.raises(toolace.CallSyntaxError):
        toolace.parse_python_calls(text)


def test_call_text_is_never_executed(tmp_path):
    target = tmp_path / "pwned"
    for text in [f"[F(x=open({str(target)!r}, 'w'))]", f"[F(x=__import__('pathlib').Path({str(target)!r}).touch())]"]:
        with pytest.raises(toolace.CallSyntaxError):
            toolace.parse_python_calls(text)
    assert not target.exists()


def test_looks_like_calls_leaves_prose_alone():
    assert not toolace.looks_like_calls("Which city would you like?")
    assert not toolace.looks_like_calls("[1, 2, 3]")
    assert not toolace.looks_like_calls("[]")


def test_extract_tools():
    tools = [{"name": "A b", "parameters": {}}]
    marker = "Here is a list of functions in JSON format that you can invoke:\n"
    assert toolace.extract_tools("intro\n" + marker + json.dumps(tools) + ". \nMore [text] after.") == tools
    assert toolace.extract_tools("no marker " + json.dumps(tools)) is None
    assert toolace.extract_tools(marker + "[{broken") is None
    assert toolace.extract_tools(marker + "[]") is None
    assert toolace.extract_tools(marker + '[{"description": "no name"}]') is None


def test_toolace_rows_in_python():
    """convert_rows also takes plain dicts; role/content keys and bad turns are handled."""
    system = "Sys.\nHere is a list of functions in JSON format that you can invoke:\n" + json.dumps(
        [{"name": "F", "parameters": {}}]
    )
    rows = [
        {
            "system": system,
            "conversations": [{"role": "user", "content": "go"}, {"role": "assistant", "content": "[F(a=1)]"}],
        },
        {"system": system, "conversations": [{"from": "narrator", "value": "?"}]},
        {"system": system, "conversations": [{"from": "assistant", "value": "[F(a=1)]"}]},
    ]
    records, drops = toolace.convert_rows(rows)
    assert [r.answer for r in records] == [[{"name": "F", "arguments": {"a": 1}}]]
    assert records[0].system == "Sys."
    assert dict(drops) == {"bad_conversation": 1, "no_user_turn": 1}


def test_xlam_rows_in_python():
    tools = json.dumps([{"name": "f", "parameters": {}}])
    rows = [
        {"id": 9, "query": "q", "tools": tools, "answers": '[{"name": "f", "arguments": "{\\"a\\": 1}"}]'},
        {"id": 10, "query": "q", "tools": tools, "answers": '[{"name": "f", "arguments": [1]}]'},
        {"id": 11, "query": "q", "tools": tools, "answers": "[]"},
    ]
    records, drops = xlam.convert_rows(rows)
    assert [r.answer for r in records] == [[{"name": "f", "arguments": {"a": 1}}], []]
    assert dict(drops) == {"bad_answer": 1}


# ---------------------------------------------------------------- records and split


def test_record_round_trip():
    record = ToolRecord(
        "xlam", "1", "", [{"name": "f"}], [{"role": "user", "content": "q"}], [{"name": "f", "arguments": {}}]
    )
    assert ToolRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    with pytest.raises(KeyError, match="answer"):
        ToolRecord.from_dict({k: v for k, v in record.to_dict().items() if k != "answer"})


def test_drop_counts_report(capsys):
    drops = DropCounts(no_tools=2, unknown_tool=1)
    line = drops.report("demo", kept=7)
    assert line == "demo: kept 7 of 10; dropped: no_tools=2, unknown_tool=1"
    assert line in capsys.readouterr().out
    assert drops.merged(DropCounts(no_tools=1)) == {"no_tools": 3, "unknown_tool": 1}


def test_train_val_split_is_seeded_90_10():
    items = list(range(1000))
    train, val = train_val_split(items, seed=3)
    assert len(train) == 900 and len(val) == 100
    assert sorted(train + val) == items
    assert train_val_split(items, seed=3) == (train, val)
    assert train_val_split(items, seed=4)[1] != val
    assert train_val_split(items[:7], seed=0, val_fraction=0.0)[1] == []
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(items, seed=0, val_fraction=1.0)
