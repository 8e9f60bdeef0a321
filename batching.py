"""
The training data a step sees: prepare.py's shards memory-mapped, examples laid out by their
mode (objectives.py) and packed into rows, rows collated into tensors, and the deterministic
stream of micro-batches (the step fixes the position: exact resume).
"""
import bisect
import json
import os
from functools import cached_property

import numpy as np
import torch

from configurator import UserError
from objectives import MODES


class Shards:
    """A split from prepare.py, memory-mapped: memory does not grow with the data set."""

    def __init__(self, data_dir, split):
        base = os.path.join(data_dir, split)
        with open(os.path.join(data_dir, "meta.json")) as f:
            self.meta = json.load(f)
        empty = os.path.getsize(base + ".bin") == 0   # np.memmap refuses an empty file
        self.tokens = np.zeros(0, self.meta["dtype"]) if empty else np.memmap(base + ".bin", dtype=self.meta["dtype"], mode="r")
        self.index = np.load(base + ".idx.npy", mmap_mode="r")

    def __len__(self):
        return len(self.index)

    def example(self, i):
        start, plen, length = self.index[i]
        return np.asarray(self.tokens[start:start + length], dtype=np.int64), int(plen)


def pack_rows(lengths, max_length, pack, rng, window=256):
    """Rows of example ids for one epoch, in a shuffled order. Packing is best-fit over a
    window of open rows (lowest waste), so the padding left is a few percent."""
    order = rng.permutation(len(lengths))
    if not pack:
        return [[int(i)] for i in order]
    rows, free, open_rows = [], [], []   # free: sorted remaining capacities, aligned with open_rows
    for i in order:
        L = int(lengths[i])
        j = bisect.bisect_left(free, L)
        if j == len(free):
            if len(open_rows) >= window:   # close the fullest row to bound the window
                rows.append(open_rows.pop(0))
                free.pop(0)
            j = bisect.bisect_left(free, max_length - L)
            free.insert(j, max_length - L)
            open_rows.insert(j, [int(i)])
        else:
            row, cap = open_rows.pop(j), free.pop(j) - L
            row.append(int(i))
            k = bisect.bisect_left(free, cap)
            free.insert(k, cap)
            open_rows.insert(k, row)
    rows += open_rows
    return [rows[i] for i in rng.permutation(len(rows))]   # spread the last, emptier rows out


def collate(layouts, T, pad_id):
    """Concatenate per-example layouts into rows of T: document ids keep examples apart,
    padding fills the rest (its own document, never supervised)."""
    B = len(layouts)
    keys = layouts[0][0].keys()
    out = {k: np.zeros((B, T), dtype=layouts[0][0][k].dtype) for k in keys}
    out["idx"][:] = pad_id
    for k in ("tgt", "ar"):   # targets: padding supervises nothing
        if k in out:
            out[k][:] = -100
    out["doc"] = np.full((B, T), -1, dtype=np.int64)
    for r, row in enumerate(layouts):
        t = 0
        for d, lay in enumerate(row):
            n = len(lay["idx"])
            for k in keys:
                out[k][r, t:t + n] = lay[k]
            out["doc"][r, t:t + n] = d
            t += n
    return {k: torch.from_numpy(v) for k, v in out.items()}


class Batches:
    """The deterministic stream of micro-batches: epoch e's rows are packed from seed + e, and
    step s uses a fixed slice of them, so the position is a function of the step (exact resume).
    Every epoch has steps_per_epoch steps, epoch 0's count: packing draws a new order each
    epoch and may pack it into fewer rows, so a short epoch is topped up with the first rows of
    the next epoch's packing (those examples come twice, once at each end of the boundary)."""

    def __init__(self, shards, c, world, rank):
        self.shards, self.c, self.world, self.rank = shards, c, world, rank
        self.lengths = np.array([MODES[c.mode]["length"](int(p), int(l), c) for _, p, l in shards.index])
        too_long = int((self.lengths > c.max_length).sum())
        if too_long:
            raise UserError(f"{too_long} examples need more than max_length={c.max_length} tokens in mode "
                            f"{c.mode} (longest {self.lengths.max()}); raise max_length or re-run prepare.py")
        self.per_step = c.batch_size * c.grad_accum * world   # rows per optimizer step
        self.packed = {}                                       # epoch -> its packed rows (two at most)

    @cached_property
    def steps_per_epoch(self):
        first = self.packing(0)
        if len(first) < self.per_step:
            raise UserError(f"one optimizer step needs {self.per_step} rows, an epoch has {len(first)}: "
                            f"lower batch_size or gradient_accumulation_steps")
        return len(first) // self.per_step

    def packing(self, e):
        if e not in self.packed:
            self.packed = {k: v for k, v in self.packed.items() if k >= e - 1}
            self.packed[e] = pack_rows(self.lengths, self.c.max_length, self.c.pack, np.random.default_rng([self.c.seed, e]))
        return self.packed[e]

    def rows_for_epoch(self, e):
        """Exactly steps_per_epoch * per_step rows: epoch e's, topped up from epoch e+1's."""
        need = self.steps_per_epoch * self.per_step
        rows = self.packing(e)
        if len(rows) < need:
            rows = rows + self.packing(e + 1)[:need - len(rows)]
        return rows[:need]

    def step(self, step):
        """This rank's micro-batches for optimizer step `step`: [(global micro index, rows)]."""
        spe = self.steps_per_epoch
        rows = self.rows_for_epoch(step // spe)
        start = (step % spe) * self.per_step
        out = []
        for m in range(self.c.grad_accum * self.world):
            if m % self.world == self.rank:
                out.append((m, rows[start + m * self.c.batch_size:start + (m + 1) * self.c.batch_size]))
        return out

    def build(self, rows):
        c = self.c
        layouts = [[MODES[c.mode]["layout"](*self.shards.example(i), c) for i in row] for row in rows]
        T = c.max_length
        if not c.pack:   # the longest row; on CUDA rounded up to a multiple of 128, a few shapes for compiled Flex
            q = 128 if c.device.startswith("cuda") else 1
            T = min(-(-max(sum(len(l["idx"]) for l in row) for row in layouts) // q) * q, c.max_length)
        return collate(layouts, T, c.eos_id)
