# Fine-tune the pretrained stories260K on GSM8K with the refinement objective.
# python prepare.py config/prepare_gsm8k_stories.py && python train.py config/gsm8k_stories_refine.py
data_dir = "data/gsm8k_stories"
out_dir = "out/gsm8k_stories_refine"
init_from = "assets/stories260K"
mode = "refine"
num_iterations = 2
ar_loss_weight = 1.0
max_length = 512
batch_size = 8
max_iters = 3000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
