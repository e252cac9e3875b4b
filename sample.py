"""
Generate text with a GPT-2 model: a checkpoint of train_gpt2.py, OpenAI's GPT-2, or a Hugging Face directory.

    python sample.py --init_from=resume --out_dir=log/shakespeare --prompt="ROMEO:"
    python sample.py --init_from=gpt2 --prompt="Hello, I'm a language model," --num_samples=3
    python sample.py --init_from=gpt2 --interactive                       # one prompt a line, until Ctrl-D
    python sample.py --init_from=gpt2 --benchmark --max_new_tokens=512    # tokens/s with and without the KV cache

The model is train_gpt2.py's GPT, loaded by its load_model: --init_from takes the same values there and here.
Tokens are printed as they are generated, and each costs the model one position, thanks to its KV cache.
"""

import codecs
import sys
import time
from types import SimpleNamespace

import torch

from common import UserError, get_tokenizer, newest_run, parse_command_line, run_main, settings_of

# -----------------------------------------------------------------------------
# Settings (python sample.py --help)

init_from = "resume"             # resume (the newest checkpoint in --out_dir), a checkpoint file, gpt2[-medium|-large|-xl] or a Hugging Face directory
out_dir = "log"                  # where --init_from=resume looks; log/ with no checkpoint: the newest run below it
prompt = ""                      # text to continue; empty: start a new document (<|endoftext|>)
prompt_file = ""                 # read the prompt from this file instead
num_samples = 1                  # samples per prompt
max_new_tokens = 256             # tokens generated per sample, unless it ends with <|endoftext|> first
temperature = 1.0                # below 1: safer choices, above 1: wilder; 0: always the likeliest token
top_k = 50                       # draw only from the k likeliest tokens; 0: no limit
top_p = 1.0                      # draw only from the likeliest tokens that together have probability p, in (0, 1]
repetition_penalty = 1.0         # above 1: tokens already in the text become less likely
seed = 1337                      # the same seed and settings give the same samples
device = ""                      # cuda, cuda:N, mps or cpu; empty: the best available
dtype = ""                       # bfloat16, float16 or float32 (autocast); empty: what training would pick
interactive = False              # read prompts from the terminal, one a line, until end of input (Ctrl-D)
benchmark = False                # print tokens/s of greedy generation with and without the KV cache, then exit

SETTINGS = settings_of(globals())

# -----------------------------------------------------------------------------
# Sampling


def encode(tokenizer, prompt, device):
    """(1, T) token ids of the prompt; an empty prompt is <|endoftext|>, the start of a new document."""
    tokens = tokenizer.encode(prompt, allowed_special="all") if prompt else [tokenizer.eot_token]
    return torch.tensor([tokens], device=device)


def print_sample(model, tokenizer, prompt, args, generator):
    """Print the prompt, then its continuation token by token, up to <|endoftext|> or max_new_tokens."""
    from train_gpt2 import generate
    idx = encode(tokenizer, prompt, next(model.parameters()).device)
    # A character may span several tokens: the decoder holds incomplete UTF-8 bytes until the rest comes.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    print(prompt, end="", flush=True)
    for token in generate(model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, generator=generator):
        token = token.item()
        if token == tokenizer.eot_token:
            break
        print(decoder.decode(tokenizer.decode_single_token_bytes(token)), end="", flush=True)
    print(decoder.decode(b"", final=True))


def typed_prompts():
    """Lines typed at the terminal, until end of input; blank ones are skipped."""
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        if line.strip():
            yield line


# -----------------------------------------------------------------------------
# Benchmark and command line


def benchmark_speed(model, tokenizer, prompt, max_new_tokens):
    """Print the tokens/s of greedy generation with and without the KV cache, and whether they agree."""
    from train_gpt2 import generate
    c = model.config
    idx = encode(tokenizer, prompt, next(model.parameters()).device)
    print(f"{model.num_params() / 1e6:.1f}M parameters ({c.n_layer} layers x {c.n_embd}, block_size {c.block_size}), "
          f"greedy, {idx.size(1)} prompt tokens, {max_new_tokens} new tokens")
    outputs, speed = {}, {}
    for use_cache in (True, False):
        list(generate(model, idx, 8, temperature=0, use_cache=use_cache))  # warm up kernels and allocator
        start = time.perf_counter()
        outputs[use_cache] = torch.cat(list(generate(model, idx, max_new_tokens, temperature=0, use_cache=use_cache))).tolist()
        speed[use_cache] = max_new_tokens / (time.perf_counter() - start)  # tolist() waited for the device
        print(f"{'with' if use_cache else 'without'} KV cache: {speed[use_cache]:8.1f} tokens/s")
    same = "the same" if outputs[True] == outputs[False] else "DIFFERENT"
    print(f"the cache is {speed[True] / speed[False]:.1f}x faster; the two outputs are {same} token for token")


def parse_args(argv):
    """The settings from the command line, checked, with the prompt read from --prompt_file if given."""
    args = SimpleNamespace(**parse_command_line(argv, SETTINGS, __doc__, __file__)[0])
    for name, good, requirement in (
            ("num_samples", args.num_samples >= 1, "a whole number >= 1"),
            ("max_new_tokens", args.max_new_tokens >= 1, "a whole number >= 1"),
            ("temperature", args.temperature >= 0, "a number >= 0"),
            ("top_k", args.top_k >= 0, "a whole number >= 0"),
            ("top_p", 0 < args.top_p <= 1, "a number in (0, 1]"),
            ("repetition_penalty", args.repetition_penalty > 0, "a number > 0")):
        if not good:
            raise UserError(f"--{name} takes {requirement}, not {getattr(args, name):g}")
    if args.init_from == "scratch":
        raise UserError("--init_from=scratch would sample from random weights; give resume, a checkpoint file, "
                        "a GPT-2 name or a Hugging Face directory")
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                args.prompt = f.read()
        except OSError as e:
            raise UserError(f"cannot read --prompt_file={args.prompt_file}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise UserError(f"--prompt_file={args.prompt_file} is not UTF-8 text") from None
        if not args.prompt.strip():
            raise UserError(f"--prompt_file={args.prompt_file} is empty; write a prompt in it "
                            f"(to start a new document, leave out --prompt and --prompt_file)")
    return args


def run(argv):
    """Load the model and print samples, or the benchmark."""
    from train_gpt2 import load_model, setup_system  # the model lives in the trainer
    args = parse_args(argv)
    if args.init_from == "resume":  # log/ after the quick start holds no run, log/shakespeare does
        args.out_dir = newest_run(args.out_dir, "ckpt_*.pt")
    system = setup_system(args)
    model, _ = load_model(args.init_from, args.out_dir)
    model.to(system.device).eval()
    tokenizer = get_tokenizer()
    generator = torch.Generator(device=system.device).manual_seed(args.seed)
    with system.autocast:
        if args.benchmark:
            return benchmark_speed(model, tokenizer, args.prompt, args.max_new_tokens)
        for prompt in typed_prompts() if args.interactive else [args.prompt]:
            for _ in range(args.num_samples):
                print_sample(model, tokenizer, prompt, args, generator)
                print("-" * 40)


def main(argv=None):
    run_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
