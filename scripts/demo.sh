#!/usr/bin/env bash
# README command 1: install, then train a tiny PixelREPA on MNIST on this machine, sample a grid.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
pixelrepa demo "$@"
