"""
Our checkpoints on disk: training checkpoints (sharded DCP state, train_state.pt, info.json built
in one place), finding a checkpoint, LoRA checkpoints and the fingerprint of the base they apply
to, train state and resume, export. Other programs' formats (HF folders, GGUF, peft) are hf.py's.

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
from hf import from_pretrained, gguf_folder, hf_config, read_hf_config, save_peft_adapter, save_pretrained
from lora import is_adapter_key
from model import Transformer, empty, rope_inv_freq
from tokenizer import Tokenizer


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


def load_base(path, vocab_size, device="cpu", dtype=torch.float32):
    """An HF folder or a training checkpoint as the frozen base of a LoRA run: the model
    (vocabulary grown to hold the data's added tokens) and the fingerprint of the weights as read,
    in fp32 before any cast: a bf16 decode of adapters trained on the fp32 base names the same base."""
    model = load_checkpoint(path)
    fp = fingerprint(model)
    if vocab_size > model.config.vocab_size:   # the MASK token, added past the vocabulary
        model.resize_vocab(vocab_size)
    return model.to(device, dtype), fp


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
              "wandb_run_name", "device", "compile", "compile_backend", "cpu_bf16", "gradient_checkpointing",
              "parallel", "learning_rate", "min_lr", "warmup_iters", "lr_decay_iters", "decay_lr", "weight_decay",
              "beta1", "beta2", "grad_clip"}


def config_changes(path, config):
    """{key: (stored, given)} for each setting of `config` that differs from the one stored in
    checkpoint `path` (data_dir compared as the folder it names, not as spelled)."""
    old = torch.load(os.path.join(path, "train_state.pt"), map_location="cpu", weights_only=True)["config"]
    same = lambda k, a, b: (os.path.realpath(a) == os.path.realpath(b)) if k == "data_dir" else a == b
    return {k: (old[k], v) for k, v in sorted(config.items()) if k in old and not same(k, old[k], v)}


def changes_text(changed, keys=None):
    """'key old -> new, ...' for config_changes' result (only `keys`, in their order, if given)."""
    return ", ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in (changed if keys is None else keys))


def check_resume(c, path):
    """The config as given against the one stored in checkpoint `path`: a change outside
    MAY_CHANGE is one error naming each key with its old and new value; returns the allowed
    changes as text ('' when none)."""
    changed = config_changes(path, c.config)
    refused = [k for k in changed if k not in MAY_CHANGE]
    if refused:
        raise UserError(f"{path} was trained with other settings: {changes_text(changed, refused)}; resume with the stored values, "
                        f"or train into another out_dir")
    return changes_text(changed, [k for k in changed if k not in ("init_from", "resume")])
