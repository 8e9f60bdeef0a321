# Adapt the AR stories260K to masked diffusion on GSM8K the Dream way: shift=True keeps
# position i predicting token i+1 as the pretrained model does.
exec(open("config/gsm8k_stories_refine.py").read())
out_dir = "out/gsm8k_stories_diffusion"
mode = "diffusion"
shift = True
gen_length = 256
block_size = 0         # one full canvas (LLaDA); block_size > 0 is block diffusion
ar_loss_weight = 0.0   # refine's AR term does not apply: a full canvas has no causal clean stream
