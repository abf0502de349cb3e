"""benchmarks/server_bench.py: a real `warmserve serve` streams every token it asks for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_server_bench_counts_every_streamed_chunk(cache_dir):
    env = os.environ | {"WARMSERVE_CACHE_DIR": str(cache_dir),
                        "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "server_bench.py"), "--tiny", "--streams",
         "4", "--tokens", "5", "--rounds", "1", "--start-timeout", "300"],
        capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    row = done.stdout.strip().splitlines()[-1].strip("|").split("|")
    streams, tokens, chunks = (int(x) for x in row[:3])
    assert (streams, tokens, chunks) == (4, 5, 20)
    float(row[5])  # the server's CPU per chunk, a number (its sign is the idle rate's noise)
