# The fast recipe: GPT-2's architecture trained in fewer steps. Muon on the blocks' matrices, AdamW on the rest,
# an untied head, the embeddings at a rate of their own, each block starting as the identity. Each choice and the
# measurement behind it: docs/optimizers.md. Put it first, so that the files after it and the flags still win:
#     python train_gpt2.py config/fast.py config/shakespeare.py
optimizer = "muon"
max_lr = 4e-3
min_lr = 4e-4
beta1 = 0.8
embedding_lr = 5e-2
tie_head = False
zero_init = True
muon_momentum_warmup = 300
