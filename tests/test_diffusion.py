"""mode=diffusion and --method=diffusion: the loss by hand, the remasking rules, the cache."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import objectives
import batching
import train
from conftest import EAGER_FLEX, STORIES, Recorder
from reference import reference_ar
from configurator import configure, defaults_from
from decoders import choose, decode_blocks, decode_blocks_verified, decode_diffusion
from generate import Decoding
from hf import from_pretrained
from masks import bidirectional_mask, block_causal_mask, block_diffusion_mask, dense_mask
from model import ModelConfig, Transformer

EOS, MASK = 256, 257


def cfg(**kw):
    c = configure(defaults_from(vars(train)), [f"--{k}={v}" for k, v in kw.items()])
    c.eos_id, c.mask_id = EOS, MASK
    return c


def tiny_model(seed=0):
    m = Transformer(ModelConfig(vocab_size=320, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))
    m.init_weights(seed)
    return m


def batch(c):
    rng = np.random.default_rng(1)
    rows = [[objectives.diffusion_layout(rng.integers(0, 200, size=p + r), p, c) for p, r in ((5, 7), (3, 4))]]
    return batching.collate(rows, 40, EOS)


@pytest.mark.parametrize("weighting", ["original", "linear", "cart"])
@pytest.mark.parametrize("shift", [False, True])
def test_loss_by_hand(weighting, shift):
    c = cfg(mode="diffusion", gen_length=10, time_weighting=weighting, shift=shift, cart_p=0.3, block_size=0)
    b = batch(c)
    assert int(b["resp"].sum()) == 20   # both responses EOS-padded to gen_length=10
    m, seed = tiny_model(), 7
    rec = Recorder(m)
    n_resp = float(b["resp"].sum())
    got = objectives.diffusion_loss(rec, b, c, torch.Generator().manual_seed(seed), {"tgt": n_resp},
                               train.Backward())["loss"]
    # the same random draws, in the same order, then every term written out
    g = torch.Generator().manual_seed(seed)
    t_doc = (1 - c.eps) * torch.rand(1, 2, generator=g) + c.eps   # two documents in the row
    u = torch.rand(b["resp"].shape, generator=g)
    noisy = rec.inputs[0][0]
    idx, doc, resp = b["idx"][0], b["doc"][0], b["resp"][0]
    with torch.no_grad():
        logits = m(noisy[None], b["pos"], bidirectional_mask(b["doc"]))[0]
    total = 0.0
    for i in range(40):
        d = int(doc[i])
        masked_i = bool(resp[i]) and bool(u[0, i] < t_doc[0, d])
        assert (noisy[i] == MASK) == masked_i          # only response tokens are ever masked
        if not masked_i:
            assert noisy[i] == idx[i]
            continue
        t = float(t_doc[0, d])
        if weighting == "original":
            w = 1 / t
        elif weighting == "linear":
            w = 1 - t
        else:
            w = sum(0.5 * 0.3 * 0.7 ** (abs(i - j) - 1) for j in range(40)
                    if j != i and int(doc[j]) == d and noisy[j] != MASK)
        src = i - 1 if shift else i                     # Dream: token i is predicted at i - 1
        total += w * float(F.cross_entropy(logits[src][None], idx[i][None]))
    assert math.isclose(got, total / n_resp, rel_tol=1e-5), (got, total / n_resp)


def test_complementary_masks_cover_the_response_once():
    c = cfg(mode="diffusion", gen_length=10, complementary_mask=True, block_size=0)
    b = batch(c)
    rec = Recorder(tiny_model())
    objectives.diffusion_loss(rec, b, c, torch.Generator().manual_seed(0), {"tgt": 20.0}, train.Backward())
    a, z = (rec.inputs[0] == MASK), (rec.inputs[1] == MASK)
    assert not (a & z).any() and torch.equal(a | z, b["resp"])


def dcfg(**kw):
    return Decoding(**{"alg": "maskgit_plus", "max_new_tokens": 12, **kw})   # the rest: generate.py's defaults


def test_each_alg_picks_its_rule():
    # four masked positions with hand-made distributions over 4 tokens
    p = torch.tensor([[0.70, 0.10, 0.10, 0.10],    # confident, wide margin, low entropy
                      [0.45, 0.44, 0.10, 0.01],    # top-1 0.45 but tiny margin
                      [0.50, 0.50, 0.00, 0.00],    # top-1 0.50, margin 0, entropy log 2
                      [0.60, 0.40, 0.00, 0.00]])   # top-1 0.60, margin 0.2, entropy 0.67
    logits = torch.log(p.clamp(min=1e-12))
    pick = lambda alg, n: choose(logits, n, dcfg(alg=alg), None)[1].nonzero()[:, 0].tolist()
    assert pick("maskgit_plus", 2) == [0, 3]       # highest top-1 probability
    assert pick("topk_margin", 2) == [0, 3]        # largest p1 - p2: 0.6, 0.2
    assert pick("topk_margin", 3) == [0, 1, 3]     # then 0.01 beats 0
    assert pick("entropy", 3) == [0, 2, 3]         # lowest entropies: 0.94, 0.69, 0.67 (vs 0.98)
    x0, sel = choose(logits, 1, dcfg(dthreshold=0.55), None)
    assert sel.nonzero()[:, 0].tolist() == [0, 3]  # the most confident always, plus p >= 0.55
    _, sel = choose(logits, 1, dcfg(dthreshold=0.99), None)
    assert sel.nonzero()[:, 0].tolist() == [0]
    g = torch.Generator().manual_seed(0)
    assert len(choose(logits, 3, dcfg(alg="origin"), g)[1].nonzero()) == 3


INFO = {"eos_ids": [EOS], "eos_id": EOS, "mask_id": MASK, "vocab_size": 258}


@pytest.mark.parametrize("alg", ["origin", "maskgit_plus", "topk_margin", "entropy"])
def test_no_mask_left(alg):
    m = tiny_model().eval()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    for kw in ({}, {"steps": 3}, {"dthreshold": 0.9}, {"block_length": 4}):
        out = decode_diffusion(m, prompts, dcfg(alg=alg, **kw), INFO, torch.Generator().manual_seed(0))
        for ids, forwards in out:
            assert MASK not in ids and 0 < forwards <= 12 and len(ids) <= 12


@pytest.mark.parametrize("kw", [{"block_length": 4}, {"block_length": 3, "steps": 4},
                                {"block_length": 4, "dthreshold": 0.5}, {"block_length": 6, "alg": "entropy"}])
@pytest.mark.parametrize("shift,causal", [(False, False), (True, False), (True, True)])
def test_cached_blocks_equal_uncached(kw, shift, causal):
    m = tiny_model(3).eval()
    with torch.no_grad():   # peaky logits: confidences far apart, so rounding cannot reorder them
        m.embed_tokens.weight.mul_(30)
    info = dict(INFO, shift=shift, causal_clean=causal)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    cached = decode_blocks(m, prompts, dcfg(**kw), info)
    assert cached == decode_blocks(m, prompts, dcfg(**kw), info, reference=True)
    # a checkpoint trained with block_size decodes this way without --block_length
    assert cached == decode_diffusion(m, prompts, dcfg(**{**kw, "block_length": 0}), dict(info, block_size=kw["block_length"]))
    for p, got in zip(prompts, cached):   # batch = single row
        assert decode_blocks(m, [p], dcfg(**kw), info) == [got]
    masks = []   # the recomputing decoder's masks: with causal_clean, causal up to the canvas (the last L)
    def spy(idx, pos, mask, **a):
        masks.append((idx.shape[1], mask))
        return m(idx, pos, mask, **a)
    spy.lm_head, spy.config = m.lm_head, m.config
    decode_blocks(spy, prompts[1:2], dcfg(**kw), info, reference=True)
    L = kw["block_length"]
    for T, mask in masks:
        by_hand = (lambda b_, h, q, kv: (kv <= q) | ((q >= T - L) & (kv >= T - L))) if causal else \
            (lambda b_, h, q, kv: (kv < 5) | ((q >= 5) & ((kv - 5) // L <= (q - 5) // L)))
        assert torch.equal(dense_mask(mask, 1, T, T, "cpu"), dense_mask(by_hand, 1, T, T, "cpu"))


@torch.no_grad()
def test_single_canvas_matches_a_slow_loop():
    """The one-canvas sampler (maskgit_plus, one token per step) against the rule written out:
    each step, over all masked canvas positions, unmask the one whose argmax is most probable,
    positions whose argmax is EOS only when no other is left (eos_last)."""
    m = tiny_model(5).eval()
    with torch.no_grad():
        m.embed_tokens.weight.mul_(30)
    prompts, G = [[5, 6, 7, 8], [9, 10]], 6
    got = decode_diffusion(m, prompts, dcfg(max_new_tokens=G), INFO)
    for p, (ids, forwards) in zip(prompts, got):
        seq = p + [MASK] * G
        for _ in range(G):
            probs = torch.softmax(m(torch.tensor([seq]), None, bidirectional_mask(torch.zeros(1, len(seq), dtype=torch.long)))[0], -1)
            probs[:, 258:] = 0
            probs[:, MASK] = 0
            masked = [i for i in range(len(p), len(seq)) if seq[i] == MASK]
            masked = [i for i in masked if int(probs[i].argmax()) != EOS] or masked
            best = max(masked, key=lambda i: float(probs[i].max()))
            seq[best] = int(probs[best].argmax())
        want = seq[len(p):]
        want = want[:want.index(EOS) + 1] if EOS in want else want
        assert ids == want and forwards == G


class EarlyEOS(torch.nn.Module):
    """A stand-in model: row b's answer is token 5 up to position stops[b], then EOS, so the rows
    of one batch end in different blocks. Raises if a sampler keeps calling it (a hang)."""

    def __init__(self, prompts, stops):
        super().__init__()
        self.lm_head = torch.nn.Linear(1, 1)
        self.config = ModelConfig(vocab_size=320, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.start, self.calls, self.inputs = torch.tensor([len(p) + s for p, s in zip(prompts, stops)]), 0, []

    def forward(self, idx, pos=None, mask_mod=None, cache=None):
        self.calls += 1
        assert self.calls < 200, "the sampler does not terminate"
        self.inputs.append(idx.clone())
        B, T = idx.shape
        p = (cache.length if cache is not None else torch.zeros(B, dtype=torch.long))[:, None] + torch.arange(T)
        eos = p >= self.start[:, None]
        logits = torch.zeros(B, T, 320)
        logits[..., 5], logits[..., EOS] = torch.where(eos, 0.0, 10.0), torch.where(eos, 10.0, 0.0)
        return logits


@pytest.mark.parametrize("alg", ["origin", "maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("dthreshold", [0.0, 0.5])
def test_rows_ending_in_different_blocks_terminate(alg, dthreshold):
    prompts, stops = [[5, 6, 7], [8, 9], [10]], [1, 4, 7]
    want = [[5] * s + [EOS] for s in stops]
    for decode, info in ((decode_diffusion, INFO), (decode_blocks, dict(INFO, block_size=2))):
        m = EarlyEOS(prompts, stops)
        out = decode(m, prompts, dcfg(alg=alg, dthreshold=dthreshold, block_length=2), info, torch.Generator().manual_seed(0))
        assert [ids for ids, _ in out] == want
        # a row stops after the block holding its EOS: rows ending earlier take fewer forwards
        assert all(0 < f <= 12 for _, f in out) and out[0][1] < out[2][1]


@pytest.mark.parametrize("kw", [{}, {"dthreshold": 0.5}, {"steps": 3}, {"alg": "origin"}])
def test_semi_ar_unmasks_only_the_current_block_of_the_whole_canvas(kw):
    """LLaDA's semi-AR: every forward holds the whole canvas (of the checkpoint's gen_length, not
    max_new_tokens), and no position past the current block is unmasked before it is reached."""
    prompts, stops, G, L = [[5, 6, 7], [8, 9]], [9, 5], 8, 2
    m = EarlyEOS(prompts, stops)
    out = decode_diffusion(m, prompts, dcfg(block_length=L, max_new_tokens=12, **kw), dict(INFO, gen_length=G),
                           torch.Generator().manual_seed(0))
    assert [ids for ids, _ in out] == [[5] * 8, [5] * 5 + [EOS]]
    for x in m.inputs:
        assert x.shape[1] == 3 + G
        for b, p in enumerate(prompts):
            canvas = x[b, len(p):len(p) + G].tolist()
            current = next((i // L for i, t in enumerate(canvas) if t == MASK), G // L)
            assert all(t == MASK for t in canvas[(current + 1) * L:]), canvas


def block_batch(shift, B=4, causal=False, **kw):
    c = cfg(mode="diffusion", block_size=B, shift=shift, gen_length=0, causal_clean=causal, **kw)
    rng = np.random.default_rng(2)
    rows = [[objectives.diffusion_layout(rng.integers(0, 200, size=p + r), p, c) for p, r in ((5, 7), (3, 9))]]
    return c, batching.collate(rows, 64, EOS)


@EAGER_FLEX
@pytest.mark.parametrize("causal", [False, True])
def test_block_diffusion_mask_truth_table_and_flex(causal):
    _, b = block_batch(False)
    doc, noisy, blk = b["doc"], b["resp"], b["blk"]
    mm = block_diffusion_mask(doc, noisy, blk, causal)
    dense = dense_mask(mm, 1, 64, 64, "cpu")[0, 0]
    for q in range(64):
        for k in range(64):
            same = doc[0, q] == doc[0, k]
            nq, nk, bq, bk = bool(noisy[0, q]), bool(noisy[0, k]), int(blk[0, q]), int(blk[0, k])
            if not nq:   # clean: block-causal (or token-causal) over clean tokens
                want = same and not nk and (k <= q if causal else bk <= bq)
            else:
                want = same and ((nk and bk == bq) or (not nk and bk < bq))
            assert bool(dense[q, k]) == bool(want), (q, k)
    m = tiny_model()
    x = torch.randint(0, 256, (1, 64))
    with torch.no_grad():   # the same mask_mod through FlexAttention and as a dense SDPA mask
        a = m.set_backend("sdpa")(x, b["pos"], mm)
        z = m.set_backend("flex")(x, b["pos"], mm)
    assert (a - z).abs().max() < 1e-4


@pytest.mark.parametrize("shift,causal", [(False, False), (True, False), (True, True)])
def test_block_diffusion_training_logits_are_the_decoding_forward(shift, causal):
    """A noised block's logits in the training layout = a decoding forward over [prompt + clean
    earlier blocks][that noised block] under block_causal_mask (what decode_blocks computes), and
    with shift the block's first token is predicted by the clean token before it. With causal_clean
    the decoding mask is written out here (context causal, the block bidirectional and seeing all
    of it), and the clean stream's logits are those of a plain causal forward: an AR model."""
    c, b = block_batch(shift, causal=causal)
    m = tiny_model(1)
    g = torch.Generator().manual_seed(0)
    masked = b["resp"] & (torch.rand(b["resp"].shape, generator=g) < 0.5)
    noisy = torch.where(masked, MASK, b["idx"])
    with torch.no_grad():
        train_logits = m(noisy, b["pos"], block_diffusion_mask(b["doc"], b["resp"], b["blk"], causal))[0]
    starts = [0, 5 + 8 + 8]                        # the two examples: prompt 5, 8 response tokens (x2)
    for s0, P, R in ((starts[0], 5, 8), (starts[1], 3, 12)):
        if causal:
            with torch.no_grad():
                ar = m(b["idx"][:, s0:s0 + P + R])[0]
            assert (ar - train_logits[s0:s0 + P + R]).abs().max() < 1e-5
        for k in range(R // 4):
            clean = b["idx"][0, s0:s0 + P + 4 * k].tolist()
            blockn = noisy[0, s0 + P + R + 4 * k:s0 + P + R + 4 * k + 4].tolist()
            x = torch.tensor([clean + blockn])
            n = len(clean)
            rule = block_causal_mask(torch.tensor([P]), 4, k + 1 if causal else None)
            if causal:
                by_hand = lambda b_, h, q, kv: (kv <= q) | ((q >= n) & (kv >= n))
                assert torch.equal(dense_mask(rule, 1, n + 4, n + 4, "cpu"), dense_mask(by_hand, 1, n + 4, n + 4, "cpu"))
            with torch.no_grad():
                dec = m(x, None, rule)[0]
            got = train_logits[s0 + P + R + 4 * k:s0 + P + R + 4 * k + 4]
            assert (dec[-4:] - got).abs().max() < 1e-5
            if shift:   # the token before the block: the clean stream in training, the context in decoding
                back = s0 + P + R + 4 * k + int(b["back"][0, s0 + P + R + 4 * k])
                assert back == s0 + P + 4 * k - 1
                assert (dec[len(clean) - 1] - train_logits[back]).abs().max() < 1e-5


@pytest.mark.parametrize("ar_weight", [0.0, 0.5])
def test_block_diffusion_loss_by_hand(ar_weight):
    c, b = block_batch(True, causal=bool(ar_weight), ar_loss_weight=ar_weight)
    m, seed = tiny_model(), 3
    rec = Recorder(m)
    n, n_ar = float(b["resp"].sum()), float((b["ar"] >= 0).sum())
    got = objectives.diffusion_loss(rec, b, c, torch.Generator().manual_seed(seed), {"tgt": n, "ar": n_ar},
                               train.Backward())["loss"]
    g = torch.Generator().manual_seed(seed)
    t_doc = (1 - c.eps) * torch.rand(1, 2, generator=g) + c.eps
    noisy = rec.inputs[0][0]
    with torch.no_grad():
        logits = m(noisy[None], b["pos"], block_diffusion_mask(b["doc"], b["resp"], b["blk"], c.causal_clean))[0]
    total, layout = 0.0, [(0, 5, 8), (21, 3, 12)]
    for s0, P, R in layout:
        for r in range(R):
            i = s0 + P + R + r
            if noisy[i] != MASK:
                continue
            src = (s0 + P + r - 1) if r % 4 == 0 else i - 1   # shift: from the clean token before the block
            total += float(F.cross_entropy(logits[src][None], b["idx"][0, i][None])) / float(t_doc[0, int(b["doc"][0, i])])
    assert (noisy[:21][~b["resp"][0, :21]] != MASK).all()
    ar_total = 0.0   # the clean stream's next tokens: prompt's last .. the response's last real token
    for (s0, P, _), R in zip(layout, (7, 9)):   # real response lengths (padded to 8 and 12)
        assert n_ar == 0 or (b["ar"][0, s0 + P - 1:s0 + P + R - 1] == b["idx"][0, s0 + P:s0 + P + R]).all()
        for j in range(s0 + P - 1, s0 + P + R - 1):
            ar_total += float(F.cross_entropy(logits[j][None], b["idx"][0, j + 1][None]))
    want = total / n + ar_weight * (ar_total / n_ar if n_ar else 0.0)
    assert n_ar == (7 + 9 if ar_weight else 0) and math.isclose(got, want, rel_tol=1e-5), (got, want)


class Probed:
    """The model, recording what the probe asked it; its first selected prediction forced right
    (a random model scores 0 everywhere, which would not test the weighting)."""

    def __init__(self, m):
        self.m = m

    def __call__(self, idx, pos, mask, select, targets):
        ce, pred = self.m(idx, pos, mask, select=select, targets=targets)
        self.idx, self.select, self.targets, self.pred = idx, select, targets, pred.clone()
        return ce, torch.cat([targets[:1], pred[1:]])


@pytest.mark.parametrize("B,shift", [(0, False), (0, True), (4, True), (4, False)])
def test_probe_scores_the_next_token_after_a_clean_prefix(B, shift):
    """diffusion_probe: per example, the response before a cut is clean and the rest MASK, the cut
    never falls on padding, the scored prediction is the one a decoding forward makes from the same
    context (whole canvas; or [prompt + clean earlier blocks][this block]), and the accuracy is
    weighted by the real response length."""
    c = cfg(mode="diffusion", block_size=B, shift=shift, gen_length=10)
    rng = np.random.default_rng(4)
    shapes = ((5, 7), (3, 4), (4, 13))                 # (prompt, real response): padded to 12, 12, 16
    lays = [objectives.diffusion_layout(rng.integers(0, 200, size=p + r), p, c) for p, r in shapes]
    b = batching.collate([lays], 96, EOS)
    m, seen = tiny_model(2), {k: set() for k in range(3)}
    norm = {k: float(v) for k, v in train.MODES["diffusion"]["counts"](b, c).items()}   # real: the weights' total
    for seed in range(12):
        rec = Probed(m)
        acc = objectives.diffusion_probe(rec, b, c, torch.Generator().manual_seed(seed), norm)["acc_next"]
        sel = rec.select[0].nonzero()[:, 0].tolist()
        assert len(sel) == 3
        s0, want_num = 0, 0.0
        for d, ((P, R), lay) in enumerate(zip(shapes, lays)):
            n = len(lay["idx"])
            Rp = (n - P) // (2 if B else 1)
            noisy = rec.idx[0, s0 + n - Rp:s0 + n].tolist()
            k = noisy.index(MASK)
            assert k < R and noisy[:k] == lay["idx"][n - Rp:n - Rp + k].tolist() and set(noisy[k:]) == {MASK}
            seen[d].add(k)
            if B:   # decoding: [prompt + clean blocks before k's][k's block, noised]
                ctx = lay["idx"][:P + k // B * B].tolist()
                x = torch.tensor([ctx + noisy[k // B * B:k // B * B + B]])
                with torch.no_grad():
                    logits = m(x, None, block_causal_mask(torch.tensor([P]), B))[0]
                at = len(ctx) + k % B - shift
            else:
                x = torch.tensor([lay["idx"][:P].tolist() + noisy])
                with torch.no_grad():
                    logits = m(x, None, bidirectional_mask(torch.zeros(1, len(x[0]), dtype=torch.long)))[0]
                at = P + k - shift
            j = sel.index(s0 + n - Rp + k + int(lay["back"][n - Rp + k]))
            assert int(rec.targets[j]) == int(lay["idx"][n - Rp + k])
            assert int(rec.pred[j]) == int(logits[at].argmax())
            want_num += R * float(j == 0 or rec.pred[j] == rec.targets[j])
            s0 += n
        assert math.isclose(acc, want_num / sum(R for _, R in shapes), rel_tol=1e-6)
    assert all(len(seen[d]) > 2 for d in seen)          # the cut moves with the seed


@pytest.mark.parametrize("dthreshold,shift", [(0.01, True), (0.5, True), (0.95, True), (0.5, False)])
def test_verified_block_decoding_is_the_models_ar_greedy(dthreshold, shift):
    """decode_blocks_verified (causal_clean) = greedy AR of the clean stream, token for token
    (the real stories260K weights, whose drafts at MASK positions are often rejected; '.' as EOS so
    rows end in different blocks); batch = single; and a model whose every prediction is the same
    token accepts every block."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(STORIES)
    m = from_pretrained(STORIES).eval()
    dot = tok.convert_tokens_to_ids(".")
    info = {"eos_ids": [dot], "eos_id": dot, "mask_id": 511, "vocab_size": 512, "block_size": 4, "shift": shift,
            "causal_clean": True, "gen_length": 24}
    prompts = [tok.encode(t) for t in ("Once upon a time", "The cat sat on", "Lily went to the park and", "Tom had")]
    c = dcfg(dthreshold=dthreshold, verify=True)
    got = decode_blocks_verified(m, prompts, c, info)
    want = [reference_ar(m, p, 24, info) for p in prompts]
    assert [ids for ids, _ in got] == want
    assert len({len(w) for w in want}) > 2 and any(f > -(-len(i) // 4) + 1 for i, f in got)   # ragged; some rejected
    for p, row in zip(prompts, got):
        assert decode_blocks_verified(m, [p], c, info) == [row]
    flat = tiny_model(6).eval()
    with torch.no_grad():   # every logit 0: greedy and the drafts both pick token 0, one per step
        flat.norm.weight.zero_()
    info = dict(INFO, block_size=4, shift=shift, causal_clean=True, gen_length=16)
    const = decode_blocks_verified(flat, [[5, 6, 7], [8]], c, info)
    # 4 blocks drafted in 4 steps each, every check sharing a forward with the next block's first
    # step, all accepted; the last check alone: 17 forwards for 16 tokens
    assert all(ids == [0] * 16 and forwards == 17 for ids, forwards in const), const


@torch.no_grad()
def slow_block_decoding(m, prompt, L, G, per_step, info):
    """Block-diffusion decoding written from the spec, sharing no code with decoders.py: blocks of
    L left to right; each step recomputes [prompt][finished blocks][canvas] with the training rule
    (the canvas sees everything before it and itself; earlier tokens see their own and earlier
    blocks, the prompt being one block, or only earlier tokens with a causal clean stream), and
    unmasks the per_step masked positions whose argmax token is most probable (MASK and padding
    ids excluded), positions predicting EOS only after all others; stop after a block with EOS."""
    out, forwards, mask_id, eos = [], 0, info["mask_id"], info["eos_id"]
    for _ in range(G // L):
        canvas = [mask_id] * L
        while mask_id in canvas:
            seq, P = prompt + out + canvas, len(prompt)
            T = len(seq)
            blk = [0 if i < P else 1 + (i - P) // L for i in range(T)]
            allowed = torch.tensor([[kv <= q if info["causal_clean"] and q < T - L else (q >= T - L or blk[kv] <= blk[q])
                                     for kv in range(T)] for q in range(T)])
            logits = m(torch.tensor([seq]), None, lambda b, h, q, kv: allowed[q, kv])[0].float()
            lg = (logits[T - L - 1:T - 1] if info["shift"] else logits[T - L:]).clone()
            lg[:, mask_id], lg[:, info["vocab_size"]:] = float("-inf"), float("-inf")
            conf, tok = torch.softmax(lg, -1).max(-1)
            masked = [i for i in range(L) if canvas[i] == mask_id]
            order = sorted(masked, key=lambda i: (int(tok[i]) == eos, -float(conf[i])))
            for i in order[:per_step]:
                canvas[i] = int(tok[i])
            forwards += 1
        out += canvas
        if eos in canvas:
            break
    return (out[:out.index(eos) + 1] if eos in out else out), forwards


@pytest.mark.parametrize("shift,causal,steps", [(False, False, 0), (True, False, 8), (True, True, 0), (True, True, 8)])
def test_block_decoding_unmasks_in_the_order_the_spec_gives(shift, causal, steps):
    """decode_blocks against slow_block_decoding on the real stories260K weights (varied text, so
    the order of unmasking decides the output), one and two tokens a step, batched; "!" as EOS."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(STORIES)
    m = from_pretrained(STORIES).eval()
    bang = tok.convert_tokens_to_ids("!")
    L, G = 4, 16
    info = {"eos_ids": [bang], "eos_id": bang, "mask_id": 511, "vocab_size": 512, "block_size": L, "shift": shift,
            "causal_clean": causal}
    prompts = [tok.encode(t) for t in ("Once upon a time", "The cat sat on", "Lily went to the park and", "Tom had")]
    got = decode_blocks(m, prompts, dcfg(alg="maskgit_plus", steps=steps, gen_length=G), info)
    per_step = 1 if not steps else L // (steps // (G // L))
    want = [slow_block_decoding(m, p, L, G, per_step, info) for p in prompts]
    assert got == want
    assert len({t for ids, _ in want for t in ids}) > 5   # varied text
