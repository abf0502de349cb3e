"""Our Llama forward equals transformers' on the same random weights (fp32, <= 1e-4)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from warmserve.engine.arch import SYNTH_ARCHS, RopeScaling
from warmserve.engine.checkpoint import write_random_checkpoint
from warmserve.engine.layers.attention import AttentionMetadata, PrefillSpan
from warmserve.engine.loader import TorchProvider, build_model

transformers = pytest.importorskip("transformers")

TINY = SYNTH_ARCHS["tiny"]
VARIANTS = {
    "llama-gqa": TINY,
    "llama3-rope-tied": replace(
        TINY, rope_theta=500000.0, max_position=16384, tie_word_embeddings=True,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64),
    ),
    "qwen2-bias": replace(TINY, attention_bias=True, architecture="Qwen2ForCausalLM",
                          num_kv_heads=1),
    "linear-rope-mha": replace(TINY, num_kv_heads=4, rope_scaling=RopeScaling("linear", 2.0)),
}
BLOCK = 4


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def models(request, tmp_path_factory):
    arch = VARIANTS[request.param]
    path = write_random_checkpoint(arch, tmp_path_factory.mktemp(request.param) / "ckpt", seed=3)
    ours = build_model(arch, path, torch.float32, TorchProvider("cpu"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager").eval()
    return arch, ours, ref


def _cache(arch, num_blocks=32):
    shape = (num_blocks, arch.num_layers, 2, BLOCK, arch.num_kv_heads, arch.head_dim)
    return torch.zeros(shape)


def _slots(table, positions):
    return torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in positions])


def _reference_logits(ref, ids):
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0]


def test_prefill_logits_match(models):
    arch, ours, ref = models
    ids = torch.randint(0, arch.vocab_size, (23,), generator=torch.Generator().manual_seed(1))
    table = [17, 3, 29, 8, 0, 11]  # fragmented
    meta = AttentionMetadata(_slots(table, range(23)), 0, torch.zeros(0, 1, dtype=torch.int32),
                             torch.zeros(0, dtype=torch.int32),
                             [PrefillSpan(0, 23, 0, torch.tensor(table))])
    with torch.no_grad():
        hidden = ours(ids, torch.arange(23), _cache(arch), meta)
        logits = ours.compute_logits(hidden)
    torch.testing.assert_close(logits, _reference_logits(ref, ids.tolist()), atol=1e-4, rtol=0)


def test_chunked_prefill_then_decode_logits_match(models):
    arch, ours, ref = models
    ids = torch.randint(0, arch.vocab_size, (30,), generator=torch.Generator().manual_seed(2))
    table = [5, 30, 1, 22, 9, 14, 2, 27]
    cache = _cache(arch)
    expected = _reference_logits(ref, ids.tolist())
    with torch.no_grad():
        # Two prefill chunks (the second reads the first back from the cache) ...
        for start, end in ((0, 13), (13, 29)):
            meta = AttentionMetadata(_slots(table, range(start, end)), 0,
                                     torch.zeros(0, 1, dtype=torch.int32),
                                     torch.zeros(0, dtype=torch.int32),
                                     [PrefillSpan(0, end - start, start, torch.tensor(table))])
            hidden = ours(ids[start:end], torch.arange(start, end), cache, meta)
            torch.testing.assert_close(ours.compute_logits(hidden), expected[start:end],
                                       atol=1e-4, rtol=0)
        # ... then one decode step through the fragmented block table.
        meta = AttentionMetadata(_slots(table, [29]), 1, torch.tensor([table], dtype=torch.int32),
                                 torch.tensor([30], dtype=torch.int32), [])
        hidden = ours(ids[29:30], torch.tensor([29]), cache, meta)
        torch.testing.assert_close(ours.compute_logits(hidden), expected[29:30], atol=1e-4, rtol=0)


def test_mixed_batch_of_decodes_and_prefill_matches(models):
    """Two sequences decoding plus one prefilling, in one step, each equals its reference."""
    arch, ours, ref = models
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, arch.vocab_size, (n,), generator=gen).tolist() for n in (9, 14, 6)]
    tables = [[3, 7, 12], [0, 31, 2, 19], [25, 6]]
    cache = _cache(arch)
    with torch.no_grad():
        for seq in (0, 1):  # prefill all but the last token of the two decoders
            n = len(prompts[seq]) - 1
            meta = AttentionMetadata(_slots(tables[seq], range(n)), 0,
                                     torch.zeros(0, 1, dtype=torch.int32),
                                     torch.zeros(0, dtype=torch.int32),
                                     [PrefillSpan(0, n, 0, torch.tensor(tables[seq]))])
            ours(torch.tensor(prompts[seq][:n]), torch.arange(n), cache, meta)
        lens = [len(prompts[0]), len(prompts[1])]
        ids = [prompts[0][-1], prompts[1][-1], *prompts[2]]
        positions = [lens[0] - 1, lens[1] - 1, *range(6)]
        slots = torch.cat([_slots(tables[0], [lens[0] - 1]), _slots(tables[1], [lens[1] - 1]),
                           _slots(tables[2], range(6))])
        width = max(len(tables[0]), len(tables[1]))
        padded = [t + [0] * (width - len(t)) for t in tables[:2]]
        meta = AttentionMetadata(slots, 2, torch.tensor(padded, dtype=torch.int32),
                                 torch.tensor(lens, dtype=torch.int32),
                                 [PrefillSpan(2, 6, 0, torch.tensor(tables[2]))])
        logits = ours.compute_logits(ours(torch.tensor(ids), torch.tensor(positions), cache, meta))
    torch.testing.assert_close(logits[0], _reference_logits(ref, prompts[0])[-1], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[1], _reference_logits(ref, prompts[1])[-1], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[2:], _reference_logits(ref, prompts[2]), atol=1e-4, rtol=0)
