"""torchrun on 2 CPU processes (gloo): checkpoints resharded across world sizes, FSDP2 from an HF
folder, evaluation over an odd number of batches, one DDP all-reduce per step; NCCL on CUDA."""
import json
import os
import re

import numpy as np
import pytest
import torch
from conftest import ROOT, STORIES, run_script

import prepare
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


def odd_batch_size(data):
    """A micro-batch size that cuts the validation split into an odd number (>= 3) of micro-batches,
    so two ranks get different numbers of real ones."""
    c = configure(defaults_from(vars(train)), [f"--data_dir={data}", "--max_length=256"])
    c.grad_accum, c.eos_id = 1, 0
    lengths = train.Batches(train.Shards(data, "val"), c, 1, 0).lengths
    rows = len(train.pack_rows(lengths, 256, True, np.random.default_rng(train.PAD_SEED)))
    bs = next(b for b in (1, 2, 3, 4, 5) if -(-rows // b) % 2 and -(-rows // b) >= 3)
    return bs, -(-rows // bs)


def run(data, out, *args, prefix=()):
    p = run_script(*prefix, "train.py", f"--data_dir={data}", f"--out_dir={out}", *COMMON, *args, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def losses(out):
    return [json.loads(l)["loss"] for l in open(os.path.join(out, "log.jsonl"))]


def val_losses(proc):
    return [float(x) for x in re.findall(r"\| val (?:.* )?loss ([\d.]+)", proc.stdout)]


def test_resume_across_world_sizes_from_an_hf_folder(data, tmp_path):
    """FSDP2 on 2 ranks from an HF folder (meta-device init, each rank reading its rows) = one
    process; its sharded checkpoint resumes in 1 process, and a 1-process checkpoint on 2 ranks,
    with the losses of an uninterrupted run. Evaluation covers an odd number of micro-batches."""
    bs, n_val = odd_batch_size(data)
    args = [f"--init_from={STORIES}", f"--batch_size={bs}", "--save_interval=3", "--lr_decay_iters=6",
            "--parallel=fsdp"]
    straight = run(data, tmp_path / "straight", *args, "--max_iters=6")
    two_one = [run(data, tmp_path / "a", *args, "--max_iters=3", prefix=TORCHRUN),
               run(data, tmp_path / "a", *args, "--max_iters=6")]
    one_two = [run(data, tmp_path / "b", *args, "--max_iters=3"),
               run(data, tmp_path / "b", *args, "--max_iters=6", prefix=TORCHRUN)]
    want = losses(tmp_path / "straight")
    assert len(want) == 6 and n_val % 2 == 1
    for out in ("a", "b"):
        assert np.allclose(losses(tmp_path / out), want, rtol=0, atol=1e-5), (out, losses(tmp_path / out), want)
    # validation: the same mean over all n_val micro-batches whatever the number of ranks
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
calls, wrap = [0], train.wrap

def counted(*a):
    model = wrap(*a)
    def hook(state, bucket):
        calls[0] += 1
        return allreduce_hook(state, bucket)
    model.register_comm_hook(None, hook)
    return model

train.wrap = counted
try:
    train.main(sys.argv[1:])
finally:
    json.dump(calls[0], open(os.path.join({out!r}, "allreduce_%s.json" % os.environ["RANK"]), "w"))
"""


def test_ddp_all_reduces_once_per_step(data, tmp_path):
    """refine (two forwards per micro-batch) with 2 micro-batches per rank: one all-reduce per
    optimizer step (a model this small is one DDP bucket), the losses of one process, and
    evaluation over an odd number of micro-batches finishes."""
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
    assert [json.load(open(out / f"allreduce_{r}.json")) for r in (0, 1)] == [3, 3]
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
