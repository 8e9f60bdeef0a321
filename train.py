"""
One plain training loop; the objective is chosen by `mode`. Single process, or DDP / FSDP2
under torchrun. Each mode adds one layout function (how an example is laid out in a row)
and one loss function; the loop, packing, checkpoints and logging are shared.

    python train.py config/toy.py
    torchrun --standalone --nproc_per_node=8 train.py config/gsm8k_gpu.py
"""
import json
import math
import os
import platform
import subprocess
import time
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch

from checkpoint import (barrier, check_resume, checkpoint_info, checkpoint_source, export, find_checkpoint,
                        latest_checkpoint, load_base, load_lora_checkpoint, load_train_state, read_info,
                        restore_aside, save_checkpoint)
from configurator import UserError, configure, cli, defaults_from, print_config
from batching import Batches, Shards, pack_rows
from hf import hf_source, materialize
from lora import parse_lora_targets
from model import ModelConfig, Transformer, empty, pad_vocab, pick_backend
from objectives import MODES, padded_response, sft_length
from tokenizer import Tokenizer

# I/O
data_dir = "data/toy"         # output of prepare.py
out_dir = "out/toy"
init_from = "scratch"         # scratch | resume | a Hugging Face model folder, a run's out_dir or a .gguf file
resume = "auto"               # auto: an out_dir holding a checkpoint is continued | never: start fresh, refuse such an out_dir
mode = "sft"                  # sft | refine | interleaved | diffusion
# refine (EOS-noise iterative refinement)
num_iterations = 2            # forwards per example: s0 (noised), s1 = greedy(s0), ...
noise_min = 0.1               # per-example ratio of response tokens replaced by EOS ...
noise_max = 0.9               # ... r ~ U[noise_min, noise_max] (see noise_schedule)
noise_schedule = "uniform"    # uniform | linear | cosine: the upper end of r grows over training
loss_weights = []             # per iteration; [] = all 1.0
ar_loss_weight = 0.0          # + this * next-token loss on the clean sequence (CLLM keeps one; refine,
                              # and block diffusion with causal_clean)
# interleaved (next-block prediction) and block diffusion
block_size = 4                # interleaved: one forward yields the next B tokens; diffusion: block
                              # diffusion with blocks of B (0: one full canvas, LLaDA)
mask_loss_weight = 1.0        # weight of the slot loss beside the clean-stream AR loss
# diffusion (LLaDA / Dream masked diffusion)
gen_length = 0                # responses are EOS-padded to this many tokens, pads supervised (LLaDA)
shift = False                 # Dream: position i predicts token i+1 (for models adapted from AR)
time_weighting = "original"   # original (1/t) | linear (1-t) | cart (Dream's context-adaptive weights)
cart_p = 0.3                  # cart: the geometric distribution's parameter
complementary_mask = False    # Fast-dLLM v2: each example also with the complement of its mask
causal_clean = False          # block diffusion: the clean stream token-causal, an AR model (decodes with
                              # method=ar too; with ar_loss_weight > 0 it also keeps the AR loss)
eps = 1e-3                    # t ~ U(eps, 1)
# adapters (any mode; needs init_from a trained model)
lora_rank = 0                 # 0: full fine-tuning; > 0: freeze the initial weights, train LoRA adapters
lora_alpha = 16.0             # adapter scale alpha / rank (peft's convention)
lora_dropout = 0.0
lora_targets = "all-linear"   # or names from q, k, v, o, gate, up, down: "q,k,v"
gated_lora = False            # interleaved: adapters act at MASK slots only; the clean stream stays the base model
sampler_head = False          # gated: each slot's draft conditioned on the token drafted before it (Apple's)
# model size (scratch)
n_layer = 4
n_head = 4
n_kv_head = 4
n_embd = 128
# data
max_length = 256              # tokens per row (after the mode's layout: slots, pads)
pack = True                   # several examples per row; pack=False pads one per row
batch_size = 16               # rows per micro-batch (per rank)
gradient_accumulation_steps = 1   # global; divided by the world size
# optimisation
max_iters = 1000              # 0: run `epochs` epochs
epochs = 0
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 50
lr_decay_iters = 0            # 0: max_iters
decay_lr = True
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# evaluation, logging, checkpoints: every so many steps (eval_interval=0: never; log and save: 0 = at the end)
eval_interval = 250
eval_iters = 10                # validation micro-batches (0: all), the same ones on any number of ranks
eval_only = False             # evaluate init_from on the validation split and exit; val reports
                              # acc_next, teacher-forced next-token accuracy (diffusion: clean
                              # prefix, MASK suffix), and per-slot accuracy for interleaved
log_interval = 10
save_interval = 500
keep_last = 2
export_hf = False             # at the end of the run also write out_dir/hf, a folder transformers loads
wandb_log = False
wandb_project = "pdlm"
wandb_run_name = ""
# system
device = "cpu"
compile = False
compile_backend = "inductor"  # torch.compile backend; aot_eager captures the same graphs without generating
                              # kernels (no speed-up, seconds instead of a minute on CPU: the tests use it)
cpu_bf16 = False              # CPU: bf16 autocast, as CUDA always does (weights, gradients and AdamW stay fp32);
                              # measured no faster than fp32 for the SmolLM2 gated drafter on an AMX CPU (README)
gradient_checkpointing = False
parallel = "ddp"              # ddp | fsdp (under torchrun)
seed = 1337

PAD_SEED = 0x5EED  # a fixed stream for validation noise, so val losses compare across steps


# ----------------------------------------------------------------------------- setup

def setup_distributed(device):
    """(world, rank, this rank's device); under torchrun a process group: gloo on CPU, NCCL for
    CUDA tensors plus gloo for any CPU ones on GPUs."""
    if "RANK" not in os.environ:
        return 1, 0, device
    import torch.distributed as dist
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return dist.get_world_size(), dist.get_rank(), device


def all_reduce(values, device):
    """Sum a list of floats over ranks, on the training device (NCCL serves CUDA tensors only)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def build_model(c, meta):
    """(model, fill): a full model is built on the meta device and fill(model, device) makes it
    real after FSDP2 has sharded it, each rank initialising or reading only its own rows
    (torchtitan's way); a LoRA model is its full frozen base plus adapters, built here."""
    if c.init_from == "scratch" and not c.resume_from:
        cfg = ModelConfig(vocab_size=pad_vocab(meta["vocab_size"]), n_layer=c.n_layer, n_head=c.n_head,
                          n_kv_head=c.n_kv_head, n_embd=c.n_embd, max_position_embeddings=c.max_length)
        with torch.device("meta"):
            model = Transformer(cfg)
        return model, lambda m, device, dist: empty(m, device).init_weights(c.seed)
    path = c.resume_from or find_checkpoint(c.init_from)   # another run's out_dir: its newest checkpoint
    info = read_info(path)
    if not c.resume_from and not info:
        hf_tok = os.path.abspath(path)
        if meta["tokenizer"] not in (hf_tok, os.path.join(hf_tok, "")):
            raise UserError(f"{c.data_dir} was prepared with tokenizer {meta['tokenizer']!r}, but {path} "
                            f"uses its own; re-run prepare.py with --tokenizer={path}")
    if info and info["tokenizer_spec"] != meta["tokenizer"]:
        raise UserError(f"{c.data_dir} was prepared with tokenizer {meta['tokenizer']!r}, but {path} "
                        f"with {info['tokenizer_spec']!r}")
    if c.eval_only and info:   # a checkpoint is evaluated under the objective it was trained with
        keys = ["mode"] + {"interleaved": ["block_size"],
                           "diffusion": ["block_size", "gen_length", "shift", "causal_clean"]}.get(info["mode"], [])
        keys = [k for k in keys if k in info]
        if any(info[k] != getattr(c, k) for k in keys):
            raise UserError(f"eval_only: {path} was trained with " + " ".join(f"--{k}={info[k]}" for k in keys) +
                            "; the config has " + " ".join(f"--{k}={getattr(c, k)}" for k in keys))
    real = lambda m, device, dist: m.to(device)
    if "lora" in info:
        if c.resume_from:
            return load_lora_checkpoint(path, info), real
        raise UserError(f"init_from={path} holds LoRA adapters, not a model: train it with --export_hf=True "
                        f"and start from its out_dir/hf")
    if c.lora_rank:   # freeze what was loaded, add adapters; the checkpoint names this base
        model, fp = load_base(path, meta["vocab_size"])
        model.add_lora(c.lora_rank, c.lora_alpha, c.lora_dropout, c.lora_targets,
                       meta["mask_id"] if c.mode in ("interleaved", "diffusion") else None, c.gated_lora,
                       c.sampler_head)
        model.lora_config.update(base=os.path.abspath(path), base_fingerprint=fp)
        return model, real
    if info and os.path.isdir(os.path.join(path, "state")):   # a training checkpoint: its sharded state,
        return checkpoint_source(path)                          # read by each rank for its rows
    # an HF folder (or a checkpoint written before sharded checkpoints: an HF folder + info.json)
    model, rows_of = hf_source(path, meta["vocab_size"])   # the MASK token may grow the vocabulary
    return model, lambda m, device, dist: materialize(m, device, rows_of)


def check_compatible(c, meta, model, splits):
    """The data fits the model: its tokens, and its largest position id (positions restart with
    each packed example, and interleaved slots reuse their block's positions)."""
    span = MODES[c.mode]["length"]
    if c.mode == "interleaved" or (c.mode == "diffusion" and c.block_size):   # copies reuse positions
        span = sft_length if c.mode == "interleaved" else lambda p, n, c: p + padded_response(p, n, c)
    longest = max((span(int(p), int(n), c) for s in splits for _, p, n in s.index), default=0)
    if longest > model.config.max_position_embeddings:
        raise UserError(f"examples of {longest} positions (mode {c.mode}) are beyond the model's "
                        f"{model.config.max_position_embeddings} positions")
    if meta["vocab_size"] > model.config.vocab_size:
        raise UserError(f"{c.data_dir}: vocab_size {meta['vocab_size']} does not fit the model's {model.config.vocab_size}")


def wrap(model, fill, c, world):
    """FSDP2 (each block, then the root; bf16 compute, fp32 gradient reduction on CUDA) on the
    meta-device model, then fill makes this rank's shard real; or fill, then DDP. Compile last."""
    fsdp = world > 1 and c.parallel == "fsdp"
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if c.device.startswith("cuda") else MixedPrecisionPolicy()
        for layer in model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    model = fill(model, c.device, fsdp)
    if world > 1 and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[torch.device(c.device).index] if c.device.startswith("cuda") else None)
    return torch.compile(model, backend=c.compile_backend) if c.compile else model


def make_optimizer(model, c):
    """AdamW over the trainable tensors only (all of them, or the adapters and the MASK row)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=c.learning_rate, betas=(c.beta1, c.beta2),
                             fused=c.device.startswith("cuda"))


def get_lr(it, c, total):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters (0: the run's total steps; nanoGPT)."""
    decay_iters = c.lr_decay_iters or total
    if not c.decay_lr:
        return c.learning_rate
    if it < c.warmup_iters:
        return c.learning_rate * (it + 1) / (c.warmup_iters + 1)
    if it >= decay_iters:
        return c.min_lr
    ratio = (it - c.warmup_iters) / max(decay_iters - c.warmup_iters, 1)
    return c.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c.learning_rate - c.min_lr)


# ----------------------------------------------------------------------------- the loop

class Backward:
    """backward(loss, final) for a loss function: fn(loss, final), or nothing (evaluation). DDP
    decides at *forward* time whether the next backward all-reduces, so every forward of a step
    but its last runs under no_sync: train_step wraps whole micro-batches, and a loss with several
    forwards wraps its non-final ones in hold(True). A step then all-reduces once. FSDP2
    reduce-scatters every backward: skipping it would accumulate unsharded gradients, a whole
    model's worth per rank."""

    def __init__(self, fn=None, no_sync=None):
        self.fn, self.no_sync = fn, no_sync

    def __call__(self, loss, final):
        if self.fn:
            self.fn(loss, final)

    def hold(self, flag):
        return self.no_sync() if flag and self.no_sync else nullcontext()


def global_counts(batches, c, weights=None):
    """What each batch supervises (the mode's counts), summed over batches and ranks; a batch of
    weight 0 adds nothing but its keys (every rank all-reduces the same ones)."""
    counts = {}
    for b, w in zip(batches, weights or [1] * len(batches)):
        for k, v in MODES[c.mode]["counts"](b, c).items():
            counts[k] = counts.get(k, 0) + v * w
    keys = sorted(counts)
    return dict(zip(keys, all_reduce([counts[k] for k in keys], c.device)))


def to_device(b, device):
    return {k: v.to(device, non_blocking=True) for k, v in b.items()}


def train_step(model, batches, c, world, step, autocast, progress):
    """One optimizer step's forward/backward over this rank's micro-batches. Losses are sums
    divided by the global count of supervised tokens, times the world size (DDP and FSDP
    average gradients), so accumulation and data parallelism never reweight examples.
    progress: the fraction of training done (refine's noise schedule)."""
    counts = global_counts([b for _, b in batches], c)
    norm = {k: max(v, 1.0) / world for k, v in counts.items()}
    metrics = {"supervised": counts["tgt"] + counts.get("slot", 0.0)}   # already global
    ddp = world > 1 and c.parallel == "ddp"
    for j, (m, b) in enumerate(batches):
        gen = torch.Generator().manual_seed(c.seed * 1_000_003 + step * 4099 + m)
        last = j == len(batches) - 1
        with autocast, (model.no_sync() if ddp and not last else nullcontext()):
            backward = Backward(lambda loss, final: loss.backward(), model.no_sync if ddp and last else None)
            out = MODES[c.mode]["loss"](model, to_device(b, c.device), c, gen, norm, backward, progress)
        for k, v in out.items():
            metrics[k] = metrics.get(k, 0.0) + v / world
    return metrics


def validation_batches(val, c):
    """The validation micro-batches: the first eval_iters (0: all) of val packed in one fixed
    order, the same set whatever the number of ranks."""
    rows = pack_rows(val.lengths, c.max_length, c.pack, np.random.default_rng(PAD_SEED))
    micro = [rows[i:i + c.batch_size] for i in range(0, len(rows), c.batch_size)]
    return micro[:c.eval_iters] if c.eval_iters > 0 else micro


@torch.no_grad()
def evaluate(model, val, c, world, rank, autocast):
    """Validation metrics, a function of the weights and the data only: a fixed set of micro-
    batches (rank r runs r, r + world, ...), fixed noise (refine at its full range), each metric
    a token-weighted mean (divided by its count over the whole set); acc_slotK only where slot k
    has targets. Every rank runs the same number of forwards (FSDP all-gathers in each one): a
    rank past the last micro-batch runs one again with weight 0."""
    model.eval()
    micro = validation_batches(val, c)
    mine = range(rank, -(-len(micro) // world) * world, world)
    counts = global_counts([val.build(micro[m % len(micro)]) for m in mine], c, [int(m < len(micro)) for m in mine])
    norm = {k: max(v, 1.0) for k, v in counts.items()}
    total = {}
    for m in mine:
        b = val.build(micro[m % len(micro)])
        with autocast:
            b, gen = to_device(b, c.device), torch.Generator().manual_seed(PAD_SEED + m)
            out = MODES[c.mode]["loss"](model, b, c, gen, norm, Backward())
            if "probe" in MODES[c.mode]:
                out.update(MODES[c.mode]["probe"](model, b, c, gen, norm))
        for k, v in out.items():
            total[k] = total.get(k, 0.0) + v * (m < len(micro))
    keys = sorted(total)
    model.train()
    return {k: v for k, v in zip(keys, all_reduce([total[k] for k in keys], c.device))
            if not (k.startswith("acc_slot") and counts[f"slot{k[len('acc_slot'):]}"] == 0)}


def environment():
    """Versions for the log; read from the package metadata (importing transformers costs seconds)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        sha = ""
    try:
        hf = version("transformers")
    except PackageNotFoundError:
        hf = "absent"
    return {"git": sha or "unknown", "python": platform.python_version(), "torch": torch.__version__,
            "transformers": hf, "numpy": np.__version__}


def load_data(c):
    if not os.path.isfile(os.path.join(c.data_dir, "meta.json")):
        raise UserError(f"data_dir={c.data_dir}: no meta.json (run prepare.py first)")
    return Shards(c.data_dir, "train"), Shards(c.data_dir, "val")


def check(c, world):
    """Settings that cannot work, each one error naming the key."""
    if c.mode not in MODES:
        raise UserError(f"unknown mode {c.mode!r} (one of {', '.join(MODES)})")
    if c.parallel not in ("ddp", "fsdp"):
        raise UserError(f"parallel={c.parallel!r}: expected ddp or fsdp")
    if c.mode == "refine" and c.loss_weights and len(c.loss_weights) != c.num_iterations:
        raise UserError(f"loss_weights has {len(c.loss_weights)} entries for num_iterations={c.num_iterations}")
    if c.time_weighting not in ("original", "linear", "cart"):
        raise UserError(f"time_weighting={c.time_weighting!r}: expected original, linear or cart")
    if c.mode == "diffusion" and c.causal_clean and not c.block_size:
        raise UserError("causal_clean=True needs block diffusion (block_size > 0): a full canvas has no clean stream")
    if c.mode == "diffusion" and c.ar_loss_weight and not c.causal_clean:
        raise UserError(f"ar_loss_weight={c.ar_loss_weight} in mode diffusion needs causal_clean=True (and block_size > 0): "
                        f"a block-causal clean stream sees the tokens it would predict")
    if c.noise_schedule not in ("uniform", "linear", "cosine"):
        raise UserError(f"noise_schedule={c.noise_schedule!r}: expected uniform, linear or cosine")
    if c.lora_rank < 0 or (c.lora_rank and c.init_from == "scratch"):
        raise UserError(f"lora_rank={c.lora_rank}: adapters need init_from a trained model (an HF folder or a run's out_dir)")
    if c.lora_rank:
        parse_lora_targets(c.lora_targets)
    if c.gated_lora and not (c.mode == "interleaved" and c.lora_rank > 0):
        raise UserError("gated_lora=True needs mode=interleaved and lora_rank > 0")
    if c.sampler_head and not c.gated_lora:
        raise UserError("sampler_head=True needs gated_lora=True")
    if c.gated_lora and c.export_hf:
        raise UserError("export_hf: gated LoRA adapters cannot be merged (they act at MASK slots only); "
                        "generate.py loads the checkpoint's base + adapters directly")
    bad = [k for k in ("eval_interval", "log_interval", "save_interval", "eval_iters") if getattr(c, k) < 0]
    if bad:
        raise UserError(f"{bad[0]}={getattr(c, bad[0])}: expected a count >= 0")
    if c.resume not in ("auto", "never"):
        raise UserError(f"resume={c.resume!r}: expected auto or never")
    if c.gradient_accumulation_steps % world:
        raise UserError(f"gradient_accumulation_steps={c.gradient_accumulation_steps} is not a multiple of the world size {world}")


def resolve(c, world, meta=None, device=None):
    """The run's settings, built once and never changed while it runs: the config as given
    (checked; kept whole as .config, what checkpoints and wandb store) plus what follows from it:
    grad_accum (per rank), eos_id and mask_id (from the data's meta), this rank's device, and
    resume_from, the checkpoint the run continues (init_from=resume, or resume=auto on an
    out_dir that holds one), else None."""
    check(c, world)
    ck = latest_checkpoint(c.out_dir)
    if c.init_from == "resume" and ck is None:
        raise UserError(f"init_from=resume: no checkpoint in {c.out_dir}")
    if ck and c.init_from != "resume" and not c.eval_only and c.resume == "never":
        raise UserError(f"out_dir={c.out_dir} holds another run's checkpoints ({os.path.basename(ck)}) and "
                        f"resume=never: choose another out_dir, or resume=auto to continue that run")
    resume_from = ck if c.init_from == "resume" or (ck and not c.eval_only) else None
    meta = meta or {}
    return SimpleNamespace(**{**vars(c), "config": dict(vars(c)), "grad_accum": c.gradient_accumulation_steps // world,
                              "eos_id": meta.get("eos_id"), "mask_id": meta.get("mask_id"),
                              "device": device or c.device, "resume_from": resume_from})


def announce_resume(c, rank):
    """Refuse a resume over changed settings (check_resume); say what continues, and what changed."""
    changes = check_resume(c, c.resume_from)
    if rank == 0:
        how = "resume=auto: continuing the run" if c.init_from != "resume" else "init_from=resume: continuing"
        print(f"{how} in {c.out_dir} from {os.path.basename(c.resume_from)}" +
              (f" with {changes}" if changes else ""), flush=True)


def setup_model(c, meta, world, splits):
    """(raw model, the wrapped one that trains, its optimizer): built, checked against the data,
    sharded or wrapped, made real."""
    torch.manual_seed(c.seed)
    raw, fill = build_model(c, meta)
    check_compatible(c, meta, raw, splits)
    raw.gradient_checkpointing = c.gradient_checkpointing
    raw.set_backend(pick_backend(raw.config, c.device), c.device)   # (raw may still be on the meta device)
    model = wrap(raw, fill, c, world)
    del fill   # it holds the source's file mappings: release them before training
    return raw, model, make_optimizer(model, c)


def train(c):
    world, rank, device = setup_distributed(c.device)
    if rank == 0:
        restore_aside(c.out_dir)
    barrier()
    train_data, val_data = load_data(c)
    meta = train_data.meta
    c = resolve(c, world, meta, device)
    if c.resume_from and not c.eval_only:
        announce_resume(c, rank)
    tok = Tokenizer(meta["tokenizer"] if meta["tokenizer"] in ("byte", "gpt2") else os.path.join(c.data_dir, "tokenizer"))
    raw, model, opt = setup_model(c, meta, world, (train_data, val_data))
    step = load_train_state(raw, opt, c) if c.resume_from else 0
    train_b, val_b = Batches(train_data, c, world, rank), Batches(val_data, c, 1, 0)
    total = c.max_iters or max(c.epochs, 1) * train_b.steps_per_epoch
    info = checkpoint_info(c.mode, MODES[c.mode].get("info", lambda c: {})(c), tok, meta)
    cuda = c.device.startswith("cuda")
    autocast = torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16) if cuda or c.cpu_bf16 else nullcontext()
    if step >= total and not c.eval_only:
        if rank == 0:
            print(f"{c.out_dir} is at step {step} and max_iters={total}: nothing to train" +
                  (" (exporting out_dir/hf)" if c.export_hf else ""), flush=True)
        if c.export_hf:
            export(c, raw, rank, tok, info)
        return raw
    logger = Logger(c, rank, total, step)
    if rank == 0:
        os.makedirs(c.out_dir, exist_ok=True)
        trainable = sum(p.numel() for p in raw.parameters() if p.requires_grad)
        print(f"{raw.num_params():,} parameters ({trainable:,} trainable), {len(train_data):,} train / "
              f"{len(val_data):,} val examples, {train_b.steps_per_epoch} steps per epoch", flush=True)
    evaluating = bool(c.eval_interval and len(val_data))
    if c.eval_only:
        if not len(val_data):
            raise UserError(f"eval_only: {c.data_dir} has an empty validation split")
        logger.eval(step, evaluate(model, val_b, c, world, rank, autocast))
        return raw
    if c.eval_interval and not len(val_data) and rank == 0:
        print(f"{c.data_dir}: the validation split is empty, so there is no evaluation", flush=True)
    model.train()
    while step < total:
        lr = get_lr(step, c, total)
        for g in opt.param_groups:
            g["lr"] = lr
        if evaluating and step % c.eval_interval == 0:
            logger.eval(step, evaluate(model, val_b, c, world, rank, autocast))
        t0 = time.time()
        batches = [(m, train_b.build(rows)) for m, rows in train_b.step(step)]
        metrics = train_step(model, batches, c, world, step, autocast, step / total)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip if c.grad_clip else float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        logger.step(step, metrics, lr, float(gnorm), batches, time.time() - t0)
        if (c.save_interval and step % c.save_interval == 0) or step == total:
            save_checkpoint(c, raw, opt, step, rank, tok, info)
    if c.export_hf:
        export(c, raw, rank, tok, info)
    if evaluating:
        logger.eval(step, evaluate(model, val_b, c, world, rank, autocast))
    logger.finish()
    return raw


def read_log(path, step):
    """log.jsonl's lines up to `step` (a resumed run repeats the steps after its checkpoint: each
    step is kept once). A torn last line, from a kill during its write, is dropped and said;
    any other line that is not a record is an error naming it."""
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if not (isinstance(rec, dict) and isinstance(rec.get("step"), int)):
            if n == len(lines) and not line.endswith("\n"):
                print(f"{path}: line {n} was torn by a kill during its write; dropped", flush=True)
                continue
            raise UserError(f"{path}: line {n} is not a log record: {line[:80]!r}")
        if rec["step"] <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    return keep


class Logger:
    """Console line per log_interval, log.jsonl, validation lines, wandb when asked (rank 0 only)."""

    def __init__(self, c, rank, total, step):
        self.c, self.rank, self.total, self.start = c, rank, total, step
        self.t_start = time.time()
        log = os.path.join(c.out_dir, "log.jsonl")
        if rank == 0 and os.path.isfile(log) and not c.eval_only:
            keep = read_log(log, step)
            with open(log + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(log + ".tmp", log)
        self.wandb = None
        if c.wandb_log and rank == 0:
            import wandb
            self.wandb = wandb.init(project=c.wandb_project, name=c.wandb_run_name or None, config=c.config,
                                    dir=c.out_dir)

    def step(self, step, metrics, lr, gnorm, batches, dt):
        metrics = dict(metrics)
        supervised = metrics.pop("supervised")   # counted once, globally, before the forward
        tokens = sum(int((b["doc"] >= 0).sum()) for _, b in batches)      # real tokens ...
        positions = sum(b["doc"].numel() for _, b in batches)             # ... of all row positions
        keys = sorted(metrics)
        tokens, positions, *values = all_reduce([float(tokens), float(positions)] + [metrics[k] for k in keys],
                                                self.c.device)
        m = dict(zip(keys, values))
        if self.rank != 0:
            return
        rec = {**m, "lr": lr, "grad_norm": gnorm, "tokens_per_s": tokens / dt, "supervised": supervised,
               "padding": 1 - tokens / positions}
        with open(os.path.join(self.c.out_dir, "log.jsonl"), "a") as f:   # full precision, for scripts
            f.write(json.dumps({"step": step, **rec}) + "\n")
        if self.wandb:
            self.wandb.log(rec, step=step)
        if (self.c.log_interval and step % self.c.log_interval == 0) or step == self.total:
            el = time.time() - self.t_start
            eta = el / (step - self.start) * (self.total - step)
            extra = " ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "loss")
            print(f"step {step}/{self.total} | loss {m.get('loss', 0):.4f} | lr {lr:.2e} | grad {gnorm:.3f} | "
                  f"{rec['tokens_per_s']:,.0f} tok/s | sup {int(supervised)} | pad {100 * rec['padding']:.1f}% | "
                  f"ETA {eta:.0f}s" + (f" | {extra}" if extra else ""), flush=True)

    def eval(self, step, metrics):
        if self.rank == 0:
            print(f"step {step} | val " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
            if self.wandb:
                self.wandb.log({f"val/{k}": v for k, v in metrics.items()}, step=step)

    def finish(self):
        if self.wandb:
            self.wandb.finish()


def main(argv=None):
    c = configure(defaults_from(globals()), argv)
    if int(os.environ.get("RANK", 0)) == 0:
        print("config:")
        print_config(c)
        print("environment:", json.dumps(environment()), flush=True)
    try:
        train(c)
    finally:
        if torch.distributed.is_initialized():
            barrier()   # with gloo, tearing down without it can abort a peer
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    cli(main)
