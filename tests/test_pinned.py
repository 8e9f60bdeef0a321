"""Numbers pinned before objectives.py and checkpoint.py were split out of train.py and model.py:
the first steps' losses of every mode fine-tuning stories260K (real weights), and the text and
forwards of every decoder on the models so trained. A refactor must reproduce them. tests/data/pinned.json is written only by hand, by
running this file (`python tests/test_pinned.py`) on the code whose numbers are to be kept."""
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import generate  # noqa: E402
import prepare  # noqa: E402
import train  # noqa: E402
from configurator import configure, defaults_from  # noqa: E402

PINNED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "pinned.json")
STORIES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "stories260K")
TINY = [f"--init_from={STORIES}", "--batch_size=2", "--learning_rate=1e-3",
        "--warmup_iters=2", "--max_iters=4", "--save_interval=4", "--eval_interval=0", "--log_interval=1000",
        "--max_length=256"]
RUNS = {   # name: (training flags, [(label, decoding flags)])
    "sft": ([], [("ar", ["--method=ar"])]),
    "refine": (["--mode=refine", "--num_iterations=2", "--ar_loss_weight=1.0"],
               [("refine", ["--method=refine"]), ("refine verify", ["--method=refine", "--verify=True"])]),
    "interleaved": (["--mode=interleaved", "--block_size=4"],
                    [("blockwise", ["--method=blockwise", "--threshold=0.3"]),
                     ("blockwise verify", ["--method=blockwise", "--verify=True"])]),
    "diffusion": (["--mode=diffusion", "--block_size=0", "--gen_length=32"],
                  [("diffusion", ["--method=diffusion", "--steps=16"]),
                   ("diffusion semi-AR", ["--method=diffusion", "--block_length=8", "--alg=origin"])]),
    "block diffusion": (["--mode=diffusion", "--block_size=4", "--gen_length=32", "--shift=True",
                         "--causal_clean=True", "--ar_loss_weight=1.0"],
                        [("blocks", ["--method=diffusion"]), ("blocks verify", ["--method=diffusion", "--verify=True", "--dthreshold=0.5"])]),
    "gated": (["--mode=interleaved", "--block_size=4", "--lora_rank=4", "--gated_lora=True", "--sampler_head=True",
               ], [("gated verify", ["--method=blockwise", "--verify=True"])]),
}
PROMPTS = ["Once upon a time", "The little dog wanted to", "Lily and Tom went to the park. They"]   # varied text: real weights


def measure(tmp):
    prepare.prepare(configure(defaults_from(vars(prepare)), [f"--out_dir={tmp}/data", "--toy_rows=200",
                                                             f"--tokenizer={STORIES}"]))
    with open(f"{tmp}/prompts.txt", "w") as f:
        f.write("\n".join(PROMPTS) + "\n")
    got = {}
    for name, (flags, decoders) in RUNS.items():
        out = f"{tmp}/{name.replace(' ', '_')}"
        train.main([f"--data_dir={tmp}/data", f"--out_dir={out}", *TINY, *flags])
        rec = {"losses": [json.loads(l)["loss"] for l in open(f"{out}/log.jsonl")], "decoded": {}}
        for label, dflags in decoders:
            generate.main([f"--init_from={out}", f"--prompts_file={tmp}/prompts.txt", "--max_new_tokens=24",
                           f"--out={tmp}/gen.jsonl", *dflags])
            rec["decoded"][label] = [[r["completion"], r["forwards"]] for r in map(json.loads, open(f"{tmp}/gen.jsonl"))]
        got[name] = rec
    return got


def test_refactors_keep_every_modes_losses_and_every_decoders_tokens(tmp_path):
    want = json.load(open(PINNED))
    got = measure(str(tmp_path))
    assert set(got) == set(want)
    for name in want:
        assert np.allclose(got[name]["losses"], want[name]["losses"], rtol=1e-5, atol=1e-6), name
        assert got[name]["decoded"] == want[name]["decoded"], name


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        json.dump(measure(d), open(PINNED, "w"), indent=1)
    print(f"wrote {PINNED}")
