"""
The Transformer (Llama / Qwen2 / Qwen3 / Mistral family), attention by mask function,
a static KV cache, LoRA and gated LoRA (the adapters: lora.py), and init (weights on disk: hf.py,
checkpoint.py).

Attention takes a rule from masks.py (FlexAttention-style mask_mod over physical indices): a
FlexAttention BlockMask on CUDA, a dense boolean mask for SDPA elsewhere.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention, create_block_mask

from configurator import UserError
from invariant import INVARIANT_ROWS, INVARIANT_TILE, Packs, invariant_attention, invariant_matmuls, linear
from masks import causal_mask, dense_mask
from lora import LORA_SLOTS, LoRA, SamplerHead, is_adapter_key, parse_lora_targets


@dataclass
class ModelConfig:
    vocab_size: int = 320          # rows of the embedding (padded to a multiple of 64 when tokens are added)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4             # grouped-query attention when < n_head
    n_embd: int = 128
    head_dim: int = 0              # 0: n_embd // n_head
    intermediate_size: int = 0     # 0: SwiGLU width 8/3 * n_embd rounded up to 64
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict = None      # Llama-3 frequency scaling parameters, or None
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False         # Qwen2
    qk_norm: bool = False          # Qwen3
    tie_word_embeddings: bool = True
    model_type: str = "llama"

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.n_embd // self.n_head
        if not self.intermediate_size:
            self.intermediate_size = 64 * math.ceil(8 * self.n_embd / 3 / 64)
        if self.n_head % self.n_kv_head:
            raise UserError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")


def pad_vocab(n, multiple=64):
    return multiple * math.ceil(n / multiple)


def pick_backend(cfg, device):
    """FlexAttention where it is fast (compiled, CUDA; Inductor needs head_dim >= 16), else SDPA."""
    return "flex" if str(device).startswith("cuda") and cfg.head_dim >= 16 else "sdpa"


# ----------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32:  # one fused op; the same arithmetic as below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # normalise in fp32 and cast back before the weight, exactly as HF Llama does
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg):
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    sc = cfg.rope_scaling
    if not sc:
        return inv_freq
    # Llama 3.1 frequency scaling: long wavelengths slowed by `factor`, short ones kept,
    # a smooth blend between (Meta's reference apply_scaling).
    factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old_len = sc["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, blended, scaled)


def rope_tables(inv_freq, pos, dtype):
    freqs = pos.float()[..., None] * inv_freq          # (B, T, D/2)
    cos, sin = freqs.cos(), freqs.sin()
    # rotate-half layout: out = x * [cos, cos] + roll(x, D/2) * [-sin, sin]
    return torch.cat([cos, cos], -1).to(dtype)[:, :, None], torch.cat([-sin, sin], -1).to(dtype)[:, :, None]


def apply_rope(x, cos, sin_signed):
    """HF's x * cos + rotate_half(x) * sin, with rotate_half(x) * sin = roll(x) * [-sin, sin]."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


def gated_rows(gate):
    """The gated rows of a (N, d) tensor as a view: every row (gate None), one run of rows (a
    slice) or the same run of positions in each of n rows of t (a (n, t, slice) tuple)."""
    if gate is None or isinstance(gate, slice):
        return lambda z: z[slice(None) if gate is None else gate]
    n, t, run = gate
    return lambda z: z.view(n, t, z.shape[-1])[:, run]


class Projection(nn.Linear):
    """A linear layer that may carry a LoRA (`lora`: None until Transformer.add_lora gives it one).
    Gated LoRA: gate holds the flat indices of the (B*T) rows that get the delta (or, where they
    are regular, a view's description: gated_rows), computed there only; every other row is the
    frozen layer's output, bit for bit (and with no gated row the adapters cost nothing). Decoding
    (inference mode) runs the adapters folded into the layer's own matmul (LoRA.folded), in eval mode;
    at a call size where that would change the frozen rows' bits, x Aᵀ is its own matmul."""

    rows = 0      # the invariant backend's calls of at most this many rows (model.set_backend)
    pack = False  # decoding: oneDNN on prepacked weights where invariant.packable (model.set_prepack)

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.lora, self.packs = None, Packs()

    def _apply(self, *args, **kw):   # .to() and the like: the adapter's fold (a copy of the weight) and packs go too
        if self.lora is not None:
            self.lora.fold = None
        self.packs = Packs()
        return super()._apply(*args, **kw)

    def packed(self, name, weight):
        """weight's prepacked copy (Packs) where decoding packs, else None (F.linear; always under the
        invariant backend's row limit, whose property is measured for F.linear)."""
        return self.packs.get_packed(name, weight) if self.pack and not self.rows else None

    def forward(self, x, gate=None):
        decoding = torch.is_inference_mode_enabled() and not self.training
        packed = self.packed if decoding else lambda name, weight: None
        if self.lora is None or (isinstance(gate, torch.Tensor) and len(gate) == 0):
            return linear(x, self.weight, self.bias, self.rows, packed("weight", self.weight))
        limit = self.rows if gate is None else 0   # every row's delta keeps the invariant row limit; slots need not
        x2, out = x.reshape(-1, x.shape[-1]), self.out_features
        if decoding:   # [W; A] and scale B (LoRA.folded); delta = (x Aᵀ)(scale B)ᵀ
            (W, b, B, blocks), one = self.lora.folded(self, len(x2))
            if one:   # one matmul gives [frozen output | x Aᵀ]
                y = linear(x, W, b, self.rows, packed("fold", W))
                xa_of = lambda pick, xa=y.view(-1, y.shape[-1])[:, out:]: pick(xa)
            else:     # appending A would change the frozen rows' bits at this size: A apart
                y = linear(x, self.weight, self.bias, self.rows, packed("weight", self.weight))
                xa_of = lambda pick: linear(pick(x2), W[out:], rows=limit)
            if isinstance(gate, slice):   # one run of rows (batch 1): B's nonzero blocks, added in place
                rows = y.view(-1, y.shape[-1])[gate]
                xa = xa_of(lambda z: z[gate])
                for o0, o1, r0, r1, Bt in blocks:
                    rows[:, o0:o1].addmm_(xa[:, r0:r1], Bt)
                return y[..., :out]
            delta = lambda pick: linear(xa_of(pick), B, rows=limit)
        else:
            y = linear(x, self.weight, self.bias, self.rows)
            delta = lambda pick: self.lora(pick(x2), limit).to(y.dtype)
        # in place: y is this call's own, and linear's backward never reads it
        y2 = y.view(-1, y.shape[-1])
        if isinstance(gate, torch.Tensor):   # into y's whole rows: index_add_ on the strided [:, :out]
            d = delta(lambda z: z[gate])     # would copy all of y, and back, on every call
            y2.index_add_(0, gate, F.pad(d, (0, y2.shape[1] - out)) if y2.shape[1] > out else d)
        else:   # every row, one run of rows or the same run in every batch row: a view, no gather or scatter
            pick, flat = gated_rows(gate), y2[:, :out]
            pick(flat).add_(delta(lambda z: pick(z).reshape(-1, z.shape[-1])).view_as(pick(flat)))
        return y[..., :out]


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        H, Hkv, D, C = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.n_embd
        self.n_head, self.n_kv_head, self.head_dim = H, Hkv, D
        # q, k and v in one matmul (gpt-fast's wqkv); split back into HF's q/k/v_proj on export
        self.qkv_proj = Projection(C, (H + 2 * Hkv) * D, bias=cfg.qkv_bias)
        self.o_proj = Projection(H * D, C, bias=False)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's q and k before RoPE
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps)

    def forward(self, x, rope, attend, cache=None, gate=None):
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x, gate).view(B, T, -1, self.head_dim).split(
            [self.n_head, self.n_kv_head, self.n_kv_head], dim=2)          # (B, T, H|Hkv, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.write(k, v)                   # (B, Hkv, S, D): cached + new
        y = attend(q, k, v)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1), gate)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_up_proj = Projection(cfg.n_embd, 2 * cfg.intermediate_size, bias=False)  # HF gate_proj; up_proj
        self.down_proj = Projection(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x, gate=None):
        g, up = self.gate_up_proj(x, gate).chunk(2, dim=-1)
        return self.down_proj(F.silu(g) * up, gate)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, attend, cache=None, gate=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, attend, cache, gate)
        return x + self.mlp(self.post_attention_layernorm(x), gate)


# ----------------------------------------------------------------------------- KV cache

class LayerCache:
    """One layer's view of the KV cache: writes new k/v at each row's own offset."""

    def __init__(self, cache, i, rows, idx, S):
        self.cache, self.i, self.rows, self.idx, self.S = cache, i, rows, idx, S   # S: the keys returned

    def write(self, k, v):
        c, i = self.cache, self.i
        if c.k[i] is None:   # dtype None: k and v as they come (under autocast k leaves RoPE in fp32, v in bf16)
            c.k[i], c.v[i] = (torch.zeros(c.shape, device=c.device, dtype=t.dtype) for t in (k, v))
        c.k[i][self.rows, :, self.idx] = k.transpose(1, 2)   # (B, T, Hkv, D) at (row, offset + t)
        c.v[i][self.rows, :, self.idx] = v.transpose(1, 2)
        return c.k[i][:, :, :self.S], c.v[i][:, :, :self.S]


class KVCache:
    """
    Preallocated (B, Hkv, max_len, D) buffers per layer and a committed length per row.
    A forward writes its T new tokens at [length, length + T) of each row but commits
    nothing: the caller decides how many become part of the prefix (`commit`), so MASK
    slots and drafts can be written, attended to, and simply overwritten next time.
    dtype None: each layer's k and v buffers take the dtype of the first k and v written to them.
    """

    def __init__(self, cfg, batch_size, max_len, device, dtype=None):
        room = -(-max_len // INVARIANT_TILE) * INVARIANT_TILE   # buffers with room for a padded key width
        self.shape, self.device = (batch_size, cfg.n_kv_head, room, cfg.head_dim), device
        self.k, self.v = ([None if dtype is None else torch.zeros(self.shape, device=device, dtype=dtype)
                           for _ in range(cfg.n_layer)] for _ in range(2))
        self.length = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len

    def layers(self, T, tile=1):
        """Per-layer writers for T new tokens, S (the longest row's length after them) and the key
        width attention reads: S rounded up to a multiple of tile (the rest stale or zero, masked)."""
        S = int((self.length + T).max())
        if S > self.max_len:
            raise ValueError(f"KV cache overflow: need {S} positions, have {self.max_len}")
        W = min(-(-S // tile) * tile, self.shape[2])
        rows = torch.arange(len(self.length), device=self.length.device)[:, None]
        idx = self.length[:, None] + torch.arange(T, device=self.length.device)   # (B, T)
        return [LayerCache(self, i, rows, idx, W) for i in range(len(self.k))], S, W

    def commit(self, n):
        """Make the first n (int or (B,) tensor) of the last forward's tokens part of the prefix."""
        self.length = self.length + n


# ----------------------------------------------------------------------------- model

class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.backend = "sdpa"            # or "flex", "invariant"; see set_backend
        self.flex = flex_attention       # the Flex kernel set_backend chose
        self.gradient_checkpointing = False
        self.lora_config = None          # set by add_lora
        self.mask_embed = None           # LoRA runs: the trainable copy of the MASK embedding row
        self.sampler_head = None         # gated LoRA runs may add one (SamplerHead)
        self.ce_rows = 0                 # rows per cross-entropy chunk (0: 2^27 logits' worth)
        self.pack, self.packs = False, Packs()   # decoding's oneDNN head (set_prepack)

    def set_backend(self, backend, device=None):
        """Chosen once: 'flex' (BlockMask; on CUDA the compiled kernel, since eager Flex
        materialises the scores), 'sdpa' (dense boolean mask) or 'invariant' (each token's bits
        independent of what else the forward feeds: bf16 decoding that --verify keeps exact)."""
        assert backend in ("flex", "sdpa", "invariant"), backend
        if backend == "invariant" and not invariant_matmuls(self):
            raise UserError(f"this machine's {self.lm_head.weight.dtype} matmul gives a row other bits in a call of other "
                            "rows, so the batch-invariant backend cannot make decoding batch-invariant here (measured "
                            "for bf16 on AMX CPUs); decode with --batch_invariant=False")
        self.backend = backend
        for m in self.modules():
            if isinstance(m, Projection):
                m.rows = INVARIANT_ROWS if backend == "invariant" else 0
        cuda = str(device or next(self.parameters()).device).startswith("cuda")
        self.flex = torch.compile(flex_attention, dynamic=False) if backend == "flex" and cuda else flex_attention
        return self

    def _apply(self, *args, **kw):   # .to() and the like: the head's prepacked copy goes
        self.packs = Packs()
        return super()._apply(*args, **kw)

    def set_prepack(self, on=True):
        """Decoding (inference mode, eval): the float32 CPU projections and head big enough to gain
        (invariant.packable) through oneDNN on prepacked copies of their weights, made at first use
        and remade when a weight changes; off: F.linear. Either way the copies made so far go, and
        the adapters' folds, whose probes ran on the other kernels. A copy adds its weight's size
        again (a gated LoRA layer keeps two: its fold's and, for the probe, its weight's)."""
        self.pack, self.packs = on, Packs()
        for m in self.modules():
            if isinstance(m, Projection):
                m.pack, m.packs = on, Packs()
                if m.lora is not None:
                    m.lora.fold = None
        return self

    @torch.no_grad()
    def init_weights(self, seed=None):
        """Every tensor's init in one place: N(0, 0.02) for matrices and embeddings, the output
        projections of each residual branch scaled by 1/sqrt(2 n_layer) (GPT-2), zero biases,
        unit norm weights. On an FSDP2-sharded model each rank keeps its rows of the same draws,
        so the model is the one a single process gets."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        std = 0.02
        for name, p in self.named_parameters():
            local, a = local_rows(p)
            if name.endswith("norm.weight") or "layernorm" in name:
                local.fill_(1.0)
            elif name.endswith(".bias"):
                local.zero_()
            else:
                s = std / math.sqrt(2 * self.config.n_layer) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                local.copy_((torch.randn(p.shape, generator=g) * s)[a:a + local.shape[0]])
        self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)
        return self

    def _attend(self, mask_mod, B, T, S, device, start, width):
        if start is not None:
            # with a cache, query i of row b sits at physical index start[b] + i, and keys past
            # start[b] + T are stale slots from an earlier forward: never attend to them
            rule = mask_mod

            def mask_mod(b, h, q, kv):
                return rule(b, h, q + start[b], kv) & (kv < start[b] + T)
        if self.backend == "flex":
            # compiled on CUDA: built eagerly it materialises the (B, T, S) grid on every forward
            bm = create_block_mask(mask_mod, B, None, T, S, device=device, _compile=device.type == "cuda")
            return lambda q, k, v: self.flex(q, k, v, block_mask=bm, enable_gqa=True)
        mask = dense_mask(mask_mod, B, T, S, device)
        if self.backend == "invariant":   # keys S..width: padding no query sees
            mask = F.pad(mask, (0, width - S)) if width > S else mask
            return lambda q, k, v: invariant_attention(q, k, v, mask)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def forward(self, idx, pos=None, mask_mod=None, cache=None, select=None, hidden=False, prev=None,
                targets=None):
        """
        idx, pos: (B, T) token ids and position ids (pos defaults to the cache offset + arange).
        mask_mod: attention rule over physical indices (default: causal).
        cache: a KVCache; the T new tokens are written after each row's committed length.
        select: optional (B, T) bool; the head then runs only there and logits are (N, V),
        which is what training needs (the head is most of the FLOPs of a small model).
        prev: (N,) the token before each selected one, for the sampler head (training).
        targets: (N,) with select: return (per-token fp32 cross-entropy, argmax) instead (head_loss).
        hidden: return the final normed hidden states (B, T, C) instead, for the caller to run the
        head (`head`) on the rows it needs (a 49k-row head costs as much as several layers).
        Returns logits (B, T, V).
        """
        B, T = idx.shape
        start = cache.length if cache is not None else None
        if pos is None:
            pos = torch.arange(T, device=idx.device).expand(B, T)
            pos = pos + start[:, None] if start is not None else pos
        tile = INVARIANT_TILE if self.backend == "invariant" else 1
        if cache is not None:
            layer_caches, S, width = cache.layers(T, tile)
        else:
            layer_caches, S, width = [None] * len(self.layers), T, -(-T // tile) * tile
        attend = self._attend(mask_mod or causal_mask(), B, T, S, idx.device, start, width)
        x = self.embed_tokens(idx)
        gate = None
        if self.mask_embed is not None:
            is_mask = (idx == self.lora_config["mask_id"])[..., None]           # (B, T, 1)
            rows = is_mask.view(-1).nonzero()[:, 0]
            if len(rows) or self.training:   # training: the row stays in the graph (a zero gradient
                x = torch.where(is_mask, self.mask_embed.to(x.dtype), x)   # without MASK), as DDP needs
            gate = rows if self.lora_config["gated"] else None   # gated LoRA: the MASK rows only
            if gate is not None and not self.training and len(gate):   # decoding: a view in each projection
                m = is_mask.view(B, T)
                first, run = m[0].nonzero()[:, 0], lambda r: int(r[-1]) - int(r[0]) + 1 == len(r)
                if run(gate):   # one run of rows (batch 1)
                    gate = slice(int(gate[0]), int(gate[-1]) + 1)
                elif len(first) and run(first) and bool((m == m[:1]).all()):   # the same run in every row
                    gate = (B, T, slice(int(first[0]), int(first[-1]) + 1))
        rope = rope_tables(self.inv_freq, pos, x.dtype)
        for layer, lc in zip(self.layers, layer_caches):
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, rope, attend, lc, gate, use_reentrant=False)
            else:
                x = layer(x, rope, attend, lc, gate)
        x = self.norm(x)
        if hidden:
            return x
        h = x if select is None else x[select]
        if targets is not None:
            return self.head_loss(h, targets, prev)
        return self.head(h, prev)

    def head(self, h, prev=None, rows=None):
        """Logits from final hidden states h (..., C); prev (...) the token before each one,
        for the sampler head; rows: some rows of the head's weight, for logits over those tokens only."""
        z = h if prev is None else self.sampler_head(h, self.embed_tokens(prev))
        if rows is not None:
            return F.linear(z, rows)
        decoding = self.pack and torch.is_inference_mode_enabled() and not self.training
        return linear(z, self.lm_head.weight, rows=INVARIANT_ROWS if self.backend == "invariant" else 0,
                      packed=self.packs.get_packed("head", self.lm_head.weight) if decoding else None)

    def head_loss(self, h, targets, prev=None):
        """(per-token fp32 cross-entropy, argmax) of the head over hidden states h (N, C), in chunks
        of rows: fp32 logits never exist for all N tokens at once (GBs at a 150k vocabulary), and
        with several chunks each one's logits are recomputed in the backward, not kept."""
        def chunk(h, t, p):
            logits = self.head(h, p)
            return F.cross_entropy(logits.float(), t, reduction="none"), logits.detach().argmax(-1)
        n = self.ce_rows or max(1, 2 ** 27 // self.config.vocab_size)
        if len(h) <= n:
            return chunk(h, targets, prev)
        parts = [torch.utils.checkpoint.checkpoint(chunk, h[i:i + n], targets[i:i + n],
                                                   None if prev is None else prev[i:i + n], use_reentrant=False)
                 for i in range(0, len(h), n)]
        return torch.cat([ce for ce, _ in parts]), torch.cat([p for _, p in parts])

    def add_lora(self, rank, alpha, dropout=0.0, targets="all-linear", mask_id=None, gated=False, sampler_head=False):
        """Freeze every weight and add LoRA adapters to the targeted projections. mask_id: the
        MASK token a mode adds; its embedding row is trained (as mask_embed, a copy). gated: the
        deltas apply only where the input token is mask_id (Apple's gated LoRA, arXiv 2507.11851),
        so every other position computes exactly the frozen model."""
        if gated and mask_id is None:
            raise UserError("gated LoRA needs the MASK token id (mode=interleaved)")
        targets = parse_lora_targets(targets)
        cfg = self.config
        sizes = {"q": cfg.n_head * cfg.head_dim, "k": cfg.n_kv_head * cfg.head_dim, "v": cfg.n_kv_head * cfg.head_dim,
                 "o": cfg.n_embd, "gate": cfg.intermediate_size, "up": cfg.intermediate_size, "down": cfg.n_embd}
        self.requires_grad_(False)
        for layer in self.layers:
            for sub, name in (("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"), ("mlp", "down_proj")):
                lin = getattr(getattr(layer, sub), name)
                slices = [(n, sizes[n]) for n, where in LORA_SLOTS.items() if where == (sub, name)]
                if any(n in targets for n, _ in slices):
                    lin.lora = LoRA(lin.in_features, slices, targets, rank, alpha, dropout).to(lin.weight.device, lin.weight.dtype)
        if mask_id is not None:
            self.mask_embed = nn.Parameter(self.embed_tokens.weight[mask_id].detach().clone())
        if sampler_head:
            w = self.embed_tokens.weight
            self.sampler_head = SamplerHead(cfg.n_embd).to(w.device, w.dtype)
        self.lora_config = {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": targets,
                            "mask_id": mask_id, "gated": gated, "sampler_head": sampler_head}
        return self

    def lora_state(self):
        """The trainable tensors of a LoRA model: adapters, the MASK row, the sampler head."""
        return {k: v for k, v in self.state_dict().items() if is_adapter_key(k)}

    @torch.no_grad()
    def merged_state(self, sd=None):
        """Full weights with the adapters merged in (W + alpha/r B A, slice by slice) and the MASK
        row written into the embedding: a plain model. `sd`: a full state dict gathered from a
        sharded model (default: this one's). Gated adapters apply at MASK positions only, which
        no weight can express, so they are refused."""
        if self.lora_config["gated"]:
            raise UserError("gated LoRA adapters cannot be merged into the weights (they apply at MASK slots only)")
        sd = sd or self.state_dict()
        out = {k: v for k, v in sd.items() if not is_adapter_key(k)}
        for name, mod in self.named_modules():
            if isinstance(mod, LoRA):
                key, w = name[:-len(".lora")] + ".weight", sd[name[:-len(".lora")] + ".weight"]
                A = lambda n: sd[f"{name}.lora_A.{n}"].to(w)
                B = lambda n: sd[f"{name}.lora_B.{n}"].to(w)
                out[key] = w + torch.cat([mod.scale * B(n) @ A(n) if n in mod.lora_A else w.new_zeros(o, w.shape[1])
                                          for n, o in mod.slices])
        if "mask_embed" in sd:
            emb = out["embed_tokens.weight"].clone()
            emb[self.lora_config["mask_id"]] = sd["mask_embed"].to(emb)
            out["embed_tokens.weight"] = emb
            if self.config.tie_word_embeddings:
                out["lm_head.weight"] = emb
        return out

    def resize_vocab(self, n):
        """Grow the embedding (and head) to hold n tokens, padded to a multiple of 64.
        New rows start at the mean of the old ones, a common choice for added tokens."""
        rows = pad_vocab(n)
        old = self.config.vocab_size
        if rows <= old:
            return
        def grow(w):
            new = torch.empty(rows, w.shape[1], dtype=w.dtype, device=w.device)
            new[:old] = w.data
            new[old:] = w.data.mean(0)
            return nn.Parameter(new)
        self.embed_tokens.weight = grow(self.embed_tokens.weight)
        if self.config.tie_word_embeddings:
            self.lm_head = nn.Linear(self.config.n_embd, rows, bias=False, device=self.embed_tokens.weight.device)
            self.lm_head.weight = self.embed_tokens.weight
        else:
            self.lm_head.weight = grow(self.lm_head.weight)
        self.lm_head.out_features = rows
        self.config.vocab_size = rows

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------- Hugging Face weights


def empty(model, device):
    """to_empty, keeping a tied head tied (to_empty from meta makes new parameters)."""
    model.to_empty(device=device)
    if model.config.tie_word_embeddings and not hasattr(model.embed_tokens.weight, "device_mesh"):
        model.lm_head.weight = model.embed_tokens.weight
    return model


def local_rows(p):
    """(local tensor, its first row in the full tensor): a plain tensor itself and 0, or the shard
    an FSDP2 DTensor parameter keeps on this rank (dim 0 cut in torch.chunk's way)."""
    if not hasattr(p, "device_mesh"):   # detach, not .data: a write bumps p's version (Packs sees it)
        return p.detach(), 0
    world, r = p.device_mesh.size(), p.device_mesh.get_local_rank()
    return p.to_local(), min(r * -(-p.shape[0] // world), p.shape[0])
