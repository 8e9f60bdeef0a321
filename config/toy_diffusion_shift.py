# Dream-style adaptation: start from the AR (sft) run and train diffusion with shift=True,
# so position i keeps predicting token i+1 as the AR model did.
# python train.py config/toy.py && python train.py config/toy_diffusion_shift.py
exec(open("config/toy_diffusion.py").read())
out_dir = "out/toy_diffusion_shift"
init_from = "out/toy"
shift = True
learning_rate = 1e-3
max_length = 256       # the sft run's positions; a diffusion row here is prompt + 80
