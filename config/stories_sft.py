# Fine-tune the real pretrained stories260K (Llama, 512-token SentencePiece vocabulary) on the toy task.
# python prepare.py --tokenizer=assets/stories260K --out_dir=data/toy_stories && python train.py config/stories_sft.py
data_dir = "data/toy_stories"
out_dir = "out/stories_sft"
init_from = "assets/stories260K"
mode = "sft"
max_length = 512
batch_size = 8
max_iters = 600
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 30
eval_interval = 200
log_interval = 50
save_interval = 200
