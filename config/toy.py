# The embedded default: a 0.9M-parameter model on the built-in arithmetic task, a few minutes on 2 CPU cores.
# python prepare.py && python train.py config/toy.py && python generate.py --init_from=out/toy --data=data/toy/val.jsonl
data_dir = "data/toy"
out_dir = "out/toy"
mode = "sft"
n_layer = 4
n_head = 4
n_kv_head = 4
n_embd = 128
max_length = 256
batch_size = 16
max_iters = 600
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 30
eval_interval = 200
log_interval = 50
save_interval = 200
