#!/usr/bin/env bash
# The long end-to-end and multi-process checks (tests marked `slow`: torchrun runs, kill -9,
# preemption, resharding, live evaluation, reproduction bands, the demo), one pytest worker per
# core. CI runs it after the README's test command (`bash scripts/test.sh`), which installs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m pytest -q -n auto --dist loadfile -m slow "$@"
