# GSM8K (github.com/openai/grade-school-math, MIT) from a local copy: question/answer jsonl,
# answers end with "#### N". The test split is the held-out evaluation set.
input = "../shared/data/gsm8k/train.jsonl"
val_input = "../shared/data/gsm8k/test.jsonl"
out_dir = "data/gsm8k"
tokenizer = "gpt2"
prompt_key = "question"
response_key = "answer"
max_length = 1024
