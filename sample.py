"""
Generate text with a GPT-2 model: a checkpoint of train_gpt2.py, OpenAI's GPT-2, or a Hugging Face directory.

    python sample.py --init_from=resume --out_dir=log/shakespeare --prompt="ROMEO:"
    python sample.py --init_from=gpt2 --prompt="Hello, I'm a language model," --num_samples=3
    python sample.py --init_from=gpt2 --interactive                       # one prompt a line, until Ctrl-D
    python sample.py --init_from=gpt2 --benchmark --max_new_tokens=512    # tokens/s with and without the KV cache

The model is train_gpt2.py's GPT, loaded by its load_model: --init_from takes the same values there and here.
Tokens are printed as they are generated, and each costs the model one position, thanks to its KV cache.
"""

import argparse
import codecs
import sys
import time

import torch

from train_gpt2 import (SETTINGS, UserError, autocast_context, generate, get_tokenizer, load_model, pick_device,
                        pick_dtype)

# -----------------------------------------------------------------------------
# Command line


class ArgumentParser(argparse.ArgumentParser):

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def number_type(kind, accepts, requirement):
    """An argparse type: text -> kind, rejected with `requirement` unless accepts(value)."""
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes {requirement}, not '{text}'") from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"takes {requirement}, not {text}")
        return value
    return convert


def true_or_false(text):
    if text not in ("True", "False"):
        raise argparse.ArgumentTypeError(f"takes True or False, not '{text}'")
    return text == "True"


def parse_args(argv):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    option = parser.add_argument
    option("--init_from", default="resume",
           help="resume (the newest checkpoint in --out_dir), a checkpoint file, gpt2[-medium|-large|-xl] or a "
                "Hugging Face directory (default: %(default)s)")
    option("--out_dir", default=SETTINGS["out_dir"], help="where --init_from=resume looks (default: %(default)s)")
    option("--prompt", default="", help="text to continue; empty: start a new document (<|endoftext|>)")
    option("--prompt_file", default="", help="read the prompt from this file instead")
    option("--num_samples", type=number_type(int, lambda n: n >= 1, "a whole number >= 1"), default=1,
           help="samples per prompt (default: %(default)s)")
    option("--max_new_tokens", type=number_type(int, lambda n: n >= 1, "a whole number >= 1"), default=256,
           help="tokens generated per sample, unless it ends with <|endoftext|> first (default: %(default)s)")
    option("--temperature", type=number_type(float, lambda t: t >= 0, "a number >= 0"), default=1.0,
           help="below 1: safer choices, above 1: wilder; 0: always the likeliest token (default: %(default)s)")
    option("--top_k", type=number_type(int, lambda k: k >= 0, "a whole number >= 0"), default=50,
           help="draw only from the k likeliest tokens; 0: no limit (default: %(default)s)")
    option("--top_p", type=number_type(float, lambda p: 0 < p <= 1, "a number in (0, 1]"), default=1.0,
           help="draw only from the likeliest tokens that together have probability p (default: %(default)s)")
    option("--repetition_penalty", type=number_type(float, lambda r: r > 0, "a number > 0"), default=1.0,
           help="above 1: tokens already in the text become less likely (default: %(default)s)")
    option("--seed", type=int, default=1337, help="the same seed and settings give the same samples")
    option("--device", default="", help="cuda, cuda:N, mps or cpu; empty: the best available")
    option("--dtype", default="", help="bfloat16, float16 or float32 (autocast); empty: what training would pick")
    option("--interactive", type=true_or_false, nargs="?", const=True, default=False,
           help="read prompts from the terminal, one a line, until end of input (Ctrl-D)")
    option("--benchmark", type=true_or_false, nargs="?", const=True, default=False,
           help="print tokens/s of greedy generation with and without the KV cache, then exit")
    args = parser.parse_args(argv)
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


def device_and_autocast(device, dtype):
    """The device to run on ('': the best available) and the autocast context for dtype, chosen as training does."""
    device = pick_device(device)
    device_type = device.split(":")[0]
    return device, autocast_context(device_type, pick_dtype(dtype, device_type))


def encode(tokenizer, prompt, device):
    """(1, T) token ids of the prompt; an empty prompt is <|endoftext|>, the start of a new document."""
    tokens = tokenizer.encode(prompt, allowed_special="all") if prompt else [tokenizer.eot_token]
    return torch.tensor([tokens], device=device)


def print_sample(model, tokenizer, prompt, args, generator):
    """Print the prompt, then its continuation token by token, up to <|endoftext|> or max_new_tokens."""
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


def benchmark(model, tokenizer, prompt, max_new_tokens):
    """Print the tokens/s of greedy generation with and without the KV cache, and whether they agree."""
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


def main(argv=None):
    try:
        run(parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def run(args):
    """Load the model and print samples, or the benchmark."""
    device, autocast = device_and_autocast(args.device, args.dtype)
    model, _ = load_model(args.init_from, args.out_dir)
    model.to(device).eval()
    tokenizer = get_tokenizer()
    generator = torch.Generator(device=device).manual_seed(args.seed)
    with autocast:
        if args.benchmark:
            benchmark(model, tokenizer, args.prompt, args.max_new_tokens)
            return
        for prompt in typed_prompts() if args.interactive else [args.prompt]:
            for _ in range(args.num_samples):
                print_sample(model, tokenizer, prompt, args, generator)
                print("-" * 40)


if __name__ == "__main__":
    main()
