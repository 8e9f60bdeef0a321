"""mode=refine and --method=refine: label alignment, per-iteration backward, exact decoding."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import prepare
from tokenizer import Tokenizer
import objectives
import batching
import train
from bench import SavedBytes
from conftest import Recorder
from configurator import configure, defaults_from
from decoders import decode_ar, decode_refine
from generate import Decoding
from reference import reference_refine
from masks import causal_mask
from model import ModelConfig, Transformer

EOS = 256


def batch(n_rows=2):
    rng = np.random.default_rng(0)
    c = SimpleNamespace(mask_id=257)
    rows = [[objectives.refine_layout(rng.integers(0, 200, size=p + r), p, c) for p, r in ((6, 9), (4, 12))]
            for _ in range(n_rows)]
    return batching.collate(rows, 50, EOS)


def model(seed=0):
    m = Transformer(ModelConfig(vocab_size=320, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))
    m.init_weights(seed)
    return m


def cfg(**kw):
    c = configure(defaults_from(vars(train)), [f"--{k}={v}" for k, v in kw.items()])
    c.eos_id = EOS
    return c


def run_loss(m, b, c, backward=train.Backward(lambda l, final: l.backward()), seed=0):
    norm = {k: float(v) for k, v in objectives.count_refine(b, c).items()}
    return objectives.refine_loss(m, b, c, torch.Generator().manual_seed(seed), norm, backward)


def test_label_alignment_and_noise_only_in_response():
    b, c = batch(), cfg(mode="refine", num_iterations=3)
    rec = Recorder(model())
    run_loss(rec, b, c)
    resp, idx = b["resp"], b["idx"]
    # targets: position i predicts token i+1, only where token i+1 is a response token
    sel = b["tgt"] >= 0
    assert torch.equal(sel[:, :-1], resp[:, 1:]) and not sel[:, -1].any()
    assert torch.equal(b["tgt"][:, :-1][sel[:, :-1]], idx[:, 1:][resp[:, 1:]])
    s0, s1, s2 = rec.inputs
    assert torch.equal(s0[~resp], idx[~resp]) and (s0[resp] == EOS).any()          # EOS noise in the response only
    assert torch.equal(s0[resp & (s0 != idx)], torch.full_like(s0[resp & (s0 != idx)], EOS))
    for s in (s1, s2):                                                            # drafts change only the response
        assert torch.equal(s[~resp], idx[~resp])
    # s1 is the greedy next-token prediction of forward 0, shifted into place
    with torch.no_grad():
        pred = rec.m(s0, b["pos"], causal_mask(b["doc"])).argmax(-1)
    assert torch.equal(s1[:, 1:][resp[:, 1:]], pred[:, :-1][resp[:, 1:]])


def test_one_iteration_without_noise_is_sft():
    b, m = batch(), model()
    c = cfg(mode="refine", num_iterations=1, noise_min=0.0, noise_max=0.0)
    norm = {"tgt": float((b["tgt"] >= 0).sum())}
    with torch.no_grad():
        sft = objectives.sft_loss(m, b, c, None, norm, train.Backward())["loss"]
        ref = run_loss(m, b, c, backward=train.Backward())["loss"]
    assert sft == ref


def test_per_iteration_backward_same_gradients_less_memory():
    b, c = batch(4), cfg(mode="refine", num_iterations=3, ar_loss_weight=0.5)
    grads, peaks = [], []
    for summed in (False, True):
        m, losses, meter = model(), [], SavedBytes()
        backward = train.Backward(lambda l, final: losses.append(l) if summed else l.backward())
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            run_loss(m, b, c, backward)
            if summed:
                sum(losses).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
        peaks.append(meter.peak)
    for n in grads[0]:
        assert (grads[0][n] - grads[1][n]).abs().max() < 1e-6, n
    assert peaks[0] < 0.5 * peaks[1], peaks   # one iteration's activations instead of four


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("rf")
    prepare.prepare(configure(defaults_from(vars(prepare)), [f"--out_dir={d}/data", "--toy_rows=2000"]))
    c = configure(defaults_from(vars(train)), [
        f"--data_dir={d}/data", f"--out_dir={d}/out", "--mode=refine", "--n_layer=2", "--n_embd=64",
        "--n_head=4", "--n_kv_head=2", "--batch_size=8", "--max_iters=80", "--learning_rate=3e-3",
        "--warmup_iters=10", "--eval_interval=0", "--log_interval=1000", "--save_interval=1000"])
    m = train.train(c).eval()
    tok = Tokenizer("byte")
    prompts = [tok.encode(tok.render([{"role": "user", "content": r["prompt"]}]), prompt=True)
               for _, r in prepare.toy_task(10, 5)]
    return m, {"eos_ids": [EOS], "eos_id": EOS, "mask_id": 257, "vocab_size": 258}, prompts


def dcfg(**kw):
    return Decoding(**{"max_new_tokens": 50, "add_eos_length": 8, **kw})   # the rest: generate.py's defaults


def test_no_eos_no_refine_is_ar_and_verify_is_ar_at_any_n(trained):
    m, info, prompts = trained
    ar = [r[0] for r in decode_ar(m, prompts, dcfg(), info)]
    assert [r[0] for r in decode_refine(m, prompts, dcfg(add_eos_length=0, refine_iter=0), info)] == ar
    for N in (1, 4, 16):
        got = decode_refine(m, prompts, dcfg(add_eos_length=N, verify=True), info)
        assert [r[0] for r in got] == ar


@pytest.mark.parametrize("kw", [{}, {"add_eos_length": 3, "refine_iter": 1}, {"verify": True}])
def test_cached_equals_reference_and_batch_equals_single(trained, kw):
    m, info, prompts = trained
    batched = decode_refine(m, prompts[:6], dcfg(**kw), info)
    for p, got in zip(prompts[:6], batched):
        assert got == decode_refine(m, [p], dcfg(**kw), info)[0] == reference_refine(m, p, dcfg(**kw), info)


@pytest.mark.parametrize("schedule", ["uniform", "linear", "cosine"])
def test_noise_schedules_move_the_upper_end(schedule):
    b = batch(8)
    c = cfg(mode="refine", noise_min=0.2, noise_max=0.8, noise_schedule=schedule, max_iters=100)
    hi = {}
    for step in (0, 50, 100):
        r_doc, _ = objectives.noise_ratio(b, c, torch.Generator().manual_seed(0), step / 100)
        assert (r_doc >= 0.2 - 1e-6).all()
        hi[step] = float(r_doc.max())
    if schedule == "uniform":
        assert hi[0] == hi[50] == hi[100] > 0.5
    else:   # from noise_min at the start to the full range at the end (both ramps are half-way at 50%)
        assert hi[0] == pytest.approx(0.2) and hi[100] > 0.5 and hi[0] < hi[50] < hi[100]
        assert hi[50] <= 0.2 + 0.6 * 0.5 + 1e-6
