"""
LoRA (plain and gated) and the sampler head: the adapters model.py's Projection layers carry
(Transformer.add_lora puts them there), and decoding's folded form of them.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import UserError
from invariant import linear

# each HF projection name -> (submodule, our fused linear); slices of a fused one in this order
LORA_SLOTS = {"q": ("self_attn", "qkv_proj"), "k": ("self_attn", "qkv_proj"), "v": ("self_attn", "qkv_proj"),
              "o": ("self_attn", "o_proj"), "gate": ("mlp", "gate_up_proj"), "up": ("mlp", "gate_up_proj"),
              "down": ("mlp", "down_proj")}


def is_adapter_key(name):
    """The state-dict names a LoRA run adds and trains: adapters, the MASK row, the sampler head."""
    return ".lora." in name or name == "mask_embed" or name.startswith("sampler_head.")


def parse_lora_targets(targets):
    """'all-linear', 'q,k,v', or a list of names from LORA_SLOTS -> a list in LORA_SLOTS order."""
    if isinstance(targets, str):
        targets = list(LORA_SLOTS) if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    bad = [t for t in targets if t not in LORA_SLOTS]
    if bad or not targets:
        raise UserError(f"lora_targets={targets!r}: expected 'all-linear' or names from {', '.join(LORA_SLOTS)}")
    return [t for t in LORA_SLOTS if t in targets]


class LoRA(nn.Module):
    """
    LoRA (Hu et al., arXiv 2106.09685) for one linear layer whose output may fuse several HF
    projections (q|k|v, gate|up). Each targeted slice has its own A (r, in) and B (out, r), so the
    adapters map one to one onto peft's per-projection ones; untargeted slices get no delta.
    delta = alpha / r * B A dropout(x); B starts at zero, so the model is unchanged at step 0.
    The slices' adapters run as two matmuls: every A stacked, then a block-diagonal B.
    """

    def __init__(self, in_features, slices, targets, rank, alpha, dropout):
        super().__init__()
        self.slices, self.scale, self.dropout = slices, alpha / rank, dropout    # slices: [(name, out)]
        self.in_features = in_features
        self.lora_A = nn.ParameterDict({n: nn.Parameter(torch.empty(rank, in_features)) for n, _ in slices if n in targets})
        self.lora_B = nn.ParameterDict({n: nn.Parameter(torch.zeros(o, rank)) for n, o in slices if n in targets})
        for a in self.lora_A.values():   # peft's default: Kaiming-uniform A, zero B
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.fold = None   # decoding: LoRA.folded's form, the weights' identity it was built from, its probes

    def fused(self):
        """A (r * targeted, in) and B (out, r * targeted): a slice without an adapter is zero rows."""
        A = torch.cat([self.lora_A[n] for n, _ in self.slices if n in self.lora_A])
        B = torch.block_diag(*[self.lora_B[n] if n in self.lora_B else A.new_zeros(o, 0) for n, o in self.slices])
        return A, B

    def folded(self, layer, n):
        """Decoding's form of the adapter on `layer` (its Projection) for a call of n rows:
        W' = [W; A] (bias zero-padded) and scale B, in the layer's dtype, so that one matmul gives
        the frozen output and x Aᵀ together. The layer's weight becomes a view of W' (no second copy
        of it). Cached while the weights are unchanged. Returns (W', b', scale B, blocks) and whether the
        one matmul keeps the frozen rows' bits for a call of n rows on this machine: checked on probe
        rows, once for each size of call the layer makes (`linear` splits n into calls of
        layer.rows). Where it does not, the caller runs W and A = W'[out:] as two matmuls.
        blocks: (out from, out to, rank from, rank to, (scale B_slice)ᵀ) per targeted slice, the
        nonzero blocks of the block-diagonal scale B, for a delta added slice by slice (addmm_): on
        SmolLM2 at batch 1 (fp32, the Zen 3) a 9-row gated forward took 67.0 ms so, against 73.9 with
        one matmul by the whole B (two thirds zeros for q|k|v, half for gate|up) and an add.
        On SmolLM2 in bf16 at batch 1 (random rank-32 adapters, two alternating rounds on the CPU) a
        gated step took 69-74 ms folded against 73-79 ms with x Aᵀ as its own matmul in fp32."""
        W, b, f = layer.weight, layer.bias, self.fold
        if f is None or f["key"] != [(p.data_ptr(), p._version) for p in f["params"]]:
            with torch.inference_mode(False), torch.no_grad():
                A, B = self.fused()
                Wc = torch.cat([W, A.to(W.dtype)])
                bc = None if b is None else torch.cat([b, b.new_zeros(len(A))])
                W.data = Wc[:len(W)]
                blocks, o0, r0 = [], 0, 0
                for name, o in self.slices:
                    if name in self.lora_B:
                        r = self.lora_B[name].shape[1]
                        blocks.append((o0, o0 + o, r0, r0 + r, (self.scale * self.lora_B[name]).t().contiguous().to(W.dtype)))
                        r0 += r
                    o0 += o
            params = [p for p in (W, b, *self.parameters()) if p is not None]
            f = self.fold = {"params": params, "key": [(p.data_ptr(), p._version) for p in params],
                             "form": (Wc, bc, (self.scale * B).to(W.dtype), blocks), "probed": {}, "ok": {}}
        if n not in f["ok"]:   # a call size not seen yet: probe each size linear splits it into
            sizes = {n} if not layer.rows or n <= layer.rows else {layer.rows, n % layer.rows} - {0}
            for m in sizes - f["probed"].keys():   # with the kernels the layer's forward runs (Projection.packed)
                x = torch.randn(m, W.shape[1], generator=torch.Generator().manual_seed(m)).to(W)
                Wc, bc = f["form"][:2]
                f["probed"][m] = torch.equal(linear(x, Wc, bc, packed=layer.packed("fold", Wc))[:, :len(W)],
                                             linear(x, W, b, packed=layer.packed("weight", W)))
            f["ok"][n] = all(f["probed"][m] for m in sizes)
        return f["form"], f["ok"][n]

    def forward(self, x, rows=0):
        """rows: the invariant backend's row limit."""
        A, B = self.fused()
        return self.scale * linear(linear(F.dropout(x, self.dropout, self.training), A, rows=rows), B, rows=rows)


class SamplerHead(nn.Module):
    """Apple's sampler head (arXiv 2507.11851): a slot's final state is conditioned on the token
    drafted just before it, z = h + W2 silu(W1 [h; embedding(prev)]), so the drafts of one group
    form a chain rather than independent guesses. W2 starts at zero: at first z = h."""

    def __init__(self, C):
        super().__init__()
        self.fc1 = nn.Linear(2 * C, C, bias=False)
        self.fc2 = nn.Linear(C, C, bias=False)
        nn.init.kaiming_uniform_(self.fc1.weight, a=math.sqrt(5))
        nn.init.zeros_(self.fc2.weight)

    def forward(self, h, prev_emb):
        return h + self.fc2(F.silu(self.fc1(torch.cat([h, prev_emb.to(h.dtype)], -1))))
