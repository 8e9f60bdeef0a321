"""A run killed between two checkpoints and started again with the same command (resume=auto)
ends with the weights of a run never interrupted, in every mode, with evaluation on."""
import json
import os
import re
import signal

import pytest
import torch
from conftest import ROOT, assert_clean_error, checkpoint_tensors, run_main, run_script

import checkpoint
import prepare
import train
from configurator import UserError, configure, defaults_from

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
    p = run_main("train.py", f"--data_dir={d}/data", f"--out_dir={d}/base", *SMALL, "--max_iters=2",
                   "--save_interval=2", "--eval_interval=0")
    assert p.returncode == 0, p.stderr[-2000:]
    return d


def steps(out):
    return [json.loads(l)["step"] for l in open(os.path.join(out, "log.jsonl"))]


def weights(out):
    return checkpoint_tensors(out)


KILL_AT = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train
logged = train.Logger.step

def step(self, s, *a):   # SIGKILL right after step {step} is logged: mid-interval, no race
    logged(self, s, *a)
    if s == {step}:
        os.kill(os.getpid(), signal.SIGKILL)

train.Logger.step = step
train.main(sys.argv[1:])
"""


@pytest.mark.parametrize("mode", list(MODES))
def test_killed_run_restarted_with_the_same_command_equals_uninterrupted(setup, tmp_path, mode, capsys):
    """The uninterrupted run and the restart run in this process (train.main, the command's own
    entry point); the killed one is a process of its own."""
    args = [f"--data_dir={setup}/data", *SMALL, *(a.format(base=f"{setup}/base") for a in MODES[mode])]
    train.main([*args, f"--out_dir={tmp_path}/straight"])
    out = tmp_path / "killed"
    script = tmp_path / "kill.py"
    script.write_text(KILL_AT.format(root=ROOT, step=12))
    killed = run_script(str(script), *args, f"--out_dir={out}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert os.listdir(out).count("ckpt_0000010") == 1 and "ckpt_0000020" not in os.listdir(out)   # mid-interval
    assert steps(out) == list(range(1, 13))
    capsys.readouterr()
    train.main([*args, f"--out_dir={out}"])
    assert "resume=auto: continuing" in capsys.readouterr().out
    assert steps(out) == list(range(1, 31))   # each step logged once
    a, b = weights(tmp_path / "straight"), weights(out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_never_refuses_an_out_dir_with_checkpoints(setup):
    p = run_script("train.py", f"--data_dir={setup}/data", f"--out_dir={setup}/base", *SMALL, "--resume=never")
    assert_clean_error(p, "holds another run's checkpoints", "resume=never")


def run_in_process(setup, out, *args):
    train.main([f"--data_dir={setup}/data", f"--out_dir={out}", *SMALL, "--eval_interval=0", "--max_iters=2",
                "--save_interval=2", *args])


def test_resume_refuses_a_changed_objective_model_adapters_or_batches(setup, tmp_path, capsys):
    out = tmp_path / "il"
    run = lambda *a: run_in_process(setup, out, "--mode=interleaved", "--block_size=4", *a)
    run()
    for args, needle in [(["--mode=sft"], "mode 'interleaved' -> 'sft'"), (["--block_size=8"], "block_size 4 -> 8"),
                         (["--lora_rank=4", f"--init_from={setup}/base"], "lora_rank 0 -> 4"),
                         (["--n_embd=64"], "n_embd 32 -> 64"), (["--batch_size=3"], "batch_size 2 -> 3"),
                         (["--seed=7"], "seed 1337 -> 7")]:
        with pytest.raises(UserError, match=re.escape(needle)):
            run(*args)
    p = run_script("train.py", f"--data_dir={setup}/data", f"--out_dir={out}", *SMALL, "--mode=sft", "--block_size=8")
    assert_clean_error(p, "mode 'interleaved' -> 'sft'", "block_size 4 -> 8")
    # how long it runs, what it reports and the optimizer's settings may change, and are said
    capsys.readouterr()
    run("--max_iters=4", "--learning_rate=1e-3")
    said = capsys.readouterr().out
    assert "max_iters 2 -> 4" in said and "learning_rate 0.003 -> 0.001" in said
    assert steps(out) == [1, 2, 3, 4]
    # a run already at max_iters says so, trains nothing and writes nothing
    before = {d: os.path.getmtime(out / d) for d in os.listdir(out)}
    run("--max_iters=4", "--learning_rate=1e-3")
    assert "is at step 4 and max_iters=4: nothing to train" in capsys.readouterr().out
    assert {d: os.path.getmtime(out / d) for d in os.listdir(out)} == before


def test_a_torn_last_log_line_is_dropped_and_said_once(setup, tmp_path, capsys):
    out = tmp_path / "torn"
    run_in_process(setup, out)
    with open(out / "log.jsonl", "a") as f:   # killed while writing step 3's record
        f.write('{"step": 3, "loss": 2.')
    capsys.readouterr()
    run_in_process(setup, out, "--max_iters=4")
    assert capsys.readouterr().out.count("was torn by a kill during its write; dropped") == 1
    assert steps(out) == [1, 2, 3, 4]
    lines = open(out / "log.jsonl").readlines()
    lines[1] = "not a record\n"   # damage anywhere else is not guessed at
    open(out / "log.jsonl", "w").writelines(lines)
    with pytest.raises(UserError, match="log.jsonl: line 2 is not a log record"):
        run_in_process(setup, out, "--max_iters=6")


def test_checkpoint_replace_leaves_one_whole_copy_whenever_it_is_killed(tmp_path, monkeypatch):
    final, tmp = tmp_path / "ckpt_0000010", tmp_path / "ckpt_0000010.tmp"
    for d, text in ((final, "old"), (tmp, "new")):
        d.mkdir()
        (d / "w").write_text(text)
    rename, calls = os.rename, []

    def killed_after_one(a, b):
        if calls:
            raise KeyboardInterrupt   # the kill, between the two renames
        calls.append(1)
        rename(a, b)
    monkeypatch.setattr(checkpoint.os, "rename", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.replace_dir(str(tmp), str(final))
    monkeypatch.undo()
    assert not final.exists() and checkpoint.latest_checkpoint(str(tmp_path)) is None
    checkpoint.restore_aside(str(tmp_path))   # what the next run does first
    assert (final / "w").read_text() == "old"
    checkpoint.replace_dir(str(tmp), str(final))
    assert (final / "w").read_text() == "new" and os.listdir(tmp_path) == ["ckpt_0000010"]
