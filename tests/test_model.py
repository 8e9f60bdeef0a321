"""model.py against transformers on real and random weights, masks dense vs Flex, the KV cache."""
import json

import pytest
import torch
from conftest import EAGER_FLEX, STORIES, assert_clean_error, needs_invariant_bf16, run_main

import transformers
from decoders import decode_ar
from generate import Decoding
from reference import reference_ar
from hf import from_pretrained, save_pretrained
from masks import bidirectional_mask, causal_mask, dense_mask
from model import KVCache, ModelConfig, Transformer
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from types import SimpleNamespace

INFO = {"eos_ids": [], "vocab_size": 10 ** 9, "mask_id": 10 ** 9}


def hf_logits(path, x):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(x).logits


def test_stories260k_matches_transformers():
    model = from_pretrained(STORIES).eval()
    x = torch.randint(0, 512, (2, 101), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(x)
    assert (ours - hf_logits(STORIES, x)).abs().max() < 1e-4


def test_stories260k_greedy_64_tokens_identical():
    tok = transformers.AutoTokenizer.from_pretrained(STORIES)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(STORIES).eval()
    want = hf.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=None,
                       min_new_tokens=64)[0, ids.shape[1]:].tolist()
    model = from_pretrained(STORIES).eval()
    c = Decoding(max_new_tokens=64, temperature=0.0, top_p=1.0)
    got, forwards = decode_ar(model, [ids[0].tolist()], c, INFO)[0]
    assert got == want and forwards == 64
    assert tok.decode(got).startswith(", there was a little girl named Lily.")


def _tiny_hf(kind, **kw):
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    common.update(kw)
    cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
           "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[kind]
    torch.manual_seed(0)
    m = cls[1](cls[0](**common)).eval()
    with torch.no_grad():  # random biases and norms so that every tensor matters
        for n, p in m.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.normal_(0.5 if "norm" in n else 0.0, 0.1)
    return m


@pytest.mark.parametrize("kind,kw", [
    ("qwen2", {"tie_word_embeddings": True}),
    ("qwen3", {"head_dim": 16, "tie_word_embeddings": False}),
    ("llama", {"tie_word_embeddings": False, "rope_theta": 500000.0,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    ("mistral", {"sliding_window": None}),
])
def test_hf_families_and_export_round_trip(tmp_path, kind, kw):
    hf = _tiny_hf(kind, **kw)
    hf.save_pretrained(tmp_path / "hf")
    x = torch.randint(0, 96, (2, 120), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(x).logits
    ours = from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        assert (ours(x) - want).abs().max() < 1e-4
    save_pretrained(ours, str(tmp_path / "ours"))
    assert (hf_logits(str(tmp_path / "ours"), x) - want).abs().max() < 1e-4


def _packed_doc(B, T, n_docs, seed):
    g = torch.Generator().manual_seed(seed)
    cuts = torch.stack([torch.randperm(T - 1, generator=g)[:n_docs - 1].sort().values + 1 for _ in range(B)])
    doc = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        for c in cuts[b]:
            doc[b, c:] += 1
    return doc


@pytest.mark.parametrize("T", [17, 64, 130])
@EAGER_FLEX
def test_dense_and_flex_agree(T):
    B, H, D = 2, 4, 8
    doc = _packed_doc(B, T, 3, T)
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    rules = {  # each mask function beside its definition written out as loops
        "causal": (causal_mask(), lambda b, i, j: j <= i),
        "causal_doc": (causal_mask(doc), lambda b, i, j: j <= i and doc[b, i] == doc[b, j]),
        "bidirectional_doc": (bidirectional_mask(doc), lambda b, i, j: bool(doc[b, i] == doc[b, j])),
    }
    for name, (mm, rule) in rules.items():
        dense = dense_mask(mm, B, T, T, "cpu")
        want = torch.tensor([[[rule(b, i, j) for j in range(T)] for i in range(T)] for b in range(B)])
        assert torch.equal(dense[:, 0], want), name
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        bm = create_block_mask(mm, B, None, T, T, device="cpu")
        assert (flex_attention(q, k, v, block_mask=bm) - ref).abs().max() < 1e-5, name


@EAGER_FLEX
def test_model_forward_dense_vs_flex_packed():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)).eval()
    m.init_weights(0)
    x = torch.randint(0, 64, (2, 48))
    doc = _packed_doc(2, 48, 4, 0)
    pos = torch.stack([torch.cat([torch.arange((d == i).sum()) for i in range(4)]) for d in doc])
    with torch.no_grad():
        a = m(x, pos, causal_mask(doc))
        b = m.set_backend("flex")(x, pos, causal_mask(doc))
    assert (a - b).abs().max() < 1e-5


def _model():
    m = Transformer(ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)).eval()
    m.init_weights(3)
    return m


@torch.no_grad()
def test_kv_cache_equals_full_recompute():
    m = _model()
    x = torch.randint(0, 64, (1, 30), generator=torch.Generator().manual_seed(0))
    full = m(x)
    for step in (1, 4):
        cache = KVCache(m.config, 1, 64, "cpu", torch.float32)
        parts = [m(x[:, :10], cache=cache)]
        cache.commit(10)
        for s in range(10, 30, step):
            parts.append(m(x[:, s:s + step], cache=cache))
            cache.commit(parts[-1].shape[1])
        assert (torch.cat(parts, 1) - full).abs().max() < 1e-5


@torch.no_grad()
def test_uncommitted_tokens_leave_no_trace():
    m = _model()
    x = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(1))
    junk = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(2))
    cache = KVCache(m.config, 1, 64, "cpu", torch.float32)
    m(x[:, :12], cache=cache)
    cache.commit(12)
    m(junk, cache=cache)             # written, attended to, never committed
    m(junk[:, :3], cache=cache)
    got = m(x[:, 12:], cache=cache)
    assert (got - m(x)[:, 12:]).abs().max() < 1e-5


@torch.no_grad()
def test_batched_rows_of_different_lengths_equal_single_rows():
    m = _model()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (3, 11, 7)]
    c = Decoding(max_new_tokens=12, temperature=0.0, top_p=1.0)
    batched = decode_ar(m, prompts, c, INFO)
    for p, (ids, _) in zip(prompts, batched):
        assert ids == decode_ar(m, [p], c, INFO)[0][0] == reference_ar(m, p, 12, INFO)


@torch.no_grad()
def test_ar_with_eos_rows_finishing_at_different_steps_equals_full_recompute():
    m = from_pretrained(STORIES).eval()   # a real model: varied greedy continuations
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (3, 11, 7, 5)]
    free = [reference_ar(m, p, 16, INFO) for p in prompts]

    def ends(eos):   # the step each row would stop at with these EOS ids (None: runs to the limit)
        return [next((k + 1 for k, t in enumerate(f) if t in eos), None) for f in free]
    eos = next({a, b} for a in free[0] for b in free[1] if len({e for e in ends({a, b}) if e}) >= 2)
    info = {**INFO, "eos_ids": sorted(eos)}
    c = Decoding(max_new_tokens=16, temperature=0.0, top_p=1.0)
    batched = decode_ar(m, prompts, c, info)
    want = [reference_ar(m, p, 16, info) for p in prompts]
    assert [ids for ids, _ in batched] == want
    ended = [len(w) for w in want if w[-1] in eos]
    assert len(set(ended)) >= 2 and len(set(map(len, want))) >= 2


def test_bad_checkpoints_give_one_clear_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(run_main("generate.py", f"--init_from={empty}", "--prompt=hi"), "config.json")
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert_clean_error(run_main("generate.py", f"--init_from={bad}", "--prompt=hi"), "model_type 'gpt2'")
    hf = _tiny_hf("llama")
    hf.save_pretrained(tmp_path / "shape")
    cfg = json.loads((tmp_path / "shape" / "config.json").read_text())
    cfg["intermediate_size"] = 40
    (tmp_path / "shape" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match=r"model.safetensors: weight 'model.layers.0.mlp.gate_proj.weight' has shape"):
        from_pretrained(str(tmp_path / "shape"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for compiled FlexAttention")
def test_compiled_flex_on_cuda_matches_dense_bf16():
    """Forward and backward through compiled FlexAttention equal the dense-mask path in bf16,
    for packed causal rows and for the interleaved next-block mask."""
    import numpy as np
    import objectives
    import batching
    from masks import interleaved_mask
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=320, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)).cuda()
    m.init_weights(0)
    m = m.to(torch.bfloat16)
    c = SimpleNamespace(block_size=4, mask_id=257)
    rng = np.random.default_rng(0)
    rows = [[objectives.interleaved_layout(rng.integers(0, 256, size=p + r), p, c) for p, r in ((20, 37), (9, 50), (30, 11))]
            for _ in range(2)]
    b = {k: v.cuda() for k, v in batching.collate(rows, 256, 256).items()}
    for mm in (causal_mask(b["doc"]), interleaved_mask(b["doc"], b["pos"], b["slot"], b["sj"])):
        outs, grads = [], []
        for backend in ("sdpa", "flex"):
            m.zero_grad()
            y = m.set_backend(backend)(b["idx"], b["pos"], mm).float()
            y.square().mean().backward()
            outs.append(y.detach())
            grads.append(m.layers[0].self_attn.qkv_proj.weight.grad.float().clone())
        assert ((outs[1] - outs[0]).norm() / outs[0].norm()).item() < 1e-2
        assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 2e-2


def test_chunked_cross_entropy_equals_one_chunk():
    """head_loss in chunks of 7 rows (checkpointed) = one chunk = F.cross_entropy of the logits:
    the losses, the argmax and every gradient."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=320, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))
    m.init_weights(0)
    idx = torch.randint(0, 320, (3, 20))
    sel = torch.rand(3, 20) < 0.6
    tgt = idx.roll(-1, 1)[sel]
    logits = m(idx, select=sel)
    want = torch.nn.functional.cross_entropy(logits, tgt, reduction="none")
    g0 = torch.autograd.grad(want.sum(), list(m.parameters()))
    for rows in (0, 7):
        m.ce_rows = rows
        ce, pred = m(idx, select=sel, targets=tgt)
        assert (ce - want).abs().max() < 1e-5 and torch.equal(pred, logits.argmax(-1))
        g = torch.autograd.grad(ce.sum(), list(m.parameters()))
        assert all((a - b).abs().max() < 1e-5 for a, b in zip(g, g0))


@pytest.mark.parametrize("T,S", [(1, 40), (16, 70), (130, 130)])
def test_invariant_attention_is_attention(T, S):
    """The batch-invariant backend's attention (written out, keys zero-padded to its mask's width)
    against SDPA on the same dense mask, grouped query heads included; in fp32 the two differ by
    rounding only."""
    from invariant import invariant_attention
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(T)
    q = torch.randn(2, 6, T, 16, generator=g)
    k, v = (torch.randn(2, 2, S, 16, generator=g) for _ in range(2))
    mask = dense_mask(causal_mask(), 2, T, S, "cpu") if T == S else torch.rand(2, 1, T, S, generator=g) < 0.7
    mask = mask.clone()
    mask[..., 0] = True   # every query sees at least one key, as in a real mask
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert (invariant_attention(q, k, v, mask) - want).abs().max() < 1e-5
    padded = F.pad(mask, (0, 64 - S % 64))   # keys past S: masked, and zeros the function adds itself
    assert (invariant_attention(q, k, v, padded) - want).abs().max() < 1e-5


@torch.no_grad()
def test_invariant_backend_gives_each_token_the_same_bits_in_any_forward():
    """bf16, the invariant backend: a token's logits are the same bits fed one per cached forward,
    sixteen in one forward, or beside other rows of other lengths (what makes bf16 --verify exactly
    AR). The model is wide enough for bf16 rounding to show: SDPA fails the same check here."""
    needs_invariant_bf16()
    cfg = ModelConfig(vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=256, intermediate_size=512)
    m = Transformer(cfg).eval()
    m.init_weights(0)
    m = m.to(torch.bfloat16)
    x = torch.randint(0, 256, (3, 90), generator=torch.Generator().manual_seed(0))

    def logits(backend):
        m.set_backend(backend)
        one = KVCache(cfg, 1, 128, "cpu")
        m(x[:1, :60], cache=one)
        one.commit(60)
        singles = []
        for t in range(60, 76):
            singles.append(m(x[:1, t:t + 1], cache=one)[0, 0])
            one.commit(1)
        three = KVCache(cfg, 3, 128, "cpu")     # rows of other lengths beside it, all 16 new tokens at once
        m(x[:, :60], cache=three)
        three.commit(torch.tensor([60, 37, 89]))
        batched = m(torch.stack([x[0, 60:76], x[1, 37:53], x[2, 70:86]]), cache=three)[0]
        return torch.stack(singles), batched
    singles, batched = logits("invariant")
    assert torch.equal(singles, batched)
    singles, batched = logits("sdpa")
    assert not torch.equal(singles, batched)   # the check can fail: bf16 SDPA's bits follow the forward's shape


def test_invariant_backend_refuses_a_machine_whose_matmul_is_not_invariant(monkeypatch):
    from configurator import UserError
    needs_invariant_bf16()
    import model as model_module
    m = _model().to(torch.bfloat16)
    m.set_backend("invariant")   # bf16 on this machine: the property holds
    real = model_module.F.linear
    monkeypatch.setattr(model_module.F, "linear", lambda x, w, b=None: real(x, w, b) + 1e-3 * x.shape[0])
    with pytest.raises(UserError, match="matmul gives a row other bits"):
        m.set_backend("invariant")


def _big_enough_to_pack():
    """Some linears at least PACK_MIN weights (gate_up 2048x256, down 256x1024, the head 1100x256),
    some below it (qkv 512x256, o 256x256)."""
    cfg = ModelConfig(vocab_size=1100, n_layer=2, n_head=4, n_kv_head=2, n_embd=256, intermediate_size=1024)
    return Transformer(cfg).init_weights(0).eval()


def test_prepacked_decoding_is_f_linear_and_follows_the_weights():
    """set_prepack: decoding (inference mode, eval) runs exactly the float32 linears with >= PACK_MIN
    weights through oneDNN on prepacked copies; the logits are F.linear's up to fp32 rounding; a
    weight written in place is repacked; training and no_grad forwards never pack; a deep copy of a
    packed model starts without copies."""
    import copy
    from invariant import PACK_MIN
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN (the packed path is off without it)")
    m = _big_enough_to_pack()
    x = torch.randint(0, 1100, (2, 9), generator=torch.Generator().manual_seed(0))
    packed = lambda: {n for n, mod in m.named_modules() if getattr(mod, "packs", None)}
    want = {n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and mod.weight.numel() >= PACK_MIN}
    assert want == {f"layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")} | {"lm_head"}

    def decode():
        with torch.inference_mode():
            return m(x)

    def logits(pack):
        m.set_prepack(pack)
        return decode()
    ref = logits(False)
    assert packed() == set()
    torch.testing.assert_close(logits(True), ref, atol=1e-4, rtol=1e-4)
    assert packed() == {n.replace("lm_head", "") for n in want}   # the head's copy lives on the model
    with torch.no_grad():
        m.layers[1].mlp.down_proj.weight.mul_(1.5)   # in place: same tensor, new version
    after = decode()   # on the copies made above, unless the new version remade this one
    torch.testing.assert_close(after, logits(False), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(after, ref, atol=1e-2)
    logits(True)   # copies on m again, for the deep copy
    twin = copy.deepcopy(m)
    assert packed() and not any(getattr(mod, "packs", None) for mod in twin.modules())
    m = twin.set_prepack(True)
    with torch.no_grad():
        m(x)
    m.train()
    m(x).sum().backward()
    assert packed() == set()
