"""
Sampling and evaluation. Every method reports tokens, forward passes, tokens per forward
and wall time, so a faster decoder is always seen next to what it costs in accuracy.

    python generate.py --init_from=out/toy --data=data/toy/val.jsonl --method=ar
    python generate.py --init_from=assets/stories260K --prompt="Once upon a time"
"""
import itertools
import json
import os
import re
import sys
import time
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from configurator import UserError, configure, cli, defaults_from, print_config
from checkpoint import find_checkpoint, load_checkpoint, load_info, load_lora_checkpoint
from batching import Shards
from model import KVCache, bidirectional_mask, block_causal_mask, interleaved_mask
from prepare import Tokenizer, read_rows, row_texts

init_from = "out/toy"      # a training out_dir, one checkpoint folder, a Hugging Face model folder or a .gguf file
method = "ar"              # ar | blockwise | refine | diffusion
prompt = ""                # one prompt ...
prompts_file = ""          # ... or a file with one prompt per line ...
data = ""                  # ... or a parquet/jsonl file (scored when it has an answer column)
prompt_key = ""            # column names for --data (default: the ones the checkpoint was prepared with)
answer_key = ""
limit = 0                  # evaluate only the first N rows of --data (0 = all)
out = ""                   # jsonl with one line per prompt
same_as = ""               # an earlier --out (AR's, say): count the completions identical to its rows
max_new_tokens = 256
temperature = 0.0          # 0 = greedy
top_p = 1.0
batch_size = 8
device = "cpu"
dtype = "float32"          # float32 | bfloat16
seed = 1337
quiet = False              # no progress line

# blockwise
threshold = 0.7            # accept a slot token while its probability >= threshold
verify = False             # blockwise/refine/block diffusion (causal_clean): accept drafts only where
                           # the model's own AR greedy agrees
draft_tree = True          # blockwise --verify: a slot group per possible acceptance length, not only for
                           # "all drafts accepted" (more tokens per forward, longer forwards)
draft_vocab = 0            # blockwise --verify: draft only among the N tokens most frequent in the responses
                           # of draft_vocab_from (FR-Spec): a head N rows tall per slot; 0 = every token
draft_vocab_from = ""      # a prepare.py data dir, the drafter's training data
# refine
add_eos_length = 127       # N EOS appended per round -> a draft of N+1 tokens
refine_iter = 2            # forwards that re-predict the draft from itself
# diffusion
steps = 0                  # denoising steps over the canvas (0: one per token)
alg = "entropy"            # origin | maskgit_plus | topk_margin | entropy
alg_temp = 0.0             # > 0 samples the positions to unmask from softmax(conf / alg_temp)
gen_length = 0             # canvas length (0: the checkpoint's gen_length, else max_new_tokens)
block_length = 0           # LLaDA semi-AR: canvas blocks unmasked left to right (0: the whole canvas at once)
dthreshold = 0.0           # Fast-dLLM parallel unmasking: the most confident + all with p >= this
eos_last = True            # confidence algs: EOS predictions are unmasked last (LLaDA's confidence_eos_eot_inf)


@dataclass(frozen=True)
class Decoding:
    """What the decoders read, and nothing else of the command line: the sampling settings and
    each method's own (defaults: the keys above). Decoding.of(config) takes them from a config."""
    max_new_tokens: int = max_new_tokens
    temperature: float = temperature
    top_p: float = top_p
    threshold: float = threshold
    verify: bool = verify
    draft_tree: bool = draft_tree
    add_eos_length: int = add_eos_length
    refine_iter: int = refine_iter
    steps: int = steps
    alg: str = alg
    alg_temp: float = alg_temp
    gen_length: int = gen_length
    block_length: int = block_length
    dthreshold: float = dthreshold
    eos_last: bool = eos_last

    @classmethod
    def of(cls, config):
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


# ----------------------------------------------------------------------------- loading

def load(init_from, device="cpu", dtype=torch.float32):
    ckpt = find_checkpoint(init_from)
    info = load_info(ckpt)
    # decoding forwards are a few tokens against the cache and change shape every step: a dense
    # mask is cheap there, while a compiled FlexAttention kernel would recompile for each length
    if "lora" in info:   # adapters (gated ones included) applied to the base the checkpoint names
        model = load_lora_checkpoint(ckpt, info, device, dtype)
    else:
        model = load_checkpoint(ckpt, device=device, dtype=dtype)
    model = model.eval().set_backend("sdpa")
    return model, info, Tokenizer(info["tokenizer_path"])


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
    """Slot logits (N, k, V) of N slot groups h (N, k, C). With a sampler head (Apple's), slot j is
    conditioned on the token drafted before it (the anchor, the token accepted just before the
    group, for j = 0): a greedy chain, one head call per slot for all groups at once.
    vocab: (its head rows, its token ids) when drafts are restricted to a draft vocabulary; the
    logits are then over it (index i is token vocab[1][i])."""
    head = (lambda z: clean_logits(model.lm_head(z), info)) if vocab is None else (lambda z: F.linear(z, vocab[0]))
    if model.sampler_head is None:
        return head(h)
    out, prev = [], torch.tensor(anchors, device=h.device)
    for j in range(h.shape[1]):
        out.append(head(model.sampler_head(h[:, j], model.embed_tokens(prev))))
        prev = out[-1].argmax(-1) if vocab is None else vocab[1][out[-1].argmax(-1)]
    return torch.stack(out, 1)


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
    k, n, dev = info["block_size"] - 1, len(prompts), model.lm_head.weight.device
    vocab = (model.lm_head.weight[vocab.to(dev)], vocab.to(dev)) if vocab is not None else None
    eos = set(info["eos_ids"])
    cache = cache or KVCache(model.config, n, max(map(len, prompts)) + c.max_new_tokens + (k + 1) ** 2 + 1,
                             dev, model.lm_head.weight.dtype)
    verified, drafts = [list(p) for p in prompts], [[] for _ in range(n)]
    out, forwards, done = [[] for _ in range(n)], [0] * n, [False] * n
    while not all(done):
        lens, live = cache.length.tolist(), [b for b in range(n) if not done[b]]
        rows = [block_chunk(verified[b], drafts[b], lens[b], k, c.draft_tree) if not done[b] else ([], [], [], [])
                for b in range(n)]
        hidden = blockwise_forward(model, cache, rows, info["mask_id"])
        at = {b: (len(verified[b]), len(drafts[b])) for b in live}   # clean predictions: hidden[b, v-1:v+m]
        clean = clean_logits(model.head(torch.cat([hidden[b, v - 1:v + m] for b, (v, m) in at.items()])), info)
        first = {b: accept_first(x, drafts[b], c, eos, generator)
                 for b, x in zip(live, clean.split([m + 1 for _, m in at.values()]))}
        grouped = [b for b in live if first[b][2] is not None]   # rows that read a slot group: all rows' at once
        h = [hidden[b, sum(at[b]) + first[b][2] * k:][:k] for b in grouped]   # group g starts k * g after the drafts
        anchors = [first[b][0][-1] for b in grouped]
        slots = dict(zip(grouped, draft_logits(model, torch.stack(h), anchors, info, vocab))) if grouped else {}
        commit = [0] * n
        for b in live:
            toks, a, _ = first[b]
            nxt = slots[b].argmax(-1) if b in slots else torch.zeros(0, dtype=torch.long)
            nxt = (nxt if vocab is None else vocab[1][nxt]).tolist()
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


# ----------------------------------------------------------------------------- scoring

NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def extract_answer(text):
    """GSM8K '#### N', else the last \\boxed{...}, else the last number; None if nothing."""
    m = re.search(r"####\s*(" + NUMBER + ")", text)
    if m:
        return m.group(1)
    i = text.rfind("\\boxed{")
    if i >= 0:
        depth, j = 1, i + len("\\boxed{")
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth == 0:
            return text[i + len("\\boxed{"):j - 1].strip()
    nums = re.findall(NUMBER, text)
    return nums[-1] if nums else None


def normalize(ans):
    if ans is None:
        return None
    a = ans.strip().replace(",", "").rstrip(".")
    try:
        f = float(a)
        return str(int(f)) if f == int(f) else str(f)
    except ValueError:
        return a.replace(" ", "")


def is_correct(completion, reference):
    pred = normalize(extract_answer(completion))
    return pred is not None and pred == normalize(extract_answer(reference))


# ----------------------------------------------------------------------------- driver

def load_prompts(c, info):
    """[(prompt messages as rendered text, reference answer or None)]."""
    if sum(bool(x) for x in (c.prompt, c.prompts_file, c.data)) != 1:
        raise UserError("give exactly one of --prompt, --prompts_file, --data")
    if c.prompt:
        return [(c.prompt, None)]
    if c.prompts_file:
        if not os.path.isfile(c.prompts_file):
            raise UserError(f"{c.prompts_file}: file not found")
        with open(c.prompts_file) as f:
            return [(l.rstrip("\n"), None) for l in f if l.strip()]
    pk = c.prompt_key or info.get("prompt_key", "prompt")
    ak = c.answer_key or info.get("response_key", "target")
    rows = []
    for n, row in read_rows(c.data, (pk,), c):
        if pk not in row:
            raise UserError(f"{c.data}: row {n}: missing key {pk!r} (set --prompt_key)")
        rows.append((row[pk], row.get(ak)))
        if c.limit and len(rows) >= c.limit:
            break
    return rows


def encode_prompts(tok, items, info):
    out = []
    for value, _ in items:
        if info.get("raw_prompt") and isinstance(value, str):
            out.append((value, tok.encode(value, prompt=True)))
            continue
        text, _ = row_texts(tok, {"p": value, "r": "x"}, "p", "r", info.get("system_prompt", ""))
        out.append((text, tok.encode(text, prompt=True)))
    return out


def decode_and_score(model, info, tok, c, items, generator=None):
    """Decode every item in batches; returns (per-row records, summary dict)."""
    if c.method not in DECODERS:
        raise UserError(f"unknown method {c.method!r} (one of {', '.join(DECODERS)})")
    if info["mode"] not in DECODES[c.method] and not (c.method == "ar" and info.get("causal_clean")):
        raise UserError(f"method {c.method} cannot decode a checkpoint trained with mode={info['mode']} "
                        f"(it decodes: {', '.join(DECODES[c.method])}; ar also block diffusion with causal_clean)")
    decode, d = DECODERS[c.method], Decoding.of(c)
    encoded = encode_prompts(tok, items, info)
    if c.draft_vocab and not (c.method == "blockwise" and c.verify and c.draft_vocab_from):
        raise UserError("draft_vocab needs --method=blockwise --verify=True and --draft_vocab_from=DATA_DIR")
    kw = {"stats": {}} if c.method in ("blockwise", "refine") else {}
    if c.draft_vocab:
        kw["vocab"] = draft_vocabulary(c.draft_vocab_from, c.draft_vocab, info)
    records, t0, stats = [], time.time(), kw.get("stats")
    for i in range(0, len(encoded), c.batch_size):
        batch = encoded[i:i + c.batch_size]
        results = decode(model, [ids for _, ids in batch], d, info, generator, **kw)
        for (ids, fw), (prompt, ref) in zip(results, items[i:i + c.batch_size]):
            ids = cut_at_eos(ids, set(info["eos_ids"]))
            ended = bool(ids) and ids[-1] in info["eos_ids"]
            body = ids[:-1] if ended else ids
            # the prompt as given (string or chat list) and the exact tokens: prepare.py reads this
            # back (--response_key=completion) as training rows holding what the model produced
            rec = {"prompt": prompt, "completion": tok.decode(body), "completion_ids": body, "eos": ended,
                   **({"eos_id": ids[-1]} if ended else {}), "tokens": len(ids), "forwards": fw}
            comp = rec["completion"]
            if ref is not None:
                rec["answer"] = ref if isinstance(ref, str) else str(ref)
                rec["correct"] = is_correct(comp, rec["answer"])
            records.append(rec)
        if not c.quiet:
            el = time.time() - t0
            print(f"\r{len(records)}/{len(encoded)} prompts, {el:.0f}s, "
                  f"ETA {el / len(records) * (len(encoded) - len(records)):.0f}s", end="", file=sys.stderr)
    if not c.quiet:
        print(file=sys.stderr)
    summary = summarize(records, time.time() - t0)
    if stats:
        summary["accepted_hist"] = dict(sorted(stats["accepted_hist"].items()))   # tokens per row per step
    return records, summary


def summarize(records, seconds):
    tokens, forwards = sum(r["tokens"] for r in records), sum(r["forwards"] for r in records)
    s = {"n": len(records), "tokens": tokens, "forwards": forwards,
         "tokens_per_forward": round(tokens / max(forwards, 1), 4), "seconds": round(seconds, 3),
         "tokens_per_second": round(tokens / max(seconds, 1e-9), 2)}
    scored = [r["correct"] for r in records if "correct" in r]
    if scored:
        s["accuracy"] = round(sum(scored) / len(scored), 4)
    return s


def count_identical(records, path):
    """How many records have exactly the completion tokens of the same row of an earlier --out."""
    try:
        with open(path) as f:
            ref = [json.loads(l) for l in f if l.strip()]
    except (OSError, ValueError) as e:
        raise UserError(f"same_as={path}: cannot read it as jsonl ({e})") from None
    if len(ref) != len(records):
        raise UserError(f"same_as={path}: {len(ref)} rows, this run decoded {len(records)}")
    for i, (r, q) in enumerate(zip(records, ref)):
        if q.get("prompt") != r["prompt"] or "completion_ids" not in q:
            raise UserError(f"same_as={path}: row {i + 1} is not this run's prompt {i + 1} with its completion_ids")
    return sum(r["completion_ids"] == q["completion_ids"] and r["eos"] == q.get("eos") for r, q in zip(records, ref))


def main(argv=None):
    c = configure(defaults_from(globals()), argv)
    print_config(c, file=sys.stderr)
    torch.manual_seed(c.seed)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(c.dtype)
    if dt is None:
        raise UserError(f"dtype={c.dtype!r}: expected float32 or bfloat16")
    model, info, tok = load(c.init_from, c.device, dt)
    items = load_prompts(c, info)
    gen = torch.Generator(device=c.device).manual_seed(c.seed)
    records, summary = decode_and_score(model, info, tok, c, items, gen)
    if c.same_as:
        summary["identical"] = count_identical(records, c.same_as)
    if c.out:
        with open(c.out, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    if len(records) <= 3:
        for r in records:
            shown = r["prompt"] if isinstance(r["prompt"], str) else json.dumps(r["prompt"], ensure_ascii=False)
            print(shown + r["completion"], file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    cli(main)
