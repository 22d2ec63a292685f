"""The parity suite fails, not skips, when its fixtures are missing, unless told to skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_parity(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "PIXELREPA_SKIP_PARITY"}
    environment.update(PIXELREPA_PARITY_FIXTURES=str(tmp_path / "absent"), **env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(REPO / "tests" / "test_parity.py"), "-k", "config_matches or fixed_tables"],
                          cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)


def test_missing_fixtures_fail_the_suite(tmp_path):
    result = run_parity(tmp_path)
    assert result.returncode != 0, result.stdout
    assert "no parity fixtures at" in result.stdout and "PIXELREPA_SKIP_PARITY=1" in result.stdout
    assert "2 error" in result.stdout or "2 failed" in result.stdout, result.stdout


def test_explicit_opt_out_skips(tmp_path):
    result = run_parity(tmp_path, PIXELREPA_SKIP_PARITY="1")
    assert result.returncode == 0, result.stdout
    assert "2 skipped" in result.stdout, result.stdout
