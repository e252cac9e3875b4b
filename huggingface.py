"""
Hugging Face's GPT2LMHeadModel and train_gpt2.py's GPT, one into the other: OpenAI's weights in (init_from=gpt2),
a trained model out (--export_hf=DIR) as a directory that transformers loads offline, tokenizer included.

    python train_gpt2.py --init_from=gpt2 ...                                        # OpenAI's GPT-2 124M
    python train_gpt2.py --init_from=resume --out_dir=log/shakespeare --export_hf=log/shakespeare/hf

The two models have the same modules under the same names; OpenAI's checkpoints store four of the weight
matrices as Conv1D, (in, out), where nn.Linear wants (out, in), and our vocabulary is padded to a multiple of 64.
An export checks itself: transformers must compute our logits from it. Only train_gpt2.py imports this file, and
it imports nothing of train_gpt2.py's.
"""

import os
import shutil
import socket
from urllib.parse import urlparse

import torch

from common import UserError, check_writable_dir, gpt2_bpe_files

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HUB_TIMEOUT = 5  # seconds to wait for the hub before saying it cannot be reached


def quiet_transformers():
    """transformers' and the hub's progress bars, notes and retry warnings would bury our own messages."""
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import logging
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def hub_reachable():
    """Whether the Hugging Face hub answers within HUB_TIMEOUT: offline, transformers would retry for a minute."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=HUB_TIMEOUT).close()
        return True
    except OSError:
        return False


def load_gpt2(model_class, config_class, name_or_dir, dropout=0.0):
    """train_gpt2.py's GPT (model_class, made from config_class) with a GPT2LMHeadModel's shape and weights, from
    the hub (a name such as gpt2) or a directory. A model already in the local cache loads without the network."""
    from transformers import GPT2LMHeadModel
    quiet_transformers()
    try:
        hf = GPT2LMHeadModel.from_pretrained(name_or_dir, local_files_only=True)
    except OSError:
        if os.path.isdir(name_or_dir) or not hub_reachable():
            where = "the directory holds no GPT-2 model" if os.path.isdir(name_or_dir) else \
                "it is not in the local cache and the Hugging Face hub cannot be reached (offline?)"
            raise UserError(f"cannot load Hugging Face model '{name_or_dir}': {where}; give a directory that "
                            f"transformers' save_pretrained wrote, or a checkpoint file") from None
        try:
            hf = GPT2LMHeadModel.from_pretrained(name_or_dir)
        except OSError as e:
            raise UserError(f"cannot load Hugging Face model '{name_or_dir}': {str(e).splitlines()[0]}") from None
    c = hf.config
    tied = bool(getattr(c, "tie_word_embeddings", True))
    model = model_class(config_class(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                                     n_head=c.n_head, n_embd=c.n_embd, dropout=dropout, tie_head=tied))
    own = model.state_dict()
    with torch.no_grad():
        for key, value in hf.state_dict().items():
            if key.endswith((".attn.bias", ".attn.masked_bias")) or (key == "lm_head.weight" and tied):
                continue  # the causal mask's buffers; a tied head is the embedding
            value = value.t() if key.endswith(CONV1D_WEIGHTS) else value
            own[key][:value.shape[0]].copy_(value)  # our vocabulary is padded: the extra rows stay
    return model


def hf_state_dict(model):
    """The model's weights in GPT2LMHeadModel's layout: Conv1D transposed, vocabulary unpadded."""
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith(CONV1D_WEIGHTS):
            value = value.t()
        elif key in ("transformer.wte.weight", "lm_head.weight"):
            value = value[:model.config.vocab_size]
        state[key] = value.contiguous()
    return state


# Our MLP's activation module -> transformers' activation_function that computes the same.
ACTIVATIONS = {("GELU", "tanh"): "gelu_new", ("GELU", "none"): "gelu", ("ReLU", None): "relu", ("SiLU", None): "silu"}


def hf_config(model):
    """The GPT2Config of our model, with n_inner and activation_function saying a changed MLP; None for a model
    whose MLP transformers cannot express (an activation it does not name)."""
    from transformers import GPT2Config
    c, mlp = model.config, model.transformer.h[0].mlp
    kinds = [(type(m).__name__, getattr(m, "approximate", None)) for m in mlp.children() if not hasattr(m, "weight")]
    if len(kinds) != 1 or kinds[0] not in ACTIVATIONS:
        return None
    return GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                      n_head=c.n_head, n_inner=mlp.c_fc.out_features, activation_function=ACTIVATIONS[kinds[0]],
                      resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout, tie_word_embeddings=c.tie_head)


def save_hf(model, directory):
    """Write the model as a Hugging Face GPT-2 directory that transformers loads offline: config.json,
    model.safetensors, generation_config.json (generation stops at the model's context) and the tokenizer's
    files. Then load it back with transformers and compare its logits with ours on one batch: a model that
    transformers computes otherwise (a changed architecture it cannot say), like a full disk, is one UserError,
    and no file of the export is left in directory."""
    from transformers import GenerationConfig, GPT2LMHeadModel, GPT2TokenizerFast
    check_writable_dir(directory, "export_hf")
    existing = set(os.listdir(directory))  # what was there before: never removed
    quiet_transformers()
    config = hf_config(model)
    try:
        if config is None:
            raise UserError("its MLP's activation is none that transformers' GPT-2 names (gelu_new, gelu, relu, silu)")
        with torch.device("meta"):  # no memory or time spent on weights that are replaced at once
            hf = GPT2LMHeadModel(config)
        try:
            hf.load_state_dict(hf_state_dict(model), assign=True, strict=False)
        except RuntimeError as e:  # a weight of another shape than the config says
            raise UserError(f"its weights do not fit GPT-2's layout ({str(e).splitlines()[-1].strip()})") from None
        if model.config.tie_head:
            hf.tie_weights()
        # Learned positions end at block_size: past it transformers would index outside the position embedding.
        hf.generation_config = GenerationConfig(bos_token_id=50256, eos_token_id=50256,
                                                max_length=model.config.block_size)
        hf.save_pretrained(directory)
        check_logits(model, GPT2LMHeadModel.from_pretrained(directory))
        # Under the names transformers looks for; loading them there and saving adds tokenizer.json and its config.
        for name, hf_name in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
            shutil.copyfile(gpt2_bpe_files()[name], os.path.join(directory, hf_name))
        GPT2TokenizerFast.from_pretrained(directory, model_max_length=model.config.block_size).save_pretrained(
            directory)
    except Exception as e:  # nothing half-written is left: the files made here go, and the directory if it was new
        for name in set(os.listdir(directory)) - existing:
            os.remove(os.path.join(directory, name))
        if not existing:
            os.rmdir(directory)
        if not isinstance(e, (UserError, OSError)) and "No space left" not in str(e):  # safetensors' full disk
            raise
        raise UserError(f"cannot export this model to Hugging Face: {getattr(e, 'strerror', None) or e}") from None
    # safetensors writes its file private (0600); every file of the export gets the usual mode of new files.
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def check_logits(model, hf):
    """Refuse an export whose logits in transformers differ from ours on one batch of random tokens."""
    idx = torch.randint(0, model.config.vocab_size, (2, min(16, model.config.block_size)),
                        generator=torch.Generator().manual_seed(0))
    training = model.training
    with torch.no_grad():
        ours, theirs = model.eval()(idx)[0].float(), hf.eval()(idx).logits.float()
    model.train(training)
    difference = (ours - theirs).abs().max().item()
    if not difference <= 1e-3 + 1e-4 * ours.abs().max().item():
        raise UserError(f"transformers computes other logits from it (up to {difference:.3g} apart): the model was "
                        f"changed in a way GPT-2's config cannot say")
