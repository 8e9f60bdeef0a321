# Fine-tune the real pretrained stories260K (Llama, 512-token SentencePiece vocabulary) on the toy task,
# with the toy run's schedule. The model's size comes from the checkpoint, not from the size keys.
# python prepare.py --tokenizer=assets/stories260K --out_dir=data/toy_stories && python train.py config/stories_sft.py
exec(open("config/toy.py").read())
data_dir = "data/toy_stories"
out_dir = "out/stories_sft"
init_from = "assets/stories260K"
max_length = 512
batch_size = 8
