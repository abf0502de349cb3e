"""Fused Triton kernels against their PyTorch twins (on CUDA; or on CPU under
TRITON_INTERPRET=1, which runs the kernels in Triton's interpreter)."""

from __future__ import annotations

import os

import pytest
import torch

from warmserve.engine.arch import RopeScaling
from warmserve.engine.layers import triton_decode, triton_ops
from warmserve.engine.layers.attention import decode_reference, write_kv
from warmserve.engine.layers.norm import RMSNorm
from warmserve.engine.layers.rotary import RotaryEmbedding

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(triton_ops.triton is None or not (torch.cuda.is_available() or INTERPRET),
                       reason="needs CUDA (or TRITON_INTERPRET=1)"),
]
DTYPES = [torch.float32] if DEVICE == "cpu" else [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(dtype):
    norm = RMSNorm(96, 1e-5).to(DEVICE)
    norm.weight.data = torch.rand(96, device=DEVICE) + 0.5
    norm = norm.to(dtype)
    x = torch.randn(7, 96, device=DEVICE, dtype=dtype)
    res = torch.randn(7, 96, device=DEVICE, dtype=dtype)
    expected_res = x + res
    expected = norm._norm(expected_res)
    out = triton_ops.add_rms_norm(x, res, norm.weight, 1e-5)
    torch.testing.assert_close(res, expected_res, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(out, expected, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(triton_ops.add_rms_norm(x, None, norm.weight, 1e-5), norm._norm(x),
                               atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_and_cache(dtype):
    tokens, heads, kv_heads, dim, block = 9, 4, 2, 32, 4
    rotary = RotaryEmbedding(dim, 256, 10000.0, RopeScaling())
    rotary.build(torch.device(DEVICE))
    q = torch.randn(tokens, heads, dim, device=DEVICE, dtype=dtype)
    k = torch.randn(tokens, kv_heads, dim, device=DEVICE, dtype=dtype)
    v = torch.randn(tokens, kv_heads, dim, device=DEVICE, dtype=dtype)
    positions = torch.randint(0, 256, (tokens,), device=DEVICE)
    slots = torch.randperm(6 * block, device=DEVICE)[:tokens]
    cache = torch.zeros(6, 3, 2, block, kv_heads, dim, device=DEVICE, dtype=dtype)[:, 1]
    expected_cache = cache.clone()
    eq, ek = rotary(positions, q, k)
    write_kv(expected_cache, ek, v, slots)
    triton_ops.rope_and_cache(q, k, v, positions, rotary.cos_sin, slots, cache)
    torch.testing.assert_close(q, eq, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(k, ek, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(cache, expected_cache, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    gate_up = torch.randn(5, 6000, device=DEVICE, dtype=dtype)
    g, u = gate_up.split(3000, dim=-1)
    expected = torch.nn.functional.silu(g) * u
    torch.testing.assert_close(triton_ops.silu_mul(gate_up), expected, atol=TOL[dtype],
                               rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads"), [(32, 8), (8, 8), (9, 3)])
def test_paged_decode(dtype, heads, kv_heads):
    """Contexts from one token to the table's width: most partitions of the short ones are
    empty, their programs return at once and the merge must not read them."""
    torch.manual_seed(heads * 7 + kv_heads)
    num_blocks, block_size, dim = 300, 16, 64 if heads == 9 else 128
    width, lens = (256, [1, 17, 513, 1500, 4000]) if DEVICE == "cuda" else (
        64, [1, 17, 256, 257, 1000])  # the interpreter is slow
    if DEVICE == "cpu" and heads == 32:
        heads, kv_heads, dim = 8, 2, 32
    cache = torch.randn(num_blocks, 2, block_size, kv_heads, dim, device=DEVICE, dtype=dtype)
    lens = torch.tensor(lens, dtype=torch.int64, device=DEVICE)
    tables = torch.stack([torch.randperm(num_blocks)[:width] for _ in lens]).to(DEVICE)
    q = torch.randn(len(lens), heads, dim, device=DEVICE, dtype=dtype)
    ref = decode_reference(q.float(), cache.float(), tables, lens, dim**-0.5)
    out = triton_decode.paged_decode(q, cache, tables, lens, dim**-0.5)
    err = (out.float() - ref).norm() / ref.norm()
    assert err < (2e-2 if dtype == torch.bfloat16 else 1e-4)
