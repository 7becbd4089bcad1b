#!/usr/bin/env bash
# The README's Quickstart as a new user runs it: a new virtualenv (no system site-packages), the
# base install alone (`pip install -e .`, no extras), the demo command at toy size, then an
# API-Bank scoring run and `sft --help`. A base dependency missing from setup.py fails here.
#   bash .ci/fresh_install_smoke.sh                   # run it (CI runs it before the test suite)
#   bash .ci/fresh_install_smoke.sh --print-commands  # print the commands only (tests/test_readme.py)
# pip's cache: $PIP_CACHE_DIR, by default ~/.cache/tooln1-ci-pip (kept between runs); the venv is new each run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# The README's first Quickstart command, verbatim (tests/test_readme.py checks that they agree).
QUICKSTART='pip install -e . && python -m tooln1_jax.train'

# The commands, given the scratch folder $1. Toy size: the demo's own config (configs/tiny_cpu.py)
# with 40 synthetic tasks, a 2-step SFT warm start, 2 GRPO steps of 8 prompts x 4 samples (up to 4 trained), a
# 4-prompt held-out eval and 16 new tokens, written under the scratch folder.
commands() {
  local w=$1
  TOY="--config.output_dir=$w/demo --config.data.synthetic.num_examples=40 --config.sft.warm_start_steps=2"
  TOY+=" --config.sft.batch_size=8 --config.rl.total_steps=2 --config.rl.train_batch_size=4"
  TOY+=" --config.rl.rollout_batch_size=8 --config.rl.mini_batch_size=2 --config.rl.micro_batch_size=8"
  TOY+=" --config.rollout.num_samples=4 --config.rollout.max_new_tokens=16"
  TOY+=" --config.eval.every_steps=0 --config.eval.num_examples=4 --config.eval.batch_size=4"
  TOY+=" --config.eval.max_new_tokens=16 --config.log.progress_bar=False"
  DEMO="$QUICKSTART $TOY"
  EVALUATE="python -m tooln1_jax.evaluate api_bank --predictions tests/fixtures/api_bank_predictions.jsonl"
  EVALUATE+=" --limit 5 --output $w/eval"
  SFT_HELP="python -m tooln1_jax.sft --help"
}

if [ "${1:-}" = "--print-commands" ]; then
  commands '$WORK'
  printf '%s\n' "$DEMO" "$EVALUATE" "$SFT_HELP"
  exit 0
elif [ $# -gt 0 ]; then
  echo "usage: bash .ci/fresh_install_smoke.sh [--print-commands]" >&2
  exit 2
fi

t_start=$SECONDS
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tooln1-smoke.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
commands "$(printf %q "$WORK")"

fail() {
  echo "FAILED fresh-install smoke: $1" >&2
  exit 1
}

# Nothing from this machine's own Python setup leaks in: no PYTHONPATH, no cached tokenizer.
unset PYTHONPATH PYTHONHOME
export TOOLN1_CACHE="$WORK/tooln1_cache"
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$HOME/.cache/tooln1-ci-pip}" PIP_NO_INPUT=1
"${PYTHON:-python3}" -m venv "$WORK/venv"
# shellcheck disable=SC1091
source "$WORK/venv/bin/activate"
python - <<'EOF' || fail "the virtualenv is not isolated"
import sys
assert sys.prefix != sys.base_prefix, "not in a virtualenv"
leaks = [p for p in sys.path if "-packages" in p and not p.startswith(sys.prefix)]
assert not leaks, f"site-packages outside the virtualenv on sys.path: {leaks}"
EOF

run_step() {  # NAME COMMAND: run COMMAND (a string, as typed) from the repo root, timed
  local t0=$SECONDS
  echo "== fresh-install smoke, $1: $2"
  (cd "$ROOT" && eval "$2") </dev/null || fail "$1 exited $? after $((SECONDS - t0)) s: $2"
  echo "== ok: $1 ($((SECONDS - t0)) s)"
}

run_step "Quickstart demo at toy size" "$DEMO"
python - "$WORK/demo/summary.json" <<'EOF' || fail "the demo's summary.json is not what a 2-step run writes"
import json, sys
s = json.load(open(sys.argv[1]))
assert s["steps_done"] == 2 and s["accuracy_start"] is not None and s["accuracy_end"] is not None, s
EOF

run_step "API-Bank scoring" "$EVALUATE"
python - "$WORK/eval" tests/fixtures/api_bank_predictions.jsonl <<'EOF' || fail "API-Bank scoring output"
import json, os, sys
out, preds = sys.argv[1:]
s = json.load(open(os.path.join(out, "summary.json")))
assert (s["api_bank_all"]["correct"], s["api_bank_all"]["total"]) == (3, 5), s["api_bank_all"]
results = [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]
written = [json.loads(line)["completion"] for line in open(preds)]
assert [r["completion"] for r in results] == written, "results.jsonl does not carry the completions"
EOF

echo "== fresh-install smoke, sft CLI: $SFT_HELP"
# --help prints the usage (with the override syntax) and exits 0; an import failure does neither.
help_rc=0
help_out=$(cd "$ROOT" && eval "$SFT_HELP" 2>&1 </dev/null) || help_rc=$?
if [ "$help_rc" -ne 0 ] || ! grep -q -- "--config.a.b=VALUE" <<<"$help_out"; then
  printf '%s\n' "$help_out" | tail -n 30 >&2
  fail "sft --help exited $help_rc without its usage: $SFT_HELP"
fi
echo "== ok: sft CLI"

echo "fresh-install smoke passed in $((SECONDS - t_start)) s (pip cache: $PIP_CACHE_DIR)"
