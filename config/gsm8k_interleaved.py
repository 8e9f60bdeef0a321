# Next-block prediction (B=4) on GSM8K from scratch with the GPT-2 tokenizer.
exec(open("config/gsm8k_sft.py").read())
out_dir = "out/gsm8k_interleaved"
mode = "interleaved"
block_size = 4
max_length = 1536   # the clean tokens plus B-1 slots per block of B
