# Next-block prediction (B=4) on the toy task, the same budget as config/toy.py (same steps, same batch).
# python train.py config/toy_interleaved.py && python generate.py --init_from=out/toy_interleaved \
#     --data=data/toy/val.jsonl --method=blockwise --verify=True
exec(open("config/toy.py").read())
out_dir = "out/toy_interleaved"
mode = "interleaved"
block_size = 4
max_length = 384   # rows hold the MASK slots too (B-1 per block of B response tokens)
