"""
The four training objectives (`mode`), one concern: for each mode, how long an example becomes
(length), how it is laid out in a row (layout), its loss, what it supervises (counts, the
global denominators), and for diffusion a validation probe. train.py holds the loop that
calls them; DESIGN.md states the semantics each one implements.

A loss function is loss(model, b, c, gen, norm, backward, progress): b a collated batch, c the
run's settings, gen the batch's noise generator, norm the global counts to divide by, backward
the callback that backpropagates a partial loss, progress the fraction of training done.
"""
import math

import numpy as np
import torch

from masks import bidirectional_mask, block_diffusion_mask, causal_mask, interleaved_mask
from model import KVCache


def sft_length(plen, length, c):
    return length


def sft_layout(tokens, plen, c):
    """Next-token targets on the response only: position i predicts token i+1."""
    tgt = np.full(len(tokens), -100, dtype=np.int64)
    tgt[plen - 1:-1] = tokens[plen:]
    return {"idx": tokens, "pos": np.arange(len(tokens)), "tgt": tgt}


def sft_loss(model, b, c, gen, norm, backward, progress=1.0):
    sel = b["tgt"] >= 0
    ce, pred = model(b["idx"], b["pos"], causal_mask(b["doc"]), select=sel, targets=b["tgt"][sel])
    backward(ce.sum() / norm["tgt"], final=True)
    return {"loss": ce.sum().item() / norm["tgt"], "acc_next": (pred == b["tgt"][sel]).sum().item() / norm["tgt"]}


def count_targets(b, c):
    return {"tgt": int((b["tgt"] >= 0).sum())}


def refine_layout(tokens, plen, c):
    """sft's targets, plus where the response is: the only tokens noise may touch."""
    lay = sft_layout(tokens, plen, c)
    lay["resp"] = np.arange(len(tokens)) >= plen
    return lay


def noise_ratio(b, c, gen, progress):
    """One ratio r per example (document), broadcast to its tokens. The schedule moves the upper
    end of the range from noise_min to noise_max over training (uniform: always the full range);
    progress is the fraction of training done, 1.0 for validation (the full range: validation
    noise depends on nothing but the data)."""
    progress = min(max(progress, 0.0), 1.0)
    ramp = {"uniform": 1.0, "linear": progress, "cosine": 0.5 - 0.5 * math.cos(math.pi * progress)}[c.noise_schedule]
    hi = c.noise_min + (c.noise_max - c.noise_min) * ramp
    n_docs = int(b["doc"].max()) + 1
    r = c.noise_min + (hi - c.noise_min) * torch.rand(b["doc"].shape[0], n_docs, generator=gen)
    return r.to(b["doc"].device), r.to(b["doc"].device).gather(1, b["doc"].clamp(min=0))


def refine_loss(model, b, c, gen, norm, backward, progress=1.0):
    """Seed iterative_refine: s0 = response tokens replaced by EOS with probability r; for each
    iteration k, CE of model(s_k) against the clean sequence, then s_{k+1} = the greedy next-token
    predictions inside the response (no gradient through the argmax). The iterations share no
    graph, so each loss is backpropagated at once: same gradient, one iteration's activations."""
    sel, resp, mask = b["tgt"] >= 0, b["resp"], causal_mask(b["doc"])
    r_doc, r_tok = noise_ratio(b, c, gen, progress)
    noise = resp & (torch.rand(resp.shape, generator=gen).to(resp.device) < r_tok)
    s = torch.where(noise, torch.full_like(b["idx"], c.eos_id), b["idx"])
    weights = c.loss_weights or [1.0] * c.num_iterations
    n_docs = r_doc.shape[1]   # which documents each row holds (padding goes to an extra column)
    present = torch.zeros(r_doc.shape[0], n_docs + 1, dtype=torch.bool, device=r_doc.device)
    present.scatter_(1, torch.where(b["doc"] >= 0, b["doc"], n_docs), True)
    out = {"noise_mean": r_doc[present[:, :n_docs]].sum().item() / norm["docs"]}
    total = 0.0
    for k in range(c.num_iterations):
        out[f"draft_acc_s{k}"] = (s[resp] == b["idx"][resp]).sum().item() / norm["tgt"]
        last = k == c.num_iterations - 1 and not c.ar_loss_weight
        with backward.hold(not last):
            ce, pred = model(s, b["pos"], mask, select=sel, targets=b["tgt"][sel])
        loss = ce.sum()
        backward(weights[k] * loss / norm["tgt"], final=last)
        out[f"loss_s{k}"] = loss.item() / norm["tgt"]
        total += weights[k] * out[f"loss_s{k}"]
        with torch.no_grad():   # position i-1 predicts token i: the predictions fill the response
            s = s.clone()
            s[resp] = pred
    if c.ar_loss_weight:
        loss = model(b["idx"], b["pos"], mask, select=sel, targets=b["tgt"][sel])[0].sum()
        backward(c.ar_loss_weight * loss / norm["tgt"], final=True)
        out["loss_ar"] = loss.item() / norm["tgt"]
        total += c.ar_loss_weight * out["loss_ar"]
    out["loss"] = total
    return out


def count_refine(b, c):
    return {"tgt": int((b["tgt"] >= 0).sum()), "docs": int(sum(len(set(r.tolist()) - {-1}) for r in b["doc"]))}


def padded_response(plen, length, c):
    """Response tokens after EOS padding: to gen_length (the canvas), and for block diffusion
    on to a whole number of blocks. The pads are supervised: the model learns to end."""
    R = max(length - plen, c.gen_length)
    return -(-R // c.block_size) * c.block_size if c.block_size else R


def diffusion_length(plen, length, c):
    R = padded_response(plen, length, c)
    return plen + (2 * R if c.block_size else R)   # block diffusion: a clean and a noised copy


def diffusion_layout(tokens, plen, c):
    """Full canvas: prompt + response EOS-padded; the loss masks response tokens. Block diffusion
    (BD3-LM): prompt + clean response + a noised copy of the response (same positions) whose
    blocks attend to themselves and to the clean tokens before them (block_diffusion_mask).
    resp: the tokens noise may touch; real: response tokens that are not padding (the EOS that
    ends the response is real); blk: the block of each response token (-1: prompt);
    back: where each token is predicted from, relative to itself (shift: the position before;
    the first token of a noised block from the clean token before the block, as decoding does);
    ar: with causal_clean, the next-token targets of the clean stream (for ar_loss_weight)."""
    R = padded_response(plen, len(tokens), c)
    resp_idx = np.concatenate([tokens[plen:], np.full(plen + R - len(tokens), c.eos_id)])
    r = np.arange(R)
    blk = r // c.block_size if c.block_size else np.zeros(R, np.int64)
    back = np.full(R, -1 if c.shift else 0)

    def part(ids, pos, blk, noised, back):
        return {"idx": ids, "pos": pos, "blk": blk, "resp": np.full(len(ids), noised), "back": back}
    parts = [part(tokens[:plen], np.arange(plen), np.full(plen, -1), False, np.zeros(plen, np.int64))]
    if c.block_size:
        first = c.shift & (r % c.block_size == 0)   # noised copy sits R after the clean one
        parts.append(part(resp_idx, plen + r, blk, False, np.zeros(R, np.int64)))
        back = np.where(first, -R - 1, back)
    parts.append(part(resp_idx, plen + r, blk, True, back))
    idx, pos, blk, resp, back = (np.concatenate([p[k] for p in parts]) for k in ("idx", "pos", "blk", "resp", "back"))
    real = np.concatenate([np.zeros(plen, bool)] + [r < len(tokens) - plen] * (len(parts) - 1))
    ar = np.full(len(idx), -100)   # causal clean stream: position j predicts clean token j+1 (real ones)
    if c.causal_clean:
        ar[plen - 1:len(tokens) - 1] = tokens[plen:]
    return {"idx": idx, "pos": pos, "tgt": np.where(resp, idx, -100), "resp": resp, "blk": blk, "back": back,
            "real": real, "ar": ar}


def cart_weights(masked, doc, p):
    """Dream's context-adaptive reweighting: a masked token's weight is the sum over the unmasked
    tokens j of its document of a geometric kernel in the distance, p (1-p)^(|i-j|-1) / 2."""
    T = masked.shape[1]
    d = (torch.arange(T, device=masked.device)[None, :] - torch.arange(T, device=masked.device)[:, None]).abs()
    kernel = torch.where(d > 0, 0.5 * p * (1 - p) ** (d - 1).clamp(min=0).float(), torch.zeros((), device=d.device))
    same = doc[:, :, None] == doc[:, None, :]                                   # (B, T, T)
    return ((same & ~masked[:, None, :]).float() * kernel).sum(-1)


def diffusion_mask(b, c):
    return (block_diffusion_mask(b["doc"], b["resp"], b["blk"], c.causal_clean) if c.block_size
            else bidirectional_mask(b["doc"]))


def diffusion_term(model, b, c, masked, t_tok, mask, ar=False):
    """(weighted CE summed over the masked response tokens for one noising of the batch, their
    plain CE, and with ar the CE of the clean stream's next tokens from the same forward). Each
    masked token is predicted at its position + back (one position predicts one token at most:
    with shift, the clean token before a block predicts the block's first token for both losses)."""
    noisy = torch.where(masked, torch.full_like(b["idx"], c.mask_id), b["idx"])
    weight = {"original": lambda: 1 / t_tok, "linear": lambda: 1 - t_tok,
              "cart": lambda: cart_weights(masked, b["doc"], c.cart_p)}[c.time_weighting]()
    r, i = masked.nonzero(as_tuple=True)
    src = i + b["back"][r, i]
    tgt_at = torch.full_like(b["idx"], -100).index_put((r, src), b["idx"][r, i])
    w_at = torch.zeros_like(weight).index_put((r, src), weight[r, i])
    ar_at = b["ar"] if ar else torch.full_like(tgt_at, -100)
    sel = (tgt_at >= 0) | (ar_at >= 0)
    ce, _ = model(noisy, b["pos"], mask, select=sel, targets=torch.where(tgt_at >= 0, tgt_at, ar_at)[sel])
    return (ce * w_at[sel]).sum(), (ce * (tgt_at[sel] >= 0)).sum(), (ce * (ar_at[sel] >= 0)).sum()


def diffusion_loss(model, b, c, gen, norm, backward, progress=1.0):
    """LLaDA SFT: t ~ U(eps, 1) per example, each response token masked with probability t, CE on
    the masked tokens weighted by time_weighting, divided by the number of response tokens; plus
    ar_loss_weight * the clean stream's next-token loss (block diffusion with causal_clean)."""
    resp = b["resp"]
    n_docs = int(b["doc"].max()) + 1
    t_doc = (1 - c.eps) * torch.rand(b["doc"].shape[0], n_docs, generator=gen) + c.eps
    t_tok = t_doc.to(resp.device).gather(1, b["doc"].clamp(min=0))
    masked = resp & (torch.rand(resp.shape, generator=gen).to(resp.device) < t_tok)
    mask, ar = diffusion_mask(b, c), bool(c.ar_loss_weight)
    with backward.hold(c.complementary_mask):
        loss, ce, ar_ce = diffusion_term(model, b, c, masked, t_tok, mask, ar)
    out = {"masked_ce": ce.item() / norm["tgt"]}
    ar_loss = c.ar_loss_weight * ar_ce / norm["ar"] if ar else 0.0
    if ar:
        out["loss_ar"] = ar_ce.item() / norm["ar"]
    if c.complementary_mask:   # the same example with exactly the other response tokens masked
        backward(0.5 * loss / norm["tgt"] + ar_loss, final=False)
        loss2, _, _ = diffusion_term(model, b, c, resp & ~masked, 1 - t_tok + c.eps, mask)
        backward(0.5 * loss2 / norm["tgt"], final=True)
        out["loss"] = 0.5 * (loss.item() + loss2.item()) / norm["tgt"]
    else:
        backward(loss / norm["tgt"] + ar_loss, final=True)
        out["loss"] = loss.item() / norm["tgt"]
    out["loss"] += c.ar_loss_weight * out.get("loss_ar", 0.0)
    return out


@torch.no_grad()
def diffusion_probe(model, b, c, gen, norm):
    """Teacher-forced left-to-right accuracy (validation only): each example is cut at a random
    real response token k, the tokens before it clean, k and after MASK (later blocks too), and
    the prediction of token k is scored. Weighted by the example's real response length, the
    mean estimates the per-token accuracy sft's acc_next measures exactly: next to it, it tells an
    undertrained model from a decoding-order problem. Each example's weight sums to its real
    response length, so dividing by norm["real"] (their total) weights batches by tokens."""
    resp, doc, dev = b["resp"], b["doc"], b["idx"].device
    key = doc + 1   # padding (-1) gets its own slot
    n = torch.zeros(doc.shape[0], int(doc.max()) + 2, dtype=torch.long, device=dev)
    start = n.clone().fill_(1 << 30).scatter_reduce(1, key, torch.where(resp, b["pos"], 1 << 30), "amin")
    n_real = n.scatter_add(1, key, (resp & b["real"]).long())
    cut = (torch.rand(n.shape, generator=gen).to(dev) * n_real).long().gather(1, key)
    rel = b["pos"] - start.gather(1, key)
    masked = resp & (rel >= cut)
    r, i = (resp & b["real"] & (rel == cut)).nonzero(as_tuple=True)
    sel = torch.zeros_like(resp).index_put((r, i + b["back"][r, i]), torch.ones_like(r, dtype=torch.bool))
    tgt = torch.full_like(b["idx"], -100).index_put((r, i + b["back"][r, i]), b["idx"][r, i])[sel]
    _, pred = model(torch.where(masked, c.mask_id, b["idx"]), b["pos"], diffusion_mask(b, c), select=sel, targets=tgt)
    weight = n_real.gather(1, key)[sel].float()
    return {"acc_next": ((pred == tgt).float() * weight).sum().item() / norm["real"]}


def count_diffusion(b, c):
    return {"tgt": int(b["resp"].sum()), "ar": int((b["ar"] >= 0).sum()), "real": int((b["resp"] & b["real"]).sum())}


def block_groups(R, B):
    """(s, n) per block of a response of R tokens: block start s, and its n <= B-1 slots
    (slot j predicts token s+j+1; slots past the last token are left out)."""
    return [(s, min(B - 1, R - 1 - s)) for s in range(0, R, B) if R - 1 - s > 0]


def interleaved_length(plen, length, c):
    return length + sum(n for _, n in block_groups(length - plen, c.block_size))


def interleaved_layout(tokens, plen, c):
    """Clean tokens first (an ordinary causal example), then every block's slot group. Two halves
    rather than the seed's interleaving: the clean stream stays one causal run, which is the
    sparser block mask; the semantics are the same (interleaved_mask)."""
    clean = sft_layout(tokens, plen, c)
    clean.update(slot=np.zeros(len(tokens), bool), sj=np.zeros(len(tokens), np.int64))
    groups = block_groups(len(tokens) - plen, c.block_size)
    j = np.concatenate([np.arange(n) for _, n in groups]) if groups else np.zeros(0, np.int64)
    s = np.concatenate([np.full(n, plen + s0) for s0, n in groups]) if groups else np.zeros(0, np.int64)
    slots = {"idx": np.full(len(j), c.mask_id), "pos": s + j, "tgt": tokens[s + j + 1],
             "slot": np.ones(len(j), bool), "sj": j}
    return {k: np.concatenate([clean[k], slots[k]]) for k in clean}


def split_rows(b, keep, pad_id):
    """The tokens where keep (B, T) is True, moved to the front of each row in their order:
    (fields (B, n_max), valid (B, n_max), n (B,)); the tail is padding of its own document."""
    n = keep.sum(1)
    order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :int(n.max())]
    valid = torch.arange(order.shape[1], device=n.device)[None] < n[:, None]
    f = {k: b[k].gather(1, order) for k in ("idx", "pos", "doc", "sj", "tgt")}
    f["idx"] = torch.where(valid, f["idx"], pad_id)
    f["doc"] = torch.where(valid, f["doc"], -2)
    f["pos"], f["sj"] = torch.where(valid, f["pos"], 0), torch.where(valid, f["sj"], 0)
    f["tgt"] = torch.where(valid, f["tgt"], -100)
    return f, valid, n


def gated_slot_forward(model, b, c, loss=False):
    """Gated LoRA: clean tokens compute the frozen base model and see no slot, so the clean
    stream runs once without a graph into a KV cache, and only the slots run with grad, attending
    to it (the decoding rule, used for training). Returns slot logits (with loss: per-token CE and
    argmax), targets and slot indices."""
    real = b["doc"] >= 0
    cl, _, nc = split_rows(b, real & ~b["slot"], c.eos_id)
    sl, svalid, _ = split_rows(b, real & b["slot"], c.eos_id)
    B, Lc, Ts, dev = cl["idx"].shape[0], cl["idx"].shape[1], sl["idx"].shape[1], b["idx"].device
    cache = KVCache(getattr(model, "module", model).config, B, Lc + Ts, dev)   # in the dtype k and v come in
    sel = svalid & (sl["tgt"] >= 0)
    with torch.no_grad():
        model(cl["idx"], cl["pos"], causal_mask(cl["doc"]), cache=cache, select=torch.zeros_like(cl["doc"], dtype=torch.bool))
    cache.commit(nc)

    def physical(clean, slots):   # (B, Lc + Ts): row r holds its nc[r] clean tokens, then its slots
        out = torch.cat([clean, torch.zeros_like(slots)], 1)
        return out.scatter(1, nc[:, None] + torch.arange(Ts, device=dev), slots)
    mask = interleaved_mask(physical(cl["doc"], sl["doc"]), physical(cl["pos"], sl["pos"]),
                            physical(torch.zeros_like(real[:, :Lc]), torch.ones_like(svalid)),
                            physical(cl["sj"], sl["sj"]))
    prev = None
    if c.sampler_head:   # the token at s+j: the clean token at the slot's position in its document
        D = int(max(cl["doc"].max(), sl["doc"].max())) + 1   # documents 0..D-1; column D: split_rows's padding
        col = lambda doc: torch.where(doc >= 0, doc, D)
        start = torch.full((B, D + 1), Lc, device=dev).scatter_reduce(   # where each document's clean tokens begin
            1, col(cl["doc"]), torch.arange(Lc, device=dev).expand(B, Lc), "amin")
        prev = cl["idx"].gather(1, (start.gather(1, col(sl["doc"])) + sl["pos"]).clamp(max=Lc - 1))[sel]
    tgt = sl["tgt"][sel]
    out = model(sl["idx"], sl["pos"], mask, cache=cache, select=sel, prev=prev, targets=tgt if loss else None)
    return out, tgt, sl["sj"][sel]


def interleaved_loss(model, b, c, gen, norm, backward, progress=1.0):
    """AR loss on the clean stream + mask_loss_weight * loss on the slots, each divided by its
    own global count; per-slot-index loss and accuracy for the logs. Gated LoRA: the clean stream
    is the frozen base model and its loss a constant: only the slots are trained (and run with grad)."""
    out = {}
    if c.gated_lora:
        (ce, pred), tgt, j = gated_slot_forward(model, b, c, loss=True)
        is_slot = torch.ones_like(tgt, dtype=torch.bool)
    else:
        sel = b["tgt"] >= 0
        tgt, is_slot, j = b["tgt"][sel], b["slot"][sel], b["sj"][sel]
        ce, pred = model(b["idx"], b["pos"], interleaved_mask(b["doc"], b["pos"], b["slot"], b["sj"]), select=sel,
                         targets=tgt)
    ar, sl = ce[~is_slot].sum(), ce[is_slot].sum()
    backward(ar / norm["tgt"] + c.mask_loss_weight * sl / norm["slot"], final=True)
    out["loss_slot"] = sl.item() / norm["slot"]
    hit = pred == tgt
    if not c.gated_lora:
        out["loss_ar"] = ar.item() / norm["tgt"]
        out["acc_next"] = hit[~is_slot].sum().item() / norm["tgt"]
    out["loss"] = out.get("loss_ar", 0.0) + c.mask_loss_weight * out["loss_slot"]
    for k in range(c.block_size - 1):
        m = is_slot & (j == k)
        out[f"acc_slot{k}"] = hit[m].sum().item() / norm[f"slot{k}"]
    return out


def count_interleaved(b, c):
    sup = b["tgt"] >= 0
    counts = {"tgt": int((sup & ~b["slot"]).sum()), "slot": int((sup & b["slot"]).sum())}
    for k in range(c.block_size - 1):   # the same keys on every rank: they are all-reduced
        counts[f"slot{k}"] = int((sup & b["slot"] & (b["sj"] == k)).sum())
    return counts


MODES = {
    "sft": {"length": sft_length, "layout": sft_layout, "loss": sft_loss, "counts": count_targets},
    "refine": {"length": sft_length, "layout": refine_layout, "loss": refine_loss, "counts": count_refine},
    "diffusion": {"length": diffusion_length, "layout": diffusion_layout, "loss": diffusion_loss,
                  "counts": count_diffusion, "probe": diffusion_probe,
                  "info": lambda c: {"gen_length": c.gen_length, "shift": c.shift, "block_size": c.block_size,
                                     "causal_clean": c.causal_clean}},
    "interleaved": {"length": interleaved_length, "layout": interleaved_layout, "loss": interleaved_loss,
                    "counts": count_interleaved, "info": lambda c: {"block_size": c.block_size}},
}
