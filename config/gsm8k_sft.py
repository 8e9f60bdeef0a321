# SFT baseline on GSM8K from scratch with the GPT-2 tokenizer (data from a local copy of the official files).
# python prepare.py config/prepare_gsm8k.py && python train.py config/gsm8k_sft.py
# (8 GPUs: config/gsm8k_gpu.py)
data_dir = "data/gsm8k"
out_dir = "out/gsm8k_sft"
mode = "sft"
n_layer = 6
n_head = 6
n_kv_head = 6
n_embd = 384
max_length = 1024
batch_size = 4
gradient_accumulation_steps = 8   # global: a multiple of the number of processes (1, 2, 4 or 8)
max_iters = 3000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
eval_interval = 500
save_interval = 500
