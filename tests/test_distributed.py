"""torchrun on 2 CPU processes (gloo): checkpoints resharded across world sizes, FSDP2 from an HF
folder, evaluation over an odd number of batches, one DDP all-reduce per step; NCCL on CUDA."""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import ROOT, STORIES, run_script, run_train_script

import prepare
import batching
import train
from configurator import configure, defaults_from

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
COMMON = ["--log_interval=1", "--warmup_iters=2", "--learning_rate=3e-3", "--max_length=256",
          "--gradient_accumulation_steps=2", "--eval_iters=1000", "--eval_interval=3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("dist") / "stories")
    prepare.prepare(configure(defaults_from(vars(prepare)), [f"--out_dir={d}", "--toy_rows=300",
                                                             f"--tokenizer={STORIES}", "--val_fraction=0.1"]))
    return d


def val_rows(data):
    """The number of packed validation rows (micro-batches at batch_size=1)."""
    c = train.resolve(configure(defaults_from(vars(train)), [f"--data_dir={data}", "--max_length=256",
                                                             f"--out_dir={data}/none"]), 1, {"eos_id": 0})
    lengths = batching.Batches(batching.Shards(data, "val"), c, 1, 0).lengths
    return len(batching.pack_rows(lengths, 256, True, np.random.default_rng(train.PAD_SEED)))


def odd_batch_size(data):
    """A micro-batch size that cuts the validation split into an odd number (>= 3) of micro-batches,
    so two ranks get different numbers of real ones."""
    rows = val_rows(data)
    bs = next(b for b in (1, 2, 3, 4, 5) if -(-rows // b) % 2 and -(-rows // b) >= 3)
    return bs, -(-rows // bs)


def run(data, out, *args, prefix=()):
    p = run_train_script(f"--data_dir={data}", f"--out_dir={out}", *COMMON, *args, prefix=prefix, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def losses(out):
    return [json.loads(l)["loss"] for l in open(os.path.join(out, "log.jsonl"))]


def val_losses(proc):
    return [float(x) for x in re.findall(r"\| val (?:.* )?loss ([\d.]+)", proc.stdout)]


def test_resume_across_world_sizes_from_an_hf_folder(data, tmp_path):
    """FSDP2 on 2 ranks from an HF folder (meta-device init, each rank reading its rows) = one
    process; its sharded checkpoint resumes in 1 process, and a 1-process checkpoint on 2 ranks,
    with the losses of an uninterrupted run. Validation is the same fixed set of 3 micro-batches
    (of more: 2 ranks must not see 6) on any number of ranks, token-weighted."""
    bs, n_val = 1, val_rows(data)
    args = [f"--init_from={STORIES}", f"--batch_size={bs}", "--save_interval=3", "--lr_decay_iters=6",
            "--parallel=fsdp", "--eval_iters=3"]
    straight = run(data, tmp_path / "straight", *args, "--max_iters=6")
    two_one = [run(data, tmp_path / "a", *args, "--max_iters=3", prefix=TORCHRUN),
               run(data, tmp_path / "a", *args, "--max_iters=6")]
    one_two = [run(data, tmp_path / "b", *args, "--max_iters=3"),
               run(data, tmp_path / "b", *args, "--max_iters=6", prefix=TORCHRUN)]
    want = losses(tmp_path / "straight")
    assert len(want) == 6 and n_val >= 6
    for out in ("a", "b"):
        assert np.allclose(losses(tmp_path / out), want, rtol=0, atol=1e-5), (out, losses(tmp_path / out), want)
    # validation: the same token-weighted mean over the same 3 micro-batches whatever the number of ranks
    vals = val_losses(straight)
    assert len(vals) == 3
    for procs in (two_one, one_two):
        got = val_losses(procs[0]) + val_losses(procs[1])[1:]   # the resumed run evaluates step 3 again
        assert np.allclose(got, vals, rtol=0, atol=1e-5), (got, vals)
    # a 2-rank checkpoint is one folder that generate.py loads in one process
    p = run_script("generate.py", f"--init_from={tmp_path / 'b'}", "--prompt=Once upon", "--max_new_tokens=4")
    assert p.returncode == 0, p.stderr[-2000:]


COUNTER = """
import json, os, sys
sys.path.insert(0, {root!r})
import train
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
calls, where, wrap, step, loss = [], [0, 0], train.wrap, train.train_step, train.MODES["refine"]["loss"]

def counted(*a):   # every all-reduce (one per DDP bucket) is recorded with the step and micro-batch
    model = wrap(*a)
    def hook(state, bucket):
        calls.append(list(where))
        return allreduce_hook(state, bucket)
    model.register_comm_hook(None, hook)
    return model

def counted_step(model, batches, c, world, s, *a):
    where[:] = [s, 0]
    return step(model, batches, c, world, s, *a)

def counted_loss(*a, **kw):
    where[1] += 1
    return loss(*a, **kw)

train.wrap, train.train_step, train.MODES["refine"]["loss"] = counted, counted_step, counted_loss
try:
    train.main(sys.argv[1:])
finally:
    json.dump(calls, open(os.path.join({out!r}, "allreduce_%s.json" % os.environ["RANK"]), "w"))
"""


def test_ddp_all_reduces_once_per_step(data, tmp_path):
    """refine (two forwards per micro-batch) with 2 micro-batches per rank: gradients are
    all-reduced in the last micro-batch's backward only, the same number of buckets each step
    (whatever DDP's bucket sizing), the losses of one process, and evaluation over an odd number
    of micro-batches finishes."""
    bs, _ = odd_batch_size(data)
    out = tmp_path / "ddp"
    os.makedirs(out)
    script = tmp_path / "count.py"
    script.write_text(COUNTER.format(root=ROOT, out=str(out)))
    args = ["--mode=refine", "--num_iterations=2", f"--init_from={STORIES}", f"--batch_size={bs}",
            "--gradient_accumulation_steps=4", "--max_iters=3", "--save_interval=100"]
    run(data, tmp_path / "single", *args)
    p = run_script(*TORCHRUN, str(script), f"--data_dir={data}", f"--out_dir={out}", *COMMON, *args, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    for r in (0, 1):
        calls = json.load(open(out / f"allreduce_{r}.json"))
        per_step = [sum(1 for s, _ in calls if s == step) for step in range(3)]
        assert {m for _, m in calls} == {2} and per_step[0] >= 1 and len(set(per_step)) == 1, calls
    assert np.allclose(losses(out), losses(tmp_path / "single"), rtol=0, atol=1e-5)
    assert len(val_losses(p)) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL, bf16, compiled FlexAttention)")
def test_torchrun_nccl_on_cuda(data, tmp_path):
    """The GPU path as the README runs it: torchrun, NCCL, FSDP2 in bf16, compiled Flex, a sharded
    checkpoint, evaluation; then resumed."""
    args = [f"--init_from={STORIES}", "--batch_size=4", "--device=cuda", "--compile=True", "--parallel=fsdp",
            "--gradient_accumulation_steps=1", "--save_interval=2"]
    one = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1")
    run(data, tmp_path / "g", *args, "--max_iters=2", prefix=one)
    run(data, tmp_path / "g", *args, "--max_iters=4", prefix=one)
    got = losses(tmp_path / "g")
    assert len(got) == 4 and all(np.isfinite(got))


def test_ddp_trains_the_mask_row_through_micro_batches_without_mask(data, tmp_path):
    """LoRA in interleaved mode trains the MASK row; an example with a one-token response has no
    slot, so a micro-batch of such examples holds no MASK, and DDP must still find every trainable
    tensor in the graph. DDP = one process; so is validation over fewer micro-batches than ranks."""
    d = tmp_path / "short"
    shutil.copytree(data, d)
    idx = np.array(np.load(d / "train.idx.npy"))
    idx[::2, 2] = idx[::2, 1] + 1   # (start, prompt_len, length): every other response one token
    np.save(d / "train.idx.npy", idx)
    args = ["--mode=interleaved", "--block_size=4", f"--init_from={STORIES}", "--lora_rank=4", "--pack=False",
            "--batch_size=1", "--max_iters=4", "--eval_interval=2", "--eval_iters=1", "--save_interval=100"]
    c = train.resolve(configure(defaults_from(vars(train)), [f"--data_dir={d}", f"--out_dir={tmp_path}/x",
                                                             *COMMON, *args]), 2, {"eos_id": 0, "mask_id": 1})
    shards = batching.Shards(str(d), "train")
    no_mask = [all(shards.index[i][2] - shards.index[i][1] == 1 for row in rows for i in row)
               for s in range(3) for r in (0, 1) for _, rows in batching.Batches(shards, c, 2, r).step(s)]
    assert any(no_mask) and not all(no_mask)   # the case: some ranks' micro-batches (not the last step's) hold no MASK
    single = run(str(d), tmp_path / "single", *args)
    ddp = run(str(d), tmp_path / "ddp", *args, prefix=TORCHRUN)
    assert np.allclose(losses(tmp_path / "ddp"), losses(tmp_path / "single"), rtol=0, atol=1e-5)
    # one validation micro-batch on two ranks: rank 1 has none of its own and still takes part
    assert len(val_losses(single)) == 3 and val_losses(ddp) == val_losses(single)
