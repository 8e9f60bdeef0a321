# GSM8K rendered with SmolLM2's chat template (its GGUF's tokenizer): the reference answers, for
# the drafter trained on them (the comparison with self-distillation, README).
# python prepare.py config/prepare_smollm2_gsm8k.py
exec(open("config/smollm2.py").read())
exec(open("config/prepare_gsm8k.py").read())
out_dir = "data/gsm8k_smollm2"
tokenizer = _SMOLLM2
