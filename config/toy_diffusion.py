# LLaDA-style masked diffusion on the toy task, the same budget as config/toy.py.
# python train.py config/toy_diffusion.py && python generate.py --init_from=out/toy_diffusion \
#     --data=data/toy/val.jsonl --method=diffusion --max_new_tokens=80 --alg=entropy
exec(open("config/toy.py").read())
out_dir = "out/toy_diffusion"
mode = "diffusion"
gen_length = 80        # the canvas: every response (<= 65 tokens here) EOS-padded to 80
max_length = 384
block_size = 0         # one full canvas (LLaDA); block_size > 0 is block diffusion
