# Refinement training on GSM8K from scratch with the GPT-2 tokenizer (python prepare.py config/prepare_gsm8k.py first).
exec(open("config/gsm8k_sft.py").read())
out_dir = "out/gsm8k_refine"
mode = "refine"
num_iterations = 2
ar_loss_weight = 1.0
