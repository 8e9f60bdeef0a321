# Masked diffusion on GSM8K from scratch with the GPT-2 tokenizer; answers EOS-padded to 384 tokens.
exec(open("config/gsm8k_sft.py").read())
out_dir = "out/gsm8k_diffusion"
mode = "diffusion"
gen_length = 384
block_size = 0         # one full canvas (LLaDA); block_size > 0 is block diffusion
