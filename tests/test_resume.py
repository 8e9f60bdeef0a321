"""A run killed between two checkpoints and started again with the same command (resume=auto)
ends with the weights of a run never interrupted, in every mode, with evaluation on."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, assert_clean_error, checkpoint_tensors, run_script

import prepare
from configurator import configure, defaults_from

SMALL = ["--n_layer=1", "--n_head=2", "--n_kv_head=2", "--n_embd=32", "--batch_size=2", "--learning_rate=3e-3",
         "--warmup_iters=2", "--log_interval=1", "--eval_interval=7", "--eval_iters=2", "--max_iters=30",
         "--save_interval=10", "--max_length=256"]
MODES = {
    "sft": [],
    "refine": ["--mode=refine", "--num_iterations=2", "--ar_loss_weight=1.0"],
    "interleaved": ["--mode=interleaved", "--block_size=4"],
    "diffusion": ["--mode=diffusion", "--gen_length=80"],
    "lora": ["--mode=interleaved", "--block_size=4", "--lora_rank=4", "--lora_dropout=0.1", "--init_from={base}"],
    "gated lora": ["--mode=interleaved", "--block_size=4", "--lora_rank=4", "--gated_lora=True",
                   "--init_from={base}"],
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    prepare.prepare(configure(defaults_from(vars(prepare)), [f"--out_dir={d}/data", "--toy_rows=400"]))
    p = run_script("train.py", f"--data_dir={d}/data", f"--out_dir={d}/base", *SMALL, "--max_iters=2",
                   "--save_interval=2", "--eval_interval=0")
    assert p.returncode == 0, p.stderr[-2000:]
    return d


def steps(out):
    return [json.loads(l)["step"] for l in open(os.path.join(out, "log.jsonl"))]


def weights(out):
    return checkpoint_tensors(out)


@pytest.mark.parametrize("mode", list(MODES))
def test_killed_run_restarted_with_the_same_command_equals_uninterrupted(setup, tmp_path, mode):
    args = [f"--data_dir={setup}/data", *SMALL, *(a.format(base=f"{setup}/base") for a in MODES[mode])]
    straight = run_script("train.py", *args, f"--out_dir={tmp_path}/straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    out = tmp_path / "killed"
    env = dict(os.environ, WANDB_MODE="offline")
    proc = subprocess.Popen([sys.executable, "train.py", *args, f"--out_dir={out}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not (os.path.isfile(out / "log.jsonl") and max(steps(out), default=0) >= 12):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.listdir(out).count("ckpt_0000010") == 1 and "ckpt_0000020" not in os.listdir(out)   # mid-interval
    assert max(steps(out)) > 10
    again = run_script("train.py", *args, f"--out_dir={out}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resume=auto: continuing" in again.stdout
    assert steps(out) == list(range(1, 31))   # each step logged once
    a, b = weights(tmp_path / "straight"), weights(out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_never_refuses_an_out_dir_with_checkpoints(setup):
    p = run_script("train.py", f"--data_dir={setup}/data", f"--out_dir={setup}/base", *SMALL, "--resume=never")
    assert_clean_error(p, "holds another run's checkpoints", "resume=never")
