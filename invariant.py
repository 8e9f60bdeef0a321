"""
Batch-invariant decoding (model.py's "invariant" backend): the few functions that make a token's
logits the same bits whatever else its forward feeds, and the check that this machine's kernels
have the property they rest on.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

# blockwise --verify returns AR greedy's output only where a token's logits have the same bits
# whether its forward feeds one token or sixteen, one row or eight. Measured on the project's CPU
# (AMX, torch 2.13): a bf16 matmul gives each row the same bits in any call of up to 32 rows, and
# a bf16 batched matmul does for any number of rows and any zero-padded reduction length; fp32
# matmuls do not, at any row count. SDPA's reduction order follows the query and key lengths.
# The "invariant" backend keeps the clean stream inside what was measured: linears in calls of at
# most INVARIANT_ROWS rows, attention written out (HF's eager attention: q kᵀ and p v in the model
# dtype, softmax in fp32) over keys padded to a multiple of INVARIANT_TILE with masked ones.
INVARIANT_ROWS, INVARIANT_TILE = 32, 64


def linear(x, weight, bias=None, rows=0):
    """F.linear in calls of at most `rows` rows of x (0: one call)."""
    n = x.numel() // x.shape[-1]
    if not rows or n <= rows:
        return F.linear(x, weight, bias)
    flat = x.reshape(n, x.shape[-1])
    out = torch.cat([F.linear(flat[i:i + rows], weight, bias) for i in range(0, n, rows)])
    return out.view(*x.shape[:-1], -1)


def invariant_attention(q, k, v, mask):
    """Attention as HF's eager code computes it, on keys padded to the mask's width: q (B, H, T, D),
    k and v (B, Hkv, S', D) with S' <= S (zero-padded here), mask (B, 1, T, S) bool. Keys past a
    query's own are masked: zeros or a cache's stale slots, finite either way, so their p = 0 adds
    exact zeros. Masked scores get fp32's lowest value, not -inf: a row that sees nothing stays finite."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], mask.shape[-1]
    if k.shape[2] < S:
        k, v = (F.pad(t, (0, 0, 0, S - t.shape[2])) for t in (k, v))
    s = (q.reshape(B, Hkv, H // Hkv * T, D) @ k.transpose(-1, -2)) * D ** -0.5   # query heads grouped by kv head
    s = s.view(B, H, T, S).float().masked_fill(~mask, torch.finfo(torch.float32).min)
    p = torch.softmax(s, -1).to(v.dtype).view(B, Hkv, H // Hkv * T, S)
    return (p @ v).view(B, H, T, D)


def invariant_matmuls(model, rows=INVARIANT_ROWS):
    """The property the invariant backend rests on, checked on this machine's kernels with each of
    the model's own weight shapes (bias included): every row of a call of up to `rows` rows = the
    same row in a smaller call."""
    g = torch.Generator().manual_seed(0)
    shapes = {(m.weight.shape, m.bias is not None): m for m in model.modules() if isinstance(m, nn.Linear)}
    for m in shapes.values():
        x = torch.randn(rows, m.weight.shape[1], generator=g).to(m.weight)
        whole = F.linear(x, m.weight, m.bias)
        if not all(torch.equal(F.linear(x[:n], m.weight, m.bias), whole[:n]) for n in (1, 2, 3, 16, rows - 1)):
            return False
    return True
