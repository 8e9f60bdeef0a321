# EOS-noise iterative refinement on the toy task, the same budget as config/toy.py.
# python train.py config/toy_refine.py && python generate.py --init_from=out/toy_refine \
#     --data=data/toy/val.jsonl --method=refine --add_eos_length=15 --refine_iter=2
exec(open("config/toy.py").read())
out_dir = "out/toy_refine"
mode = "refine"
num_iterations = 2
noise_min = 0.1
noise_max = 0.9
ar_loss_weight = 1.0   # 0 is the seed's objective
