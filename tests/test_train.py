"""train.py: stored losses, exact resume, DDP/FSDP2 = single process, packing, export, bad input."""
import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_clean_error, checkpoint_tensors, run_main, run_script, run_train_script

import prepare
from tokenizer import Tokenizer
import objectives
import batching
import train
from configurator import configure, defaults_from
from checkpoint import load_checkpoint
from hf import from_pretrained
from masks import causal_mask
from model import ModelConfig, Transformer

TINY = ["--n_layer=2", "--n_head=2", "--n_kv_head=1", "--n_embd=32", "--max_length=128", "--batch_size=4",
        "--learning_rate=3e-3", "--warmup_iters=2", "--eval_interval=0", "--log_interval=1"]


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy") / "data"
    prepare.prepare(configure(defaults_from(vars(prepare)), [f"--out_dir={d}", "--toy_rows=1500"]))
    return str(d)


def losses(out_dir):
    return [json.loads(l)["loss"] for l in open(os.path.join(out_dir, "log.jsonl"))]


def run_train(toy_data, out, *args, prefix=()):
    proc = run_train_script(f"--data_dir={toy_data}", f"--out_dir={out}", *TINY, *args, prefix=prefix)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def final_weights(out):
    return checkpoint_tensors(out)


def test_sft_reproduces_stored_losses(toy_data, tmp_path):
    run_train(toy_data, tmp_path / "o", "--max_iters=6")
    stored = os.path.join(ROOT, "tests", "data", "sft_first_losses.json")
    got = losses(tmp_path / "o")
    want = json.load(open(stored))   # written by hand when a change is meant to move them
    assert np.allclose(got, want, rtol=1e-5, atol=1e-6), (got, want)
    assert got[-1] < got[0]


def test_resume_equals_uninterrupted(toy_data, tmp_path):
    run_train(toy_data, tmp_path / "straight", "--max_iters=8", "--save_interval=4")
    run_train(toy_data, tmp_path / "split", "--max_iters=4", "--save_interval=4", "--lr_decay_iters=8")
    run_train(toy_data, tmp_path / "split", "--max_iters=8", "--save_interval=4", "--init_from=resume")
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_ranks_match_single_process(toy_data, tmp_path):
    """FSDP2 from scratch (each rank keeps its rows of the same draws) = one process. DDP = one
    process: tests/test_distributed.py (refine, several forwards per micro-batch)."""
    common = ["--max_iters=10", "--gradient_accumulation_steps=2", "--parallel=fsdp"]
    run_train(toy_data, tmp_path / "single", *common)
    run_train(toy_data, tmp_path / "dist", *common,
              prefix=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert np.allclose(losses(tmp_path / "single"), losses(tmp_path / "dist"), rtol=0, atol=1e-5)
    # the checkpoint written from two ranks loads in one process and holds the same weights
    a, b = final_weights(tmp_path / "single"), final_weights(tmp_path / "dist")
    assert all((a[k] - b[k]).abs().max() < 1e-4 for k in a)
    ck = sorted(os.listdir(tmp_path / "dist"))[0]
    assert load_checkpoint(str(tmp_path / "dist" / ck)).num_params() > 0


def test_packing_keeps_documents_apart(toy_data):
    c = configure(defaults_from(vars(train)), [f"--data_dir={toy_data}", "--max_length=128"])
    c = train.resolve(c, 1)
    c.eos_id = 256
    shards = batching.Shards(toy_data, "train")
    T = sum(len(shards.example(i)[0]) for i in (0, 1)) + 7   # two documents and some padding
    b = batching.collate([[objectives.sft_layout(*shards.example(i), c) for i in (0, 1)]], T, 256)
    model = train.Transformer(train.ModelConfig(vocab_size=320, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights(0)
    model.eval()
    with torch.no_grad():
        packed = model(b["idx"], b["pos"], causal_mask(b["doc"]))
        t = 0
        for i in (0, 1):
            tokens, plen = shards.example(i)
            alone = model(torch.from_numpy(tokens)[None])
            assert (packed[0, t:t + len(tokens)] - alone[0]).abs().max() < 1e-5
            t += len(tokens)
    # the supervised count is exactly the response lengths (EOS included)
    assert int((b["tgt"] >= 0).sum()) == sum(len(shards.example(i)[0]) - shards.example(i)[1] for i in (0, 1))


def test_pack_rows_uses_every_example_once():
    lengths = np.random.default_rng(0).integers(10, 120, size=500)
    rows = batching.pack_rows(lengths, 256, True, np.random.default_rng(1))
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(500))
    assert all(lengths[r].sum() <= 256 for r in rows)
    assert 1 - lengths.sum() / (256 * len(rows)) < 0.03   # best-fit leaves little padding


def test_export_hf_and_wandb_offline(toy_data, tmp_path):
    import transformers
    out = tmp_path / "o"   # its own process: wandb (offline there) keeps state in the process
    p = run_script("train.py", f"--data_dir={toy_data}", f"--out_dir={out}", *TINY, "--max_iters=3", "--export_hf=True",
                   "--wandb_log=True")
    assert p.returncode == 0, p.stderr[-3000:]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    ours = from_pretrained(str(out / "hf")).eval()
    x = torch.randint(0, 258, (1, 40))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max() < 1e-4
    runs = [d for d in os.listdir(out / "wandb") if d.startswith("offline-run")]
    assert runs and any(f.endswith(".wandb") for f in os.listdir(out / "wandb" / runs[0]))


def test_zero_intervals_mean_only_at_the_end(toy_data, tmp_path):
    run_train(toy_data, tmp_path / "o", "--max_iters=3", "--save_interval=0", "--log_interval=0")
    assert sorted(os.listdir(tmp_path / "o")) == ["ckpt_0000003", "log.jsonl"] and len(losses(tmp_path / "o")) == 3


def test_bad_input_fails_cleanly(toy_data, tmp_path):
    base = [f"--out_dir={tmp_path}/o", "--max_iters=1"]
    cases = [
        ([f"--data_dir={tmp_path}/nothing"], "no meta.json"),
        ([f"--data_dir={toy_data}", "--mode=ddpm"], "unknown mode 'ddpm'"),
        ([f"--data_dir={toy_data}", "--save_interval=-1"], "save_interval=-1: expected a count >= 0"),
        ([f"--data_dir={toy_data}", f"--init_from={tmp_path}/missing"], "no such folder"),
        ([f"--data_dir={toy_data}", "--init_from=assets/stories260K"], "prepared with tokenizer 'byte'"),
    ]
    stories_data = tmp_path / "stories_data"
    prepare.prepare(configure(defaults_from(vars(prepare)), [f"--out_dir={stories_data}", "--toy_rows=50",
                                                             "--tokenizer=assets/stories260K"]))
    cases.append(([f"--data_dir={stories_data}", "--init_from=assets/stories260K", "--max_length=1024",
                   "--mode=diffusion", "--gen_length=600", "--batch_size=1"], "beyond the model's 512 positions"))
    for args, needle in cases:
        assert_clean_error(run_main("train.py", *base, *args), needle)


def test_eval_only_reports_per_slot_accuracy_and_writes_nothing(toy_data, tmp_path):
    run_train(toy_data, tmp_path / "run", "--max_iters=2", "--mode=interleaved", "--max_length=256")
    p = run_train(toy_data, tmp_path / "eval", "--mode=interleaved", "--max_length=256", "--eval_only=True",
                  f"--init_from={tmp_path / 'run'}", "--eval_iters=2")
    line = [l for l in p.stdout.splitlines() if " val " in l][-1]
    assert "acc_slot0" in line and "acc_slot2" in line and "acc_next" in line
    assert not [d for d in os.listdir(tmp_path / "eval") if d.startswith("ckpt_")]
    assert_clean_error(run_main("train.py", f"--data_dir={toy_data}", f"--out_dir={tmp_path / 'eval'}", *TINY,
                                  "--mode=interleaved", "--block_size=8", "--eval_only=True",
                                  f"--init_from={tmp_path / 'run'}"),
                       "was trained with --mode=interleaved --block_size=4; the config has --mode=interleaved --block_size=8")


def test_sft_acc_next_is_teacher_forced_argmax_accuracy():
    """Responses built token by token, every other one the model's greedy choice: acc_next counts
    those (and any random token that happens to be the greedy one)."""
    c = configure(defaults_from(vars(train)), ["--mode=sft"])
    m = Transformer(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=16)).init_weights(0)
    rng, lays, hits, n = np.random.default_rng(0), [], 0, 0
    for length, p in ((9, 3), (12, 5)):
        toks = rng.integers(0, 50, size=p).tolist()
        while len(toks) < length:
            with torch.no_grad():
                greedy = int(m(torch.tensor([toks]))[0, -1].argmax())
            toks.append(greedy if len(toks) % 2 else int(rng.integers(0, 50)))
            hits, n = hits + (toks[-1] == greedy), n + 1
        lays.append(objectives.sft_layout(np.array(toks), p, c))
    b = batching.collate([lays], 24, 0)
    out = objectives.sft_loss(m, b, c, None, {"tgt": float(n)}, train.Backward())
    assert 0.4 < hits / n < 1 and math.isclose(out["acc_next"], hits / n, rel_tol=1e-6)


def test_torch_compile_matches_eager(toy_data, tmp_path):
    small = ["--max_iters=3", "--n_layer=1", "--n_embd=32", "--n_head=2", "--n_kv_head=2"]
    run_train(toy_data, tmp_path / "eager", *small)
    run_train(toy_data, tmp_path / "compiled", *small, "--compile=True", "--compile_backend=aot_eager")
    assert np.allclose(losses(tmp_path / "eager"), losses(tmp_path / "compiled"), rtol=1e-4)


def test_cpu_bf16_autocasts_and_keeps_fp32_weights(toy_data, tmp_path):
    """--cpu_bf16=True: the forward runs in bf16 (losses near fp32's, not equal to them), the
    weights it trains and saves stay fp32."""
    run_train(toy_data, tmp_path / "fp32", "--max_iters=3")
    run_train(toy_data, tmp_path / "bf16", "--max_iters=3", "--cpu_bf16=True")
    a, b = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert np.allclose(a, b, rtol=2e-2) and a != b, (a, b)
    assert {t.dtype for t in final_weights(tmp_path / "bf16").values() if t.is_floating_point()} == {torch.float32}


def test_epochs_keep_last_and_gradient_checkpointing(toy_data, tmp_path, monkeypatch):
    # epochs: max_iters=0 runs that many epochs of optimizer steps, packing each epoch once
    packs, pack_rows = [], batching.pack_rows
    monkeypatch.setattr(train, "pack_rows", lambda *a: packs.append(1) or pack_rows(*a))
    c = configure(defaults_from(vars(train)), [f"--data_dir={toy_data}", *TINY, "--max_iters=0", "--epochs=2",
                                               f"--out_dir={tmp_path}/e", "--save_interval=3", "--keep_last=2",
                                               "--batch_size=16", "--max_length=256"])
    train.train(c)
    assert len(packs) <= 3   # once per epoch (a short epoch also packs the next, to top up)
    c = train.resolve(c, 1)
    per_epoch = batching.Batches(batching.Shards(toy_data, "train"), c, 1, 0).steps_per_epoch
    assert [json.loads(l)["step"] for l in open(tmp_path / "e" / "log.jsonl")] == list(range(1, 2 * per_epoch + 1))
    # keep_last: only the newest checkpoints stay
    last = 2 * per_epoch
    want = sorted({f"ckpt_{s:07d}" for s in range(3, last + 1, 3)} | {f"ckpt_{last:07d}"})[-2:]
    assert sorted(d for d in os.listdir(tmp_path / "e") if d.startswith("ckpt_")) == want


def test_gradient_checkpointing_same_gradients_less_saved_memory(toy_data):
    from bench import SavedBytes
    c = configure(defaults_from(vars(train)), [f"--data_dir={toy_data}", "--max_length=256"])
    c = train.resolve(c, 1)
    c.eos_id, c.mask_id = 256, 257
    b = batching.Batches(batching.Shards(toy_data, "train"), c, 1, 0).build([[0, 1], [2]])
    grads, peak = {}, {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = train.Transformer(train.ModelConfig(vocab_size=320, n_layer=3, n_head=2, n_kv_head=2, n_embd=32))
        m.init_weights(0)
        m.gradient_checkpointing = ckpt
        meter = SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            objectives.sft_loss(m, b, c, None, {"tgt": 1.0}, train.Backward(lambda loss, final: loss.backward()))
        grads[ckpt], peak[ckpt] = [p.grad.clone() for p in m.parameters()], meter.peak
    assert all(torch.allclose(a, b_, atol=1e-6) for a, b_ in zip(grads[False], grads[True]))
    assert peak[True] < 0.7 * peak[False]


@pytest.mark.parametrize("spec", ["byte", "gpt2"])
def test_export_hf_writes_a_tokenizer_transformers_loads(tmp_path, spec):
    import transformers
    d = tmp_path / "data"
    prepare.prepare(configure(defaults_from(vars(prepare)), [f"--out_dir={d}", "--toy_rows=60", f"--tokenizer={spec}"]))
    run_train(str(d), tmp_path / "o", "--max_iters=1", "--export_hf=True", "--batch_size=2")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "o" / "hf")
    ours = Tokenizer(spec)
    for text in ["Compute 3+4-2.", "héllo  wörld\n\n\tend 日本 <think>\n", "  it's 've"]:
        assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert (hf.eos_token_id, hf.mask_token_id) == (ours.eos_id, ours.mask_id)


@pytest.fixture(scope="module")
def gated_single(toy_data, tmp_path_factory):
    """A base model and gated LoRA + sampler head trained on it in one process (parallel= only
    matters under torchrun): what both torchrun runs below must reproduce."""
    d = tmp_path_factory.mktemp("gated")
    run_train(toy_data, d / "base", "--max_iters=2")
    common = ["--max_iters=4", "--gradient_accumulation_steps=2", "--mode=interleaved", "--max_length=256",
              f"--init_from={d / 'base'}", "--lora_rank=4", "--gated_lora=True", "--sampler_head=True"]
    run_train(toy_data, d / "single", *common)
    return d / "single", common


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_gated_lora_matches_single_process(toy_data, tmp_path, gated_single, parallel):
    single, common = gated_single
    run_train(toy_data, tmp_path / "dist", *common, f"--parallel={parallel}",
              prefix=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert np.allclose(losses(single), losses(tmp_path / "dist"), rtol=0, atol=1e-5)
    a, b = checkpoint_tensors(single), checkpoint_tensors(tmp_path / "dist")
    assert set(a) == set(b) and all((a[k] - b[k]).abs().max() < 1e-4 for k in a)


def test_empty_validation_split_trains_without_evaluation(tmp_path):
    prepare.prepare(configure(defaults_from(vars(prepare)), [f"--out_dir={tmp_path}/d", "--toy_rows=100",
                                                             "--val_fraction=0"]))
    p = run_train(f"{tmp_path}/d", tmp_path / "o", "--max_iters=2", "--eval_interval=1")
    assert p.stdout.count("the validation split is empty") == 1 and "| val " not in p.stdout
    assert_clean_error(run_main("train.py", f"--data_dir={tmp_path}/d", f"--out_dir={tmp_path}/o", *TINY,
                                  "--eval_only=True"), "empty validation split")


def test_every_step_of_every_epoch_is_full_when_epochs_pack_differently(tmp_path):
    d = tmp_path / "d"
    prepare.prepare(configure(defaults_from(vars(prepare)), [f"--out_dir={d}", "--toy_rows=340"]))
    args = [f"--data_dir={d}", f"--out_dir={tmp_path}/o", "--n_layer=1", "--n_head=2", "--n_kv_head=2", "--n_embd=32",
            "--batch_size=4", "--gradient_accumulation_steps=2", "--max_length=256", "--max_iters=0", "--epochs=4",
            "--eval_interval=0", "--log_interval=1000", "--save_interval=1000", "--seed=2"]   # epoch 1 packs short
    c = train.resolve(configure(defaults_from(vars(train)), args), 1)
    b = batching.Batches(batching.Shards(str(d), "train"), c, 1, 0)
    rows = [len(b.packing(e)) for e in range(4)]
    assert min(rows[1:]) < b.steps_per_epoch * 8 <= rows[0], rows   # the case: a later epoch packs short
    for s in range(4 * b.steps_per_epoch):
        assert [len(r) for _, r in b.step(s)] == [4, 4], s
    train.main(args)
    assert [json.loads(l)["step"] for l in open(tmp_path / "o" / "log.jsonl")] == list(range(1, 4 * b.steps_per_epoch + 1))


def test_refine_validation_is_a_function_of_the_weights(toy_data, tmp_path, capsys):
    """noise_schedule=linear moves training noise with the step; validation noise stays fixed, so
    the final evaluation of a run and --eval_only on its checkpoint agree."""
    args = [f"--data_dir={toy_data}", *TINY, "--mode=refine", "--noise_schedule=linear", "--max_iters=4",
            "--eval_interval=4", "--eval_iters=2"]
    train.main([*args, f"--out_dir={tmp_path}/o"])
    last = [l for l in capsys.readouterr().out.splitlines() if "| val " in l][-1]
    train.main([*args, f"--out_dir={tmp_path}/e", "--eval_only=True", f"--init_from={tmp_path}/o"])
    again = [l for l in capsys.readouterr().out.splitlines() if "| val " in l][-1]
    assert last.split("| val ")[1] == again.split("| val ")[1], (last, again)


def test_decay_lr_mask_loss_weight_and_eps_do_what_they_say():
    c = configure(defaults_from(vars(train)), ["--decay_lr=False", "--learning_rate=0.01"])
    assert {train.get_lr(i, c, 100) for i in (0, 10, 99, 500)} == {0.01}
    c = configure(defaults_from(vars(train)), ["--warmup_iters=0"])
    assert train.get_lr(0, c, 100) == c.learning_rate and train.get_lr(100, c, 100) == c.min_lr
    # mask_loss_weight: the slot loss's weight in the loss that is backpropagated
    from conftest import Recorder
    c = configure(defaults_from(vars(train)), ["--mode=interleaved", "--block_size=4", "--mask_loss_weight=0.25"])
    c.eos_id, c.mask_id = 256, 257
    rng = np.random.default_rng(0)
    b = batching.collate([[objectives.interleaved_layout(rng.integers(0, 250, size=p + r), p, c) for p, r in ((5, 9), (4, 12))]],
                      64, 256)
    norm = {k: float(max(v, 1)) for k, v in objectives.count_interleaved(b, c).items()}
    m = Transformer(ModelConfig(vocab_size=320, n_layer=1, n_head=2, n_kv_head=2, n_embd=16)).init_weights(0)
    sent = []
    out = objectives.interleaved_loss(m, b, c, None, norm, train.Backward(lambda loss, final: sent.append(loss.item())))
    assert math.isclose(sent[0], out["loss_ar"] + 0.25 * out["loss_slot"], rel_tol=1e-6) and out["loss_slot"] > 0
    # eps: t ~ U(eps, 1), so eps near 1 masks every response token
    c = configure(defaults_from(vars(train)), ["--mode=diffusion", "--block_size=0", "--gen_length=16", "--eps=0.999999"])
    c.eos_id, c.mask_id = 256, 257
    b = batching.collate([[objectives.diffusion_layout(rng.integers(0, 250, size=12), 4, c)]], 32, 256)
    rec = Recorder(m)
    objectives.diffusion_loss(rec, b, c, torch.Generator().manual_seed(0), {"tgt": 16.0, "ar": 1.0}, train.Backward())
    assert (rec.inputs[0][b["resp"]] == 257).all() and (rec.inputs[0][~b["resp"]] != 257).all()
