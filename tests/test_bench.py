"""bench.py runs and prints its table (tiny sizes; the timings themselves are never asserted)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="bench.py ssd compares against mamba-ssm")
def test_bench_ssd_prints_a_table():
    r = subprocess.run([sys.executable, "bench.py", "ssd", "--lengths", "16", "--batch", "2", "--repeats", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "| 16 |" in r.stdout and "sequential / ours" in r.stdout


def test_bench_scaling_prints_a_table_and_plot(tmp_path):
    plot = tmp_path / "scaling.png"
    r = subprocess.run([sys.executable, "bench.py", "scaling", "--scaling-lengths", "8", "16", "--tokens", "32",
                        "--repeats", "1", "--plot", str(plot)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "| Mamba-2 |" in r.stdout and "| attention |" in r.stdout
    assert plot.stat().st_size > 0
