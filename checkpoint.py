"""
Everything on disk: training checkpoints (sharded DCP state, train_state.pt, info.json), finding
a checkpoint, Hugging Face folders in (read shard-wise) and out, peft adapters out, LoRA
checkpoints and the fingerprint of the base they apply to.

    out_dir/ckpt_NNNNNNN/  state/ (model or adapters + optimizer, torch.distributed.checkpoint)
                           config.json (HF), info.json, tokenizer/, train_state.pt
    out_dir/hf/            (--export_hf) a folder transformers loads; out_dir/adapter/ a peft adapter
"""
import hashlib
import json
import os
import re
import shutil

import torch

from configurator import UserError
from model import ModelConfig, Transformer, empty, is_adapter_key, local_rows, rope_inv_freq
from prepare import Tokenizer


SUPPORTED_TYPES = ("llama", "qwen2", "qwen3", "mistral")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}


def config_from_hf(hf, path):
    """Our ModelConfig from an HF config.json dict; refuses what this model does not implement."""
    where = os.path.join(path, "config.json")
    mt = hf.get("model_type")
    if mt not in SUPPORTED_TYPES:
        raise UserError(f"{where}: model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED_TYPES)})")
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise UserError(f"{where}: rope type {rope_type!r} is not supported (default or llama3)")
    window = hf.get("sliding_window") if (mt == "mistral" or hf.get("use_sliding_window")) else None
    if window and window < hf.get("max_position_embeddings", 0):
        raise UserError(f"{where}: sliding_window={window} attention is not supported")
    if hf.get("mlp_bias") or (mt == "llama" and hf.get("attention_bias")):
        raise UserError(f"{where}: llama with attention_bias/mlp_bias is not supported")
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
            n_head=hf["num_attention_heads"],
            n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            n_embd=hf["hidden_size"], head_dim=hf.get("head_dim") or 0,
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            rope_scaling=({k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                "original_max_position_embeddings")}
                          if rope_type == "llama3" else None),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            qkv_bias=(mt == "qwen2"), qk_norm=(mt == "qwen3"),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            model_type=mt)
    except KeyError as e:
        raise UserError(f"{where}: missing key {e.args[0]!r}") from None


def to_hf_state(sd, cfg):
    """Our state dict -> HF names: split the fused qkv and gate_up projections."""
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    out = {}
    for name, t in sd.items():
        if (name == "lm_head.weight" and cfg.tie_word_embeddings) or is_adapter_key(name):
            continue
        key = name if name.startswith("lm_head") else "model." + name
        if ".qkv_proj." in key:
            for p, part in zip("qkv", t.split([H * D, Hkv * D, Hkv * D])):
                out[key.replace("qkv_proj", f"{p}_proj")] = part
        elif ".gate_up_proj." in key:
            out[key.replace("gate_up", "gate")], out[key.replace("gate_up", "up")] = t.chunk(2)
        else:
            out[key] = t
    return out


class HFWeights:
    """An HF folder's weights, read lazily a slice at a time (safetensors, a sharded index, or
    pytorch_model.bin memory-mapped). rows(name, a, b) gives rows a:b of one of *our* tensors,
    fusing q|k|v and gate|up slice by slice: a rank reads only its shard, and no process ever
    holds the whole model (meta-device init, torchtitan's way). Names and shapes are checked
    against config.json up front."""

    def __init__(self, path, cfg, ours):
        from safetensors import safe_open
        index, single = os.path.join(path, "model.safetensors.index.json"), os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(single):
            files = ["model.safetensors"]
        elif os.path.exists(os.path.join(path, "pytorch_model.bin")):
            files = ["pytorch_model.bin"]
        else:
            raise UserError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
        self.cfg, self.src, self.shape, origin = cfg, {}, {}, {}
        for name in files:
            if name.endswith(".bin"):
                sd = torch.load(os.path.join(path, name), map_location="cpu", weights_only=True, mmap=True)
                handle = None
            else:
                handle = safe_open(os.path.join(path, name), framework="pt")
                sd = {k: handle.get_slice(k) for k in handle.keys()}
            for k, v in sd.items():
                self.src[k], origin[k] = v, name
                self.shape[k] = tuple(v.shape) if handle is None else tuple(v.get_shape())
        expected = to_hf_state(ours, cfg)   # HF names and shapes, from meta tensors
        for key, p in expected.items():
            if key not in self.src:
                raise UserError(f"{path}: weight {key!r} missing (model_type {cfg.model_type})")
            if self.shape[key] != tuple(p.shape):
                raise UserError(f"{os.path.join(path, origin[key])}: weight {key!r} has shape "
                                f"{self.shape[key]}, config.json implies {tuple(p.shape)}")
        extra = [k for k in self.src if k not in expected and k != "lm_head.weight" and not k.endswith("rotary_emb.inv_freq")]
        if extra:
            raise UserError(f"{os.path.join(path, origin[extra[0]])}: unexpected weight {extra[0]!r} "
                            f"for model_type {cfg.model_type}")

    def parts(self, name):
        """The HF tensors stacked along dim 0 that make our tensor `name`."""
        key = name if name.startswith("lm_head") else "model." + name
        if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
            key = "model.embed_tokens.weight"
        if ".qkv_proj." in key:
            return [key.replace("qkv_proj", f"{p}_proj") for p in "qkv"]
        if ".gate_up_proj." in key:
            return [key.replace("gate_up", "gate"), key.replace("gate_up", "up")]
        return [key]

    def rows(self, name, a, b, dtype=torch.float32):
        out, at = [], 0
        for key in self.parts(name):
            n = self.shape[key][0]
            lo, hi = max(a - at, 0), min(b - at, n)
            if lo < hi:
                out.append(self.src[key][lo:hi].to(dtype))
            at += n
        return torch.cat(out) if len(out) > 1 else out[0]

    def full(self, name, dtype=torch.float32):
        return self.rows(name, 0, sum(self.shape[k][0] for k in self.parts(name)), dtype)


@torch.no_grad()
def materialize(model, device, rows_of):
    """A model built on the meta device (maybe sharded) made real: to_empty, then every parameter
    (this rank's rows of it) from rows_of(name, shape, a, b), one tensor at a time."""
    empty(model, device)
    for name, p in model.named_parameters():   # a tied head comes once, as embed_tokens.weight
        local, a = local_rows(p)
        if local.numel():
            local.copy_(rows_of(name, tuple(p.shape), a, a + local.shape[0]))
    model.inv_freq = rope_inv_freq(model.config).to(device)
    return model


def read_hf_config(path):
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise UserError(f"{path}: no config.json (expected a Hugging Face model folder)")
    with open(cfg_file) as f:
        return config_from_hf(json.load(f), path)


def hf_source(path, vocab_size=0):
    """(model on meta, rows_of) for an HF folder; vocab_size beyond the folder's grows the
    embedding (resize_vocab: new rows are the mean of the old ones)."""
    cfg = read_hf_config(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    weights, old = HFWeights(path, cfg, model.state_dict()), cfg.vocab_size
    model.resize_vocab(vocab_size)
    mean = {}

    def rows_of(name, shape, a, b):
        if name not in ("embed_tokens.weight", "lm_head.weight") or b <= old:
            return weights.rows(name, a, b)
        if name not in mean:
            mean[name] = weights.full(name).mean(0)
        out = mean[name].expand(b - a, -1).clone()
        if a < old:
            out[:old - a] = weights.rows(name, a, old)
        return out
    return model, rows_of


def from_pretrained(path, device="cpu", dtype=torch.float32):
    """Load an HF checkpoint folder (llama, qwen2, qwen3, mistral) into our Transformer."""
    model, rows_of = hf_source(path)
    return materialize(model, device, rows_of).to(dtype)


def hf_config(cfg, bos_id=None, eos_id=None):
    out = {"architectures": [ARCHITECTURES[cfg.model_type]], "model_type": cfg.model_type,
           "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd,
           "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.n_layer,
           "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
           "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_position_embeddings,
           "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "hidden_act": "silu",
           "tie_word_embeddings": cfg.tie_word_embeddings, "torch_dtype": "float32",
           "attention_bias": cfg.qkv_bias, "bos_token_id": bos_id, "eos_token_id": eos_id}
    if cfg.rope_scaling:
        out["rope_scaling"] = {"rope_type": "llama3", **cfg.rope_scaling}
    if cfg.model_type == "mistral":
        out["sliding_window"] = None
    return out


def save_pretrained(model, path, tokenizer_dir=None, bos_id=None, eos_id=None, state_dict=None):
    """Write config.json + model.safetensors (+ tokenizer files) that transformers loads unchanged.
    `state_dict` (a full one gathered from a sharded model) replaces model.state_dict()."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    cfg = model.config
    sd = {k: v.detach().to("cpu", torch.float32).contiguous()
          for k, v in to_hf_state(state_dict or model.state_dict(), cfg).items()}
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config(cfg, bos_id, eos_id), f, indent=2)
    if tokenizer_dir:
        for name in os.listdir(tokenizer_dir):
            if name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens")):
                shutil.copy(os.path.join(tokenizer_dir, name), path)


def load_checkpoint_state(ckpt, sd, keys="model", distributed=False):
    """Fill sd (tensors, or an FSDP2 model's DTensor shards) in place from the sharded DCP state of a
    training checkpoint, whatever number of ranks wrote it."""
    state = os.path.join(ckpt, "state")
    if not os.path.isfile(os.path.join(state, ".metadata")):
        raise UserError(f"{ckpt}: no state/.metadata (not a complete training checkpoint)")
    dcp_call("load", {keys: sd}, checkpoint_id=state, no_dist=not distributed)


def dcp_call(fn, *args, **kw):
    """torch.distributed.checkpoint.save/load; in one process it warns that it assumes one
    process, which is meant."""
    import warnings
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        return getattr(dcp, fn)(*args, **kw)


def untied(sd, cfg):
    """A state dict without the tied head's second name: checkpoints store that tensor once."""
    return {k: v for k, v in sd.items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}


def checkpoint_source(ckpt):
    """(model on meta, fill(model, device)) for a full-model training checkpoint."""
    cfg = read_hf_config(ckpt)
    with torch.device("meta"):
        model = Transformer(cfg)

    def fill(m, device, distributed=False):
        empty(m, device)
        if distributed:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 set_model_state_dict)
            sd = untied(get_model_state_dict(m), cfg)
            load_checkpoint_state(ckpt, sd, distributed=True)
            set_model_state_dict(m, sd, options=StateDictOptions(strict=False))   # a tied head comes with its embedding
        else:
            load_checkpoint_state(ckpt, untied(m.state_dict(), cfg))
        m.inv_freq = rope_inv_freq(cfg).to(device)
        return m
    return model, fill


def load_checkpoint(ckpt, device="cpu", dtype=torch.float32):
    """A full-model training checkpoint in one process, or an HF folder."""
    if not os.path.isdir(os.path.join(ckpt, "state")):
        return from_pretrained(ckpt, device, dtype)
    model, fill = checkpoint_source(ckpt)
    return fill(model, device).to(dtype)


def latest_checkpoint(out_dir):
    """The newest ckpt_NNNNNNN folder of a training out_dir, or None."""
    ckpts = sorted(d for d in os.listdir(out_dir) if re.fullmatch(r"ckpt_\d+", d)) if os.path.isdir(out_dir) else []
    return os.path.join(out_dir, ckpts[-1]) if ckpts else None


def fingerprint(model):
    """A short hash of the frozen weights (names, shapes, float64 sums): which base a LoRA
    checkpoint applies to, checked when it is loaded."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if not is_adapter_key(k):
            v = v.detach().double()
            h.update(f"{k}{tuple(v.shape)}{v.sum().item():.9e}{v.abs().sum().item():.9e}".encode())
    return h.hexdigest()[:16]


def save_peft_adapter(model, path, sd=None):
    """The adapters as peft writes them (adapter_config.json + adapter_model.safetensors), for
    peft.PeftModel.from_pretrained on the transformers model of the base: one lora_A (r, in) and
    lora_B (out, r) per HF projection, scaling alpha / r. A trained MASK row has no place in a
    peft LoRA adapter: such models (interleaved, diffusion) are exported merged instead."""
    from safetensors.torch import save_file
    lc = model.lora_config
    if lc["gated"] or model.mask_embed is not None:
        raise UserError("a peft adapter holds neither gated adapters nor a trained MASK row")
    out = {}
    for k, v in (sd or model.state_dict()).items():
        m = re.fullmatch(r"(layers\.\d+\.(?:self_attn|mlp))\.\w+\.lora\.lora_([AB])\.(\w+)", k)
        if m:
            out[f"base_model.model.model.{m[1]}.{m[3]}_proj.lora_{m[2]}.weight"] = v.detach().float().cpu().contiguous()
    os.makedirs(path, exist_ok=True)
    save_file(out, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": lc["base"],
                   "r": lc["rank"], "lora_alpha": lc["alpha"], "lora_dropout": lc["dropout"],
                   "target_modules": [f"{n}_proj" for n in lc["targets"]], "bias": "none",
                   "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True,
                   "inference_mode": True, "modules_to_save": None}, f, indent=2)


def load_base(path, vocab_size, device="cpu", dtype=torch.float32):
    """An HF folder or a training checkpoint as the frozen base of a LoRA run: the model
    (vocabulary grown to hold the data's added tokens) and the fingerprint of the weights as read."""
    model = load_checkpoint(path, dtype=dtype)
    fp = fingerprint(model)
    if vocab_size > model.config.vocab_size:   # the MASK token, added past the vocabulary
        model.resize_vocab(vocab_size)
    return model.to(device), fp


def load_lora_checkpoint(ckpt, info, device="cpu", dtype=torch.float32):
    """A LoRA checkpoint (info.json's "lora" + lora.safetensors) applied to the base it names."""
    lc = info["lora"]
    if not os.path.isfile(os.path.join(lc["base"], "config.json")):
        raise UserError(f"{ckpt}: its adapters apply to the base model {lc['base']}, which is not there")
    model, fp = load_base(lc["base"], info["vocab_size"], device, dtype)
    if fp != lc["base_fingerprint"]:
        raise UserError(f"{ckpt}: its adapters were trained on other weights than those now in {lc['base']} "
                        f"(fingerprint {fp}, expected {lc['base_fingerprint']})")
    model.add_lora(lc["rank"], lc["alpha"], lc["dropout"], lc["targets"], lc["mask_id"], lc["gated"],
                   lc.get("sampler_head", False))
    model.lora_config.update(base=lc["base"], base_fingerprint=fp)
    sd = model.lora_state()   # views of the adapters: filled in place
    load_checkpoint_state(ckpt, sd)
    return model


def gguf_folder(path):
    """A GGUF file (llama.cpp's format) as an HF folder: read once by transformers (weights
    dequantized to fp32, the tokenizer with its chat template) and written to a cache folder named
    by the file's path, size and time, which every later run reuses. The weights are the GGUF's:
    a quantized file gives the quantized model's weights, not the original ones."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such GGUF file")
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pdlm", "gguf")
    folder = os.path.join(cache, f"{os.path.basename(path)[:-len('.gguf')]}-{key}")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    import transformers
    where, name = os.path.split(os.path.abspath(path))
    try:
        tok = transformers.AutoTokenizer.from_pretrained(where, gguf_file=name)
        model = transformers.AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    except Exception as e:   # an architecture transformers cannot read from GGUF, a damaged file
        raise UserError(f"{path}: transformers cannot read this GGUF file ({type(e).__name__}: {e})") from None
    model.hf_quantizer = None   # dequantized already: save_pretrained refuses a quantized model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    os.makedirs(cache, exist_ok=True)
    tmp = folder + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, folder)
    except OSError:   # another process (a torchrun rank) wrote it meanwhile: keep that one
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise
    shutil.rmtree(tmp, ignore_errors=True)
    return folder


def find_checkpoint(path):
    """A checkpoint folder (has info.json), the newest one in a training out_dir, an HF folder,
    or a .gguf file (as the HF folder gguf_folder makes of it)."""
    if path.endswith(".gguf"):
        return gguf_folder(path)
    if not os.path.isdir(path):
        raise UserError(f"init_from={path}: no such folder")
    if os.path.isfile(os.path.join(path, "info.json")):
        return path
    if latest_checkpoint(path):
        return latest_checkpoint(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    raise UserError(f"init_from={path}: no checkpoint (ckpt_*/ or info.json) and no config.json")


def read_info(ckpt):
    """A checkpoint's info.json, or {} for a folder without one (an HF model)."""
    f = os.path.join(ckpt, "info.json")
    if not os.path.isfile(f):
        return {}
    with open(f) as fh:
        return json.load(fh)


def load_info(ckpt):
    """What decoding needs to know about how a checkpoint was trained."""
    info = read_info(ckpt)
    if info:
        tok = info["tokenizer"]
        info["tokenizer_path"] = os.path.join(ckpt, tok) if tok not in ("byte", "gpt2") else tok
        return info
    # a plain Hugging Face model: causal, its tokenizer beside it, EOS ids from generation_config
    tok = Tokenizer(ckpt)
    eos = {tok.eos_id}
    gc = os.path.join(ckpt, "generation_config.json")
    if os.path.isfile(gc):
        with open(gc) as fh:
            e = json.load(fh).get("eos_token_id")
        eos |= set(e if isinstance(e, list) else [e] if e is not None else [])
    return {"mode": "sft", "block_size": 0, "tokenizer": ckpt, "tokenizer_path": ckpt, "eos_id": tok.eos_id,
            "eos_ids": sorted(eos), "mask_id": tok.mask_id, "vocab_size": tok.vocab_size,
            "system_prompt": "", "prompt_key": "prompt", "response_key": "target",
            "raw_prompt": tok.template is None}  # a base model continues the text as given


def checkpoint_info(mode, mode_info, tok, meta):
    """info.json, built here only: what generate.py needs to decode a checkpoint as it was trained
    (mode_info: the mode's own keys, such as block_size). save_checkpoint adds the step and any
    LoRA settings; load_info reads it back."""
    return {"mode": mode, "block_size": 0, "tokenizer": "tokenizer" if tok.hf else tok.spec,
            "tokenizer_spec": meta["tokenizer"], "eos_id": meta["eos_id"], "bos_id": meta["bos_id"],
            "eos_ids": sorted({meta["eos_id"]}), "mask_id": meta["mask_id"], "vocab_size": meta["vocab_size"],
            "system_prompt": meta.get("system_prompt", ""), "prompt_key": meta["prompt_key"],
            "response_key": meta["response_key"], **mode_info}


# ----------------------------------------------------------------------------- training checkpoints

def save_checkpoint(c, raw, opt, step, rank, tok, info):
    """ckpt_NNNNNNN/: the model (or its adapters) and the optimizer as a sharded DCP state, each
    rank writing its own part; config.json, info.json, the tokenizer and train_state.pt (step,
    CPU and CUDA RNG, the config as given) from rank 0. Written under a temporary name and
    renamed: whole or absent."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    dist = torch.distributed.is_initialized()
    final = os.path.join(c.out_dir, f"ckpt_{step:07d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    msd, osd = get_state_dict(raw, opt)   # sharded under FSDP2: nothing is gathered
    msd = untied(msd, raw.config)
    if raw.lora_config:   # the adapters, the MASK row, the sampler head; info.json names the base
        keep = set(raw.lora_state())
        msd = {k: v for k, v in msd.items() if k in keep}
        info = {**info, "lora": raw.lora_config}
    dcp_call("save", {"model": msd, "optimizer": osd}, checkpoint_id=os.path.join(tmp, "state"), no_dist=not dist)
    if rank == 0:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(raw.config, info["bos_id"], info["eos_id"]), f, indent=2)
        tok.save(os.path.join(tmp, "tokenizer"))
        with open(os.path.join(tmp, "info.json"), "w") as f:
            json.dump({**info, "step": step}, f, indent=2)
        cuda_rng = torch.cuda.get_rng_state(c.device) if c.device.startswith("cuda") else None
        torch.save({"step": step, "rng": torch.get_rng_state(), "cuda_rng": cuda_rng, "config": c.config},
                   os.path.join(tmp, "train_state.pt"))
        replace_dir(tmp, final)
        ckpts = sorted(d for d in os.listdir(c.out_dir) if re.fullmatch(r"ckpt_\d+", d))
        for old in ckpts[:-max(c.keep_last, 1)]:
            shutil.rmtree(os.path.join(c.out_dir, old))
    barrier()


def replace_dir(tmp, final):
    """Rename the finished folder tmp to final. An older final is first moved aside to final.old
    and removed after, so a kill at any moment leaves one whole copy (restore_aside)."""
    aside = final + ".old"
    if os.path.isdir(final):
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
    os.rename(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


def restore_aside(out_dir):
    """A kill inside replace_dir, between its two renames: put the older copy back."""
    for d in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        final = os.path.join(out_dir, d[:-len(".old")])
        if d.endswith(".old") and not os.path.exists(final):
            os.rename(os.path.join(out_dir, d), final)
        elif d.endswith(".old"):   # killed after both renames: the new copy is whole
            shutil.rmtree(os.path.join(out_dir, d))


def barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def export(c, raw, rank, tok, info):
    """out_dir/hf: a folder transformers loads (adapters merged in); LoRA runs without a MASK
    row also get out_dir/adapter, a peft adapter for the base model. Under FSDP2 the weights
    (never the optimizer state) are gathered to rank 0's CPU memory. Once, at the end of a run."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    msd = get_model_state_dict(raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        hf = os.path.join(c.out_dir, "hf")
        state = raw.merged_state(msd) if raw.lora_config else msd
        for d in (hf, os.path.join(c.out_dir, "adapter")):   # a killed export's leftovers
            shutil.rmtree(d + ".tmp", ignore_errors=True)
        save_pretrained(raw, hf + ".tmp", bos_id=info["bos_id"], eos_id=info["eos_id"], state_dict=state)
        tok.save(hf + ".tmp")
        replace_dir(hf + ".tmp", hf)
        if raw.lora_config and raw.mask_embed is None:
            adapter = os.path.join(c.out_dir, "adapter")
            save_peft_adapter(raw, adapter + ".tmp", msd)
            replace_dir(adapter + ".tmp", adapter)
    barrier()


def load_train_state(raw, opt, c):
    """Continue checkpoint c.resume_from: the optimizer state (resharded to this world size) with
    this config's weight decay and betas, the RNG; returns its step."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    osd = get_optimizer_state_dict(raw, opt)
    load_checkpoint_state(c.resume_from, osd, "optimizer", distributed=torch.distributed.is_initialized())
    set_optimizer_state_dict(raw, opt, osd)
    for g, wd in zip(opt.param_groups, (c.weight_decay, 0.0)):   # the checkpoint brings its own
        g.update(weight_decay=wd, betas=(c.beta1, c.beta2))
    st = torch.load(os.path.join(c.resume_from, "train_state.pt"), map_location="cpu", weights_only=True)
    torch.set_rng_state(st["rng"])
    if st.get("cuda_rng") is not None and c.device.startswith("cuda"):   # LoRA dropout on the GPU
        torch.cuda.set_rng_state(st["cuda_rng"], c.device)
    return st["step"]


# settings a resumed run may change: how long it runs, what it reports, where and how fast it
# runs, and the optimizer's (what AdamW applies from then on). Any other change would continue a
# checkpoint under another objective, model, adapters, data or batch geometry: refused.
MAY_CHANGE = {"init_from", "resume", "out_dir", "max_iters", "epochs", "eval_interval", "eval_iters", "eval_only",
              "log_interval", "save_interval", "keep_last", "export_hf", "wandb_log", "wandb_project",
              "wandb_run_name", "device", "compile", "compile_backend", "gradient_checkpointing", "parallel", "learning_rate",
              "min_lr", "warmup_iters", "lr_decay_iters", "decay_lr", "weight_decay", "beta1", "beta2", "grad_clip"}


def check_resume(c, path):
    """The config as given against the one stored in checkpoint `path`: a change outside
    MAY_CHANGE is one error naming each key with its old and new value; returns the allowed
    changes as text ('' when none)."""
    old = torch.load(os.path.join(path, "train_state.pt"), map_location="cpu", weights_only=True)["config"]
    same = lambda k, a, b: (os.path.realpath(a) == os.path.realpath(b)) if k == "data_dir" else a == b
    changed = {k: (old[k], v) for k, v in sorted(c.config.items()) if k in old and not same(k, old[k], v)}
    text = lambda keys: ", ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in keys)
    refused = [k for k in changed if k not in MAY_CHANGE]
    if refused:
        raise UserError(f"{path} was trained with other settings: {text(refused)}; resume with the stored values, "
                        f"or train into another out_dir")
    return text([k for k in changed if k not in ("init_from", "resume")])
