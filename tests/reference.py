"""
Slow, obviously-correct decoders: the oracles the fast, cached, batched decoders of decoders.py
are tested against. Each decodes one row and recomputes the whole sequence for every forward,
written from the rules in DESIGN.md ("Decoding"). They share nothing with decoders.py: their
own logit cleaning, attention mask and acceptance rules, so a bug there cannot hide here.
"""
import torch


def greedy_logits(logits, info):
    """Logits with the tokens a decoder may never emit (MASK, rows past the vocabulary) removed."""
    out = logits.float().clone()
    out[..., info["vocab_size"]:] = float("-inf")
    if info["mask_id"] < out.shape[-1]:
        out[..., info["mask_id"]] = float("-inf")
    return out


def upto_eos(ids, eos):
    return ids[:next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))]


def dense(allowed):
    """A mask_mod from a dense (T, T) bool tensor."""
    return lambda b, h, q, kv: allowed[q, kv]


@torch.inference_mode()
def reference_ar(model, prompt, max_new_tokens, info):
    """Greedy: the whole sequence through the model for every token."""
    seq, eos, dev = list(prompt), set(info["eos_ids"]), model.lm_head.weight.device
    for _ in range(max_new_tokens):
        seq.append(int(greedy_logits(model(torch.tensor([seq], device=dev))[0, -1], info).argmax()))
        if seq[-1] in eos:
            break
    return seq[len(prompt):]


@torch.inference_mode()
def reference_blockwise(model, prompt, c, info):
    """Next-block decoding, one row, no cache. A forward holds the whole clean sequence (the
    verified tokens, then the drafts) and groups of B-1 MASK slots; group a drafts the tokens
    after the first a drafts and the token the clean stream then predicts, so its slot j sits at
    position L + a + j (L = verified length), sees the clean tokens before that position and the
    slots 0..j of its group, and predicts the token at L + a + j + 1. With --verify every draft
    group is kept (draft_tree) or only the one after all drafts; without it there are no drafts.
    The first token is the clean stream's own prediction; threshold mode then takes slot tokens
    while their probability is >= threshold (stopping after EOS); verify accepts the longest draft
    prefix greedy agrees with plus greedy's next token. Returns (tokens to the first EOS, forwards)."""
    k, eos, dev, mask_id = c.draft_slots or info["block_size"] - 1, set(info["eos_ids"]), model.lm_head.weight.device, info["mask_id"]
    out, drafts, forwards = [], [], 0
    while True:
        seq = list(prompt) + out
        L, m = len(seq), len(drafts)
        groups = list(range(m + 1)) if c.draft_tree else [m]
        ids = seq + drafts + [mask_id] * (k * len(groups))
        pos = list(range(L + m)) + [L + a + j for a in groups for j in range(k)]
        n = len(ids)
        allowed = torch.zeros(n, n, dtype=torch.bool)
        for q in range(L + m):                       # the clean stream: causal, never a slot
            allowed[q, :q + 1] = True
        for g, a in enumerate(groups):
            for j in range(k):
                q = L + m + g * k + j
                allowed[q, :L + a] = True                           # clean tokens before the group
                allowed[q, L + m + g * k:q + 1] = True              # its group's slots 0..j
        hidden = model(torch.tensor([ids], device=dev), torch.tensor([pos], device=dev),
                       dense(allowed.to(dev)), hidden=True)[0]
        logits = greedy_logits(model.lm_head(hidden), info)
        forwards += 1
        greedy = logits[L - 1:L + m].argmax(-1).tolist()   # after the last verified token and each draft

        def group_tokens(g, before):
            """Group g's slot logits; with a sampler head each slot also sees the token drafted before it."""
            at = slice(L + m + g * k, L + m + (g + 1) * k)
            if model.sampler_head is None:
                return logits[at]
            rows = []
            for h in hidden[at]:
                z = model.sampler_head(h, model.embed_tokens(torch.tensor(before, device=dev)))
                rows.append(greedy_logits(model.lm_head(z), info))
                before = int(rows[-1].argmax())
            return torch.stack(rows)

        if c.verify:
            a = 0
            while a < m and drafts[a] == greedy[a] and greedy[a] not in eos:
                a += 1
            toks = drafts[:a] + [greedy[a]]
            if a in groups:
                nxt = group_tokens(groups.index(a), toks[-1]).argmax(-1).tolist()
            else:
                nxt = []
        else:
            toks, nxt = [greedy[0]], []
            probs = torch.softmax(group_tokens(0, toks[0]), -1)
            for j in range(k):
                if toks[-1] in eos or probs[j].max() < c.threshold:
                    break
                toks.append(int(probs[j].argmax()))
        out += toks[:c.max_new_tokens - len(out)]
        drafts = nxt
        if any(t in eos for t in toks) or len(out) >= c.max_new_tokens:
            return upto_eos(out, eos), forwards


@torch.inference_mode()
def reference_refine(model, prompt, c, info):
    """Refinement decoding (greedy), one row: every forward runs over the whole sequence. A round
    drafts N+1 tokens after [sequence][EOS x N] and re-predicts them refine_iter times; with
    --verify each forward instead accepts the longest draft prefix greedy agrees with (stopping at
    EOS) plus greedy's next token, and greedy's later predictions become the next draft."""
    N, eos, fill, dev = c.add_eos_length, set(info["eos_ids"]), info["eos_id"], model.lm_head.weight.device
    run = lambda ids: greedy_logits(model(torch.tensor([ids], device=dev))[0], info).argmax(-1).tolist()
    seq, out, forwards, draft = list(prompt), [], 0, [fill] * N
    while True:
        L = len(seq)
        if c.verify:
            g = run(seq + draft)[L - 1:]
            a = 0
            while a < N and draft[a] == g[a] and g[a] not in eos:
                a += 1
            toks, draft = draft[:a] + [g[a]], (g[a + 1:] + [fill] * N)[:N]
        else:
            toks = run(seq + [fill] * N)[L - 1:]
            for _ in range(c.refine_iter if N else 0):
                toks = toks[:1] + run(seq + toks[:N])[L:]
                forwards += 1
        forwards += 1
        toks = upto_eos(toks, eos)[:c.max_new_tokens - len(out)]
        out += toks
        seq += toks
        if toks[-1] in eos or len(out) >= c.max_new_tokens:
            return out, forwards
