"""Run logs survive a writer that died mid-line: the torn last line is dropped with a warning and
a resumed run goes on; damage before the last line is a clear error naming the line."""

import json
import os

import pytest

from tooln1_jax.metrics import EVAL_FILE, METRICS_FILE, MetricsLogger, read_jsonl


def _write(path, rows, tail=""):
    with open(path, "wb") as f:
        f.writelines((json.dumps(r) + "\n").encode() for r in rows)
        f.write(tail if isinstance(tail, bytes) else tail.encode())


# Torn inside a value, inside a two-byte UTF-8 character, and after a key.
@pytest.mark.parametrize("tail", ['{"step": 4, "loss": 0.', b'{"step": 4, "note": "\xc3', '{"step"\n'])
def test_resume_drops_a_torn_last_line(tmp_path, tail):
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    path = os.path.join(tmp_path, METRICS_FILE)
    _write(path, rows, tail)
    _write(os.path.join(tmp_path, EVAL_FILE), [{"step": 0, "accuracy": 0.5}])
    with pytest.warns(RuntimeWarning, match=f"{METRICS_FILE}:4: dropped a torn last line"):
        logger = MetricsLogger(str(tmp_path), total_steps=5, start_step=3, progress_bar=False)
    assert read_jsonl(path) == rows
    logger.log_step(4, {"loss": 0.25})
    logger.close(plot=False)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4]


def test_a_bad_line_before_the_last_names_it(tmp_path):
    path = os.path.join(tmp_path, METRICS_FILE)
    _write(path, [{"step": 1}], '{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=f"{METRICS_FILE}:2: not a JSON line"):
        read_jsonl(path)
