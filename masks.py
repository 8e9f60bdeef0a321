"""
Attention rules: FlexAttention-style `mask_mod(b, h, q_idx, kv_idx) -> bool` functions, one per
mode and decoder. Indices are *physical* positions in the row (cached tokens first, then the new
ones), so one rule serves training (no cache) and decoding (cache + new tokens) alike. model.py
turns a rule into a FlexAttention BlockMask (CUDA) or, by dense_mask, a boolean mask for SDPA (CPU).
"""
import torch

# Each rule returns a mask_mod over physical indices. `doc` (B, S) holds a document id per
# token; packed examples never see each other. Written with broadcasting tensor ops so the
# same function runs under FlexAttention's vmap and densely for SDPA.

def causal_mask(doc=None):
    def mask_mod(b, h, q_idx, kv_idx):
        m = kv_idx <= q_idx
        return m if doc is None else m & (doc[b, q_idx] == doc[b, kv_idx])
    return mask_mod


def bidirectional_mask(doc):
    def mask_mod(b, h, q_idx, kv_idx):
        return doc[b, q_idx] == doc[b, kv_idx]
    return mask_mod


def interleaved_mask(doc, pos, slot, sj):
    """
    Next-block prediction (seed interleaved_sft). Per token: doc id, position id, whether it is
    a MASK slot, and its index j in its group. A slot group drafting the block that starts at
    position s holds slots j = 0..B-2 at positions s+j, so s = pos - j is the group's key.
      clean query:  clean keys at positions <= its own (an ordinary causal LM);
      slot query:   clean keys at positions < s, and slots 0..j of its own group.
    Clean tokens never see a slot, so the clean stream is exactly an AR model.
    """
    def mask_mod(b, h, q_idx, kv_idx):
        q_slot, kv_slot = slot[b, q_idx], slot[b, kv_idx]
        q_pos, kv_pos = pos[b, q_idx], pos[b, kv_idx]
        q_start = q_pos - sj[b, q_idx]
        see_clean = ~kv_slot & torch.where(q_slot, kv_pos < q_start, kv_pos <= q_pos)
        see_group = q_slot & kv_slot & (kv_pos - sj[b, kv_idx] == q_start) & (sj[b, kv_idx] <= sj[b, q_idx])
        return (doc[b, q_idx] == doc[b, kv_idx]) & (see_clean | see_group)
    return mask_mod


def block_diffusion_mask(doc, noisy, blk, causal=False):
    """Block diffusion (BD3-LM) over [prompt][clean response][noised copy]: clean tokens attend
    block-causally (the prompt is block -1), or token-causally (causal=True: the clean stream is
    an AR model); a noised block attends to itself, bidirectionally, and to the clean tokens of
    earlier blocks and the prompt. Clean tokens never see a noised one."""
    def mask_mod(b, h, q_idx, kv_idx):
        nq, nk, bq, bk = noisy[b, q_idx], noisy[b, kv_idx], blk[b, q_idx], blk[b, kv_idx]
        clean = ~nq & ~nk & ((kv_idx <= q_idx) if causal else (bk <= bq))
        noised = nq & ((nk & (bk == bq)) | (~nk & (bk < bq)))
        return (doc[b, q_idx] == doc[b, kv_idx]) & (clean | noised)
    return mask_mod


def block_causal_mask(prompt_len, block_length, causal_before=None):
    """Semi-autoregressive diffusion decoding: the prompt is block 0, response block k covers
    positions P + (k-1) L .. P + k L - 1; a token sees every token of its own and earlier blocks.
    Finished blocks never see later ones, so their cached keys and values stay exact. With
    causal_before=k (a block-diffusion model with a causal clean stream) every block before k is
    token-causal, as in training; block k, the canvas, stays bidirectional."""
    def block(b, i):
        P = prompt_len[b]
        return torch.where(i < P, 0, 1 + (i - P) // block_length)

    def mask_mod(b, h, q_idx, kv_idx):
        bq, bk = block(b, q_idx), block(b, kv_idx)
        if causal_before is None:
            return bk <= bq
        return (kv_idx <= q_idx) | ((bk == bq) & (bq >= causal_before))
    return mask_mod


def dense_mask(mask_mod, B, T, S, device):
    """Evaluate a mask_mod on the full (B, 1, T, S) grid: the SDPA path and the test oracle."""
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    q = torch.arange(T, device=device).view(1, 1, T, 1)
    kv = torch.arange(S, device=device).view(1, 1, 1, S)
    return mask_mod(b, torch.zeros_like(b), q, kv).expand(B, 1, T, S)
