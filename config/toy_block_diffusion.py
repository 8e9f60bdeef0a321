# Block diffusion (BD3-LM / Fast-dLLM v2 / SDAR) adapted from the AR sft run: blocks of 4, shift=True
# so position i keeps predicting token i+1; decoded block by block with a KV cache.
# python train.py config/toy.py && python train.py config/toy_block_diffusion.py
# python generate.py --init_from=out/toy_block_diffusion --data=data/toy/val.jsonl --method=diffusion --dthreshold=0.9
exec(open("config/toy.py").read())
out_dir = "out/toy_block_diffusion"
init_from = "out/toy"
mode = "diffusion"
block_size = 4
shift = True
gen_length = 0         # no canvas: responses are EOS-padded to whole blocks only
learning_rate = 1e-3
max_length = 384       # prompt + clean response + its noised copy
