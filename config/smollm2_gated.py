# Gated LoRA next-block drafting (B=4, sampler head) on SmolLM2-135M-Instruct: the model's own
# answers stay exactly what they are (blockwise --verify = its AR greedy), at several tokens per
# forward. Train it on the model's own completions (data_dir below, README: self-distillation),
# or on the reference answers with --data_dir=data/gsm8k_smollm2 for the comparison.
# python train.py config/smollm2_gated.py
# python generate.py --init_from=out/smollm2_gated --data=../shared/data/gsm8k/test.jsonl --prompt_key=question \
#     --answer_key=answer --method=blockwise --verify=True --max_new_tokens=256 --limit=200 --batch_size=1
exec(open("config/smollm2.py").read())
init_from = _SMOLLM2
data_dir = "data/gsm8k_smollm2_self"
out_dir = "out/smollm2_gated"
mode = "interleaved"
block_size = 4
max_length = 1024      # prompt + completion + its MASK slots
lora_rank = 32
lora_alpha = 32.0
gated_lora = True
sampler_head = True
batch_size = 1
gradient_accumulation_steps = 8
max_iters = 500
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 20
eval_interval = 100
eval_iters = 10
save_interval = 100
