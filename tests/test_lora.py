"""LoRA for every mode and gated LoRA for interleaved: oracles are the frozen base model itself,
transformers + peft on the exported files, and an uninterrupted run for resume."""
import copy
import json
import os
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import STORIES, assert_clean_error, checkpoint_tensors, run_main
from safetensors.torch import load_file

import prepare
from tokenizer import Tokenizer
import objectives
import batching
import model
import train
from configurator import UserError, configure, defaults_from
from decoders import decode_ar, decode_blockwise, draft_vocabulary
from generate import Decoding, load
from hf import from_pretrained
from masks import interleaved_mask
from reference import reference_blockwise

TINY = ["--eval_interval=0", "--log_interval=1000", "--warmup_iters=2"]


def train_run(*args):
    c = configure(defaults_from(vars(train)), [*TINY, *args])
    return train.train(c)


@pytest.fixture(scope="module")
def stories_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora") / "stories"
    prepare.prepare(configure(defaults_from(vars(prepare)), [f"--out_dir={d}", "--toy_rows=300",
                                                             f"--tokenizer={STORIES}"]))
    return str(d)


def base_model(vocab_size):
    m = from_pretrained(STORIES)
    m.resize_vocab(vocab_size)
    return m.eval()


def test_step0_is_the_base_and_a_step_changes_only_adapters_and_mask_row(stories_data, tmp_path):
    meta = json.load(open(os.path.join(stories_data, "meta.json")))
    base = base_model(meta["vocab_size"])
    x = torch.randint(0, 512, (2, 33))
    x[0, 7] = meta["mask_id"]
    with torch.no_grad():
        ref = base(x)
        lora = copy.deepcopy(base).add_lora(4, 8.0, 0.0, "all-linear", meta["mask_id"])
        assert torch.equal(lora(x), ref)   # B = 0 and the MASK row copied: exactly the base model
    raw = train_run(f"--data_dir={stories_data}", f"--out_dir={tmp_path}/o", f"--init_from={STORIES}",
                    "--mode=interleaved", "--lora_rank=4", "--max_iters=3", "--batch_size=4", "--max_length=512",
                    "--learning_rate=1e-2")
    trained, frozen = raw.state_dict(), base.state_dict()
    assert set(trained) - set(frozen) == set(raw.lora_state())
    for k, v in frozen.items():
        assert torch.equal(trained[k], v), k
    moved = [k for k, v in raw.lora_state().items() if ".lora_B." in k and v.abs().max() > 0]
    assert len(moved) == len([k for k in raw.lora_state() if ".lora_B." in k])   # every adapter trained
    assert not torch.equal(trained["mask_embed"], frozen["embed_tokens.weight"][meta["mask_id"]])
    with torch.no_grad():
        assert (raw.eval()(x) - ref).abs().max() > 1e-3


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    """A small sft model trained on the toy task, then gated LoRA adapters for next-block drafting."""
    d = tmp_path_factory.mktemp("gated")
    prepare.prepare(configure(defaults_from(vars(prepare)), [f"--out_dir={d}/data", "--toy_rows=3000"]))
    small = [f"--data_dir={d}/data", "--n_layer=2", "--n_embd=64", "--n_head=4", "--n_kv_head=2",
             "--batch_size=8", "--learning_rate=3e-3"]
    train_run(*small, f"--out_dir={d}/sft", "--max_length=256", "--max_iters=150", "--save_interval=150")
    model = train_run(*small, f"--out_dir={d}/gated", f"--init_from={d}/sft", "--mode=interleaved",
                      "--block_size=4", "--max_length=384", "--lora_rank=16", "--gated_lora=True",
                      "--max_iters=100", "--save_interval=100").eval()
    base, _, _ = load(f"{d}/sft")
    info = {"block_size": 4, "eos_ids": [256], "mask_id": 257, "vocab_size": 258}
    rows = [r for _, r in prepare.toy_task(12, 7)]
    tok = Tokenizer("byte")
    prompts = [tok.encode(tok.render([{"role": "user", "content": r["prompt"]}]), prompt=True) for r in rows]
    prompts[3] = prompts[3][:len(prompts[3]) // 2]   # ragged, and a row that ends at another step
    return model, base, info, prompts, d


def test_gated_clean_stream_is_the_base_bit_for_bit(gated):
    model, base, info, _, d = gated
    shards = batching.Shards(f"{d}/data", "val")
    c = configure(defaults_from(vars(train)), ["--mode=interleaved", "--block_size=4"])
    c.mask_id = 257
    b = batching.collate([[objectives.interleaved_layout(*shards.example(i), c) for i in range(3)]], 384, 256)
    mask = interleaved_mask(b["doc"], b["pos"], b["slot"], b["sj"])
    with torch.no_grad():
        got, want = model(b["idx"], b["pos"], mask)[0], base(b["idx"], b["pos"], mask)[0]
    clean, slot = ~b["slot"][0], b["slot"][0]
    assert torch.equal(got[clean], want[clean])
    assert (got[slot] - want[slot]).abs().amax(-1).min() > 1e-3   # every slot moved


def cfg(**kw):
    return Decoding(**{"max_new_tokens": 60, "verify": True, **kw})   # the rest: generate.py's defaults


@pytest.mark.parametrize("tree", [True, False])
def test_gated_verify_is_the_base_models_ar_greedy(gated, tree):
    model, base, info, prompts, _ = gated
    want = decode_ar(base, prompts, cfg(), info)
    got = decode_blockwise(model, prompts, cfg(draft_tree=tree), info)
    assert [r[0] for r in got] == [r[0] for r in want]
    assert len({len(r[0]) for r in want if r[0][-1] == 256}) > 1   # rows end with EOS at different steps
    for p, g in zip(prompts[:4], got):
        assert decode_blockwise(model, [p], cfg(draft_tree=tree), info)[0] == g
    # every forward commits at least one token, and some accepted draft saves one (no threshold on luck)
    assert all(g[1] <= w[1] for g, w in zip(got, want)) and sum(r[1] for r in got) < sum(r[1] for r in want)


def test_sampler_head_verify_is_still_the_base_models_ar_greedy(gated):
    _, base, info, prompts, d = gated
    model = train_run(f"--data_dir={d}/data", "--n_layer=2", "--n_embd=64", "--n_head=4", "--n_kv_head=2",
                      "--batch_size=8", "--learning_rate=3e-3", f"--out_dir={d}/sampler", f"--init_from={d}/sft",
                      "--mode=interleaved", "--block_size=4", "--max_length=384", "--lora_rank=8", "--gated_lora=True",
                      "--sampler_head=True", "--max_iters=20", "--save_interval=20").eval()
    assert model.sampler_head.fc2.weight.abs().max() > 0   # trained
    want = decode_ar(base, prompts[:6], cfg(), info)
    for kw in ({"draft_tree": True}, {"draft_tree": False}, {"draft_slots": 1}, {"draft_slots": 2, "draft_tree": False}):
        got = decode_blockwise(model, prompts[:6], cfg(**kw), info)
        assert [r[0] for r in got] == [r[0] for r in want]
        assert decode_blockwise(model, prompts[1:2], cfg(**kw), info)[0] == got[1] == \
            reference_blockwise(model, prompts[1], cfg(**kw), info)
        assert sum(r[1] for r in got) < sum(r[1] for r in want)   # drafts were accepted
    with pytest.raises(UserError, match="draft_slots=4: expected 0 .all. to 3"):
        decode_blockwise(model, prompts[:1], cfg(draft_slots=4), info)
    # threshold decoding drafts through the sampler chain too: cached = the independent oracle
    for kw in ({}, {"draft_slots": 2}):
        t = cfg(verify=False, threshold=0.5, **kw)
        for p, got in zip(prompts[:3], decode_blockwise(model, prompts[:3], t, info)):
            assert got == reference_blockwise(model, p, t, info)
    loaded, _, _ = load(f"{d}/sampler")
    assert loaded.sampler_head is not None
    # a draft vocabulary (FR-Spec): the most frequent response tokens; the whole vocabulary drafts
    # exactly as no restriction, a small one drafts less but the output stays the AR greedy one
    shards = batching.Shards(f"{d}/data", "train")
    freq = Counter(t for s, p, L in shards.index for t in shards.tokens[s + p:s + L].tolist())
    full = draft_vocabulary(f"{d}/data", 10 ** 6, info)
    assert sorted(full.tolist()) == [t for t in range(258) if t != 257]
    assert [freq[t] for t in full[:20].tolist()] == sorted(freq.values(), reverse=True)[:20]
    plain = decode_blockwise(model, prompts[:6], cfg(), info)
    assert decode_blockwise(model, prompts[:6], cfg(), info, vocab=full) == plain
    got = decode_blockwise(model, prompts[:6], cfg(), info, vocab=draft_vocabulary(f"{d}/data", 3, info))
    assert [r[0] for r in got] == [r[0] for r in want] and sum(r[1] for r in got) > sum(r[1] for r in plain)


def test_generate_loads_gated_checkpoint_without_flags(gated):
    model, _, info, prompts, d = gated
    loaded, linfo, _ = load(f"{d}/gated")
    assert linfo["lora"]["gated"] and linfo["mode"] == "interleaved"
    x = torch.tensor([prompts[0] + [257, 257, 257]])
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_gated_training_under_cpu_bf16_autocast(gated):
    """--cpu_bf16=True on the gated split forward (the clean stream into a KV cache, then the slots
    with a sampler head): it trains, near the fp32 run's losses and not equal to them."""
    d = gated[4]
    args = [f"--data_dir={d}/data", f"--init_from={d}/sft", "--mode=interleaved", "--block_size=4",
            "--max_length=384", "--batch_size=8", "--lora_rank=8", "--gated_lora=True", "--sampler_head=True",
            "--max_iters=2", "--save_interval=100", "--log_interval=1"]
    logs = []
    for name, extra in (("fp32", []), ("bf16", ["--cpu_bf16=True"])):
        train_run(*args, f"--out_dir={d}/cpu_{name}", *extra)
        logs.append([json.loads(l)["loss"] for l in open(f"{d}/cpu_{name}/log.jsonl")])
    assert len(logs[0]) == 2 and all(abs(a - b) < 0.05 * a for a, b in zip(*logs)) and logs[0] != logs[1], logs


def test_gated_checkpoint_loads_in_bf16_with_its_base_fingerprint(gated):
    """generate.py --dtype=bfloat16 on adapters trained in fp32: the base is checked as stored (fp32),
    then the whole model, adapters and sampler head included, runs in bf16 near the fp32 logits."""
    model, _, _, prompts, d = gated
    loaded, _, _ = load(f"{d}/gated", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    x = torch.tensor([prompts[0] + [257, 257, 257]])
    with torch.no_grad():
        want, got = model(x), loaded(x).float()
    assert not torch.equal(got, want) and (got - want).abs().max() < 0.05 * want.abs().max()


def test_peft_and_merged_exports_give_our_logits(stories_data, tmp_path):
    import peft
    import transformers
    out = tmp_path / "o"
    raw = train_run(f"--data_dir={stories_data}", f"--out_dir={out}", f"--init_from={STORIES}", "--lora_rank=4",
                    "--lora_alpha=12", "--lora_targets=q,v,gate,down", "--max_iters=3", "--batch_size=4",
                    "--max_length=512", "--learning_rate=1e-2", "--export_hf=True").eval()
    cfg_ = json.load(open(out / "adapter" / "adapter_config.json"))
    assert cfg_["r"] == 4 and cfg_["lora_alpha"] == 12 and sorted(cfg_["target_modules"]) == [
        "down_proj", "gate_proj", "q_proj", "v_proj"]
    sd = load_file(out / "adapter" / "adapter_model.safetensors")
    assert sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert sd["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (64, 4)
    x = torch.randint(0, 512, (2, 40))
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(STORIES).eval()
    with torch.no_grad():
        ours = raw(x)[..., :512]
        base_logits = hf_base(x).logits
        pm = peft.PeftModel.from_pretrained(hf_base, str(out / "adapter")).eval()
        assert (pm(x).logits - ours).abs().max() < 1e-4
        assert (base_logits - ours).abs().max() > 1e-2   # the adapters do something
        merged = transformers.AutoModelForCausalLM.from_pretrained(out / "hf").eval()
        assert (merged(x).logits[..., :512] - ours).abs().max() < 1e-4


def lora_weights(out):
    return checkpoint_tensors(out)


def test_lora_resume_equals_uninterrupted(stories_data, tmp_path):
    common = [f"--data_dir={stories_data}", f"--init_from={STORIES}", "--mode=interleaved", "--lora_rank=4",
              "--lora_dropout=0.1", "--batch_size=2", "--max_length=512", "--save_interval=3", "--log_interval=1"]

    def run(out, *args):
        p = run_main("train.py", *common, f"--out_dir={out}", *args)
        assert p.returncode == 0, p.stderr[-3000:]

    run(tmp_path / "straight", "--max_iters=6")
    run(tmp_path / "split", "--max_iters=3", "--lr_decay_iters=6")
    run(tmp_path / "split", "--max_iters=6", "--init_from=resume")
    a, b = lora_weights(tmp_path / "straight"), lora_weights(tmp_path / "split")
    assert set(a) == set(b) and "mask_embed" in a
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_bad_input_fails_cleanly(stories_data, tmp_path):
    base = [f"--data_dir={stories_data}", f"--out_dir={tmp_path}/o", "--max_iters=1", "--max_length=512"]
    cases = [
        (["--lora_rank=4"], "adapters need init_from a trained model"),
        ([f"--init_from={STORIES}", "--gated_lora=True"], "gated_lora=True needs mode=interleaved and lora_rank > 0"),
        ([f"--init_from={STORIES}", "--lora_rank=4", "--lora_targets=q,x"], "lora_targets"),
        ([f"--init_from={STORIES}", "--lora_rank=4", "--mode=interleaved", "--gated_lora=True", "--export_hf=True"],
         "cannot be merged"),
    ]
    for args, needle in cases:
        assert_clean_error(run_main("train.py", *base, *args), needle)


def test_moved_or_changed_base_is_named(tmp_path):
    import shutil
    from checkpoint import dcp_call
    prepare.prepare(configure(defaults_from(vars(prepare)), [f"--out_dir={tmp_path}/data", "--toy_rows=100"]))
    small = [f"--data_dir={tmp_path}/data", "--n_layer=1", "--n_embd=32", "--n_head=2", "--n_kv_head=2",
             "--batch_size=2", "--max_iters=1", "--save_interval=1"]
    train_run(*small, f"--out_dir={tmp_path}/base")
    train_run(*small, f"--out_dir={tmp_path}/o", f"--init_from={tmp_path}/base", "--lora_rank=2")
    ck = os.path.join(tmp_path, "base", "ckpt_0000001")
    sd = {k: v + 1e-3 if k.endswith("norm.weight") else v for k, v in checkpoint_tensors(f"{tmp_path}/base").items()}
    shutil.rmtree(os.path.join(ck, "state"))
    dcp_call("save", {"model": sd}, checkpoint_id=os.path.join(ck, "state"), no_dist=True)
    assert_clean_error(run_main("generate.py", f"--init_from={tmp_path}/o", "--prompt=1+2"), "trained on other weights")
    shutil.rmtree(ck)
    assert_clean_error(run_main("generate.py", f"--init_from={tmp_path}/o", "--prompt=1+2"), "is not there")


@pytest.mark.parametrize("sampler", [False, True])
def test_gated_split_forward_equals_one_forward(tmp_path, sampler):
    """Training runs the clean stream without a graph into a cache, then the slots with grad:
    the same slot logits and adapter gradients as one forward over the whole packed layout.
    With a sampler head, each slot is conditioned on the true token at its own position."""
    from model import ModelConfig, Transformer
    prepare.prepare(configure(defaults_from(vars(prepare)), [f"--out_dir={tmp_path}", "--toy_rows=60"]))
    c = configure(defaults_from(vars(train)), ["--mode=interleaved", "--block_size=4", "--gated_lora=True",
                                               f"--sampler_head={sampler}"])
    c.mask_id, c.eos_id = 257, 256
    shards = batching.Shards(str(tmp_path), "train")
    rows = [[objectives.interleaved_layout(*shards.example(i), c) for i in r] for r in ((0, 1, 2), (3,), (4, 5))]
    b = batching.collate(rows, max(sum(len(l["idx"]) for l in r) for r in rows) + 3, 256)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=320, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))
    model.init_weights(0)
    model.add_lora(4, 8.0, 0.0, "all-linear", 257, gated=True, sampler_head=sampler)
    with torch.no_grad():
        for k, p in model.named_parameters():
            if ".lora_B." in k or "fc2" in k:
                p.normal_(0, 0.05)
    lora = [p for p in model.parameters() if p.requires_grad]
    logits, tgt, j = objectives.gated_slot_forward(model, b, c)
    sel = (b["tgt"] >= 0) & b["slot"]
    clean = ~b["slot"] & (b["doc"] >= 0)
    twins = [int((clean[r] & (b["doc"][r] == b["doc"][r, t]) & (b["pos"][r] == b["pos"][r, t])).nonzero()[0, 0])
             for r, t in sel.nonzero().tolist()]
    rows_ = sel.nonzero()[:, 0]
    prev = b["idx"][rows_, torch.tensor(twins)] if sampler else None   # the input token at the slot's position
    ref = model(b["idx"], b["pos"], interleaved_mask(b["doc"], b["pos"], b["slot"], b["sj"]), select=sel, prev=prev)
    assert torch.equal(tgt, b["tgt"][sel]) and torch.equal(j, b["sj"][sel])
    assert (logits - ref).abs().max() < 1e-5
    g1 = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, tgt), lora)
    g2 = torch.autograd.grad(torch.nn.functional.cross_entropy(ref, tgt), lora)
    assert all((a - b_).abs().max() < 1e-5 * max(1.0, b_.abs().max()) for a, b_ in zip(g1, g2))
    assert any(a.abs().max() > 0 for a in g1)


def test_gated_rows_are_a_view_where_every_batch_row_has_its_slots_in_the_same_columns(monkeypatch):
    """A decoding forward whose batch rows hold MASK in the same run of columns runs the adapters
    on a strided view of those rows (no gather or scatter); each row is what it is alone (one run)."""
    m = from_pretrained(STORIES)
    mask_id = m.config.vocab_size - 1
    m.add_lora(4, 8.0, mask_id=mask_id, gated=True).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    idx = torch.randint(0, mask_id, (3, 9))
    idx[:, 5:8] = mask_id
    seen, rows = [], model.gated_rows
    monkeypatch.setattr(model, "gated_rows", lambda gate: seen.append(gate) or rows(gate))
    with torch.inference_mode():
        batch = m(idx)
        alone = torch.cat([m(idx[b:b + 1]) for b in range(3)])
        m(torch.cat([idx[:2], idx[2:].roll(1, -1)]))   # the last row's slots elsewhere: indices
    # (one run of rows, batch 1, adds B's blocks in place without gated_rows: test_fused_adapters...)
    assert seen.count((3, 9, slice(5, 8))) == 4 * m.config.n_layer and slice(5, 8) not in seen
    torch.testing.assert_close(batch, alone)
    with torch.no_grad():
        frozen = from_pretrained(STORIES).eval()(idx)
    assert torch.equal(batch[:, :5], frozen[:, :5]) and not torch.allclose(batch[:, 5:8], frozen[:, 5:8])


def test_gated_rows_keep_the_frozen_bits_on_prepacked_weights(monkeypatch):
    """fp32 decoding through oneDNN (set_prepack): the rows a gated model does not gate are its
    base's bits (the base prepacked too), on whichever path the fold's probe picked, and the gated
    rows get the delta, at batch 2 (the same run of columns in each row) and at batch 1 (B's blocks
    by addmm_). Weights big enough to pack: gate_up 2048x256, down 256x1024, the head."""
    from conftest import every_big_linear_packed, spy_packing
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN (the packed path is off without it)")
    cfg = model.ModelConfig(vocab_size=1100, n_layer=2, n_head=4, n_kv_head=2, n_embd=256, intermediate_size=1024)
    base = model.Transformer(cfg).init_weights(0).eval()
    gated = copy.deepcopy(base).add_lora(8, 16.0, 0.0, "all-linear", 1099, gated=True).eval()
    with torch.no_grad():
        for n, p in gated.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))
    x = torch.randint(0, 1099, (2, 12), generator=torch.Generator().manual_seed(0))
    x[:, 9:] = 1099   # MASK last: the rows before it never see a gated row
    calls = spy_packing(monkeypatch)
    base.set_prepack(), gated.set_prepack()
    for rows in (x, x[:1]):
        with torch.inference_mode():
            a, g = base(rows), gated(rows)
        assert torch.equal(g[:, :9], a[:, :9]) and not torch.allclose(g[:, 9:], a[:, 9:], atol=1e-3)
    assert every_big_linear_packed(calls)


def test_fused_adapters_are_each_projections_own_and_follow_updates(monkeypatch):
    """A LoRA runs its slices as one stacked A and a block-diagonal B; that is each HF projection's
    own B A x (zero for a slice without an adapter). Decoding (inference mode) folds A into the
    layer's matmul: every row it does not gate keeps the frozen layer's bits, the gated rows (a
    slice, B's blocks added one by one; the same slice of every batch row, or indices) and an ungated LoRA get the delta, the layer's weight is a view of the
    folded matrix (no second copy), and the fold follows every in-place update of an adapter."""
    m = from_pretrained(STORIES).add_lora(4, 8.0, targets="q,v,up").eval()
    layer = m.layers[0].self_attn.qkv_proj
    lora = layer.lora
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lora.lora_B.values():
            p.normal_()
    x = torch.randn(3, 5, lora.in_features)
    W0 = layer.weight.detach().clone()

    def by_hand():
        parts = [lora.scale * x @ lora.lora_A[n].T @ lora.lora_B[n].T if n in lora.lora_A else x.new_zeros(3, 5, o)
                 for n, o in lora.slices]
        return torch.cat(parts, -1)
    assert [n for n, _ in lora.slices] == ["q", "k", "v"] and "k" not in lora.lora_A
    torch.testing.assert_close(lora(x), by_hand())
    frozen = F.linear(x, W0, layer.bias)
    gates = (None, slice(4, 9), (3, 5, slice(2, 4)), torch.tensor([1, 6, 7, 14]), torch.tensor([], dtype=torch.long))
    widths, real = [], model.linear   # the rows of each weight the layer multiplies by: which path ran
    monkeypatch.setattr(model, "linear", lambda x, w, b=None, rows=0, packed=None: widths.append(len(w)) or
                        real(x, w, b, rows, packed))
    for one in (True, False):   # False: a call size where appending A would change the frozen rows' bits
        for gate in gates:
            if not one:   # the fold, built on the first pass, says so for this call size
                lora.fold["ok"][15] = False
            widths.clear()
            with torch.inference_mode():
                y = layer(x, gate)
            if not (isinstance(gate, torch.Tensor) and len(gate) == 0):   # [W; A] in one matmul, or W and A apart
                folded, by_b = len(lora.fold["form"][0]), [] if isinstance(gate, slice) else [len(W0)]
                # one run of rows (a slice) adds B's nonzero blocks by addmm_, not through linear
                assert widths == ([folded] + by_b if lora.fold["ok"][15] else [len(W0), folded - len(W0)] + by_b)
            before = y if gate is None else before
            rows = torch.zeros(15, dtype=torch.bool)
            if isinstance(gate, tuple):   # the same run of positions in each of the 3 rows
                rows.view(3, 5)[:, gate[2]] = True
            else:
                rows[gate if gate is not None else slice(None)] = True
            assert y.shape == frozen.shape and torch.equal(y.reshape(15, -1)[~rows], frozen.reshape(15, -1)[~rows])
            torch.testing.assert_close(y.reshape(15, -1)[rows], (frozen + by_hand()).reshape(15, -1)[rows])
    assert set(lora.fold["ok"]) == {15}   # the one call size probed (then set False by hand)
    assert layer.weight.data_ptr() == lora.fold["form"][0].data_ptr()
    assert torch.equal(layer.weight, W0) and torch.equal(m.state_dict()["layers.0.self_attn.qkv_proj.weight"], W0)
    for p in (lora.lora_B["v"], lora.lora_A["q"]):
        with torch.no_grad():
            p.mul_(2.0)
        with torch.inference_mode():
            after = layer(x)
        torch.testing.assert_close(after, frozen + by_hand())
        assert not torch.allclose(after, before)
        before = after
    m.train()
    layer(x).sum().backward()   # training after a decode: the weight is no inference tensor
    assert not layer.weight.is_inference() and lora.lora_A["q"].grad is not None