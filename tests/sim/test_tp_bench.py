"""benchmarks/tp_bench.py: the tensor-parallel split computes what one rank computes, and the
comparison reads the efficiency per doubling the profile's rule stands for."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from benchmarks.tp_bench import (
    check_divisible,
    compare,
    decode_layer,
    make_shard,
    prefill_layer,
)

from warmserve.engine.arch import SYNTH_ARCHS

ARCH = SYNTH_ARCHS["tiny"]  # 4 heads, 2 KV heads, intermediate 160: splits over 2


def _outputs(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)  # the same inputs on every rank
    x = torch.randn(7, ARCH.hidden_size)
    xb = torch.randn(3, ARCH.hidden_size)
    full_kv = [torch.randn(3, ARCH.num_kv_heads, 6, ARCH.head_dim) for _ in range(2)]
    local = ARCH.num_kv_heads // world
    cache = tuple(c[:, rank * local:(rank + 1) * local].clone() for c in full_kv)
    y, yb = x, xb
    for layer in range(2):
        w = make_shard(ARCH, layer, rank, world, torch.float32, "cpu")
        y = prefill_layer(y, w, ARCH, world)
    w = make_shard(ARCH, 0, rank, world, torch.float32, "cpu")
    yb = decode_layer(xb, w, cache, ARCH, world)
    return y, yb


def _rank(rank: int, world: int, port: int, path: str) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=world)
    y, yb = _outputs(rank, world)
    if rank == 0:
        torch.save((y, yb), path)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_compute_what_one_computes(tmp_path):
    alone, alone_b = _outputs(0, 1)
    path = str(tmp_path / "tp2.pt")
    mp.spawn(_rank, args=(2, _free_port(), path), nprocs=2, join=True)
    split, split_b = torch.load(path)
    torch.testing.assert_close(split, alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(split_b, alone_b, rtol=1e-4, atol=1e-4)


def test_a_shape_that_does_not_split_is_refused():
    check_divisible(ARCH, 2)
    with pytest.raises(ValueError, match="num_kv_heads=2 does not split over 4"):
        check_divisible(ARCH, 4)


def _result(tp: int, prefill_2048: float, b1: float, b128: float) -> dict:
    return {"shape": "llama-2-13b", "tp": tp, "layers": 4, "depth": 40, "context": 512,
            "device": "test", "prefill_ms_per_layer": {"512": prefill_2048 / 4,
                                                       "2048": prefill_2048},
            "decode_ms_per_layer": {"1": b1, "128": b128}}


def test_compare_reads_the_efficiency_per_doubling(tmp_path, capsys):
    # TP2 at 0.8 per doubling: time x 1 / (2 x 0.8); TP4: x 1 / (4 x 0.64)
    runs = [_result(1, 4.0, 0.2, 1.47), _result(2, 2.5, 0.15, 0.15 + 1.27 / 1.6),
            _result(4, 4.0 / 2.56, 0.12, 0.12 + 1.27 / 2.56)]
    paths = []
    for r in runs:
        path = tmp_path / f"tp{r['tp']}.json"
        path.write_text(json.dumps(r))
        paths.append(str(path))
    compare(paths[::-1])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 2 ") or
            line.startswith("| 4 ")]
    assert len(rows) == 2
    for row in rows:
        assert "0.80 (at 2048)" in row and "0.80 (b1..b128)" in row
    assert "| 1 | 40.0 | 160.0 | 8.00 | 58.80 | - | - |" in out
    with pytest.raises(SystemExit, match="one-GPU run"):
        compare(paths[1:])
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_result(2, 2.5, 0.15, 0.9) | {"shape": "llama-2-70b"}))
    with pytest.raises(SystemExit, match=r"other\.json: llama-2-70b at context 512, not "
                                         r"llama-2-13b"):
        compare([paths[0], str(other)])
