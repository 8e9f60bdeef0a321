"""
Tokenizers: one face (encode, decode, the prompt's rendering, saving as transformers loads it) for
the built-in byte and gpt2 (tiktoken, offline), Hugging Face tokenizer folders (with their chat
template) and GGUF files (their tokenizer, through transformers).
"""
import os

from configurator import UserError

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


class Tokenizer:
    """One face for tiktoken (byte, gpt2) and Hugging Face tokenizers."""

    def __init__(self, spec):
        if spec.endswith(".gguf"):   # llama.cpp's file: its tokenizer, as an HF folder
            from hf import gguf_folder
            spec = gguf_folder(spec)
        self.spec, self.hf, self.template = spec, None, None
        if spec in ("byte", "gpt2"):
            import tiktoken
            if spec == "byte":  # 256 byte tokens + specials: no download, no merges
                ranks, pat = {bytes([i]): i for i in range(256)}, r"\S+|\s+"
            else:  # GPT-2 BPE from the files shipped in assets/gpt2 (identical to OpenAI's)
                from tiktoken.load import load_tiktoken_bpe
                ranks = load_tiktoken_bpe(os.path.join(ASSETS, "gpt2", "gpt2.tiktoken"))
                pat = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
            n = len(ranks)
            self.enc = tiktoken.Encoding(name=spec, pat_str=pat, mergeable_ranks=ranks,
                                         special_tokens={"<|endoftext|>": n, "<|mask|>": n + 1})
            self.eos_id, self.mask_id, self.bos_id, self.vocab_size = n, n + 1, None, n + 2
        elif os.path.isdir(spec):
            from transformers import AutoTokenizer
            try:
                self.hf = AutoTokenizer.from_pretrained(spec)
            except Exception as e:
                raise UserError(f"tokenizer {spec}: cannot load a Hugging Face tokenizer ({e})") from None
            if self.hf.eos_token_id is None:
                raise UserError(f"tokenizer {spec}: has no eos token")
            self.template = self.hf.chat_template
            self.eos_id, self.bos_id = self.hf.eos_token_id, self.hf.bos_token_id
            # the tokenizer's own mask token, else a new id past the vocabulary
            self.mask_id = self.hf.mask_token_id if self.hf.mask_token_id is not None else len(self.hf)
            self.vocab_size = max(len(self.hf), self.mask_id + 1)
        else:
            raise UserError(f"unknown tokenizer {spec!r} (byte, gpt2, a Hugging Face tokenizer folder or a .gguf file)")

    def render(self, messages):
        """The prompt text the model sees, ending where the response begins."""
        if self.template:
            return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:\n"

    def encode_batch(self, texts, prompt=False):
        if self.hf is None:
            return self.enc.encode_ordinary_batch(texts)
        # a chat template writes its own BOS; a plain prompt gets the tokenizer's specials
        special = prompt and not self.template
        return self.hf(texts, add_special_tokens=special)["input_ids"]

    def encode(self, text, prompt=False):
        return self.encode_batch([text], prompt)[0]

    def decode(self, ids):
        ids = [int(i) for i in ids if int(i) != self.mask_id]
        return self.enc.decode(ids) if self.hf is None else self.hf.decode(ids)

    def save(self, path):
        """Tokenizer files transformers loads (AutoTokenizer) into `path`: an HF tokenizer's own, or
        for byte / gpt2 the same byte-level BPE rebuilt with the `tokenizers` library."""
        if self.hf is not None:
            self.hf.save_pretrained(path)
            return
        from tokenizers import Tokenizer as Fast, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
        char = byte_chars()
        if self.spec == "byte":   # 256 byte tokens, no merges
            bpe, regex = models.BPE({char[b]: b for b in range(256)}, []), False
        else:                     # GPT-2's own vocabulary and merges (assets/gpt2, as OpenAI released them)
            d = os.path.join(ASSETS, "gpt2")
            bpe, regex = models.BPE.from_file(os.path.join(d, "encoder.json"), os.path.join(d, "vocab.bpe")), True
        fast = Fast(bpe)
        fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex)
        fast.decoder = decoders.ByteLevel()
        tok = PreTrainedTokenizerFast(tokenizer_object=fast, eos_token="<|endoftext|>", mask_token="<|mask|>")
        assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|mask|>"]) == [self.eos_id, self.mask_id]
        tok.save_pretrained(path)


def byte_chars():
    """GPT-2's byte -> printable character map (the alphabet of byte-level BPE vocabularies)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b], n = chr(256 + n), n + 1
    return chars
