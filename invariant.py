"""
Decoding's linears and attention: batch-invariant decoding (model.py's "invariant" backend), the
few functions that make a token's logits the same bits whatever else its forward feeds, and the
check that this machine's kernels have the property they rest on; and float32 linears through
oneDNN on prepacked weights (Packs), the fast path for decoding on a CPU.
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


# float32 on a CPU, torch's F.linear calls MKL, whose kernel for a few rows is slow: on SmolLM2's shapes
# on an AVX2 Zen 3 a call of 2-16 rows costs about twice one row's, and a row 2x what oneDNN's matmul
# on a prepacked weight costs (the 49k-row head: 9.0 ms against 4.7 for one row, 21.7 against 5.9 for
# four). oneDNN's call costs ~30 us more, which only a big weight repays: PACK_MIN elements (measured:
# even around 2^17-2^18, a loss below). Measured there too: each row of a oneDNN call has the bits it
# has alone, and appending rows to the weight leaves the first rows' outputs' bits as they were.
PACK_MIN = 2 ** 18


def packable(weight):
    """Whether linear runs this weight through oneDNN on a prepacked copy (Packs)."""
    return (weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.numel() >= PACK_MIN
            and not weight.is_inference() and torch.backends.mkldnn.is_available())


class Packs(dict):
    """A module's oneDNN prepacked copies of its weights (name -> ((data_ptr, version, shape), copy)),
    each remade when its weight changes: another tensor, or the same one written in place (an
    optimizer step, load_state_dict; not a write through `.data`, which bypasses the version). A
    deep copy of the module starts without them (an opaque oneDNN tensor cannot be copied)."""

    def get_packed(self, name, weight):
        if not packable(weight):
            return None
        key, hit = (weight.data_ptr(), weight._version, tuple(weight.shape)), self.get(name)
        if hit is None or hit[0] != key:
            hit = self[name] = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))
        return hit[1]

    def __deepcopy__(self, memo):
        return Packs()


def linear(x, weight, bias=None, rows=0, packed=None):
    """F.linear in calls of at most `rows` rows of x (0: one call); with `packed`, weight's oneDNN
    prepacked copy (Packs), one oneDNN call."""
    if packed is not None and x.dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
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
