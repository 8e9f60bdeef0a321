# GSM8K SFT of a GPT-2-small-size (124M) Llama on GPUs:
# python prepare.py config/prepare_gsm8k.py
# torchrun --standalone --nproc_per_node=8 train.py config/gsm8k_gpu.py
# FSDP2 with bf16 compute and fp32 gradient reduction, compiled model and FlexAttention
# (chosen on CUDA), sharded checkpoints; other modes: --mode=interleaved|refine|diffusion.
exec(open("config/gsm8k_sft.py").read())
out_dir = "out/gsm8k_gpu"
n_layer = 12
n_head = 12
n_kv_head = 12
n_embd = 768
device = "cuda"
compile = True
parallel = "fsdp"
batch_size = 16                   # rows of 1024 tokens per GPU per micro-batch
gradient_accumulation_steps = 8   # global, divided by the number of GPUs
learning_rate = 6e-4
min_lr = 6e-5
