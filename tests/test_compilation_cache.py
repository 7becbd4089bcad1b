"""JAX's persistent compilation cache (`run_setup.enable_compilation_cache`, called by
`setup_run`): a second process with the same programs loads them instead of compiling, and a
directory the user set is kept."""

import json
import os
import subprocess
import sys

SCRIPT = """
import json, sys
import jax, jax.numpy as jnp
from jax import monitoring
from tooln1_jax.run_setup import enable_compilation_cache
events = []
monitoring.register_event_listener(lambda name, **kw: events.append(name))
path = enable_compilation_cache()
step = jax.jit(lambda w, x: jnp.tanh(x @ w) @ w.T)
step(jnp.ones((32, 32)), jnp.ones((4, 32))).block_until_ready()
print(json.dumps({"path": path, "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses")}))
"""


def _run(env: dict) -> dict:
    # every program is worth caching here (the default skips those compiling in under a second)
    base = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env = {**base, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **env}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_its_programs_from_the_cache(tmp_path):
    first = _run({"TOOLN1_CACHE": str(tmp_path)})
    assert first["path"] == str(tmp_path / "jax_compilation_cache")
    assert first["misses"] > 0 and first["hits"] == 0
    assert os.listdir(first["path"])  # programs written
    second = _run({"TOOLN1_CACHE": str(tmp_path)})
    assert second["hits"] > 0 and second["misses"] == 0


def test_a_directory_the_user_set_is_kept(tmp_path):
    mine = str(tmp_path / "mine")
    out = _run({"TOOLN1_CACHE": str(tmp_path / "ours"), "JAX_COMPILATION_CACHE_DIR": mine})
    assert out["path"] == mine and os.listdir(mine) and not os.path.exists(tmp_path / "ours")
