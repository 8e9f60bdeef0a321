"""
The decoders, each a function (model, prompts, settings, info) -> [(token ids, forwards)] per
prompt: AR with a static KV cache, blockwise next-block decoding (threshold, or verified drafts),
refinement (Jacobi verify), and masked diffusion (full canvas, semi-AR blocks, block diffusion
with a cache, verified blocks). `settings` is generate.Decoding; info is the checkpoint's
info.json. generate.py is the command line around them: loading, prompts, scoring, reports.
"""
import itertools
import os

import numpy as np
import torch

from batching import Shards
from configurator import UserError
from masks import bidirectional_mask, block_causal_mask, interleaved_mask
from model import KVCache


# ----------------------------------------------------------------------------- sampling helpers

def clean_logits(logits, info):
    """Never emit the MASK token or the padding rows past the tokenizer's vocabulary (in place)."""
    logits = logits.float()
    logits[..., info["vocab_size"]:] = float("-inf")
    if info["mask_id"] < logits.shape[-1]:
        logits[..., info["mask_id"]] = float("-inf")
    return logits


def sample(logits, temperature=0.0, top_p=1.0, generator=None):
    """Greedy at temperature 0, else temperature + nucleus (top-p) sampling. logits (..., V)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p            # keep the smallest prefix with mass >= top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def right_pad(seqs, pad, device):
    L = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), L), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return idx.to(device), torch.tensor([len(s) for s in seqs], device=device)


def cut_at_eos(ids, eos_ids):
    """Tokens up to and including the first EOS: all that counts as generated."""
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[:i + 1]
    return ids


def count_accepted(stats, n):
    if stats is not None:
        hist = stats.setdefault("accepted_hist", {})
        hist[n] = hist.get(n, 0) + 1


# ----------------------------------------------------------------------------- ar

@torch.inference_mode()
def decode_ar(model, prompts, c, info, generator=None):
    """Greedy or sampled AR decoding with a static KV cache; rows of different lengths in one
    batch, each writing at its own offset. Returns [(token ids, forwards)] per prompt."""
    B, dev = len(prompts), model.lm_head.weight.device
    eos = set(info["eos_ids"])
    idx, lens = right_pad(prompts, 0, dev)
    cache = KVCache(model.config, B, idx.shape[1] + c.max_new_tokens + 1, dev, model.lm_head.weight.dtype)
    at_last = torch.arange(idx.shape[1], device=dev) == lens[:, None] - 1
    last = model(idx, cache=cache, select=at_last)   # the head at each row's last prompt token only
    cache.commit(lens)
    out, forwards, done = [[] for _ in range(B)], [1] * B, [False] * B
    for _ in range(c.max_new_tokens):
        tok = sample(clean_logits(last, info), c.temperature, c.top_p, generator)
        for b, t in enumerate(tok.tolist()):
            if not done[b]:
                out[b].append(t)
                done[b] = t in eos or len(out[b]) >= c.max_new_tokens
        if all(done):
            break
        last = model(tok[:, None], cache=cache)[:, 0]
        cache.commit(1)
        forwards = [f + (not d) for f, d in zip(forwards, done)]
    return list(zip(out, forwards))


# ----------------------------------------------------------------------------- blockwise

def block_chunk(verified, drafts, start, k, tree=True):
    """One row's forward input: the verified tokens not yet cached, the drafts after them, and a
    group of k MASK slots for every number of drafts a that may be accepted (a = 0..len(drafts);
    only a = len(drafts) without `tree`): group a drafts the k tokens after the token at
    position P0 + a (P0 = first draft's position). Returns lists (idx, pos, slot, sj); `start`
    is the position of verified[0]."""
    clean = verified + drafts
    idx, pos = list(clean), list(range(start, start + len(clean)))
    slot, sj = [False] * len(clean), [0] * len(clean)
    p0 = start + len(verified)
    for a in (range(len(drafts) + 1) if tree else [len(drafts)]):
        idx += [None] * k
        pos += [p0 + a + j for j in range(k)]
        slot += [True] * k
        sj += list(range(k))
    return idx, pos, slot, sj


def accept_first(clean, drafts, c, eos, generator):
    """A row's tokens from its clean logits (m+1, V): the predictions after the last verified token
    and after each of its m drafts. verify: the longest draft prefix AR greedy agrees with, plus
    greedy's own next token; else one sampled token. Returns (tokens, drafts accepted, the slot
    group that drafts the tokens after them: None where no group was drafted for them)."""
    if c.verify:
        toks, a, _ = verify_draft(clean, drafts, eos)
        return toks, a, (a if c.draft_tree else 0 if a == len(drafts) else None)
    return [int(sample(clean[0], c.temperature, c.top_p, generator))], 0, 0


def draft_logits(model, h, anchors, info, vocab=None):
    """Slot logits (N, k, V) of N slot groups h (N, k, C) and their greedy drafts (N, k) as token
    ids. With a sampler head (Apple's), slot j is conditioned on the token drafted before it (the
    anchor, the token accepted just before the group, for j = 0): a greedy chain, one head call
    per slot for all groups at once. vocab: (its head rows, its token ids) when drafts are
    restricted to a draft vocabulary; the logits are then over it."""
    rows, ids = vocab if vocab is not None else (None, None)

    def head(z, prev=None):   # a draft vocabulary holds neither MASK nor padding rows: nothing to clean
        return clean_logits(model.head(z, prev), info) if rows is None else model.head(z, prev, rows)
    token = lambda logits: logits.argmax(-1) if ids is None else ids[logits.argmax(-1)]
    if model.sampler_head is None:
        logits = head(h)
        return logits, token(logits)
    out, drafts, prev = [], [], torch.tensor(anchors, device=h.device)
    for j in range(h.shape[1]):
        out.append(head(h[:, j], prev))
        prev = token(out[-1])
        drafts.append(prev)
    return torch.stack(out, 1), torch.stack(drafts, 1)


def draft_vocabulary(data_dir, n, info):
    """The n tokens most frequent in the responses of a prepare.py data dir (ties: lower id first),
    never MASK or a padding row past the tokenizer's vocabulary: FR-Spec's frequency-ranked draft
    vocabulary (Zhao et al., arXiv 2502.14856). Drafts outside it are never proposed; as every
    draft is verified, that costs tokens per forward, never a different output."""
    if not os.path.isfile(os.path.join(data_dir, "meta.json")):
        raise UserError(f"draft_vocab_from={data_dir!r}: not a prepare.py data dir (no meta.json)")
    shards, V = Shards(data_dir, "train"), info["vocab_size"]
    responses = [np.asarray(shards.tokens[s + p:s + L], dtype=np.int64) for s, p, L in shards.index]
    counts = np.bincount(np.concatenate(responses or [np.zeros(0, np.int64)]), minlength=V)[:V]
    allowed = np.arange(V) != info["mask_id"]
    order = np.argsort(-counts, kind="stable")
    return torch.from_numpy(order[allowed[order]][:n].copy())


def extend_by_threshold(toks, probs, threshold, eos):
    """Early block stop: slot tokens are accepted while the most likely one has p >= threshold
    (and the block has not ended)."""
    for p, t in zip(*probs.max(-1)):
        if toks[-1] in eos or p < threshold:
            break
        toks.append(int(t))
    return toks


def draft_slots(c, info):
    """The MASK slots a group holds: the first c.draft_slots of the block's block_size - 1 (all for
    0). A slot sees only the slots before it in its group, so the first N draft as in a full group."""
    k = info["block_size"] - 1
    if not 0 <= c.draft_slots <= k:
        raise UserError(f"draft_slots={c.draft_slots}: expected 0 (all) to {k} (the checkpoint's block_size - 1)")
    return c.draft_slots or k


@torch.inference_mode()
def decode_blockwise(model, prompts, c, info, generator=None, cache=None, stats=None, vocab=None):
    """Batched next-block decoding with a KV cache. A step feeds each row its verified tokens
    (the prompt at first), its drafts (verify only) and MASK slot groups, in one forward; rows
    advance by different amounts. Only verified tokens are committed to the cache: slots and
    rejected drafts are written past the committed length and overwritten by the next step.
    The head runs only where it is read: every row's clean predictions in one call, then the one
    slot group each row uses. stats: a dict that receives the histogram of tokens accepted per
    row per forward. vocab: the token ids drafts are restricted to (draft_vocabulary; verify only)."""
    if c.verify and c.temperature > 0:
        raise UserError("--verify reproduces greedy decoding: use --temperature=0")
    if vocab is not None and not c.verify:
        raise UserError("a draft vocabulary needs --verify=True (the threshold reads probabilities over every token)")
    k, n, dev = draft_slots(c, info), len(prompts), model.lm_head.weight.device
    vocab = (model.lm_head.weight[vocab.to(dev)], vocab.to(dev)) if vocab is not None else None
    eos = set(info["eos_ids"])
    cache = cache or KVCache(model.config, n, max(map(len, prompts)) + c.max_new_tokens + (k + 1) ** 2 + 1,
                             dev, model.lm_head.weight.dtype)
    verified, drafts = [list(p) for p in prompts], [[] for _ in range(n)]
    out, forwards, done = [[] for _ in range(n)], [0] * n, [False] * n
    while not all(done):
        lens, live = cache.length.tolist(), [b for b in range(n) if not done[b]]
        # with the tree a finished row goes on feeding the chunk it would feed next, read by nobody and
        # never committed: every row keeps its slots in the same columns (a strided view in each projection)
        rows = [block_chunk(verified[b], drafts[b], lens[b], k, c.draft_tree)
                if not done[b] or (c.verify and c.draft_tree) else ([], [], [], []) for b in range(n)]
        hidden = blockwise_forward(model, cache, rows, info["mask_id"])
        at = {b: (len(verified[b]), len(drafts[b])) for b in live}   # clean predictions: hidden[b, v-1:v+m]
        clean = clean_logits(model.head(torch.cat([hidden[b, v - 1:v + m] for b, (v, m) in at.items()])), info)
        first = {b: accept_first(x, drafts[b], c, eos, generator)
                 for b, x in zip(live, clean.split([m + 1 for _, m in at.values()]))}
        grouped = [b for b in live if first[b][2] is not None]   # rows that read a slot group: all rows' at once
        h = [hidden[b, sum(at[b]) + first[b][2] * k:][:k] for b in grouped]   # group g starts k * g after the drafts
        anchors = [first[b][0][-1] for b in grouped]
        slots, drafted = draft_logits(model, torch.stack(h), anchors, info, vocab) if grouped else ([], torch.zeros(0))
        slots, drafted = dict(zip(grouped, slots)), dict(zip(grouped, drafted.tolist()))
        commit = [0] * n
        for b in live:
            toks, a, _ = first[b]
            nxt = drafted.get(b, [])
            if not c.verify:
                toks, nxt = extend_by_threshold(toks, torch.softmax(slots[b], -1), c.threshold, eos), []
            toks = toks[:c.max_new_tokens - len(out[b])]
            out[b] += toks
            # commit what was fed and verified, never past the (possibly truncated) output
            commit[b], forwards[b] = min(at[b][0] + a, len(prompts[b]) + len(out[b]) - lens[b]), forwards[b] + 1
            count_accepted(stats, len(toks))
            done[b] = any(t in eos for t in toks) or len(out[b]) >= c.max_new_tokens
            verified[b], drafts[b] = (toks[-1:], nxt) if c.verify else (toks, [])
        cache.commit(torch.tensor(commit, device=dev))
    return [(cut_at_eos(o, eos), f) for o, f in zip(out, forwards)]


def blockwise_forward(model, cache, rows, mask_id):
    """One forward over per-row chunks, right-padded. Attention follows interleaved_mask over the
    whole physical row: cached tokens are clean and sit at their own positions."""
    n, lens = len(rows), cache.length.tolist()
    T = max(max(len(r[0]) for r in rows), 1)
    S = max(lens) + T
    idx = np.zeros((n, T), dtype=np.int64)
    pos, slot = np.tile(np.arange(S), (n, 1)), np.zeros((n, S), dtype=bool)
    sj, doc = np.zeros((n, S), dtype=np.int64), np.zeros((n, S), dtype=np.int64)
    for b, (ids, p, sl, j) in enumerate(rows):
        L, w = lens[b], len(ids)
        idx[b, :w] = [mask_id if t is None else t for t in ids]
        pos[b, L:L + w], slot[b, L:L + w], sj[b, L:L + w] = p, sl, j
        doc[b, L + w:], pos[b, L + w:] = 1, 0   # padding: its own document, seen by no real token
    new_pos = pos[np.arange(n)[:, None], np.minimum(np.array(lens)[:, None] + np.arange(T), S - 1)]
    t = lambda a: torch.from_numpy(a).to(cache.length.device)
    return model(t(idx), t(new_pos), interleaved_mask(t(doc), t(pos), t(slot), t(sj)), cache=cache, hidden=True)


# ----------------------------------------------------------------------------- refine

def causal_forward(model, cache, rows):
    """Logits (n, T, V) for per-row token lists, right-padded, after each row's cached prefix."""
    dev = cache.length.device
    idx, _ = right_pad([r or [0] for r in rows], 0, dev)
    return model(idx, cache=cache).float()


def verify_draft(logits_row, draft, eos):
    """Speculative check (CLLM's Jacobi step, blockwise --verify): logits_row (m+1, V) follow the
    last verified token and each of the m drafts. Accept the longest draft prefix greedy agrees
    with (stopping at EOS), plus greedy's own next token; also return greedy's later predictions."""
    g = logits_row.argmax(-1).tolist()
    a = 0
    while a < len(draft) and draft[a] == g[a] and g[a] not in eos:
        a += 1
    return draft[:a] + [g[a]], a, g[a + 1:]


@torch.inference_mode()
def decode_refine(model, prompts, c, info, generator=None, stats=None):
    """Refinement decoding (seed iterative_refine), batched, with the committed prefix in the KV
    cache. A round feeds [verified][EOS x N]: one forward drafts N+1 tokens; refine_iter forwards
    over the first N draft tokens re-predict tokens 2..N+1 (the first is exact AR); then the draft
    is appended. With --verify every forward checks the draft instead (output = AR greedy).
    stats: a dict that receives the histogram of tokens accepted per row per round."""
    if c.verify and c.temperature > 0:
        raise UserError("--verify reproduces greedy decoding: use --temperature=0")
    N, n, dev = c.add_eos_length, len(prompts), model.lm_head.weight.device
    eos, fill = set(info["eos_ids"]), info["eos_id"]
    cache = KVCache(model.config, n, max(map(len, prompts)) + c.max_new_tokens + 2 * N + 2, dev,
                    model.lm_head.weight.dtype)
    verified, drafts = [list(p) for p in prompts], [[fill] * N for _ in range(n)]
    out, forwards, done = [[] for _ in range(n)], [0] * n, [False] * n
    pick = lambda x: sample(x, c.temperature, c.top_p, generator).tolist()
    while not all(done):
        lens = cache.length.tolist()
        live = [b for b in range(n) if not done[b]]
        logits = clean_logits(causal_forward(model, cache, [verified[b] + drafts[b] if not done[b] else []
                                                            for b in range(n)]), info)
        commit, new = [0] * n, {}
        for b in live:
            v = len(verified[b])
            if c.verify:
                toks, a, rest = verify_draft(logits[b, v - 1:v + N], drafts[b], eos)
                drafts[b] = (rest + [fill] * N)[:N]
            else:
                toks, a = pick(logits[b, v - 1:v + N]), 0
            new[b], commit[b] = toks, v + a
            forwards[b] += 1
            if c.verify:   # never commit past what the output keeps (EOS, max_new_tokens)
                kept = len(cut_at_eos(toks, eos)[:c.max_new_tokens - len(out[b])])
                commit[b] = min(commit[b], len(prompts[b]) + len(out[b]) + kept - lens[b])
        cache.commit(torch.tensor(commit, device=dev))
        for _ in range(0 if c.verify else c.refine_iter if N else 0):   # refine the drafts in place
            logits = clean_logits(causal_forward(model, cache, [new[b][:N] if b in new else [] for b in range(n)]), info)
            for b in live:
                new[b] = new[b][:1] + pick(logits[b, :N])
                forwards[b] += 1
        for b in live:
            toks = cut_at_eos(new[b], eos)[:c.max_new_tokens - len(out[b])]
            out[b] += toks
            count_accepted(stats, len(toks))
            done[b] = toks[-1] in eos or len(out[b]) >= c.max_new_tokens
            verified[b] = toks[-1:] if c.verify else toks
    return [(o, f) for o, f in zip(out, forwards)]


# ----------------------------------------------------------------------------- diffusion

def confidence(probs, x0, alg):
    """Per masked position: how sure the model is (higher = unmask first). probs (N, V)."""
    if alg == "maskgit_plus":
        return probs.gather(-1, x0[:, None])[:, 0]
    if alg == "topk_margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    if alg == "entropy":
        return (probs * torch.log(probs.clamp(min=1e-10))).sum(-1)    # -entropy
    raise UserError(f"unknown alg {alg!r} (origin, maskgit_plus, topk_margin, entropy)")


def choose(logits, n_unmask, c, generator, eos_ids=()):
    """For one row's masked positions (logits (N, V)): the tokens x0 and which positions to unmask
    (a bool (N,)). n_unmask from the schedule; with dthreshold, the most confident position plus
    every position whose token has probability >= dthreshold (Fast-dLLM). eos_last: positions
    predicting EOS come after every other one (LLaDA's evaluation; a confidence-ordered sampler
    otherwise fills the easy EOS padding first and ends answers early); with dthreshold they are
    unmasked once nothing else is left, all at once."""
    probs = torch.softmax(logits / c.temperature if c.temperature > 0 else logits, -1)
    x0 = sample(logits, c.temperature, c.top_p, generator)
    N = logits.shape[0]
    pick = torch.zeros(N, dtype=torch.bool, device=logits.device)
    later = torch.isin(x0, torch.tensor(list(eos_ids), device=x0.device)) if c.eos_last and c.alg != "origin" \
        else torch.zeros_like(pick)
    if c.dthreshold > 0:
        if later.all():
            return x0, ~pick
        p = torch.where(later, -1.0, probs.gather(-1, x0[:, None])[:, 0])
        pick[p.argmax()] = True
        return x0, pick | (p >= c.dthreshold)
    n = min(n_unmask, N)
    if c.alg == "origin":   # random positions, as Dream's origin / LLaDA's random remasking
        gdev = generator.device if generator is not None else logits.device
        order = torch.randperm(N, generator=generator, device=gdev)[:n].to(logits.device)
    else:
        conf = confidence(probs, x0, c.alg)
        first, rest = (~later).nonzero()[:, 0], later.nonzero()[:, 0]
        a = first[rank(conf[first], min(n, len(first)), c, generator)]
        order = torch.cat([a, rest[rank(conf[rest], n - len(a), c, generator)]])
    pick[order] = True
    return x0, pick


def rank(conf, n, c, generator):
    """The n most confident of conf, or n sampled from softmax(conf / alg_temp)."""
    if n <= 0:
        return torch.zeros(0, dtype=torch.long, device=conf.device)
    if c.alg_temp > 0:
        return torch.multinomial(torch.softmax(conf / c.alg_temp, -1), n, generator=generator)
    return conf.topk(n).indices


def schedule(n_masked, steps):
    """How many tokens each step unmasks (LLaDA): evenly, the remainder to the first steps."""
    base, rem = divmod(n_masked, steps)
    return [base + (i < rem) for i in range(steps)]


def denoise_step(logits, canvas, lo, hi, k, c, info, generator):
    """Unmask k positions of canvas[lo:hi] (1-D tensor) from logits aligned to the canvas."""
    region = canvas[lo:hi]
    masked = (region == info["mask_id"]).nonzero()[:, 0]
    if len(masked) == 0:
        return
    x0, pick = choose(clean_logits(logits[lo:hi][masked], info), k, c, generator, info["eos_ids"])
    region[masked[pick]] = x0[pick]


def canvas_length(c, info):
    return c.gen_length or info.get("gen_length") or c.max_new_tokens


@torch.inference_mode()
def decode_diffusion(model, prompts, c, info, generator=None):
    """Masked-diffusion sampling (LLaDA / Dream) of a canvas of gen_length MASKs (by default the
    length the checkpoint was trained with). Every step feeds the whole canvas, bidirectionally.
    block_length: LLaDA's semi-AR sampling, blocks left to right, only the current block may be
    unmasked (later ones stay MASK in the forward), steps split evenly over blocks; a row stops
    after a block that holds EOS. Block-diffusion checkpoints decode with decode_blocks."""
    if info.get("block_size"):
        return (decode_blocks_verified if c.verify else decode_blocks)(model, prompts, c, info, generator)
    G, dev, mask_id, eos = canvas_length(c, info), model.lm_head.weight.device, info["mask_id"], set(info["eos_ids"])
    L = c.block_length or G
    if G % L:
        raise UserError(f"gen_length={G} must be a multiple of block_length={L}")
    per_block = schedule(L, max(1, (c.steps or G) // (G // L)))
    idx, lens = right_pad([list(p) + [mask_id] * G for p in prompts], info["eos_id"], dev)
    doc = (torch.arange(idx.shape[1], device=dev)[None] >= lens[:, None]).long()   # padding: its own document
    n = len(prompts)
    forwards, done = [0] * n, [False] * n
    for lo in range(0, G, L):
        region = lambda b: idx[b, len(prompts[b]) + lo:len(prompts[b]) + lo + L]
        for k in (per_block if not c.dthreshold else itertools.repeat(0)):
            live = [b for b in range(n) if not done[b] and (region(b) == mask_id).any()]
            if not live:   # rows that finished earlier are never denoised again
                break
            logits = shift_logits(model(idx, None, bidirectional_mask(doc)).float(), info)
            for b in live:
                forwards[b] += 1
                P = len(prompts[b])
                denoise_step(logits[b], idx[b], P + lo, P + lo + L, k, c, info, generator)
        for b in range(n):
            done[b] = done[b] or any(t in eos for t in region(b).tolist())
        if all(done):
            break
    return [(cut_at_eos(idx[b, len(p):len(p) + G].tolist(), eos), forwards[b]) for b, p in enumerate(prompts)]


def shift_logits(logits, info):
    """Dream's shift: the logits at i predict token i+1, so position j reads the logits of j-1."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1) if info.get("shift") else logits


@torch.inference_mode()
def decode_blocks(model, prompts, c, info, generator=None, reference=False):
    """Block diffusion (a checkpoint trained with block_size L; else block_length): each block's
    first forward feeds [the prompt or the block just finished][L MASKs]; the pending tokens are
    then committed to the KV cache, later steps feed only the L tokens of the current block.
    Under block_causal_mask a finished block never sees later ones, so the cache is exact: equal
    to recomputing everything (reference=True); with the checkpoint's causal_clean the finished
    blocks are token-causal, as in training. A row stops after the block holding EOS."""
    L, G = info.get("block_size") or c.block_length, canvas_length(c, info)
    n, dev, mask_id = len(prompts), model.lm_head.weight.device, info["mask_id"]
    if G % L:
        raise UserError(f"gen_length={G} must be a multiple of the block size {L}")
    n_blocks, eos = G // L, set(info["eos_ids"])
    per_block = schedule(L, max(1, (c.steps or G) // n_blocks))   # LLaDA: steps split evenly over blocks
    plen = torch.tensor([len(p) for p in prompts], device=dev)
    causal = bool(info.get("causal_clean"))
    cache = KVCache(model.config, n, max(map(len, prompts)) + G + 1, dev, model.lm_head.weight.dtype)
    pending, out, forwards, done = [list(p) for p in prompts], [[] for _ in range(n)], [0] * n, [False] * n
    for blk in range(n_blocks):
        rule = block_causal_mask(plen, L, blk + 1 if causal else None)
        canvas = torch.full((n, L), mask_id, dtype=torch.long, device=dev)
        first = True
        for k in (per_block if not c.dthreshold else itertools.repeat(0)):
            live = [b for b in range(n) if not done[b] and (canvas[b] == mask_id).any()]
            if not live:   # rows that finished in an earlier block are never denoised again
                break
            if reference:   # recompute [prompt][finished blocks][block] from scratch
                seqs = [prompts[b] + out[b] + canvas[b].tolist() for b in range(n)]
                idx, _ = right_pad(seqs, info["eos_id"], dev)
                logits = model(idx, None, rule).float()
                lg = [logits[b, len(seqs[b]) - L - 1:len(seqs[b])] for b in range(n)]
            else:
                rows = [pending[b] + canvas[b].tolist() for b in range(n)] if first else canvas.tolist()
                idx, _ = right_pad(rows, info["eos_id"], dev)
                logits = model(idx, None, rule, cache=cache).float()
                if first:   # commit the pending tokens; keep the logits of the last one (for shift)
                    last = torch.stack([logits[b, len(pending[b]) - 1] for b in range(n)])
                    cache.commit(torch.tensor([len(p) for p in pending], device=dev))
                    logits = torch.stack([logits[b, len(pending[b]):len(pending[b]) + L] for b in range(n)])
                lg = [torch.cat([last[b:b + 1], logits[b]]) for b in range(n)]
            for b in live:   # lg[b] (L + 1, V): the logits before and at each block position
                forwards[b] += 1
                denoise_step(lg[b][:-1] if info.get("shift") else lg[b][1:], canvas[b], 0, L, k, c, info, generator)
            first = False
        for b in range(n):
            if not done[b]:
                out[b] += canvas[b].tolist()
                done[b] = any(t in eos for t in canvas[b].tolist())   # stop once a finished block holds EOS
            pending[b] = canvas[b].tolist()
        if all(done):
            break
    return [(cut_at_eos(o, eos), f) for o, f in zip(out, forwards)]


@torch.inference_mode()
def decode_blocks_verified(model, prompts, c, info, generator=None):
    """--verify for block diffusion with a causal clean stream: the output is the model's own AR
    greedy output. Each forward feeds a row's pending tokens (the prompt, or its last drafted
    block), causally as the clean stream, then its next block's canvas, which sees everything
    before it. A drafted block is checked against the AR logits before each of its tokens: the
    longest prefix greedy agrees with is accepted with greedy's token after it. All accepted: the
    block is committed to the cache and the canvas goes on (--dthreshold unmasking, as
    decode_blocks); else the block comes back as the canvas, its accepted tokens and the
    correction unmasked, and the rest MASK (nothing committed, the other canvas dropped)."""
    if c.temperature > 0 or not c.dthreshold or not info.get("causal_clean"):
        raise UserError("--verify on block diffusion needs a checkpoint trained with causal_clean=True, "
                        "--temperature=0 and --dthreshold > 0")
    L, G, mask_id, eos = info["block_size"], canvas_length(c, info), info["mask_id"], set(info["eos_ids"])
    n, dev = len(prompts), model.lm_head.weight.device
    cache = KVCache(model.config, n, max(map(len, prompts)) + G + 2 * L + 1, dev, model.lm_head.weight.dtype)
    pending, drafted = [list(p) for p in prompts], [False] * n         # drafted: pending is a block to check
    canvas = [[mask_id] * L for _ in range(n)]
    last, out, forwards, done = [None] * n, [[] for _ in range(n)], [0] * n, [False] * n
    while not all(done):
        rows = [pending[b] + canvas[b] if not done[b] else [] for b in range(n)]
        idx, _ = right_pad([r or [mask_id] for r in rows], info["eos_id"], dev)
        start = cache.length + torch.tensor([len(p) for p in pending], device=dev)   # each row's canvas
        end = start + torch.tensor([len(x) for x in canvas], device=dev)
        rule = lambda b, h, q, kv: (kv <= q) | ((q >= start[b]) & (kv >= start[b]) & (kv < end[b]))
        logits = clean_logits(model(idx, None, rule, cache=cache), info)
        commit = [0] * n
        for b in (b for b in range(n) if not done[b]):
            forwards[b] += 1
            P, lg = len(pending[b]), logits[b]
            if drafted[b]:   # greedy before each drafted token: the last committed logits, then the block's own
                g = torch.cat([last[b][None], lg[:P - 1]]).argmax(-1).tolist()
                a = next((i for i in range(P) if pending[b][i] != g[i] or g[i] in eos), P)
                if a < P:   # the block again, up to greedy's token unmasked; this round's canvas dropped
                    canvas[b] = pending[b][:a] + [g[a]] + [mask_id] * (L - a - 1)
                    pending[b], drafted[b] = [], False
                    if g[a] in eos or len(out[b]) + a + 1 >= G:
                        out[b], done[b] = out[b] + canvas[b][:a + 1], True
                    continue
                out[b] += pending[b]
            commit[b], last[b] = P, (lg[P - 1] if P else last[b])
            pending[b], drafted[b] = [], False
            if not canvas[b]:   # the canvas budget is used up: that check was the last
                done[b] = True
                continue
            row = torch.tensor(canvas[b], device=dev)
            aligned = torch.cat([last[b][None], lg[P:P + L]])   # the logits before and at each canvas position
            denoise_step(aligned[:-1] if info.get("shift") else aligned[1:], row, 0, L, 0, c, info, generator)
            canvas[b] = row.tolist()
            if mask_id not in canvas[b]:   # drafted: checked by the next forward, with the next block's canvas
                pending[b], drafted[b] = canvas[b], True
                canvas[b] = [mask_id] * L if len(out[b]) + 2 * L <= G else []
        cache.commit(torch.tensor(commit, device=dev))
    return [(cut_at_eos(o, eos), f) for o, f in zip(out, forwards)]


DECODERS = {"ar": decode_ar, "blockwise": decode_blockwise, "refine": decode_refine, "diffusion": decode_diffusion}
DECODES = {"ar": ("sft", "refine", "interleaved"), "blockwise": ("interleaved",),   # what each method decodes
         "refine": ("refine", "sft", "interleaved"), "diffusion": ("diffusion",)}
