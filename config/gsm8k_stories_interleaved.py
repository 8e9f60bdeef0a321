# Fine-tune stories260K on GSM8K with next-block prediction (a MASK token is added past its vocabulary).
exec(open("config/gsm8k_stories_refine.py").read())
out_dir = "out/gsm8k_stories_interleaved"
mode = "interleaved"
block_size = 4
