"""
Generate text with a GPT-2 model: a checkpoint of train_gpt2.py, OpenAI's GPT-2, or a Hugging Face directory.

    python sample.py --init_from=resume --out_dir=log/shakespeare --prompt="ROMEO:"
    python sample.py --init_from=gpt2 --prompt="Hello, I'm a language model," --num_samples=3
    python sample.py --init_from=gpt2 --interactive                       # one prompt a line, until Ctrl-D
    python sample.py --init_from=gpt2 --benchmark --max_new_tokens=512    # tokens/s with and without the KV cache

The model is train_gpt2.py's GPT, loaded by its load_model: --init_from takes the same values there and here.
Tokens are printed as they are generated, and each costs the model one position, thanks to its KV cache.
generate() is also the trainer's: its samples at each evaluation come from it.
"""

import codecs
import sys
import time
from types import SimpleNamespace

import torch

from common import UserError, get_tokenizer, newest_run, parse_command_line, run_main, settings_of

# -----------------------------------------------------------------------------
# Settings (python sample.py --help)

init_from = "resume"             # resume (the newest checkpoint in --out_dir), a checkpoint, gpt2[-xl] or a HF directory
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


class KVCache:
    """The keys and values of the positions seen so far, so that each new token costs one position."""

    def __init__(self, n_layer):
        self.layers = [None] * n_layer  # per layer: (keys, values), each (B, nh, block_size, hs)
        self.pos = 0                     # positions filled so far


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
             generator=None, use_cache=True):
    """Continue the (B, T) token ids idx: yield max_new_tokens times a (B,) tensor of next tokens.

    temperature 0 is greedy. top_k keeps the k likeliest tokens, top_p the smallest set whose probability
    reaches p; repetition_penalty > 1 makes every token already in the text less likely (as CTRL and
    transformers do it). Run the model in eval mode. With use_cache=False every token recomputes the whole
    context: the reference that the cache must equal, and the baseline of the benchmark.

    Past block_size the context slides, in jumps: the positions are learned embeddings, so a token's keys
    and values depend on where it sits, and the cache cannot drop its oldest position and go on. When the
    context outgrows block_size it restarts from its last block_size // 2 tokens (one prefill, then one
    position a token again), so the model always sees between half a block and a full block of context.
    """
    block_size = model.config.block_size
    seen = None  # (B, vocab_size): which tokens the text holds so far, for the repetition penalty
    if repetition_penalty != 1.0:
        seen = torch.zeros(idx.size(0), model.config.vocab_size, dtype=torch.bool, device=idx.device)
        seen.scatter_(1, idx, True)
    context, cache = idx, None
    for _ in range(max_new_tokens):
        if context.size(1) > block_size:
            context, cache = context[:, -(block_size // 2):], None
        if cache is not None:
            hidden = model.hidden_states(context[:, -1:], cache=cache)  # only the newest token: the rest is cached
        else:
            cache = KVCache(model.config.n_layer) if use_cache else None
            hidden = model.hidden_states(context, cache=cache)
        logits = model.logits(hidden[:, -1]).float()  # only the last position predicts: (B, vocab_size)
        if seen is not None:
            penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
            logits = torch.where(seen, penalized, logits)
        token = choose_token(logits, temperature, top_k, top_p, generator)  # (B,)
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        context = torch.cat([context, token[:, None]], dim=1)
        yield token


def choose_token(logits, temperature, top_k, top_p, generator=None):
    """(B, vocab_size) logits -> (B,) token ids: the likeliest if temperature is 0, else a draw."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k:
        kth_largest = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # the likeliest token has 0 before it and always stays
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = logits.scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator).squeeze(1)


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


# -----------------------------------------------------------------------------
# Benchmark and command line


def benchmark_speed(model, tokenizer, prompt, max_new_tokens):
    """Print the tokens/s of greedy generation with and without the KV cache, and whether they agree."""
    c = model.config
    idx = encode(tokenizer, prompt, next(model.parameters()).device)
    print(f"{model.num_params() / 1e6:.1f}M parameters ({c.n_layer} layers x {c.n_embd}, block_size {c.block_size}), "
          f"greedy, {idx.size(1)} prompt tokens, {max_new_tokens} new tokens")
    outputs, speed = {}, {}
    for use_cache in (True, False):
        list(generate(model, idx, 8, temperature=0, use_cache=use_cache))  # warm up kernels and allocator
        start = time.perf_counter()
        tokens = generate(model, idx, max_new_tokens, temperature=0, use_cache=use_cache)
        outputs[use_cache] = torch.cat(list(tokens)).tolist()
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
        args.out_dir = newest_run(args.out_dir)
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
