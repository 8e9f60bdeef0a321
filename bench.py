"""
The performance table: what each training mode costs next to sft on the same examples, and what
each decoder buys next to AR decoding of the same model (accuracy, tokens per forward, speed).
Trains every mode with the same budget on the toy task, in this process, then decodes its
held-out split. Prints Markdown tables, then one JSON line.

    python bench.py --quick          # a smoke run, under two minutes on 2 CPU cores
    python bench.py                  # the README tables (long on 2 CPU cores: each gated drafter
                                     # alone trains ~10 min; pick runs with --only)
    python bench.py --device=cuda    # adds MFU
    python bench.py --only="interleaved B=4 gated lora from sft"   # some runs (sft always), reusing
                                     # finished runs in --out_dir; bench.png: accuracy vs tokens/forward
"""
import json
import os
import statistics
import sys
import tempfile
import time
import weakref
from collections import Counter
from contextlib import nullcontext

import numpy as np
import torch

import generate
import prepare
import batching
import train
from configurator import UserError, configure, cli, defaults_from
from checkpoint import changes_text, config_changes, latest_checkpoint
from speed import forward_cost_ratios, hf_generate_speed, prepare_speed, sync

quick = False            # the smoke preset
device = "cpu"
out_dir = ""             # where runs go (default: a temporary folder)
eval_n = 300             # held-out problems decoded at batch 8 (accuracy)
speed_n = 40             # problems decoded at batch 1 and 8 for the wall-clock ratios
time_steps = 10          # timed training steps per mode (after 3 warm-up steps)
peak_flops = 989e12      # bf16 dense peak of an H100 SXM, for MFU on CUDA
gsm8k = "../shared/data/gsm8k/train.jsonl"   # for prepare.py's throughput (skipped when absent)
only = ""                # comma-separated names from RUNS (default: all); sft always runs (the reference)
plot = "bench.png"       # accuracy against tokens/forward for every decoder row (needs matplotlib; "" = none)
lora_rank = 32           # rank of the LoRA / gated LoRA runs from sft
drafter_steps = 3        # the gated drafters train this many times the preset's max_iters (their lever: README)
forward_cost = ""        # only r(k) of this model (an HF folder, a checkpoint or a .gguf file), then exit
context = 200            # r(k): tokens in the KV cache before the timed forwards
dtype = "float32"        # r(k): float32 | bfloat16 (CPUs with AMX run bf16 matmuls of a few rows at about one row's cost)
batch_invariant = True   # r(k) in bf16: on the batch-invariant backend generate.py decodes bf16 with (False: SDPA)
prepack = True           # --forward_cost in float32 on a CPU: big linears through oneDNN, as generate.py decodes (False: F.linear)

PRESETS = {  # model, data and budget; every mode gets the same
    "full": dict(toy_rows=20000, n_layer=4, n_head=4, n_kv_head=4, n_embd=128, max_iters=600, batch_size=16,
                 learning_rate=2e-3, min_lr=2e-4, warmup_iters=30),
    "quick": dict(toy_rows=600, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, max_iters=8, batch_size=4,
                  learning_rate=3e-3, min_lr=3e-4, warmup_iters=2),
}
GATED = {"lora_rank": "{rank}", "lora_alpha": "{rank}", "gated_lora": True, "sampler_head": True,
         "max_iters": "{drafter_iters}"}
# trained mode -> (train overrides, [(decoder label, generate overrides)]); placeholders: {sft} the sft run, {rank}
# --lora_rank, {drafter_iters} --drafter_steps x max_iters, {self} sft's greedy answers to the training prompts
RUNS = {
    "sft": ({}, [("ar", {})]),
    "refine": ({"mode": "refine", "num_iterations": 2, "ar_loss_weight": 1.0},
               [("refine N=15 M=1", {"method": "refine", "add_eos_length": 15, "refine_iter": 1}),
                ("refine N=15 M=2", {"method": "refine", "add_eos_length": 15, "refine_iter": 2}),
                ("refine N=63 M=3", {"method": "refine", "add_eos_length": 63, "refine_iter": 3}),
                ("refine verify N=15", {"method": "refine", "add_eos_length": 15, "verify": True})]),
    "interleaved B=4": ({"mode": "interleaved", "block_size": 4},
                        [(f"blockwise t={t}", {"method": "blockwise", "threshold": t}) for t in (0.5, 0.7, 0.9)] +
                        [("blockwise verify", {"method": "blockwise", "verify": True, "draft_tree": False}),
                         ("blockwise verify tree", {"method": "blockwise", "verify": True})]),
    "interleaved B=8": ({"mode": "interleaved", "block_size": 8},
                        [("blockwise t=0.9", {"method": "blockwise", "threshold": 0.9}),
                         ("blockwise verify", {"method": "blockwise", "verify": True, "draft_tree": False})]),
    # the two-stage recipe: next-block drafting added to the trained sft model (full, LoRA, gated LoRA)
    **{f"interleaved B={B} {kind} from sft": ({"mode": "interleaved", "block_size": B, "init_from": "{sft}", **kw},
                                               [("blockwise verify", {"method": "blockwise", "verify": True,
                                                                      "draft_tree": False}),
                                                ("blockwise verify tree", {"method": "blockwise", "verify": True})])
       for B in (4, 8) for kind, kw in (("full", {}), ("lora", {"lora_rank": "{rank}", "lora_alpha": "{rank}"}),
                                        ("gated lora", GATED), ("gated lora self", {**GATED, "data_dir": "{self}"}))},
    # refinement started from the trained sft model (CLLM, Jacobi Forcing start from one), its next-token loss kept
    "refine from sft": ({"mode": "refine", "num_iterations": 2, "ar_loss_weight": 1.0, "init_from": "{sft}"},
                        [("refine verify N=15", {"method": "refine", "add_eos_length": 15, "verify": True}),
                         ("refine N=15 M=2", {"method": "refine", "add_eos_length": 15, "refine_iter": 2})]),
    # block diffusion adapted from the sft model (BD3-LM / Fast-dLLM v2): decoded block by block, cached;
    # "+AR": a causal clean stream that keeps sft's next-token loss (and decodes AR too)
    **{f"block diffusion B={B}{ar} from sft": ({"mode": "diffusion", "block_size": B, "shift": True, "gen_length": 0,
                                               "init_from": "{sft}", "learning_rate": 1e-3, **kw},
                                          [(f"diffusion t={t}", {"method": "diffusion", "dthreshold": t,
                                                                 "max_new_tokens": 80}) for t in (0.9, 0.7)] +
                                          [("diffusion 2 per step", {"method": "diffusion", "alg": "entropy",
                                                                    "steps": 40, "max_new_tokens": 80})] +
                                          [(f"diffusion verify t={t}", {"method": "diffusion", "dthreshold": t, "verify": True,
                                                                        "max_new_tokens": 80}) for t in (0.9, 0.5) if ar])
       for B in (4, 8) for ar, kw in (("", {}), (" +AR", {"causal_clean": True, "ar_loss_weight": 1.0}))},
    "diffusion shift from sft": ({"mode": "diffusion", "gen_length": 80, "shift": True, "init_from": "{sft}",
                                  "learning_rate": 1e-3, "block_size": 0},
                                 [("diffusion entropy steps=80", {"method": "diffusion", "alg": "entropy", "steps": 80,
                                                                  "max_new_tokens": 80}),
                                  ("diffusion entropy steps=20", {"method": "diffusion", "alg": "entropy", "steps": 20,
                                                                  "max_new_tokens": 80}),
                                  ("diffusion entropy block=16", {"method": "diffusion", "alg": "entropy",
                                                                  "block_length": 16, "max_new_tokens": 80})]),
    "diffusion": ({"mode": "diffusion", "gen_length": 80, "block_size": 0},
                  [(f"diffusion {a} steps={s}", {"method": "diffusion", "alg": a, "steps": s, "max_new_tokens": 80})
                   for a in ("origin", "maskgit_plus", "topk_margin", "entropy") for s in (80, 40, 20)] +
                  [("diffusion entropy t=0.9", {"method": "diffusion", "alg": "entropy", "dthreshold": 0.9,
                                                "max_new_tokens": 80}),
                   ("diffusion entropy block=16", {"method": "diffusion", "alg": "entropy", "block_length": 16,
                                                   "max_new_tokens": 80})]),
}
LENGTH = {"interleaved": 384, "diffusion": 384}   # rows hold slots / pads too (by mode)


def run_dir(tmp, name):
    return os.path.join(tmp, name.replace(" ", "_").replace("=", ""))


class Box:
    def __init__(self, t):
        self.t = t


class SavedBytes:
    """Peak bytes autograd holds for backward (the CPU stand-in for peak memory): saved-tensor
    hooks count what is packed; a finalizer uncounts it when the graph is freed."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, t):
        box, n = Box(t), t.numel() * t.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(box, self._free, n)
        return box

    def _free(self, n):
        self.live -= n

    def unpack(self, box):
        return box.t


def preset(b):
    return PRESETS["quick" if b.quick else "full"]


def train_config(b, data_dir, out, name, overrides):
    args = {k: v for k, v in preset(b).items() if k != "toy_rows"}
    args.update(data_dir=data_dir, out_dir=out, max_length=LENGTH.get(overrides.get("mode"), 256), eval_interval=0,
                log_interval=10 ** 9, save_interval=10 ** 9, device=b.device)
    args.update(overrides)
    c = configure(defaults_from(vars(train)), [f"--{k}={v}" for k, v in args.items()])
    return c


def time_training(b, data_dir, tmp, runs):
    """Step time, data tokens/s and memory of each mode on the same examples (batch_size rows of sft)."""
    out = {}
    for name, (overrides, _) in runs.items():
        if ("init_from" in overrides and "lora_rank" not in overrides) or "data_dir" in overrides:
            continue   # the same step as its mode's scratch run, or as the run it differs from by data only
        overrides = resolve(overrides, b, tmp)
        c = train_config(b, data_dir, os.path.join(tmp, "timing"), name, overrides)
        meta = json.load(open(os.path.join(data_dir, "meta.json")))
        c = train.resolve(c, 1, meta)
        shards = batching.Shards(data_dir, "train")
        batches = batching.Batches(shards, c, 1, 0)
        n_ex = 3 * c.batch_size   # the same examples for every mode, packed by its own layout
        rows = batching.pack_rows(batches.lengths[:n_ex], c.max_length, True, np.random.default_rng(0))
        batch = batches.build(rows)
        data_tokens = int(sum(shards.index[i][2] for i in range(n_ex)))
        torch.manual_seed(0)
        model, fill = train.build_model(c, meta)
        model = fill(model, c.device, False).set_backend(train.pick_backend(model.config, c.device))
        opt = train.make_optimizer(model, c)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if "cuda" in c.device else nullcontext()
        times, meter = [], SavedBytes()
        if "cuda" in c.device:
            torch.cuda.reset_peak_memory_stats()
        for i in range(3 + b.time_steps):
            sync(c.device)
            t0 = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
                train.train_step(model, [(0, batch)], c, 1, i, autocast, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(c.device)
            times.append(time.perf_counter() - t0)
        dt = statistics.median(times[3:])
        mem = torch.cuda.max_memory_allocated() if "cuda" in c.device else meter.peak
        rec = {"step_s": dt, "data_tokens_per_s": data_tokens / dt, "memory_mb": mem / 2 ** 20,
               "row_tokens": int(batch["idx"].numel()),
               "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        if "cuda" in c.device:   # 6 N flops per token for the matmuls, attention left out (small here)
            rec["mfu"] = 6 * model.num_params() * int((batch["doc"] >= 0).sum()) * (
                overrides.get("num_iterations", 1) + (1 if overrides.get("ar_loss_weight") else 0)) / dt / b.peak_flops
        out[name] = rec
    for rec in out.values():
        rec["step_ratio"] = rec["step_s"] / out["sft"]["step_s"]
        rec["memory_ratio"] = rec["memory_mb"] / out["sft"]["memory_mb"]
    return out


def padding(data_dir, b):
    """Padding fraction of an sft epoch, packed vs one example per row (padded to the batch's longest)."""
    c = train.resolve(train_config(b, data_dir, "", "sft", {}), 1)
    lengths = batching.Batches(batching.Shards(data_dir, "train"), c, 1, 0).lengths
    packed = batching.pack_rows(lengths, c.max_length, True, np.random.default_rng(0))
    pad_packed = 1 - lengths.sum() / (len(packed) * c.max_length)
    order = np.random.default_rng(0).permutation(len(lengths))
    groups = [order[i:i + c.batch_size] for i in range(0, len(order), c.batch_size)]
    pad_padded = 1 - lengths.sum() / sum(len(g) * lengths[g].max() for g in groups)
    return {"packed": float(pad_packed), "padded": float(pad_padded)}


def resolve(overrides, b, tmp):
    """Fill the placeholders of RUNS: {sft} (the sft run's folder), {rank}, {drafter_iters}, {self}."""
    ints = {"{rank}": b.lora_rank, "{drafter_iters}": b.drafter_steps * preset(b)["max_iters"]}
    return {k: ints[v] if v in ints else v.format(sft=run_dir(tmp, "sft"), self=os.path.join(tmp, "data_self"))
            if isinstance(v, str) else v for k, v in overrides.items()}


def self_distill(b, tmp):
    """The sft model's own greedy answers to the training split's prompts, made into a data dir
    ({self}) the way the README's recipe does (generate.py --out, then prepare.py --input=G
    --prompt_key=prompt --response_key=completion): what a drafter trained on them learns is what
    the model says, wrong answers included. Answers the decode budget cuts are dropped, counted."""
    done = os.path.join(tmp, "self_distill.json")   # written last: the data dir is complete
    if os.path.isfile(done):
        print(f"reusing {done}", file=sys.stderr, flush=True)
        return json.load(open(done))
    pc = configure(defaults_from(vars(prepare)), [f"--toy_rows={preset(b)['toy_rows']}"])
    items = [(r["prompt"], r["target"]) for i, r in prepare.toy_task(pc.toy_rows, pc.seed) if not prepare.is_val(i, pc)]
    model, info, tok = generate.load(run_dir(tmp, "sft"), b.device)
    t0 = time.time()
    records, s = generate.decode_and_score(model, info, tok, gen_config(b, batch_size=64, max_new_tokens=128,
                                                                        quiet=b.quick), items)
    generate.write_records(records, os.path.join(tmp, "self.jsonl"))
    meta = prepare.prepare(configure(defaults_from(vars(prepare)), [
        f"--input={tmp}/self.jsonl", "--prompt_key=prompt", "--response_key=completion", f"--out_dir={tmp}/data_self",
        f"--truncated={'keep' if b.quick else 'drop'}"]))   # the quick preset's 8-step model rarely stops
    splits = meta["splits"].values()
    rec = {"prompts": len(records), "sft_train_accuracy": s["accuracy"], "decode_s": round(time.time() - t0, 1),
           "kept": sum(st["rows"] for st in splits), "dropped": dict(sum((Counter(st["dropped"]) for st in splits), Counter()))}
    json.dump(rec, open(done, "w"))
    return rec


def decode_all(b, data_dir, tmp, runs, res):
    out = res["decoding"] = {}
    meta = json.load(open(os.path.join(data_dir, "meta.json")))   # the held-out split's keys, for every run
    for name, (overrides, decoders) in runs.items():
        out_run = run_dir(tmp, name)
        if "{self}" in overrides.values() and "self_distill" not in res:   # after the sft run, which it decodes
            res["self_distill"] = self_distill(b, tmp)
        overrides = resolve(overrides, b, tmp)
        c = train_config(b, data_dir, out_run, name, overrides)
        final = os.path.join(out_run, f"ckpt_{c.max_iters:07d}")
        ck = latest_checkpoint(out_run)   # an earlier invocation's run with this out_dir: only with these settings
        if ck:
            check_reuse(c, ck)
        if ck == final:
            print(f"reusing {final}", file=sys.stderr, flush=True)
        else:
            t0 = time.time()
            train.train(c)
            print(f"trained {name} in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        model, info, tok = generate.load(out_run, b.device)
        items = generate.load_prompts(gen_config(b, data=os.path.join(data_dir, "val.jsonl"), limit=b.eval_n,
                                                 prompt_key=meta["prompt_key"], answer_key=meta["response_key"]), info)
        ar = {bs: measure(b, model, info, tok, items, {}, bs) for bs in (1, 8)} if info["mode"] != "diffusion" or info.get("causal_clean") else None
        rows = {"ar": ar} if ar else {}
        for label, kw in decoders:
            if label != "ar":
                rows[label] = {bs: measure(b, model, info, tok, items, kw, bs) for bs in (1, 8)}
        records = {label: r[8].pop("records") for label, r in rows.items()}
        for label, r in rows.items():
            r[8]["decoded"] = len(records[label])
            if ar:   # completions token for token the same model's AR ones (a lossless decoder: all)
                r[8]["same_as_ar"] = generate.identical(records[label], records["ar"])
            for bs in (1, 8):
                if ar:
                    r[bs]["speedup_vs_ar"] = r[bs]["speed_tokens_per_second"] / ar[bs]["speed_tokens_per_second"]
        out[name] = rows


def check_reuse(c, ckpt):
    """An earlier invocation's run (finished, or cut short: it resumes) is used only if it was trained
    with exactly these settings: a run is found by its name, so another --lora_rank or --drafter_steps
    would otherwise be reused, or continued with a spliced schedule."""
    changed = {k: v for k, v in config_changes(ckpt, vars(c)).items() if k not in ("out_dir", "device")}
    if changed:
        raise UserError(f"{ckpt} was trained with other settings ({changes_text(changed)}): use another --out_dir")


def gen_config(b, **kw):
    args = {"device": b.device, "quiet": True, "max_new_tokens": 80, **kw}
    return configure(defaults_from(vars(generate)), [f"--{k}={v}" for k, v in args.items()])


def measure(b, model, info, tok, items, kw, bs):
    """Accuracy and tokens per forward on eval_n problems (batch 8 only); tokens/s on speed_n."""
    c = gen_config(b, batch_size=bs, **kw)
    g = torch.Generator(device=b.device).manual_seed(0)
    rec = {}
    if bs == 8:
        records, s = generate.decode_and_score(model, info, tok, c, items, g)
        rec.update(accuracy=s.get("accuracy"), tokens_per_forward=s["tokens_per_forward"], records=records)
    # warm-up over the same prompts: CPU kernels set up per shape on first use (oneDNN), and the
    # first model decoded would otherwise pay for every shape; at batch 8 the pass above was one
    # when speed_n is a multiple of 8 (the same batches)
    if bs != 8 or b.speed_n % 8:
        generate.decode_and_score(model, info, tok, c, items[:b.speed_n], g)
    _, s = generate.decode_and_score(model, info, tok, c, items[:b.speed_n], g)
    rec["speed_tokens_per_second"] = s["tokens_per_second"]
    rec.setdefault("tokens_per_forward", s["tokens_per_forward"])
    return rec


def tables(res):
    lines = ["| mode | trainable | step time | vs sft | data tokens/s | memory MB | vs sft |" +
             (" MFU |" if "mfu" in res["training"]["sft"] else ""),
             "| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if "mfu" in res["training"]["sft"] else "")]
    for name, r in res["training"].items():
        lines.append(f"| {name} | {r['trainable']:,} | {1000 * r['step_s']:.1f} ms | {r['step_ratio']:.2f}x | {r['data_tokens_per_s']:,.0f} "
                     f"| {r['memory_mb']:.1f} | {r['memory_ratio']:.2f}x |" + (f" {100 * r['mfu']:.1f}% |" if "mfu" in r else ""))
    p = res["padding"]
    lines += ["", f"Padding, sft epoch: packed {100 * p['packed']:.1f}%, one example per row {100 * p['padded']:.1f}%", ""]
    d = res.get("self_distill")
    if d:
        lines += [f"Self-distilled data: the sft model's greedy answers to {d['prompts']:,} training prompts "
                  f"({100 * d['sft_train_accuracy']:.1f}% correct), {d['kept']:,} kept, dropped {d['dropped'] or 0}, "
                  f"decoded in {d['decode_s']:.0f} s", ""]
    lines += [
              "| trained | decoder | accuracy | same as ar | tokens/forward | tok/s b=1 | vs ar b=1 | tok/s b=8 | vs ar b=8 |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, rows in res["decoding"].items():
        for label, r in rows.items():
            acc = r[8]["accuracy"]
            vs = lambda bs: f"{r[bs]['speedup_vs_ar']:.2f}x" if "speedup_vs_ar" in r[bs] else "-"
            same = f"{r[8]['same_as_ar']}/{r[8]['decoded']}" if "same_as_ar" in r[8] else "-"
            lines.append(f"| {name} | {label} | {100 * acc:.1f}% | {same} | {r[8]['tokens_per_forward']:.2f} | "
                         f"{r[1]['speed_tokens_per_second']:,.0f} | {vs(1)} | {r[8]['speed_tokens_per_second']:,.0f} | {vs(8)} |")
    return "\n".join(lines)


def figure(res, path):
    """Accuracy against tokens per forward, one point per decoder row, one colour per trained model:
    the trade the README's tables hold, at a glance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 6))
    for name, rows in res["decoding"].items():
        pts = [(r[8]["tokens_per_forward"], 100 * r[8]["accuracy"], label) for label, r in rows.items()]
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=name, alpha=0.8)[0]
        for x, y, label in pts:
            ax.annotate(label.replace("blockwise ", "").replace("diffusion ", ""), (x, y), fontsize=6,
                        color=line.get_color(), xytext=(3, 2), textcoords="offset points")
    sft = res["decoding"].get("sft", {}).get("ar")
    if sft:
        ax.axhline(100 * sft[8]["accuracy"], color="grey", ls="--", lw=0.8, label="sft, AR")
    ax.set_xlabel("tokens per forward")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"toy task, {res['preset']} preset, {res['device']}: accuracy vs tokens per forward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def select_runs(b):
    """The runs this invocation makes (a new dict; RUNS stays as written): --only's, and for
    --quick one decoder per trained mode and no run whose code paths another one covers."""
    keep = {"sft", *(n.strip() for n in b.only.split(","))} if b.only else set(RUNS)
    if keep - set(RUNS):
        raise UserError(f"only: unknown runs {sorted(keep - set(RUNS))} (one of: {', '.join(RUNS)})")
    runs = {n: (o, list(d)) for n, (o, d) in RUNS.items() if n in keep}
    if b.quick:   # the same code paths as the B=4 LoRA runs and refine; block diffusion: tests/test_diffusion.py
        covered = [n for n in runs if "from sft" in n and (n.startswith(("interleaved B=8", "block diffusion", "refine"))
                                                            or (n.startswith("interleaved") and " full " in n))]
        runs = {n: (o, d[:1]) for n, (o, d) in runs.items() if n not in covered}
    return runs


def main(argv=None):
    b = configure(defaults_from(globals()), [a if a != "--quick" else "--quick=True" for a in (sys.argv[1:] if argv is None else argv)])
    if b.forward_cost:   # r(k) of one model, alone
        model, _, _ = generate.load(b.forward_cost, b.device, generate.torch_dtype(b.dtype), b.batch_invariant, b.prepack)
        r = forward_cost_ratios(model, b.context)
        print(f"{b.forward_cost} ({b.dtype}, {model.backend}, prepack={b.prepack}): t(1) {r['t1_ms']:.1f} ms after {b.context} tokens; r(k) = t(k)/t(1): " +
              ", ".join(f"k={k} {v:.2f}" for k, v in r["ratio"].items()))
        return print(json.dumps({"forward_cost": r, "device": b.device, "dtype": b.dtype,
                                 "backend": model.backend, "prepack": b.prepack, "threads": torch.get_num_threads()}))
    if b.drafter_steps < 1:
        raise UserError(f"drafter_steps={b.drafter_steps}: expected a whole number >= 1 (times the preset's max_iters)")
    runs = select_runs(b)
    if b.quick:
        b.eval_n, b.speed_n, b.time_steps, b.lora_rank, b.drafter_steps = 16, 4, 2, 4, 1
    tmp = b.out_dir or tempfile.mkdtemp(prefix="bench-")
    data_dir = os.path.join(tmp, "data")
    prepare.prepare(configure(defaults_from(vars(prepare)), [f"--out_dir={data_dir}", f"--toy_rows={preset(b)['toy_rows']}"]))
    t0 = time.time()
    res = {"preset": "quick" if b.quick else "full", "device": b.device, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "lora_rank": b.lora_rank, "drafter_steps": b.drafter_steps}
    decode_all(b, data_dir, tmp, runs, res)   # first: the LoRA runs' step is timed on the sft model
    res["training"] = time_training(b, data_dir, tmp, runs)
    res["padding"] = padding(data_dir, b)
    res["forward_cost"] = forward_cost_ratios(generate.load(run_dir(tmp, "sft"), b.device)[0], b.context)
    # the smoke run: the same code on less (64 tokens once, GSM8K's first 500 rows)
    res["hf_generate"] = hf_generate_speed(*((64, 1) if b.quick else ())) if not b.only else None
    res["prepare_gsm8k"] = prepare_speed(b.gsm8k, tmp, 500 if b.quick else None) if not b.only else None
    res["seconds"] = round(time.time() - t0, 1)
    print(tables(res))
    if h := res["hf_generate"]:
        print(f"\nstories260K greedy decoding: ours {h['ours_tokens_per_s']:,.0f} tok/s, transformers generate "
              f"{h['hf_tokens_per_s']:,.0f} tok/s ({h['ratio']:.2f}x)")
    r = res["forward_cost"]
    print(f"sft model, one forward of k tokens after {r['context']}: r(k) = t(k)/t(1) " +
          ", ".join(f"k={k} {v:.2f}" for k, v in r["ratio"].items()))
    if res["prepare_gsm8k"]:
        p = res["prepare_gsm8k"]
        print(f"prepare.py on GSM8K: {p['prepare_tokens_per_s']:,.0f} tok/s, bare tokenizer "
              f"{p['bare_tokens_per_s']:,.0f} tok/s ({p['ratio']:.2f})")
    if b.plot:
        try:
            figure(res, b.plot)
            print(f"figure: {b.plot}")
        except ImportError:
            print("figure: skipped (pip install matplotlib to draw it)")
    print(json.dumps(res))


if __name__ == "__main__":
    cli(main)
