"""
What the primitives cost on this machine, next to bench.py's table of modes and decoders: r(k), one
cached forward of k tokens against one of a single token (the ceiling a drafter's tokens per
forward buys); our AR decoding against transformers' generate; prepare.py's tokens/s against the
bare tokenizer. bench.py reports all three (python bench.py --forward_cost=MODEL: r(k) alone).
"""
import itertools
import json
import os
import statistics
import time

import torch

import generate
import prepare
from configurator import configure, defaults_from
from model import KVCache
from tokenizer import Tokenizer


def sync(dev):
    if "cuda" in dev:
        torch.cuda.synchronize()


def hf_generate_speed(n=256, reps=3):
    """stories260K greedy decoding, 256 tokens from "Once upon a time": our KV cache vs
    transformers' generate, same process, same threads; medians of interleaved repeats."""
    import transformers
    from decoders import decode_ar
    from hf import from_pretrained
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "stories260K")
    ids = transformers.AutoTokenizer.from_pretrained(path)("Once upon a time", return_tensors="pt").input_ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ours = from_pretrained(path).eval()
    c = configure(defaults_from(vars(generate)), [f"--max_new_tokens={n}", "--quiet=True"])
    info = {"eos_ids": [], "vocab_size": 512, "mask_id": 512}
    runs = {"ours": lambda: decode_ar(ours, [ids[0].tolist()], c, info),
            "hf": lambda: hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)}
    times = {k: [] for k in runs}
    for _ in range(reps + 1):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    tps = {k: n / statistics.median(v[1:]) for k, v in times.items()}
    return {"ours_tokens_per_s": tps["ours"], "hf_tokens_per_s": tps["hf"], "ratio": tps["ours"] / tps["hf"]}


def forward_cost_ratios(model, context=200, ks=(1, 2, 4, 8, 16, 32), reps=7):
    """r(k) = t(k) / t(1): one cached forward feeding k tokens after `context` tokens, against one
    feeding a single token (medians of interleaved repeats; nothing is committed, so every forward
    sees the same cache). A decoder that commits n tokens with forwards of k tokens gains about
    n / r(k) over AR: the ceiling a drafter's tokens per forward buys on this machine."""
    cfg, dev = model.config, next(model.parameters()).device
    cache = KVCache(cfg, 1, context + max(ks), dev, next(model.parameters()).dtype)
    g = torch.Generator().manual_seed(0)
    times = {k: [] for k in ks}
    with torch.inference_mode():   # as decoding runs (a prepacked model packs there only)
        model(torch.randint(0, cfg.vocab_size, (1, context), generator=g).to(dev), cache=cache)
        cache.commit(context)
        for _ in range(reps + 1):
            for k in ks:
                x = torch.randint(0, cfg.vocab_size, (1, k), generator=g).to(dev)
                sync(str(dev))
                t0 = time.perf_counter()
                model(x, cache=cache)
                sync(str(dev))
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    return {"context": context, "t1_ms": 1000 * med[1], "ratio": {str(k): med[k] / med[1] for k in ks}}


def prepare_speed(path, tmp, limit=None):
    """prepare.py's tokens/s on GSM8K train (its first `limit` rows) vs the bare tiktoken batch
    encoder on the same texts."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        rows = [json.loads(l) for l in itertools.islice(f, limit)]
    if limit is not None:   # prepare.py reads a file: the same rows
        path = os.path.join(tmp, "gsm8k_head.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    tok = Tokenizer("gpt2")
    texts = [t for r in rows for t in prepare.row_texts(tok, r, "question", "answer", "")]
    bare, prep = [], []
    for i in range(3):
        t0 = time.perf_counter()
        n = sum(len(x) for x in tok.enc.encode_ordinary_batch(texts))
        bare.append(n / (time.perf_counter() - t0))
        c = configure(defaults_from(vars(prepare)), [f"--input={path}", f"--out_dir={tmp}/gsm8k{i}", "--tokenizer=gpt2",
                                                    "--prompt_key=question", "--response_key=answer", "--max_length=1024"])
        t0 = time.perf_counter()
        meta = prepare.prepare(c)
        prep.append(sum(s["tokens"] for s in meta["splits"].values()) / (time.perf_counter() - t0))
    return {"bare_tokens_per_s": statistics.median(bare), "prepare_tokens_per_s": statistics.median(prep),
            "ratio": statistics.median(prep) / statistics.median(bare)}
