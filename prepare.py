"""
Prompt/response rows (parquet or jsonl; strings or chat message lists) -> memory-mapped
token shards + meta.json. Streams: parquet by row group, jsonl by line; RAM does not grow
with the data. Every row is accounted for: kept, dropped as too long, or (on_bad_row=skip)
skipped as malformed, each counted with its reason.

    python prepare.py --input=toy --out_dir=data/toy --tokenizer=byte
    python prepare.py config/prepare_gsm8k.py
"""
import json
import os
import random
import shutil
import sys
import time

import numpy as np

from configurator import UserError, configure, cli, defaults_from
from tokenizer import Tokenizer

input = "toy"              # parquet/jsonl path(s), comma-separated; "toy" = the built-in arithmetic task
val_input = ""             # separate validation file(s); else val_fraction of input goes to val
out_dir = "data/toy"
tokenizer = "byte"         # byte | gpt2 | a Hugging Face tokenizer/model folder | a .gguf file (its tokenizer)
prompt_key = "prompt"
response_key = "target"
system_prompt = ""         # prepended as a system message when the row has none
max_length = 512           # rows longer than this (prompt + response + EOS) are dropped and counted
val_fraction = 0.05
seed = 1337
on_bad_row = "error"       # error | skip (skip and count malformed rows)
eos_key = "eos"            # a boolean column, where a row has it: false = the response did not end with EOS
                           # (generate.py --out, cut by max_new_tokens); "" = every response ends with one
truncated = "drop"         # such a row: drop (counted) | keep (without an EOS it did not produce)
toy_rows = 20000           # size of the built-in toy task
chunk_rows = 2048          # rows tokenized per batch call

# ----------------------------------------------------------------------------- rows

def toy_task(n, seed):
    """The embedded task: a number below 20, then 3-5 additions/subtractions of a digit, with a
    <think> trace of the running total and a GSM8K-style final line (small enough that a
    0.9M-parameter model learns it on a laptop CPU in minutes)."""
    rng = random.Random(seed)
    for i in range(n):
        value = rng.randint(0, 19)
        expr, steps = str(value), []
        for _ in range(rng.randint(3, 5)):
            b = rng.randint(1, 9)
            op = "-" if (rng.random() < 0.5 and b <= value) else "+"
            new = value + b if op == "+" else value - b
            steps.append(f"{value}{op}{b}={new}")
            expr, value = f"{expr}{op}{b}", new
        yield i, {"prompt": f"Compute {expr}.", "target": "<think>\n" + "\n".join(steps) + f"\n</think>\n#### {value}"}


def read_rows(path, keys, cfg, optional=()):
    """Yield (row number, row dict) from a parquet file (by row group: the columns keys, and those
    of optional it has) or jsonl (by line)."""
    if path == "toy":
        yield from toy_task(cfg.toy_rows, cfg.seed)
        return
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:
            raise UserError(f"{path}: not a readable parquet file ({e})") from None
        missing = [k for k in keys if k not in pf.schema_arrow.names]
        if missing:
            raise UserError(f"{path}: missing column {missing[0]!r} (columns: {pf.schema_arrow.names})")
        n = 0
        for g in range(pf.num_row_groups):
            cols = list(keys) + [k for k in optional if k and k in pf.schema_arrow.names and k not in keys]
            for row in pf.read_row_group(g, columns=cols).to_pylist():
                yield n, row
                n += 1
    elif path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: row {n}: not valid JSON ({e})") from None
                yield n, row
    else:
        raise UserError(f"{path}: expected a .parquet or .jsonl file")


def _messages(value, what):
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ValueError(f"{what}: expected a string or a list of {{'role': str, 'content': str}} messages, "
                     f"got {type(value).__name__}")


def row_texts(tok, row, pkey, rkey, system, allow_empty=False):
    """(rendered prompt, response text) of one row; ValueError says what is wrong with it.
    allow_empty: a response given as token ids may be EOS alone (a model that stopped at once)."""
    if not isinstance(row, dict):
        raise ValueError(f"expected an object with keys {pkey!r} and {rkey!r}, got a JSON {type(row).__name__}")
    for k in (pkey, rkey):
        if k not in row:
            raise ValueError(f"missing key {k!r}")
        if row[k] is None:
            raise ValueError(f"{k!r} is null")
    messages = _messages(row[pkey], repr(pkey))
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    response = row[rkey]
    if not isinstance(response, str):
        msgs = _messages(response, repr(rkey))
        response = "".join(m["content"] for m in msgs if m["role"] == "assistant")
    if not response.strip() and not allow_empty:
        raise ValueError(f"{rkey!r} is empty")
    prompt = tok.render(messages)
    # a template that already opens the think block: keep <think> once (seed interleaved_sft Q3)
    if prompt.rstrip("\n").endswith("<think>") and response.lstrip().startswith("<think>"):
        response = response.lstrip()[len("<think>"):]
        response = response[1:] if response.startswith("\n") and prompt.endswith("\n") else response
    return prompt, response


# ----------------------------------------------------------------------------- shards

def _npy_header(rows):
    """A .npy header for an (rows, 3) int64 array; its size does not depend on rows."""
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<i8", "fortran_order": False, "shape": (rows, 3)})
    return buf.getvalue()


class ShardWriter:
    """A flat token file written through np.memmap (grown by doubling, cut to size at close)
    and its (start, prompt_len, length) index, appended to the .npy as it grows: flat memory."""

    def __init__(self, path, dtype):
        self.path, self.dtype, self.n, self.cap = path, dtype, 0, 1 << 16
        self.rows, self.pending, self.prompt_tokens, self.max_len = 0, [], 0, 0
        self.idx = open(path[:-len(".bin")] + ".idx.npy", "wb")
        self.idx.write(_npy_header(10 ** 15))  # rewritten with the real row count at close
        self._map()

    def _map(self):
        with open(self.path, "ab") as f:
            f.truncate(self.cap * np.dtype(self.dtype).itemsize)
        self.mm = np.memmap(self.path, dtype=self.dtype, mode="r+", shape=(self.cap,))

    def _remap(self, cap):
        self.mm.flush()
        del self.mm  # unmapping also releases the written pages from our RSS
        self.cap = cap
        self._map()

    def add(self, prompt_ids, response_ids):
        L = len(prompt_ids) + len(response_ids)
        if self.n + L > self.cap:
            self._remap(max(2 * self.cap, self.n + L))
        self.mm[self.n:self.n + len(prompt_ids)] = prompt_ids
        self.mm[self.n + len(prompt_ids):self.n + L] = response_ids
        self.pending.append((self.n, len(prompt_ids), L))
        self.n, self.rows = self.n + L, self.rows + 1
        if len(self.pending) >= 1 << 16:
            self._spill()
            self._remap(self.cap)

    def _spill(self):
        part = np.array(self.pending, dtype=np.int64).reshape(-1, 3)
        part.tofile(self.idx)
        self.prompt_tokens += int(part[:, 1].sum())
        self.max_len = max(self.max_len, int(part[:, 2].max(initial=0)))
        self.pending = []

    def close(self):
        self.mm.flush()
        del self.mm
        with open(self.path, "r+b") as f:
            f.truncate(self.n * np.dtype(self.dtype).itemsize)
        self._spill()
        self.idx.seek(0)
        self.idx.write(_npy_header(self.rows))
        self.idx.close()
        return {"rows": self.rows, "tokens": int(self.n), "prompt_tokens": self.prompt_tokens,
                "response_tokens": int(self.n) - self.prompt_tokens,
                "length": {"mean": self.n / max(self.rows, 1), "max": self.max_len}}


def decoded_response(row, cfg, tok):
    """(the response's token ids when the row carries them, else None; whether it ends with EOS).
    generate.py --out writes completion_ids, the exact tokens the model produced: encoding the
    text again could tokenize it otherwise; such a row must say whether it ended with EOS (eos_key),
    and ends with the EOS id it names (eos_id). A row whose eos_key is false did not end with EOS."""
    if not isinstance(row, dict):
        return None, True   # row_texts names what is wrong with it
    ids = row.get(cfg.response_key + "_ids")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(t, int) and 0 <= t < tok.vocab_size
                                                                 for t in ids)):
        raise ValueError(f"{cfg.response_key + '_ids'!r} should be a list of token ids below {tok.vocab_size}")
    if ids is not None and cfg.eos_key and cfg.eos_key not in row:
        raise ValueError(f"has {cfg.response_key + '_ids'!r} but no {cfg.eos_key!r}: whether it ended with EOS is unknown")
    ended = row.get(cfg.eos_key, True) if cfg.eos_key else True
    if not isinstance(ended, bool):
        raise ValueError(f"{cfg.eos_key!r} should be true or false, got {ended!r}")
    return ids, ended


def is_val(row_global, cfg):
    """A deterministic per-row coin from (seed, row number): independent of chunking."""
    return random.Random(cfg.seed * 1_000_003 + row_global).random() < cfg.val_fraction


def process_chunk(tok, chunk, writers, stats, cfg, val_rows):
    """Tokenize a chunk of (split, row, prompt, response) in two batch calls and write it;
    kept validation rows also go to val.jsonl, for generate.py --data to score."""
    p_ids = tok.encode_batch([c[2] for c in chunk], prompt=True)
    r_ids = tok.encode_batch([c[3] for c in chunk])
    for (split, row, _, _, ids, ended), p, r in zip(chunk, p_ids, r_ids):
        eos = row.get("eos_id", tok.eos_id) if ids is not None else tok.eos_id   # the EOS the model emitted
        r = (ids if ids is not None else r) + ([eos] if ended else [])
        if len(p) + len(r) > cfg.max_length:
            stats[split]["dropped"]["too_long"] = stats[split]["dropped"].get("too_long", 0) + 1
            continue
        writers[split].add(p, r)
        if split == "val":
            val_rows.write(json.dumps({k: row[k] for k in (cfg.prompt_key, cfg.response_key)}) + "\n")


def write_shards(cfg, tok, tmp):
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    writers = {s: ShardWriter(os.path.join(tmp, f"{s}.bin"), dtype) for s in ("train", "val")}
    stats = {s: {"dropped": {}} for s in writers}
    val_rows = open(os.path.join(tmp, "val.jsonl"), "w")
    sources = [(p, None) for p in cfg.input.split(",") if p] + [(p, "val") for p in cfg.val_input.split(",") if p]
    t0, seen, chunk = time.time(), 0, []
    last = t0  # the first progress line after 2 s: small inputs print none
    total_rows = sum(count_rows(p, cfg) for p, _ in sources)
    for path, forced in sources:
        for n, row in read_rows(path, (cfg.prompt_key, cfg.response_key), cfg, (cfg.response_key + "_ids", cfg.eos_key)):
            split = forced or ("val" if (not cfg.val_input and is_val(seen, cfg)) else "train")
            seen += 1
            try:
                ids, ended = decoded_response(row, cfg, tok)
                prompt, response = row_texts(tok, row, cfg.prompt_key, cfg.response_key, cfg.system_prompt,
                                             allow_empty=bool(ids) or (ids is not None and ended))
            except ValueError as e:
                if cfg.on_bad_row != "skip":
                    raise UserError(f"{path}: row {n}: {e} (use --on_bad_row=skip to skip and count such rows)") from None
                stats[split]["dropped"]["malformed"] = stats[split]["dropped"].get("malformed", 0) + 1
                continue
            if not ended and cfg.truncated == "drop":
                stats[split]["dropped"]["no_eos"] = stats[split]["dropped"].get("no_eos", 0) + 1
                continue
            chunk.append((split, row, prompt, response, ids, ended))
            if len(chunk) >= cfg.chunk_rows:
                process_chunk(tok, chunk, writers, stats, cfg, val_rows)
                chunk = []
            if time.time() - last > 2.0:
                last, rate = time.time(), seen / max(time.time() - t0, 1e-9)
                eta = f", ETA {(total_rows - seen) / rate:.0f}s" if total_rows else ""
                print(f"\r{seen:,} rows, {rate:,.0f} rows/s{eta}", end="", file=sys.stderr)
    process_chunk(tok, chunk, writers, stats, cfg, val_rows)
    val_rows.close()
    for s, w in writers.items():
        stats[s].update(w.close())
    if stats["train"]["rows"] == 0:
        raise UserError(f"no training rows left from {seen} read (dropped: {stats['train']['dropped']}, "
                        f"max_length={cfg.max_length})")
    return stats, dtype, time.time() - t0


def count_rows(path, cfg):
    """Rows in a file when cheap to know (parquet metadata, the toy task); 0 = unknown."""
    if path == "toy":
        return cfg.toy_rows
    if path.endswith(".parquet") and os.path.isfile(path):
        import pyarrow.parquet as pq
        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception:
            return 0
    return 0


def check_out_dir(cfg):
    meta = os.path.join(cfg.out_dir, "meta.json")
    if os.path.isdir(cfg.out_dir) and os.listdir(cfg.out_dir):
        if not os.path.isfile(meta):
            raise UserError(f"{cfg.out_dir} exists and is not a prepare.py output (no meta.json); refusing to overwrite")
        with open(meta) as f:
            old = json.load(f).get("tokenizer")
        if old != tokenizer_spec(cfg.tokenizer):
            raise UserError(f"{cfg.out_dir} was prepared with tokenizer {old!r}, not {cfg.tokenizer!r}; "
                            f"choose another out_dir or delete it")


def tokenizer_spec(spec):
    if spec.endswith(".gguf"):
        from hf import gguf_folder
        return gguf_folder(spec)
    return os.path.abspath(spec) if os.path.isdir(spec) else spec


def prepare(cfg):
    if cfg.on_bad_row not in ("error", "skip"):
        raise UserError(f"on_bad_row={cfg.on_bad_row!r}: expected 'error' or 'skip'")
    if cfg.truncated not in ("drop", "keep"):
        raise UserError(f"truncated={cfg.truncated!r}: expected 'drop' or 'keep'")
    tok = Tokenizer(cfg.tokenizer)
    for p in (cfg.input + "," + cfg.val_input).split(","):
        if p and p != "toy" and not os.path.isfile(p):
            raise UserError(f"{p}: file not found")
    check_out_dir(cfg)
    tmp = cfg.out_dir.rstrip("/") + f".tmp-{os.getpid()}"
    os.makedirs(tmp)
    try:
        stats, dtype, seconds = write_shards(cfg, tok, tmp)
        meta = {"tokenizer": tokenizer_spec(cfg.tokenizer), "vocab_size": tok.vocab_size,
                "eos_id": tok.eos_id, "mask_id": tok.mask_id, "bos_id": tok.bos_id,
                "dtype": np.dtype(dtype).name, "max_length": cfg.max_length,
                "prompt_key": cfg.prompt_key, "response_key": cfg.response_key,
                "system_prompt": cfg.system_prompt, "seed": cfg.seed, "val_fraction": cfg.val_fraction,
                "inputs": [{"path": p, "bytes": os.path.getsize(p) if os.path.isfile(p) else None}
                           for p in (cfg.input + "," + cfg.val_input).split(",") if p],
                "splits": stats, "seconds": round(seconds, 2)}
        if tok.hf is not None:
            tok.save(os.path.join(tmp, "tokenizer"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        old = cfg.out_dir.rstrip("/") + f".old-{os.getpid()}"
        if os.path.exists(cfg.out_dir):
            os.rename(cfg.out_dir, old)
        os.rename(tmp, cfg.out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def main(argv=None):
    cfg = configure(defaults_from(globals()), argv)
    meta = prepare(cfg)
    print(file=sys.stderr)
    for s, st in meta["splits"].items():
        print(f"{s}: {st['rows']:,} rows, {st['tokens']:,} tokens, mean length {st['length']['mean']:.1f}, "
              f"max {st['length']['max']}, dropped {st['dropped'] or 0}")
    print(f"wrote {cfg.out_dir} in {meta['seconds']:.1f}s")


if __name__ == "__main__":
    cli(main)
