import contextlib
import importlib
import io
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
STORIES = os.path.join(ROOT, "assets", "stories260K")
sys.path.insert(0, ROOT)


# tests that compare eager FlexAttention on CPU with the dense mask expect its "unfused" warning;
# everywhere else that warning would mean a slow path, so only these tests silence it
EAGER_FLEX = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")


def run_script(*args, timeout=600):
    """Run a repo script as a user would; returns CompletedProcess (text)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_SILENT="true")
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def run_main(script, *args):
    """Run a repo script's main(argv) in this process, as cli() does (a UserError becomes one
    'error:' line on stderr and exit status 1), from the repo root; returns a CompletedProcess like
    run_script's. The same code without an interpreter start-up (seconds a run on 2 cores): the
    tests of the command line itself, torchrun and wandb use run_script."""
    from configurator import UserError
    main = importlib.import_module(script[:-len(".py")]).main
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            code = 1
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def run_train_script(*args, prefix=(), timeout=600):
    """train.py under prefix (torchrun: processes of its own), or in this process without one."""
    if prefix:
        return run_script(*prefix, "train.py", *args, timeout=timeout)
    return run_main("train.py", *args)


def assert_clean_error(proc, *needles):
    """Non-zero exit, one 'error:' line on stderr naming what was wrong, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def shared_data(*parts):
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent (shared data lives beside the repo, not in it)")
    return path


def checkpoint_tensors(out):
    """The model tensors (or adapters) of out's newest checkpoint, read straight from its DCP
    state, with the shapes and dtypes its metadata records."""
    import warnings
    import torch
    import torch.distributed.checkpoint as dcp
    ck = os.path.join(out, sorted(d for d in os.listdir(out) if d.startswith("ckpt_"))[-1], "state")
    md = dcp.FileSystemReader(ck).read_metadata().state_dict_metadata
    sd = {k[len("model."):]: torch.empty(tuple(m.size), dtype=m.properties.dtype)
          for k, m in md.items() if k.startswith("model.")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load({"model": sd}, checkpoint_id=ck, no_dist=True)
    return sd


class Recorder:
    """Wraps a model and records the token ids of every forward (to check what a loss fed it)."""

    def __init__(self, m):
        self.m, self.inputs = m, []

    def __call__(self, idx, *a, **kw):
        self.inputs.append(idx.clone())
        return self.m(idx, *a, **kw)


def needs_invariant_bf16():
    """Skip where this machine's bf16 matmul is not row-invariant (model.py's invariant backend is
    measured on AMX CPUs; generate.py falls back to SDPA elsewhere and says so)."""
    import torch
    from invariant import invariant_matmuls
    from model import ModelConfig, Transformer
    m = Transformer(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=64)).to(torch.bfloat16)
    if not invariant_matmuls(m):
        pytest.skip("this CPU's bf16 matmul gives a row other bits in calls of other sizes (no AMX?)")


def spy_packing(monkeypatch):
    """A list that receives (big enough to pack?, ran packed?) for every linear model.py calls."""
    import model
    from invariant import PACK_MIN
    calls, real = [], model.linear
    monkeypatch.setattr(model, "linear", lambda x, w, b=None, rows=0, packed=None:
                        calls.append((w.numel() >= PACK_MIN, packed is not None)) or real(x, w, b, rows, packed))
    return calls


def every_big_linear_packed(calls):
    return any(big for big, _ in calls) and all(p for big, p in calls if big)
