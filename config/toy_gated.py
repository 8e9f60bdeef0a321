# Gated LoRA next-block drafting (B=4) on top of the sft model of config/toy.py: the sft model's
# answers are unchanged (blockwise --verify returns its AR greedy output), at several tokens per forward.
# python train.py config/toy.py && python train.py config/toy_gated.py
# python generate.py --init_from=out/toy_gated --data=data/toy/val.jsonl --method=blockwise --verify=True
exec(open("config/toy.py").read())
init_from = "out/toy"
out_dir = "out/toy_gated"
mode = "interleaved"
max_iters = 1800   # 3x the sft run's: the drafter's tokens/forward rise with training length (README, bench.py)
block_size = 4
max_length = 384   # rows hold the MASK slots too
lora_rank = 32
lora_alpha = 32.0    # scale alpha / rank = 1
gated_lora = True
sampler_head = True   # each slot's draft conditioned on the one before it: +0.16-0.21 tokens/forward (README)
