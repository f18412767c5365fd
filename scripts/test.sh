#!/usr/bin/env bash
# The README's test command: install (CPU torch from the local wheel first, then the project) and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e '.[test]'
HF_HUB_OFFLINE=1 python3 -m pytest -q
