"""mode=interleaved and --method=blockwise: the mask, the layout, and exactness of decoding."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import EAGER_FLEX

import prepare
from tokenizer import Tokenizer
import objectives
import batching
import train
from configurator import configure, defaults_from
from decoders import decode_ar, decode_blockwise
from generate import Decoding
from reference import reference_blockwise
from masks import dense_mask, interleaved_mask
from model import KVCache, ModelConfig, Transformer
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

MASK, EOS = 257, 256


def layout(tokens, plen, B):
    c = SimpleNamespace(block_size=B, mask_id=MASK)
    return objectives.interleaved_layout(np.array(tokens), plen, c)


def test_who_sees_whom_by_hand():
    # prompt p0 p1, response r0..r4 (B=3): blocks {r0 r1 r2} {r3 r4}
    lay = layout([10, 11, 20, 21, 22, 23, 24], 2, 3)
    # clean half, then groups: block 0 (s=0): slots at positions 2,3; block 1 (s=3): one slot at 5
    assert lay["idx"].tolist() == [10, 11, 20, 21, 22, 23, 24, MASK, MASK, MASK]
    assert lay["pos"].tolist() == [0, 1, 2, 3, 4, 5, 6, 2, 3, 5]
    assert lay["tgt"].tolist() == [-100, 20, 21, 22, 23, 24, -100, 21, 22, 24]
    t = {k: torch.from_numpy(np.asarray(v))[None] for k, v in lay.items()}
    m = dense_mask(interleaved_mask(torch.zeros(1, 10, dtype=torch.long), t["pos"], t["slot"], t["sj"]),
                   1, 10, 10, "cpu")[0, 0].int()
    want = [  # rows: queries, columns: keys   p0 p1 r0 r1 r2 r3 r4 | s0 s1 | s0'
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 1, 0, 0],   # slot 0 of block 0: the prompt, itself
        [1, 1, 0, 0, 0, 0, 0, 1, 1, 0],   # slot 1 of block 0: the prompt, slots 0..1
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 1],   # slot 0 of block 1: prompt + r0..r2, itself
    ]
    assert m.tolist() == want


@pytest.mark.parametrize("B", [2, 4, 7])
@EAGER_FLEX
def test_dense_and_flex_agree_packed_ragged(B):
    rng = np.random.default_rng(B)
    rows = []
    for _ in range(2):  # three examples per row, response lengths not multiples of B
        examples = [(rng.integers(0, 200, size=p + r).tolist(), p) for p, r in ((3, 2 * B + 1), (5, B + 2), (2, 3))]
        rows.append([layout(tok, p, B) | {} for tok, p in examples])
    T = max(sum(len(l["idx"]) for l in r) for r in rows) + 5
    b = batching.collate(rows, T, EOS)
    mm = interleaved_mask(b["doc"], b["pos"], b["slot"], b["sj"])
    g = torch.Generator().manual_seed(B)
    q, k, v = (torch.randn(2, 2, T, 8, generator=g) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(mm, 2, T, T, "cpu"))
    out = flex_attention(q, k, v, block_mask=create_block_mask(mm, 2, None, T, T, device="cpu"))
    assert (out - ref).abs().max() < 1e-5


def small_model(seed=0):
    m = Transformer(ModelConfig(vocab_size=320, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)).eval()
    m.init_weights(seed)
    return m


@torch.no_grad()
def test_training_logits_equal_generation_forward():
    m, B = small_model(), 4
    tokens, plen = list(range(30, 40)) + list(range(50, 61)), 10   # 11 response tokens: ragged
    lay = layout(tokens, plen, B)
    t = {k: torch.from_numpy(np.asarray(v))[None] for k, v in lay.items()}
    train_logits = m(t["idx"], t["pos"], interleaved_mask(torch.zeros_like(t["pos"]), t["pos"], t["slot"], t["sj"]))[0]
    # clean stream = a plain causal forward of the example
    assert (train_logits[:len(tokens)] - m(torch.tensor([tokens]))[0]).abs().max() < 1e-5
    # each slot = a generation-style forward over [context][MASK x (B-1)], no cache
    i = len(tokens)
    for s, n in objectives.block_groups(len(tokens) - plen, B):
        ctx = tokens[:plen + s]
        ids = torch.tensor([ctx + [MASK] * (B - 1)])
        pos = torch.tensor([list(range(len(ctx))) + [plen + s + j for j in range(B - 1)]])
        slot = torch.tensor([[False] * len(ctx) + [True] * (B - 1)])
        sj = torch.tensor([[0] * len(ctx) + list(range(B - 1))])
        gen = m(ids, pos, interleaved_mask(torch.zeros_like(pos), pos, slot, sj))[0, len(ctx):len(ctx) + n]
        assert (train_logits[i:i + n] - gen).abs().max() < 1e-5
        i += n
    assert i == len(lay["idx"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small interleaved model trained briefly on the toy task, so its drafts mean something."""
    d = tmp_path_factory.mktemp("il")
    prepare.prepare(configure(defaults_from(vars(prepare)), [f"--out_dir={d}/data", "--toy_rows=3000"]))
    c = configure(defaults_from(vars(train)), [
        f"--data_dir={d}/data", f"--out_dir={d}/out", "--mode=interleaved", "--block_size=4", "--n_layer=2",
        "--n_embd=64", "--n_head=4", "--n_kv_head=2", "--max_length=384", "--batch_size=8", "--max_iters=150",
        "--learning_rate=3e-3", "--warmup_iters=10", "--eval_interval=0", "--log_interval=1000", "--save_interval=1000"])
    model = train.train(c).eval()
    info = {"block_size": 4, "eos_ids": [EOS], "mask_id": MASK, "vocab_size": 258}
    rows = [r for _, r in prepare.toy_task(24, 99)]
    tok = Tokenizer("byte")
    prompts = [tok.encode(tok.render([{"role": "user", "content": r["prompt"]}]), prompt=True) for r in rows]
    return model, info, prompts


def cfg(**kw):
    return Decoding(**{"max_new_tokens": 60, **kw})   # the rest: generate.py's defaults


def test_threshold_above_one_is_ar_greedy(trained):
    model, info, prompts = trained
    ar = decode_ar(model, prompts, cfg(), info)
    bw = decode_blockwise(model, prompts, cfg(threshold=1.01), info)
    assert [r[0] for r in bw] == [r[0] for r in ar]


@pytest.mark.parametrize("tree", [True, False])
def test_verify_is_ar_greedy_with_fewer_forwards(trained, tree):
    model, info, prompts = trained
    ar = decode_ar(model, prompts, cfg(), info)
    vf = decode_blockwise(model, prompts, cfg(verify=True, draft_tree=tree), info)
    assert [r[0] for r in vf] == [r[0] for r in ar]
    # every forward commits at least one token, and some accepted draft saves one (no threshold on luck)
    assert all(v[1] <= a[1] for v, a in zip(vf, ar)) and sum(r[1] for r in vf) < sum(r[1] for r in ar)


@pytest.mark.parametrize("kw", [{"threshold": 0.5}, {"threshold": 0.7}, {"threshold": 0.9}, {"verify": True},
                                {"verify": True, "draft_tree": False}])
def test_cached_equals_uncached_and_batch_equals_single(trained, kw):
    model, info, prompts = trained
    batched = decode_blockwise(model, prompts[:8], cfg(**kw), info)
    for p, got in zip(prompts[:8], batched):
        assert got == decode_blockwise(model, [p], cfg(**kw), info)[0] == reference_blockwise(model, p, cfg(**kw), info)


@pytest.mark.parametrize("kw", [{"verify": False}, {"verify": True}, {"verify": True, "draft_tree": False}])
def test_cache_holds_only_committed_clean_tokens(trained, kw):
    model, info, prompts = trained
    cache = KVCache(model.config, 3, 200, "cpu", torch.float32)
    results = decode_blockwise(model, prompts[:3], cfg(max_new_tokens=25, **kw), info, cache=cache)
    for b, (p, (out, _)) in enumerate(zip(prompts, results)):
        L = int(cache.length[b])
        committed = (p + out)[:L]
        assert len(p) < L <= len(p) + len(out)
        fresh = KVCache(model.config, 1, 200, "cpu", torch.float32)
        with torch.no_grad():
            model(torch.tensor([committed]), cache=fresh)
        for layer in range(len(cache.k)):
            assert (cache.k[layer][b, :, :L] - fresh.k[layer][0, :, :L]).abs().max() < 1e-5
            assert (cache.v[layer][b, :, :L] - fresh.v[layer][0, :, :L]).abs().max() < 1e-5
