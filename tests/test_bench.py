"""bench.py --quick: the smoke run CI does, and the fields its JSON line must carry."""
import json

from conftest import run_script


def test_bench_quick_json_has_every_field(tmp_path):
    p = run_script("bench.py", "--quick", f"--plot={tmp_path}/bench.png")
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
    assert open(tmp_path / "bench.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert 0 <= res["padding"]["packed"] < 1 and 0 <= res["padding"]["padded"] < 1
    for name, rows in res["decoding"].items():
        for label, r in rows.items():
            for bs in ("1", "8"):
                assert {"tokens_per_forward", "speed_tokens_per_second"} <= set(r[bs]), (name, label)
            assert "accuracy" in r["8"]
            if "diffusion" not in name:   # diffusion checkpoints have no AR decoding to compare with
                assert "speedup_vs_ar" in r["1"] and "speedup_vs_ar" in r["8"]
    assert res["hf_generate"]["ratio"] > 0
