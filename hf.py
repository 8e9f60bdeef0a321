"""
Other programs' formats, in and out: Hugging Face model folders (config.json + safetensors, read
a shard at a time so no process holds the whole model) for llama, qwen2, qwen3 and mistral; GGUF
files (llama.cpp) read through transformers into such a folder; peft LoRA adapters out. Our own
training checkpoints are checkpoint.py's.
"""
import hashlib
import json
import os
import re
import shutil

import torch

from configurator import UserError
from lora import is_adapter_key
from model import ModelConfig, Transformer, empty, local_rows, rope_inv_freq

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
