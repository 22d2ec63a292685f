#!/usr/bin/env bash
# README command 2 (and CI): install, then run the test suite (slow end-to-end checks excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m pytest -q "$@"
