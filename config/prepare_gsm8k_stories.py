# GSM8K tokenized for stories260K (its 512-token SentencePiece vocabulary, 512 positions).
exec(open("config/prepare_gsm8k.py").read())
out_dir = "data/gsm8k_stories"
tokenizer = "assets/stories260K"
max_length = 512
