"""generate.py: scoring, the command-line contract, AR against the slow reference."""
import json
import os

import pytest
import torch
from conftest import assert_clean_error, needs_invariant_bf16, run_main, run_script

from decoders import sample
from generate import extract_answer, is_correct


@pytest.mark.parametrize("text,want", [
    ("so 3+4=7\n#### 1,234", "1,234"),
    ("the area is \\boxed{\\frac{1}{2}} units", "\\frac{1}{2}"),
    ("first 12 then 7.5 apples", "7.5"),
    ("no answer here", None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_is_correct_normalizes_numbers():
    assert is_correct("#### 1,234", "steps...\n#### 1234")
    assert is_correct("answer \\boxed{42.0}", "#### 42")
    assert not is_correct("#### 41", "#### 42") and not is_correct("nothing", "#### 42")


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, 0.7, g)) for _ in range(300)}
    assert draws == {0, 1}   # 0.5 + 0.3 >= 0.7: the nucleus is the first two


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    assert run_main("prepare.py", f"--out_dir={d}/data", "--toy_rows=400").returncode == 0
    p = run_main("train.py", f"--data_dir={d}/data", f"--out_dir={d}/out", "--max_iters=2", "--n_layer=1",
                   "--n_embd=32", "--n_head=2", "--n_kv_head=2", "--eval_interval=0", "--batch_size=4")
    assert p.returncode == 0, p.stderr
    return d


def test_cli_contract(tiny_ckpt):
    out = tiny_ckpt / "gen.jsonl"
    p = run_script("generate.py", f"--init_from={tiny_ckpt}/out", f"--data={tiny_ckpt}/data/val.jsonl",
                   "--limit=5", "--max_new_tokens=8", f"--out={out}", "--batch_size=2")
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(summary) >= {"n", "tokens", "forwards", "tokens_per_forward", "seconds", "tokens_per_second", "accuracy"}
    rows = [json.loads(l) for l in open(out)]
    assert len(rows) == summary["n"] == 5
    assert all(set(r) >= {"prompt", "completion", "tokens", "forwards", "correct"} for r in rows)
    assert summary["tokens"] == sum(r["tokens"] for r in rows)


def test_cli_errors(tiny_ckpt):
    assert_clean_error(run_script("generate.py", f"--init_from={tiny_ckpt}/out", "--prompt=x", "--method=beam"),
                       "unknown method 'beam'")
    assert_clean_error(run_main("generate.py", f"--init_from={tiny_ckpt}/out"), "exactly one of")
    # a method that does not match how the checkpoint was trained says so
    assert_clean_error(run_main("generate.py", f"--init_from={tiny_ckpt}/out", "--prompt=x", "--method=diffusion"),
                       "cannot decode a checkpoint trained with mode=sft")


def test_same_as_counts_identical_completions(tiny_ckpt, capsys):
    import generate
    from configurator import UserError
    args = [f"--init_from={tiny_ckpt}/out", f"--data={tiny_ckpt}/data/val.jsonl", "--limit=5", "--max_new_tokens=8",
            "--quiet=True"]
    ref, edited, short = (tiny_ckpt / n for n in ("ar.jsonl", "edited.jsonl", "short.jsonl"))
    generate.main([*args, f"--out={ref}"])
    rows = [json.loads(l) for l in open(ref)]
    rows[2]["completion_ids"] = rows[2]["completion_ids"] + [0]   # one row's completion: a token more
    edited.write_text("".join(json.dumps(r) + "\n" for r in rows))
    short.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    capsys.readouterr()
    for path, want in ((ref, 5), (edited, 4)):
        generate.main([*args, f"--same_as={path}"])
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["identical"] == want
    with pytest.raises(UserError, match="4 rows, this run decodes 5"):
        generate.main([*args, f"--same_as={short}"])


def test_out_and_same_as_are_checked_before_decoding(tiny_ckpt, tmp_path, monkeypatch):
    """A decode can take an hour: an --out path that cannot be written is refused and --same_as is
    read before the first forward (making no folder); --out's missing folders are made when it is
    written, whole (no temporary file left)."""
    import generate
    from configurator import UserError
    args = [f"--init_from={tiny_ckpt}/out", f"--data={tiny_ckpt}/data/val.jsonl", "--limit=3", "--max_new_tokens=4",
            "--quiet=True"]
    decoded, decode = [], generate.decode_and_score
    monkeypatch.setattr(generate, "decode_and_score", lambda *a: decoded.append(1) or decode(*a))
    (tmp_path / "adir").mkdir()
    (tmp_path / "a.jsonl").write_text('{"prompt": "not this one", "completion_ids": [1]}\n' * 3)
    for bad, needle in ((f"--out={tmp_path}/adir", "not a file path"), (f"--out={tmp_path}/made/", "not a file path"),
                        (f"--same_as={tmp_path}/none.jsonl", "cannot read"),
                        (f"--same_as={tmp_path}/a.jsonl", "row 1 is not this run's prompt 1")):
        with pytest.raises(UserError, match=needle):
            generate.main([*args, bad])
    assert not decoded and not (tmp_path / "made").exists()
    out = tmp_path / "new" / "folder" / "g.jsonl"
    generate.main([*args, f"--out={out}"])
    assert len(open(out).readlines()) == 3 and os.listdir(out.parent) == ["g.jsonl"] and decoded == [1]


def test_bf16_decodes_on_the_batch_invariant_backend(tiny_ckpt, tmp_path):
    """--dtype=bfloat16 on CPU loads the batch-invariant backend unless --batch_invariant=False, and
    its greedy output is then the same at batch 1 and batch 3; fp32 keeps SDPA."""
    from generate import load
    needs_invariant_bf16()
    out = f"{tiny_ckpt}/out"
    assert load(out, dtype=torch.bfloat16)[0].backend == "invariant"
    assert load(out, dtype=torch.bfloat16, batch_invariant=False)[0].backend == "sdpa"
    assert load(out)[0].backend == "sdpa"
    assert load(out)[0].pack and not load(out, prepack=False)[0].pack   # --prepack: fp32's oneDNN linears
    data = [f"--init_from={out}", f"--data={tiny_ckpt}/data/val.jsonl", "--limit=6", "--max_new_tokens=12",
            "--dtype=bfloat16", "--quiet=True"]
    assert run_main("generate.py", *data, "--batch_size=1", f"--out={tmp_path}/b1.jsonl").returncode == 0
    p = run_main("generate.py", *data, "--batch_size=3", f"--same_as={tmp_path}/b1.jsonl")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["identical"] == 6


def test_bf16_falls_back_to_sdpa_where_the_matmul_is_not_invariant(tiny_ckpt, monkeypatch, capsys):
    import generate
    import model
    monkeypatch.setattr(model, "invariant_matmuls", lambda m: False)
    assert generate.load(f"{tiny_ckpt}/out", dtype=torch.bfloat16)[0].backend == "sdpa"
    assert "not batch-invariant" in capsys.readouterr().err


@pytest.mark.parametrize("units", [False, True])
def test_bf16_on_a_cpu_without_bf16_matrix_units_says_so(tiny_ckpt, monkeypatch, capsys, units):
    """Without AMX or AVX512-BF16 a bf16 forward feeding k tokens costs about k/2 one-token forwards
    (measured on an AVX2 Zen 3): loading bf16 there says so and names float32; fp32, or a CPU with the
    units, says nothing."""
    import generate
    monkeypatch.setattr(generate, "cpu_bf16_units", lambda: units)
    generate.load(f"{tiny_ckpt}/out", dtype=torch.bfloat16, batch_invariant=False)
    assert ("no bf16 matrix units" in capsys.readouterr().err) == (not units)
    generate.load(f"{tiny_ckpt}/out")
    assert "no bf16 matrix units" not in capsys.readouterr().err
