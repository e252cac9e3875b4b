# A small GPT-2 on tiny Shakespeare, sized for a few minutes on a 2-core CPU. The quick start trains it with the
# fast recipe (config/fast.py: Muon, an untied head, its rates):
#     python train_gpt2.py config/fast.py config/shakespeare.py
# Without config/fast.py it trains with GPT-2's recipe (add --max_lr=2e-3 --min_lr=2e-4 for this small model).
# Every line is `name = value` of a setting at the top of train_gpt2.py; flags still win.
data_dir = "input.txt"
out_dir = "log/shakespeare"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
batch_size = 4
total_batch_size = 1024
max_steps = 250
warmup_steps = 25
eval_interval = 50
eval_iters = 8
checkpoint_interval = 250
hellaswag = False
num_samples = 1
sample_length = 64
sample_prompt = "ROMEO:"
