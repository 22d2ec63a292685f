#!/usr/bin/env bash
# README command 2 (and CI): install, then run the test suite, one pytest worker per core (each test
# file stays on one worker, so its module fixtures are built once).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m pytest -q -n auto --dist loadfile "$@"
