"""The notebooks run top to bottom in a fresh kernel, at toy sizes (TOOLN1_NOTEBOOK_TEST=1).

Each notebook is copied into a temporary folder and executed there with nbclient, so nothing is
written into the repository. The kernel imports the package from this checkout (PYTHONPATH), so
the install cell finds it and installs nothing, and uses a fresh cache folder (TOOLN1_CACHE), so
the tiny tokenizer is built from the current code rather than read from an older cache.
"""

import base64
import json
import os
import shutil
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
CELL_TIMEOUT_S = 600
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
    """ "python3" when Jupyter knows it; otherwise a spec for this interpreter, written into a
    temporary JUPYTER_PATH folder (nothing is installed into the user's Jupyter config)."""
    try:
        KernelSpecManager().get_kernel_spec("python3")
        yield "python3"
        return
    except NoSuchKernel:
        pass
    from ipykernel.kernelspec import write_kernel_spec

    root = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(path=str(root / "kernels" / "tooln1-test"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, [str(root), os.environ.get("JUPYTER_PATH")])))
        yield "tooln1-test"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["TOOLN1_NOTEBOOK_TEST"] = "1"
    env["TOOLN1_CACHE"] = str(tmp_path_factory.mktemp("tooln1_cache"))
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    # One CPU device, as on a Colab CPU runtime (the suite's conftest asks for eight).
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")
    )
    return env


def execute(name: str, workdir: Path, kernel_name: str, env: dict) -> nbformat.NotebookNode:
    """Runs a copy of notebooks/<name> inside `workdir`; any cell error fails the test (nbclient
    raises CellExecutionError with the cell and its traceback). Returns the executed notebook,
    also saved in `workdir` for inspection."""
    path = workdir / name
    shutil.copy(NOTEBOOKS / name, path)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name=kernel_name, resources={"metadata": {"path": str(workdir)}}
    )
    client.execute(env=env)
    nbformat.write(nb, workdir / f"executed_{name}")
    return nb


def outputs(nb: nbformat.NotebookNode, kind: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == kind]


def text_of(nb: nbformat.NotebookNode) -> str:
    parts = [o.get("text", "") for o in outputs(nb, "stream")]
    for kind in ("execute_result", "display_data"):
        parts += [o["data"].get("text/plain", "") for o in outputs(nb, kind)]
    return "\n".join(parts)


@pytest.mark.parametrize("name", ["quickstart.ipynb", "evaluate_bfcl.ipynb", "lora_grpo.ipynb"])
def test_notebooks_are_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_quickstart_runs(tmp_path, kernel_name, kernel_env):
    nb = execute("quickstart.ipynb", tmp_path, kernel_name, kernel_env)
    text = text_of(nb)
    assert "from " + str(REPO / "tooln1_jax") in text  # the checkout was imported, nothing installed
    assert "reward of the reference answer: 1.0" in text
    assert "reward with one wrong argument: 0.0" in text

    run_dir = tmp_path / "runs" / "quickstart"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_done"] == 3 and summary["num_updates"] >= 3
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(0.0 <= r["reward_mean"] <= 1.0 for r in steps)

    curve = run_dir / "notebook_reward_curve.png"
    assert curve.read_bytes().startswith(PNG_MAGIC) and curve.stat().st_size > 5000
    shown = [o for o in outputs(nb, "display_data") if "image/png" in o["data"]]
    assert shown and base64.b64decode(shown[0]["data"]["image/png"]).startswith(PNG_MAGIC)


def test_evaluate_bfcl_runs(tmp_path, kernel_name, kernel_env):
    nb = execute("evaluate_bfcl.ipynb", tmp_path, kernel_name, kernel_env)
    work = tmp_path / "runs" / "evaluate_bfcl"
    assert (work / "tiny_model" / "config.json").exists() and (work / "tiny_model" / "tokenizer.json").exists()

    limit, categories = 3, ("simple", "multiple")
    gen = json.loads((work / "generation" / "summary.json").read_text())
    assert gen["run"]["mode"] == "generation"
    for category in categories:
        assert gen[category]["total"] == limit
    rows = [json.loads(line) for line in (work / "generation" / "results.jsonl").read_text().splitlines()]
    assert sorted({r["category"] for r in rows}) == sorted(categories) and len(rows) == 2 * limit
    assert len((work / "generation" / "predictions.jsonl").read_text().splitlines()) == 2 * limit
    assert "| simple |" in text_of(nb)  # the printed summary table

    scored = json.loads((work / "scoring" / "summary.json").read_text())
    assert scored["run"]["mode"] == "scoring"
    for category in categories:  # items 0 and 2 of each category got their reference answer
        assert (scored[category]["correct"], scored[category]["total"]) == (2, limit)
    assert scored["run"]["skipped_lines"] == {"non_json_line": 1}
    assert scored["run"]["missing_prediction"] == 0


def test_lora_grpo_runs(tmp_path, kernel_name, kernel_env):
    """The LoRA notebook at toy size: the Colab table from plan.py, a LoRA SFT warm start and GRPO,
    a checkpoint of adapters, and both exports."""
    nb = execute("lora_grpo.ipynb", tmp_path, kernel_name, kernel_env)
    text = text_of(nb)
    assert "Qwen2.5-1.5B LoRA, Colab TPU v2-8: fits = True" in text
    assert "Qwen2.5-1.5B LoRA, Colab T4: fits = True" in text
    run_dir = tmp_path / "runs" / "lora_grpo"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_done"] == 2 and summary["num_updates"] == 2
    assert "trainable adapter parameters" in text
    assert sorted(os.listdir(run_dir / "export" / "peft_adapter")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert (run_dir / "export" / "merged" / "model.safetensors").exists()
