"""prepare.py: exact accounting, rendering rules, streaming shards, clean failures."""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import assert_clean_error, run_main, run_script, shared_data

import prepare
from tokenizer import Tokenizer
from configurator import configure, defaults_from


def cfg(**kw):
    return configure(defaults_from(vars(prepare)), [f"--{k}={v}" for k, v in kw.items()])


def load_split(d, split):
    meta = json.load(open(os.path.join(d, "meta.json")))
    toks = np.memmap(os.path.join(d, f"{split}.bin"), dtype=meta["dtype"], mode="r")
    return meta, toks, np.load(os.path.join(d, f"{split}.idx.npy"))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_gsm8k_train_round_trip(tmp_path):
    src = shared_data("gsm8k", "train.jsonl")
    out = tmp_path / "gsm8k"
    meta = prepare.prepare(cfg(input=src, out_dir=out, tokenizer="gpt2", prompt_key="question",
                               response_key="answer", max_length=1024, val_fraction=0.0))
    assert meta["splits"]["train"]["rows"] == 7473 and meta["splits"]["train"]["dropped"] == {}
    _, toks, idx = load_split(out, "train")
    tok = Tokenizer("gpt2")
    rows = [json.loads(l) for l in open(src)]
    for (start, plen, length), row in zip(idx, rows):
        ids = toks[start:start + length]
        assert tok.decode(ids[:plen]) == f"User: {row['question']}\nAssistant:\n"
        assert tok.decode(ids[plen:]) == row["answer"] + "<|endoftext|>"
        assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]


def tiny_chat_tokenizer(path, think):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    t = Tokenizer(models.BPE())
    t.pre_tokenizer, t.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    t.train_from_iterator(["hello world <think> think answer 42"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    gen = "<|assistant|>\n" + ("<think>\n" if think else "")
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}" + gen.replace("\n", "\\n") + "{% endif %}")
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>")
    tok.chat_template = template.replace("\\n", "\n")
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("think", [True, False])
def test_chat_template_and_think_prefix(tmp_path, think):
    tokdir = tiny_chat_tokenizer(tmp_path / "tok", think)
    rows = [{"prompt": [{"role": "user", "content": "hello"}],
             "target": [{"role": "assistant", "content": "<think>\nthink</think>answer 42"}]}]
    src = write_jsonl(tmp_path / "chat.jsonl", rows)
    prepare.prepare(cfg(input=src, out_dir=tmp_path / "out", tokenizer=tokdir, val_fraction=0.0,
                        system_prompt="be brief"))
    _, toks, idx = load_split(tmp_path / "out", "train")
    tok = Tokenizer(tokdir)
    start, plen, length = idx[0]
    prompt, response = tok.decode(toks[start:start + plen]), tok.decode(toks[start + plen:start + length])
    want_prompt = "<|system|>be brief\n<|user|>hello\n<|assistant|>\n" + ("<think>\n" if think else "")
    assert prompt == want_prompt
    # the sequence holds <think> exactly once either way
    assert (prompt + response).count("<think>") == 1
    assert response == ("think</think>answer 42<eos>" if think else "<think>\nthink</think>answer 42<eos>")


def test_parquet_and_jsonl_give_identical_shards(tmp_path):
    rows = [{"prompt": f"q{i} " * (i % 7 + 1), "target": f"a{i}"} for i in range(300)]
    rows[5]["prompt"] = [{"role": "user", "content": "chat prompt"}]
    pq.write_table(pa.Table.from_pylist([{"prompt": json.dumps(r["prompt"]) if isinstance(r["prompt"], list)
                                          else r["prompt"], "target": r["target"]} for r in rows]),
                   tmp_path / "x.parquet", row_group_size=64)
    rows[5]["prompt"] = json.dumps(rows[5]["prompt"])  # same strings in both files
    write_jsonl(tmp_path / "x.jsonl", rows)
    for ext in ("parquet", "jsonl"):
        prepare.prepare(cfg(input=tmp_path / f"x.{ext}", out_dir=tmp_path / ext, tokenizer="byte",
                            chunk_rows=50, val_fraction=0.2))
    for split in ("train", "val"):
        for f in (f"{split}.bin", f"{split}.idx.npy"):
            assert (tmp_path / "parquet" / f).read_bytes() == (tmp_path / "jsonl" / f).read_bytes()
    meta = json.load(open(tmp_path / "jsonl" / "meta.json"))
    assert meta["splits"]["train"]["rows"] + meta["splits"]["val"]["rows"] == 300


def test_over_long_rows_dropped_and_counted_never_cut(tmp_path):
    rows = [{"prompt": "p", "target": "x" * n} for n in (5, 50, 6)]
    prepare.prepare(cfg(input=write_jsonl(tmp_path / "r.jsonl", rows), out_dir=tmp_path / "o",
                        tokenizer="byte", max_length=30, val_fraction=0.0))
    meta, toks, idx = load_split(tmp_path / "o", "train")
    assert meta["splits"]["train"]["dropped"] == {"too_long": 1}
    assert [int(l - p) for _, p, l in idx] == [6, 7]  # 5 and 6 bytes + EOS, untouched


def test_skip_bad_rows_counts_them(tmp_path):
    rows = [{"prompt": "p", "target": "ok"}, {"prompt": "p", "target": ""}, {"prompt": "p"}, "a string", 7]
    prepare.prepare(cfg(input=write_jsonl(tmp_path / "r.jsonl", rows), out_dir=tmp_path / "o",
                        tokenizer="byte", val_fraction=0.0, on_bad_row="skip"))
    meta = json.load(open(tmp_path / "o" / "meta.json"))
    assert meta["splits"]["train"]["rows"] == 1 and meta["splits"]["train"]["dropped"] == {"malformed": 4}


BAD_ROWS = {
    "null_response": ({"prompt": "p", "target": None}, "'target' is null"),
    "empty_response": ({"prompt": "p", "target": "  "}, "'target' is empty"),
    "non_string_content": ({"prompt": [{"role": "user", "content": 3}], "target": "a"}, "expected a string or a list"),
    "malformed_chat": ({"prompt": [{"text": "hi"}], "target": "a"}, "expected a string or a list"),
    "missing_key": ({"question": "p", "target": "a"}, "missing key 'prompt'"),
    "not_an_object": (["p", "a"], "got a JSON list"),
    "a_number": (3, "got a JSON int"),
}


@pytest.mark.parametrize("name", list(BAD_ROWS))
def test_bad_rows_fail_cleanly_naming_the_row(tmp_path, name):
    row, needle = BAD_ROWS[name]
    src = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine", "target": "fine"}] * 3 + [row])
    out = tmp_path / "out"
    proc = run_main("prepare.py", f"--input={src}", f"--out_dir={out}")
    assert_clean_error(proc, "bad.jsonl: row 3", needle)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def test_bad_files_and_settings_fail_cleanly(tmp_path):
    out = tmp_path / "out"
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "p", "target": "t"}])
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "answer": "a"}]), tmp_path / "nocol.parquet")
    too_long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "p", "target": "x" * 100}])
    cases = [
        ([f"--input={tmp_path}/missing.jsonl"], "missing.jsonl: file not found"),
        ([f"--input={tmp_path}/corrupt.parquet"], "not a readable parquet file"),
        ([f"--input={tmp_path}/nocol.parquet"], "missing column 'target'"),
        ([f"--input={too_long}", "--max_length=50"], "no training rows left"),
        ([f"--input={good}", "--tokenizer=sentencepiece9"], "unknown tokenizer"),
        ([f"--input={good}", "--max_lenght=5"], "did you mean 'max_length'"),
    ]
    for args, needle in cases:
        assert_clean_error(run_main("prepare.py", f"--out_dir={out}", *args), needle)
        assert not out.exists() and not [p for p in os.listdir(tmp_path) if "tmp" in p]
    # an out_dir made with another tokenizer is refused, not mixed (the last: the script itself, as a user runs it)
    assert run_main("prepare.py", f"--input={good}", f"--out_dir={out}", "--val_fraction=0").returncode == 0
    before = (out / "train.bin").read_bytes()
    assert_clean_error(run_script("prepare.py", f"--input={good}", f"--out_dir={out}", "--tokenizer=gpt2"),
                       "prepared with tokenizer 'byte'")
    assert (out / "train.bin").read_bytes() == before


def test_toy_task_is_deterministic():
    a, b = list(prepare.toy_task(50, 7)), list(prepare.toy_task(50, 7))
    assert a == b and a != list(prepare.toy_task(50, 8))
    for _, row in a:  # the trace is right: each step's result feeds the next, the answer is the last
        steps = row["target"].split("\n")[1:-2]
        for s in steps:
            lhs, rhs = s.split("=")
            assert eval(lhs) == int(rhs)
        assert row["target"].endswith(f"#### {steps[-1].split('=')[1]}")


def self_distilled(init_from, tokenizer, tmp, rows, max_new_tokens, truncated="keep"):
    """generate.py --data=rows --out=G, then prepare.py --input=G --response_key=completion: the
    training rows and the decoded records, in order. max_new_tokens is one budget, or one per row
    (rows decoded one generate.py call per budget, their records joined in row order)."""
    import generate
    budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(rows)
    recs = [None] * len(rows)
    for n in sorted(set(budgets)):
        idx = [i for i, b in enumerate(budgets) if b == n]
        with open(f"{tmp}/rows.jsonl", "w") as f:
            f.writelines(json.dumps(rows[i]) + "\n" for i in idx)
        generate.main([f"--init_from={init_from}", f"--data={tmp}/rows.jsonl", "--prompt_key=prompt", "--quiet=True",
                       f"--max_new_tokens={n}", f"--out={tmp}/G{n}.jsonl"])
        lines = open(f"{tmp}/G{n}.jsonl").readlines()
        assert len(lines) == len(idx)
        for i, line in zip(idx, lines):
            recs[i] = json.loads(line)
    with open(f"{tmp}/G.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    prepare.prepare(configure(defaults_from(vars(prepare)), [
        f"--input={tmp}/G.jsonl", "--prompt_key=prompt", "--response_key=completion", f"--tokenizer={tokenizer}",
        f"--out_dir={tmp}/sd_{truncated}", "--val_fraction=0", f"--truncated={truncated}"]))
    return recs, f"{tmp}/sd_{truncated}"


def check_round_trip(init_from, recs, data_dir):
    """Each training row holds exactly the tokens decoding fed (the prompt) and produced (the
    completion, and EOS only where the model emitted one)."""
    import generate
    import batching
    from checkpoint import find_checkpoint, load_info
    info = load_info(find_checkpoint(init_from))
    tok = Tokenizer(info["tokenizer_path"])
    shards = batching.Shards(data_dir, "train")
    assert len(shards) == len(recs)
    for i, rec in enumerate(recs):
        tokens, plen = shards.example(i)
        fed = generate.encode_prompts(tok, [(rec["prompt"], None)], info)[0][1]
        assert tokens[:plen].tolist() == fed
        assert tokens[plen:].tolist() == rec["completion_ids"] + ([rec["eos_id"]] if rec["eos"] else [])
        assert not rec["eos"] or rec["eos_id"] in info["eos_ids"]


def test_self_distillation_round_trip_byte(tmp_path):
    import train
    prepare.prepare(configure(defaults_from(vars(prepare)), [f"--out_dir={tmp_path}/d", "--toy_rows=300"]))
    train.main([f"--data_dir={tmp_path}/d", f"--out_dir={tmp_path}/m", "--n_layer=2", "--n_head=2", "--n_kv_head=2",
                "--n_embd=64", "--max_iters=150", "--learning_rate=1e-2", "--batch_size=8", "--eval_interval=0",
                "--log_interval=1000", "--save_interval=1000"])   # enough to end its answers (~50 bytes) with EOS
    rows = [{"prompt": "Compute 2+3."}, {"prompt": [{"role": "user", "content": "Compute 7-4+1."}]},
            {"prompt": "Compute 9+9-9."}, {"prompt": "héllo <think>\n"}]
    budgets = [120, 120, 120, 8]   # room to finish (~50 bytes); 8 bytes cut any answer mid-trace
    recs, d = self_distilled(f"{tmp_path}/m", "byte", tmp_path, rows, budgets)
    assert recs[1]["prompt"] == rows[1]["prompt"]   # the prompt as given, not its rendering
    check_round_trip(f"{tmp_path}/m", recs, d)
    assert {r["eos"] for r in recs} == {True, False}, recs   # both kinds of row occur ...
    recs2, d2 = self_distilled(f"{tmp_path}/m", "byte", tmp_path, rows, budgets, truncated="drop")
    meta = json.load(open(f"{d2}/meta.json"))   # ... and a completion cut short is dropped and counted
    split = meta["splits"]["train"]
    assert split["rows"] == sum(r["eos"] for r in recs) and split["dropped"]["no_eos"] == sum(not r["eos"] for r in recs)
