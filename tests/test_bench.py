"""bench.py --quick: the smoke run CI does, and the fields its JSON line must carry."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from configurator import UserError, configure, defaults_from
from conftest import run_script


def test_bench_quick_json_has_every_field(tmp_path):
    p = run_script("bench.py", "--quick", f"--plot={tmp_path}/bench.png", f"--out_dir={tmp_path}/runs")
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    lora, gated = "interleaved B=4 lora from sft", "interleaved B=4 gated lora from sft"
    assert set(res["training"]) == {"sft", "refine", "interleaved B=4", "interleaved B=8", "diffusion", lora, gated}
    for r in res["training"].values():
        assert {"step_s", "data_tokens_per_s", "memory_mb", "step_ratio", "memory_ratio", "trainable"} <= set(r)
    assert res["training"][gated]["trainable"] < res["training"]["sft"]["trainable"]
    # gated adapters leave the sft model's own output alone: AR and verify score exactly what sft's AR does
    sft_acc = res["decoding"]["sft"]["ar"]["8"]["accuracy"]
    assert [r["8"]["accuracy"] for r in res["decoding"][gated].values()] == [sft_acc, sft_acc]
    for name in (gated, "interleaved B=4 gated lora self from sft"):   # --verify: token for token its AR
        assert [(r["8"]["same_as_ar"], r["8"]["decoded"]) for r in res["decoding"][name].values()] == [(16, 16)] * 2
    # self-distillation: every training prompt decoded, each answer kept or counted; the drafter trained
    # on them still returns sft's answers
    d = res["self_distill"]
    meta = {k: json.load(open(tmp_path / "runs" / k / "meta.json")) for k in ("data", "data_self")}
    assert d["prompts"] == meta["data"]["splits"]["train"]["rows"]
    assert d["kept"] == sum(s["rows"] for s in meta["data_self"]["splits"].values())
    assert d["kept"] + sum(d["dropped"].values()) == d["prompts"]
    assert [r["8"]["accuracy"] for r in res["decoding"]["interleaved B=4 gated lora self from sft"].values()] == [sft_acc, sft_acc]
    assert open(tmp_path / "bench.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert 0 <= res["padding"]["packed"] < 1 and 0 <= res["padding"]["padded"] < 1
    for name, rows in res["decoding"].items():
        for label, r in rows.items():
            for bs in ("1", "8"):
                assert {"tokens_per_forward", "speed_tokens_per_second"} <= set(r[bs]), (name, label)
            assert "accuracy" in r["8"]
            if "diffusion" not in name:   # diffusion checkpoints have no AR decoding to compare with
                assert "speedup_vs_ar" in r["1"] and "speedup_vs_ar" in r["8"]
                assert 0 <= r["8"]["same_as_ar"] <= r["8"]["decoded"] and (label != "ar" or r["8"]["same_as_ar"] == 16)
    assert res["hf_generate"]["ratio"] > 0
    r = res["forward_cost"]["ratio"]
    assert r["1"] == 1.0 and set(r) == {"1", "2", "4", "8", "16", "32"} and all(v > 0 for v in r.values())
    # values that can be wrong: ratios against the numbers they are ratios of, AR at one token a forward
    sft = res["training"]["sft"]
    for r in res["training"].values():
        assert math.isclose(r["step_ratio"], r["step_s"] / sft["step_s"], rel_tol=1e-6)
        assert math.isclose(r["memory_ratio"], r["memory_mb"] / sft["memory_mb"], rel_tol=1e-6)
    for name, rows in res["decoding"].items():
        if "ar" in rows:
            assert all(rows["ar"][bs]["tokens_per_forward"] == 1.0 for bs in ("1", "8")), name
        for label, r in rows.items():
            if "diffusion" not in name:   # a canvas ending early takes fewer tokens than its steps
                assert all(r[bs]["tokens_per_forward"] >= 1.0 for bs in ("1", "8")), (name, label)
            assert 0.0 <= r["8"]["accuracy"] <= 1.0
            for bs in ("1", "8"):
                if "ar" in rows and "speedup_vs_ar" in r[bs]:
                    want = r[bs]["speed_tokens_per_second"] / rows["ar"][bs]["speed_tokens_per_second"]
                    assert math.isclose(r[bs]["speedup_vs_ar"], want, rel_tol=1e-6), (name, label, bs)
    # a finished run is reused only with the settings it was trained with
    import bench
    b = configure(defaults_from(vars(bench)), ["--quick=True", "--lora_rank=4", "--drafter_steps=1"])
    runs = str(tmp_path / "runs")
    c = bench.train_config(b, f"{runs}/data", bench.run_dir(runs, gated), gated, bench.resolve(bench.RUNS[gated][0], b, runs))
    final = f"{bench.run_dir(runs, gated)}/ckpt_{c.max_iters:07d}"
    bench.check_reuse(c, final)
    for key, value, needle in (("lora_rank", 8, "lora_rank 4 -> 8"), ("max_iters", 24, "max_iters 8 -> 24")):
        with pytest.raises(UserError, match=needle):   # another rank, or another length (not resumed)
            bench.check_reuse(SimpleNamespace(**{**vars(c), key: value}), final)


def test_forward_cost_runs_in_the_dtype_asked(monkeypatch, capsys):
    """bench.py --forward_cost=M --dtype=bfloat16 times the model in bf16 (on a CPU with AMX a bf16
    forward of a few rows costs about one row's); another dtype is refused."""
    import bench
    from conftest import STORIES
    seen = []

    def fake(model, context):
        seen.append(next(model.parameters()).dtype)
        return {"context": context, "t1_ms": 1.0, "ratio": {"1": 1.0}}
    monkeypatch.setattr(bench, "forward_cost_ratios", fake)
    bench.main([f"--forward_cost={STORIES}", "--dtype=bfloat16"])
    assert seen == [torch.bfloat16]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dtype"] == "bfloat16"
    with pytest.raises(UserError, match="dtype='float16': expected float32 or bfloat16"):
        bench.main([f"--forward_cost={STORIES}", "--dtype=float16"])
