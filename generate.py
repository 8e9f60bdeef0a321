"""
Sampling and evaluation from the command line: load a checkpoint, read and render the prompts,
run one of the decoders (decoders.py), score the answers. Every method reports tokens, forward
passes, tokens per forward and wall time, so a faster decoder is always seen next to what it
costs in accuracy.

    python generate.py --init_from=out/toy --data=data/toy/val.jsonl --method=ar
    python generate.py --init_from=assets/stories260K --prompt="Once upon a time"
"""
import json
import os
import re
import sys
import time
from dataclasses import dataclass, fields

import torch

from configurator import UserError, configure, cli, defaults_from, print_config
from checkpoint import find_checkpoint, load_checkpoint, load_info, load_lora_checkpoint
from decoders import DECODERS, DECODES, cut_at_eos, draft_vocabulary
from prepare import read_rows, row_texts
from tokenizer import Tokenizer

init_from = "out/toy"      # a training out_dir, one checkpoint folder, a Hugging Face model folder or a .gguf file
method = "ar"              # ar | blockwise | refine | diffusion
prompt = ""                # one prompt ...
prompts_file = ""          # ... or a file with one prompt per line ...
data = ""                  # ... or a parquet/jsonl file (scored when it has an answer column)
prompt_key = ""            # column names for --data (default: the ones the checkpoint was prepared with)
answer_key = ""
limit = 0                  # evaluate only the first N rows of --data (0 = all)
out = ""                   # jsonl with one line per prompt
same_as = ""               # an earlier --out (AR's, say): count the completions identical to its rows
max_new_tokens = 256
temperature = 0.0          # 0 = greedy
top_p = 1.0
batch_size = 8
device = "cpu"
dtype = "float32"          # float32 | bfloat16
batch_invariant = True     # bfloat16 on CPU: a token's logits are the same bits whatever else its forward
                           # feeds (model.py's invariant backend), so greedy output is a function of the prompt
                           # and --verify is exactly AR's; False: SDPA. fp32 and CUDA run SDPA (fp32 CPU attention and
                           # F.linear are not batch-invariant; CUDA is not measured); --verify there = AR wherever the argmax agrees
prepack = True             # float32 on a CPU: projections and head with >= 2^18 weights (SmolLM2's, not the toy's) through
                           # oneDNN on prepacked copies (invariant.py; each copy adds its weight's size again); False: F.linear
seed = 1337
quiet = False              # no progress line

# blockwise
threshold = 0.7            # accept a slot token while its probability >= threshold
verify = False             # blockwise/refine/block diffusion (causal_clean): accept drafts only where
                           # the model's own AR greedy agrees
draft_tree = True          # blockwise --verify: a slot group per possible acceptance length, not only for
                           # "all drafts accepted" (more tokens per forward, longer forwards)
draft_slots = 0            # blockwise: use the first N MASK slots of each group (0: all, block_size - 1); fewer
                           # rows a forward (batch 8 on the bf16 invariant backend: calls of <= 32 rows)
draft_vocab = 0            # blockwise --verify: draft only among the N tokens most frequent in the responses
                           # of draft_vocab_from (FR-Spec): a head N rows tall per slot; 0 = every token
draft_vocab_from = ""      # a prepare.py data dir, the drafter's training data
# refine
add_eos_length = 127       # N EOS appended per round -> a draft of N+1 tokens
refine_iter = 2            # forwards that re-predict the draft from itself
# diffusion
steps = 0                  # denoising steps over the canvas (0: one per token)
alg = "entropy"            # origin | maskgit_plus | topk_margin | entropy
alg_temp = 0.0             # > 0 samples the positions to unmask from softmax(conf / alg_temp)
gen_length = 0             # canvas length (0: the checkpoint's gen_length, else max_new_tokens)
block_length = 0           # LLaDA semi-AR: canvas blocks unmasked left to right (0: the whole canvas at once)
dthreshold = 0.0           # Fast-dLLM parallel unmasking: the most confident + all with p >= this
eos_last = True            # confidence algs: EOS predictions are unmasked last (LLaDA's confidence_eos_eot_inf)


@dataclass(frozen=True)
class Decoding:
    """What the decoders read, and nothing else of the command line: the sampling settings and
    each method's own (defaults: the keys above). Decoding.of(config) takes them from a config."""
    max_new_tokens: int = max_new_tokens
    temperature: float = temperature
    top_p: float = top_p
    threshold: float = threshold
    verify: bool = verify
    draft_tree: bool = draft_tree
    draft_slots: int = draft_slots
    add_eos_length: int = add_eos_length
    refine_iter: int = refine_iter
    steps: int = steps
    alg: str = alg
    alg_temp: float = alg_temp
    gen_length: int = gen_length
    block_length: int = block_length
    dthreshold: float = dthreshold
    eos_last: bool = eos_last

    @classmethod
    def of(cls, config):
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


# ----------------------------------------------------------------------------- loading

def torch_dtype(name):
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(name)
    if dt is None:
        raise UserError(f"dtype={name!r}: expected float32 or bfloat16")
    return dt


def cpu_bf16_units():
    """Whether this CPU multiplies bf16 matrices in hardware (AMX tiles or AVX512-BF16). Without them
    (an AVX2 Zen 3, measured) a bf16 forward feeding k tokens costs about k/2 one-token forwards."""
    has = lambda name: getattr(torch.cpu, name, lambda: False)()
    return has("_is_amx_tile_supported") or has("_is_avx512_bf16_supported")


def load(init_from, device="cpu", dtype=torch.float32, batch_invariant=True, prepack=True):
    ckpt = find_checkpoint(init_from)
    info = load_info(ckpt)
    # decoding forwards are a few tokens against the cache and change shape every step: a dense
    # mask is cheap there, while a compiled FlexAttention kernel would recompile for each length
    if "lora" in info:   # adapters (gated ones included) applied to the base the checkpoint names
        model = load_lora_checkpoint(ckpt, info, device, dtype)
    else:
        model = load_checkpoint(ckpt, device=device, dtype=dtype)
    model = model.eval().set_backend("sdpa").set_prepack(prepack)
    cpu_bf16 = dtype == torch.bfloat16 and torch.device(device).type == "cpu"
    if cpu_bf16 and not cpu_bf16_units():
        print("note: this CPU has no bf16 matrix units (AMX or AVX512-BF16): a bf16 forward feeding k tokens costs about "
              "k/2 one-token forwards here (bench.py --forward_cost), so decoders that feed several tokens a forward "
              "lose to AR in bf16; use float32 for them", file=sys.stderr)
    if cpu_bf16 and batch_invariant:
        try:   # set_backend checks the machine's kernels once
            model.set_backend("invariant")
        except UserError:
            print("note: this CPU's bf16 matmul is not batch-invariant (invariant.py): decoding with SDPA, whose greedy "
                  "output may depend on the batch, and --verify equals AR only where the argmax agrees", file=sys.stderr)
    return model, info, Tokenizer(info["tokenizer_path"])


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


def decode_and_score(model, info, tok, c, items, generator=None):
    """Decode every item in batches; returns (per-row records, summary dict)."""
    if c.method not in DECODERS:
        raise UserError(f"unknown method {c.method!r} (one of {', '.join(DECODERS)})")
    if info["mode"] not in DECODES[c.method] and not (c.method == "ar" and info.get("causal_clean")):
        raise UserError(f"method {c.method} cannot decode a checkpoint trained with mode={info['mode']} "
                        f"(it decodes: {', '.join(DECODES[c.method])}; ar also block diffusion with causal_clean)")
    decode, d = DECODERS[c.method], Decoding.of(c)
    encoded = encode_prompts(tok, items, info)
    if c.draft_vocab and not (c.method == "blockwise" and c.verify and c.draft_vocab_from):
        raise UserError("draft_vocab needs --method=blockwise --verify=True and --draft_vocab_from=DATA_DIR")
    kw = {"stats": {}} if c.method in ("blockwise", "refine") else {}
    if c.draft_vocab:
        kw["vocab"] = draft_vocabulary(c.draft_vocab_from, c.draft_vocab, info)
    records, t0, stats = [], time.time(), kw.get("stats")
    for i in range(0, len(encoded), c.batch_size):
        batch = encoded[i:i + c.batch_size]
        results = decode(model, [ids for _, ids in batch], d, info, generator, **kw)
        for (ids, fw), (prompt, ref) in zip(results, items[i:i + c.batch_size]):
            ids = cut_at_eos(ids, set(info["eos_ids"]))
            ended = bool(ids) and ids[-1] in info["eos_ids"]
            body = ids[:-1] if ended else ids
            # the prompt as given (string or chat list) and the exact tokens: prepare.py reads this
            # back (--response_key=completion) as training rows holding what the model produced
            rec = {"prompt": prompt, "completion": tok.decode(body), "completion_ids": body, "eos": ended,
                   **({"eos_id": ids[-1]} if ended else {}), "tokens": len(ids), "forwards": fw}
            comp = rec["completion"]
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
    summary = summarize(records, time.time() - t0)
    if stats:
        summary["accepted_hist"] = dict(sorted(stats["accepted_hist"].items()))   # tokens per row per step
    return records, summary


def summarize(records, seconds):
    tokens, forwards = sum(r["tokens"] for r in records), sum(r["forwards"] for r in records)
    s = {"n": len(records), "tokens": tokens, "forwards": forwards,
         "tokens_per_forward": round(tokens / max(forwards, 1), 4), "seconds": round(seconds, 3),
         "tokens_per_second": round(tokens / max(seconds, 1e-9), 2)}
    scored = [r["correct"] for r in records if "correct" in r]
    if scored:
        s["accuracy"] = round(sum(scored) / len(scored), 4)
    return s


def read_same_as(path, items):
    """--same_as: an earlier --out of these prompts, read before decoding (a wrong file fails now,
    not after the decode)."""
    try:
        with open(path) as f:
            ref = [json.loads(l) for l in f if l.strip()]
    except (OSError, ValueError) as e:
        raise UserError(f"same_as={path}: cannot read it as jsonl ({e})") from None
    if len(ref) != len(items):
        raise UserError(f"same_as={path}: {len(ref)} rows, this run decodes {len(items)}")
    for i, (q, (prompt, _)) in enumerate(zip(ref, items)):
        if q.get("prompt") != prompt or "completion_ids" not in q:
            raise UserError(f"same_as={path}: row {i + 1} is not this run's prompt {i + 1} with its completion_ids")
    return ref


def identical(records, ref):
    """How many records end exactly as the same row of ref: the same completion tokens, and EOS or not."""
    return sum(r["completion_ids"] == q["completion_ids"] and r["eos"] == q.get("eos") for r, q in zip(records, ref))


def check_out(path):
    """--out: a file this process can write (its missing folders made when it is written), known
    before decoding, not found out after it."""
    full = os.path.realpath(path)
    above = os.path.dirname(full)
    while not os.path.exists(above):   # the nearest folder that exists must let us make the rest
        above = os.path.dirname(above)
    if (path.endswith(os.sep) or os.path.isdir(full) or not os.path.isdir(above) or not os.access(above, os.W_OK | os.X_OK)
            or (os.path.exists(full) and not os.access(full, os.W_OK))):
        raise UserError(f"out={path}: not a file path this process can write")


def write_records(records, path):
    """--out: one json line per prompt, which prepare.py --response_key=completion reads back;
    written whole (a temporary file renamed; through a link to its target), so a killed run leaves
    no half a file."""
    full = os.path.realpath(path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    tmp = f"{full}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, full)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None):
    c = configure(defaults_from(globals()), argv)
    print_config(c, file=sys.stderr)
    torch.manual_seed(c.seed)
    model, info, tok = load(c.init_from, c.device, torch_dtype(c.dtype), c.batch_invariant, c.prepack)
    items = load_prompts(c, info)
    ref = read_same_as(c.same_as, items) if c.same_as else None
    if c.out:
        check_out(c.out)
    gen = torch.Generator(device=c.device).manual_seed(c.seed)
    records, summary = decode_and_score(model, info, tok, c, items, gen)
    if ref is not None:
        summary["identical"] = identical(records, ref)
    if c.out:
        write_records(records, c.out)
    if len(records) <= 3:
        for r in records:
            shown = r["prompt"] if isinstance(r["prompt"], str) else json.dumps(r["prompt"], ensure_ascii=False)
            print(shown + r["completion"], file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    cli(main)
