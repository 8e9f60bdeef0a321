"""
Sampling and evaluation. Every method reports tokens, forward passes, tokens per forward
and wall time, so a faster decoder is always seen next to what it costs in accuracy.

    python generate.py --init_from=out/toy --data=data/toy_val.jsonl --method=ar
    python generate.py --init_from=assets/stories260K --prompt="Once upon a time"
"""
import json
import os
import re
import sys
import time

import torch

from configurator import UserError, configure, cli, defaults_from, print_config
from model import KVCache, Transformer, from_pretrained
from prepare import Tokenizer, read_rows, row_texts

init_from = "out/toy"      # a training out_dir, one checkpoint folder, or a Hugging Face model folder
method = "ar"              # ar | blockwise | refine | diffusion
prompt = ""                # one prompt ...
prompts_file = ""          # ... or a file with one prompt per line ...
data = ""                  # ... or a parquet/jsonl file (scored when it has an answer column)
prompt_key = ""            # column names for --data (default: the ones the checkpoint was prepared with)
answer_key = ""
limit = 0                  # evaluate only the first N rows of --data (0 = all)
out = ""                   # jsonl with one line per prompt
max_new_tokens = 256
temperature = 0.0          # 0 = greedy
top_p = 1.0
batch_size = 8
device = "cpu"
dtype = "float32"          # float32 | bfloat16
seed = 1337
quiet = False              # no progress line

EXTRA = {}  # decoders add their settings here (see the method sections below)


# ----------------------------------------------------------------------------- loading

def find_checkpoint(path):
    """A checkpoint folder (has info.json), the newest one in a training out_dir, or an HF folder."""
    if not os.path.isdir(path):
        raise UserError(f"init_from={path}: no such folder")
    if os.path.isfile(os.path.join(path, "info.json")):
        return path
    ckpts = sorted(d for d in os.listdir(path) if re.fullmatch(r"ckpt_\d+", d))
    if ckpts:
        return os.path.join(path, ckpts[-1])
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    raise UserError(f"init_from={path}: no checkpoint (ckpt_*/ or info.json) and no config.json")


def load_info(ckpt):
    """What decoding needs to know about how a checkpoint was trained."""
    f = os.path.join(ckpt, "info.json")
    if os.path.isfile(f):
        with open(f) as fh:
            info = json.load(fh)
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
    return {"mode": "sft", "block_size": 0, "tokenizer": ckpt, "tokenizer_path": ckpt,
            "eos_ids": sorted(eos), "mask_id": tok.mask_id, "vocab_size": tok.vocab_size,
            "system_prompt": "", "prompt_key": "prompt", "response_key": "target",
            "raw_prompt": tok.template is None}  # a base model continues the text as given


def load(init_from, device="cpu", dtype=torch.float32):
    ckpt = find_checkpoint(init_from)
    info = load_info(ckpt)
    model = from_pretrained(ckpt, device=device, dtype=dtype).eval()
    model.set_backend("flex" if str(device).startswith("cuda") else "sdpa")
    return model, info, Tokenizer(info["tokenizer_path"])


# ----------------------------------------------------------------------------- sampling helpers

def clean_logits(logits, info):
    """Never emit the MASK token or the padding rows past the tokenizer's vocabulary."""
    logits = logits.float() if logits.dtype != torch.float32 else logits.clone()
    logits[..., info["vocab_size"]:] = float("-inf")
    if info["mask_id"] < logits.shape[-1]:
        logits[..., info["mask_id"]] = float("-inf")
    return logits


def sample(logits, temperature=0.0, top_p=1.0, generator=None):
    """Greedy at temperature 0, else temperature + nucleus (top-p) sampling. logits (..., V)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p            # keep the smallest prefix with mass >= top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def right_pad(seqs, pad, device):
    L = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), L), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return idx.to(device), torch.tensor([len(s) for s in seqs], device=device)


def cut_at_eos(ids, eos_ids):
    """Tokens up to and including the first EOS: all that counts as generated."""
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[:i + 1]
    return ids


# ----------------------------------------------------------------------------- ar

@torch.inference_mode()
def decode_ar(model, prompts, c, info, generator=None):
    """Greedy or sampled AR decoding with a static KV cache; rows of different lengths in one
    batch, each writing at its own offset. Returns [(token ids, forwards)] per prompt."""
    B, dev = len(prompts), model.lm_head.weight.device
    eos = set(info["eos_ids"])
    idx, lens = right_pad(prompts, 0, dev)
    cache = KVCache(model.config, B, idx.shape[1] + c.max_new_tokens + 1, dev, model.lm_head.weight.dtype)
    logits = model(idx, cache=cache)
    cache.commit(lens)
    last = logits[torch.arange(B, device=dev), lens - 1]
    out, forwards, done = [[] for _ in range(B)], [1] * B, [False] * B
    for _ in range(c.max_new_tokens):
        tok = sample(clean_logits(last, info), c.temperature, c.top_p, generator)
        for b, t in enumerate(tok.tolist()):
            if not done[b]:
                out[b].append(t)
                done[b] = t in eos or len(out[b]) >= c.max_new_tokens
        if all(done):
            break
        last = model(tok[:, None], cache=cache)[:, 0]
        cache.commit(1)
        forwards = [f + (not d) for f, d in zip(forwards, done)]
    return list(zip(out, forwards))


@torch.inference_mode()
def reference_ar(model, prompt, max_new_tokens, info):
    """The slow, obviously-correct greedy sampler: full recompute, no cache, one row."""
    seq, eos = list(prompt), set(info["eos_ids"])
    dev = model.lm_head.weight.device
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([seq], device=dev))[0, -1]
        t = int(clean_logits(logits, info).argmax())
        seq.append(t)
        if t in eos:
            break
    return seq[len(prompt):]


DECODERS = {"ar": decode_ar}
MODES = {"ar": ("sft", "refine", "interleaved")}   # which training modes each method decodes


# ----------------------------------------------------------------------------- scoring

NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def extract_answer(text):
    """GSM8K '#### N', else the last \\boxed{...}, else the last number; None if nothing."""
    m = re.search(r"####\s*(" + NUMBER + ")", text)
    if m:
        return m.group(1)
    i = text.rfind("\\boxed{")
    if i >= 0:
        depth, j = 1, i + len("\\boxed{")
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth == 0:
            return text[i + len("\\boxed{"):j - 1].strip()
    nums = re.findall(NUMBER, text)
    return nums[-1] if nums else None


def normalize(ans):
    if ans is None:
        return None
    a = ans.strip().replace(",", "").rstrip(".")
    try:
        f = float(a)
        return str(int(f)) if f == int(f) else str(f)
    except ValueError:
        return a.replace(" ", "")


def is_correct(completion, reference):
    pred = normalize(extract_answer(completion))
    return pred is not None and pred == normalize(extract_answer(reference))


# ----------------------------------------------------------------------------- driver

def load_prompts(c, info):
    """[(prompt messages as rendered text, reference answer or None)]."""
    if sum(bool(x) for x in (c.prompt, c.prompts_file, c.data)) != 1:
        raise UserError("give exactly one of --prompt, --prompts_file, --data")
    if c.prompt:
        return [(c.prompt, None)]
    if c.prompts_file:
        if not os.path.isfile(c.prompts_file):
            raise UserError(f"{c.prompts_file}: file not found")
        with open(c.prompts_file) as f:
            return [(l.rstrip("\n"), None) for l in f if l.strip()]
    pk = c.prompt_key or info.get("prompt_key", "prompt")
    ak = c.answer_key or info.get("response_key", "target")
    rows = []
    for n, row in read_rows(c.data, (pk,), c):
        if pk not in row:
            raise UserError(f"{c.data}: row {n}: missing key {pk!r} (set --prompt_key)")
        rows.append((row[pk], row.get(ak)))
        if c.limit and len(rows) >= c.limit:
            break
    return rows


def encode_prompts(tok, items, info):
    out = []
    for value, _ in items:
        if info.get("raw_prompt") and isinstance(value, str):
            out.append((value, tok.encode(value, prompt=True)))
            continue
        text, _ = row_texts(tok, {"p": value, "r": "x"}, "p", "r", info.get("system_prompt", ""))
        out.append((text, tok.encode(text, prompt=True)))
    return out


def evaluate(model, info, tok, c, items, generator=None):
    """Decode every item in batches; returns (per-row records, summary dict)."""
    if c.method not in DECODERS:
        raise UserError(f"unknown method {c.method!r} (one of {', '.join(DECODERS)})")
    if info["mode"] not in MODES[c.method]:
        raise UserError(f"method {c.method} cannot decode a checkpoint trained with mode={info['mode']} "
                        f"(it decodes: {', '.join(MODES[c.method])})")
    decode = DECODERS[c.method]
    encoded = encode_prompts(tok, items, info)
    records, t0 = [], time.time()
    for i in range(0, len(encoded), c.batch_size):
        batch = encoded[i:i + c.batch_size]
        results = decode(model, [ids for _, ids in batch], c, info, generator)
        for (text, _), (ids, fw), (_, ref) in zip(batch, results, items[i:i + c.batch_size]):
            ids = cut_at_eos(ids, set(info["eos_ids"]))
            comp = tok.decode([t for t in ids if t not in info["eos_ids"]])
            rec = {"prompt": text, "completion": comp, "tokens": len(ids), "forwards": fw}
            if ref is not None:
                rec["answer"] = ref if isinstance(ref, str) else str(ref)
                rec["correct"] = is_correct(comp, rec["answer"])
            records.append(rec)
        if not c.quiet:
            el = time.time() - t0
            print(f"\r{len(records)}/{len(encoded)} prompts, {el:.0f}s, "
                  f"ETA {el / len(records) * (len(encoded) - len(records)):.0f}s", end="", file=sys.stderr)
    if not c.quiet:
        print(file=sys.stderr)
    return records, summarize(records, time.time() - t0)


def summarize(records, seconds):
    tokens, forwards = sum(r["tokens"] for r in records), sum(r["forwards"] for r in records)
    s = {"n": len(records), "tokens": tokens, "forwards": forwards,
         "tokens_per_forward": round(tokens / max(forwards, 1), 4), "seconds": round(seconds, 3),
         "tokens_per_second": round(tokens / max(seconds, 1e-9), 2)}
    scored = [r["correct"] for r in records if "correct" in r]
    if scored:
        s["accuracy"] = round(sum(scored) / len(scored), 4)
    return s


def main(argv=None):
    c = configure({**defaults_from(globals()), **EXTRA}, argv)
    print_config(c, file=sys.stderr)
    torch.manual_seed(c.seed)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(c.dtype)
    if dt is None:
        raise UserError(f"dtype={c.dtype!r}: expected float32 or bfloat16")
    model, info, tok = load(c.init_from, c.device, dt)
    items = load_prompts(c, info)
    gen = torch.Generator(device=c.device).manual_seed(c.seed)
    records, summary = evaluate(model, info, tok, c, items, gen)
    if c.out:
        with open(c.out, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    if len(records) <= 3:
        for r in records:
            print(r["prompt"] + r["completion"], file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    cli(main)
