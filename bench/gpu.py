"""
The GPU path, measured by one command: the CUDA tests, then the speed figures, as one markdown table.

    python bench/gpu.py                  # on one CUDA GPU: estimated at about 10 minutes on an H100
    python bench/gpu.py --profile        # also a torch.profiler trace of three training steps of GPT-2 124M
    python bench/gpu.py --only profile   # the profile alone (any of the parts below; also --only=gpt2,profile)
    python bench/gpu.py --cpu            # a small version of the same on the CPU, in well under a minute

The parts, in this order:
  tests        python -m pytest tests/test_cuda.py
  gpt2         train_gpt2.py --benchmark for GPT-2 124M (bf16, T=1024, 524,288 tokens a step) at micro-batch 16, 32, 64
  sizes        the largest micro-batch of gpt2-medium, -large and -xl, and of xl with activation checkpointing
  hellaswag    hellaswag.py --benchmark on a random GPT-2 124M over 10,042 invented examples
  sample       sample.py --benchmark: greedy tokens/s with and without the KV cache
  shakespeare  200 steps of the Shakespeare preset on the GPU (needs input.txt in the repository root)
  profile      (with --profile) train_gpt2.py --benchmark --profile for GPT-2 124M at micro-batch 16, one micro-step
               a step: three more training steps under torch.profiler, and the ten costliest kernels

It writes into --out (default: $OUT if set, else bench/out/): table.md (the table, also printed at the end,
rewritten after every part so that a run cut short keeps what it measured), raw.txt (every command and its
whole output), shakespeare_log.txt, and with --profile profile.txt and trace.json.gz (chrome://tracing or
ui.perfetto.dev opens it). Without CUDA, or with --cpu, every part runs small on the CPU: tiny models, a
few steps, a few examples, no CUDA tests; that is what CI checks.
"""

import gzip
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script, this file's own folder bench/ is on the path, not the repository root
    sys.path.insert(0, ROOT)

from train_gpt2 import GPT, GPTConfig, SETTINGS as TRAIN_SETTINGS, UserError, parse_command_line, run_main, settings_of

# -----------------------------------------------------------------------------
# Settings (python bench/gpu.py --help)

cpu = False                      # run the small CPU version, even where CUDA is available
profile = False                  # add the profile part: a torch.profiler trace of three training steps of GPT-2 124M
only = []                        # run only these parts (--only gpt2 profile, or --only=gpt2,profile); empty: all
out = ""                         # where table.md, raw.txt and the rest go; empty: $OUT if set, else bench/out
time_limit = 560.0               # seconds for all the parts, to fit a ten-minute budget; the parts left are listed as not run

SETTINGS = settings_of(globals())

DEFAULT_OUT = os.path.join(ROOT, "bench", "out")
PARTS = ("tests", "gpt2", "sizes", "hellaswag", "sample", "shakespeare", "profile")
HELLASWAG_EXAMPLES = 10042  # the size of HellaSwag's validation split


@dataclass
class Plan:
    """What each part runs: the full sizes on a GPU, small ones on the CPU."""
    device: str
    block_size: int
    vocab_size: int                  # of the training benchmarks; HellaSwag and sampling need GPT-2's 50257
    shapes: dict                     # name -> (n_layer, n_head, n_embd)
    gpt2_batch_sizes: tuple
    total_batch_size: int
    # (name, extra flags, micro-batches to try, largest first). Each try runs eager (no compile, which would
    # take minutes for the large models) with one micro-step a step (total_batch_size = batch x block_size):
    # the largest micro-batch that fits with compile is at least as large.
    searches: list
    hellaswag_examples: int
    hellaswag_block_size: int
    sample_tokens: int
    shakespeare_flags: list
    profile_batch_size: int          # with one micro-step a step, so that the trace stays small
    small: bool = False
    names: dict = field(default_factory=dict)  # name -> how the table calls it

    def label(self, name):
        n_layer, _, n_embd = self.shapes[name]
        return f"CPU stand-in for {self.names[name]} ({n_layer} x {n_embd})" if self.small else self.names[name]


NAMES = {"gpt2": "GPT-2 124M", "gpt2-medium": "gpt2-medium", "gpt2-large": "gpt2-large", "gpt2-xl": "gpt2-xl"}

GPU_PLAN = Plan(
    device="cuda", block_size=1024, vocab_size=50257,
    shapes={"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)},
    gpt2_batch_sizes=(16, 32, 64), total_batch_size=524288,
    # First guesses one power of two above an estimate for 80 GB (weights, gradients and AdamW in float32,
    # bf16 activations, the float32 logits): a GPU with more memory starts with a try that fits.
    searches=[("gpt2-medium", [], (64, 32, 16, 8, 4, 2, 1)),
              ("gpt2-large", [], (32, 16, 8, 4, 2, 1)),
              ("gpt2-xl", [], (16, 8, 4, 2, 1)),
              ("gpt2-xl", ["--activation_checkpointing=True"], (64, 32, 16, 8, 4, 2, 1))],
    hellaswag_examples=HELLASWAG_EXAMPLES, hellaswag_block_size=1024, sample_tokens=256,
    shakespeare_flags=["--max_steps=200"], profile_batch_size=16, names=NAMES,
)

CPU_PLAN = Plan(
    device="cpu", block_size=64, vocab_size=256,
    shapes={"gpt2": (2, 2, 64), "gpt2-medium": (3, 2, 64), "gpt2-large": (4, 2, 64), "gpt2-xl": (5, 2, 64)},
    gpt2_batch_sizes=(2, 8), total_batch_size=512,
    searches=[("gpt2-medium", [], (8,)), ("gpt2-large", [], (8,)), ("gpt2-xl", [], (8,)),
              ("gpt2-xl", ["--activation_checkpointing=True"], (8,))],
    hellaswag_examples=8, hellaswag_block_size=128, sample_tokens=16,
    shakespeare_flags=["--max_steps=10", "--warmup_steps=2", "--eval_interval=5", "--eval_iters=1", "--n_layer=2",
                       "--n_head=2", "--n_embd=64", "--block_size=64", "--batch_size=2", "--total_batch_size=128",
                       "--num_samples=0"],
    profile_batch_size=4, small=True, names=NAMES,
)

# -----------------------------------------------------------------------------
# Running the repository's scripts and recording what they print


class Bench:
    """Runs commands within the time limit, keeps their output in raw.txt and the table's rows."""

    def __init__(self, plan, out_dir, work_dir, time_limit):
        self.plan, self.out_dir, self.work_dir = plan, out_dir, work_dir
        self.deadline = time.time() + time_limit
        self.rows = []
        self.raw = open(os.path.join(out_dir, "raw.txt"), "w")
        if plan.device == "cuda":
            # Asked of another process: CUDA in this one would hold GPU memory while the benchmarks run.
            self.device_name = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name())"],
                                              capture_output=True, text=True).stdout.strip() or "CUDA GPU"
        else:
            threads = torch.get_num_threads()
            self.device_name = f"CPU, {threads} thread{'s' if threads > 1 else ''}"

    def seconds_left(self):
        return self.deadline - time.time()

    def run(self, args, env=None):
        """Run a command of the repository; returns (exit status or None if out of time, stdout, stderr)."""
        start = time.time()
        # A session of its own: out of time, the command goes with every process it started (pytest's and
        # torchrun's children too), so that none goes on using the GPU under the next benchmark.
        process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)
        try:
            out, err = process.communicate(timeout=max(1, self.seconds_left()))
            status = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            status, err = None, err + "\n(stopped: out of time)"
        self.raw.write(f"$ {self.shown(args)}\n(exit status {status}, {time.time() - start:.1f} s)\n"
                       f"--- stdout\n{out}\n--- stderr\n{err}\n\n")
        self.raw.flush()
        return status, out, err

    def shown(self, args):
        """The command as a user would type it in the repository root, without this run's temporary paths."""
        text = " ".join(["python" if arg == sys.executable else arg for arg in args])
        return text.replace(self.work_dir + os.sep, "").replace(ROOT + os.sep, "")

    def row(self, what, args, speed="—", mfu="—", ms="—", memory="—"):
        command = f"`{self.shown(args)}`" if args else "—"
        self.rows.append([what, self.device_name, torch.__version__, command, speed, mfu, ms, memory])

    def table(self):
        header = ["what", "device", "torch", "command", "tokens/s (or examples/s)", "MFU", "ms/step", "peak memory"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def write_table(self):
        with open(os.path.join(self.out_dir, "table.md"), "w") as f:
            f.write(self.table())


def failure(status, out, err):
    """What the table says of a command that gave no figures."""
    if status is None:
        return "timed out"
    if "out of memory" in (out + err).lower():
        return "OOM"
    last = (err.strip() or out.strip() or f"exit status {status}").splitlines()[-1]
    return f"failed: {last[:100]}"

# -----------------------------------------------------------------------------
# Reading the scripts' output


def parse_train_benchmark(text):
    """{ms, tokens, mfu, memory} from the last 'benchmark: ... ms/step' line of train_gpt2.py, or None."""
    lines = [line for line in text.splitlines() if line.startswith("benchmark:") and "ms/step" in line]
    if not lines:
        return None
    ms, tokens, mfu, memory = (part.strip() for part in lines[-1].removeprefix("benchmark:").split(" | "))
    return {"ms": ms.split()[0], "tokens": tokens.split()[0], "mfu": short(mfu.removeprefix("mfu ")),
            "memory": short(memory.removeprefix("peak memory "))}


def short(value):
    return "n/a" if value.startswith("n/a") else value


def parse_hellaswag_benchmark(text):
    """{batched, one_at_a_time, seconds, count} from hellaswag.py --benchmark, or None."""
    speeds = re.search(r"benchmark: batched ([\d.]+) examples/s, one at a time ([\d.]+) examples/s", text)
    timing = re.search(r"^(\d+) examples in ([\d.]+) s", text, flags=re.M)
    if not speeds or not timing:
        return None
    return {"batched": float(speeds[1]), "one_at_a_time": float(speeds[2]),
            "count": int(timing[1]), "seconds": float(timing[2])}


def parse_sample_benchmark(text):
    """(tokens/s with the cache, without) from sample.py --benchmark, or None."""
    speeds = dict(re.findall(r"^(with|without) KV cache:\s*([\d.]+) tokens/s", text, flags=re.M))
    return (float(speeds["with"]), float(speeds["without"])) if len(speeds) == 2 else None


def parse_train_steps(text):
    """[(step, ms, tokens/s, mfu or None)] from the step lines a training run prints."""
    pattern = r"^(\d+) train \S+ \|.*?\| (\d+) ms \| ([\d,]+) tok/s(?: \| mfu ([\d.]+)%)?"
    return [(int(step), float(ms), float(tokens.replace(",", "")), float(mfu) if mfu else None)
            for step, ms, tokens, mfu in re.findall(pattern, text, flags=re.M)]


def largest_micro_batch(try_batch, guesses):
    """Try each micro-batch in guesses, largest first, until one runs: (batch, figures, [those out of memory]),
    with batch None if none ran; try_batch(b) returns (figures or None, why not)."""
    out_of_memory = []
    for batch in guesses:
        figures, why = try_batch(batch)
        if figures is not None:
            return batch, figures, out_of_memory
        if why != "OOM":
            return None, why, out_of_memory  # another failure: smaller batches would fail alike
        out_of_memory.append(batch)
    return None, "OOM", out_of_memory

# -----------------------------------------------------------------------------
# The parts


def run_tests(bench):
    args = [sys.executable, "-m", "pytest", "tests/test_cuda.py", "-q", "-rs"]
    if importlib.util.find_spec("xdist"):
        args += ["-n", "4"]  # most tests wait on small subprocesses: four at a time share the GPU well
    if bench.plan.device != "cuda":
        bench.row("CUDA tests: not run (no CUDA)", args)
        return
    status, out, err = bench.run(args)
    summary = (out.strip().splitlines() or ["no output"])[-1].strip("= ")
    bench.row(f"CUDA tests: {summary}" if status is not None else "CUDA tests: timed out", args)


def train_benchmark_args(plan, name, batch_size, total_batch_size, *flags):
    """train_gpt2.py --benchmark=True for the model `name`, naming the micro-batch and the settings that differ
    from the script's defaults."""
    n_layer, n_head, n_embd = plan.shapes[name]
    settings = dict(device="cpu" if plan.device == "cpu" else "", n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                    block_size=plan.block_size, vocab_size=plan.vocab_size, batch_size=batch_size,
                    total_batch_size=total_batch_size)
    return [sys.executable, "train_gpt2.py", "--benchmark=True",
            *(f"--{key}={value}" for key, value in settings.items() if value != TRAIN_SETTINGS[key] or key == "batch_size"),
            *flags]


def precision(plan):
    return "float32" if plan.device == "cpu" else "bf16"


def run_gpt2(bench):
    plan = bench.plan
    for batch_size in plan.gpt2_batch_sizes:
        args = train_benchmark_args(plan, "gpt2", batch_size, plan.total_batch_size)
        status, out, err = bench.run(args)
        figures = parse_train_benchmark(out)
        what = (f"{plan.label('gpt2')}, micro-batch {batch_size} x {plan.block_size}, "
                f"{plan.total_batch_size:,} tokens a step ({precision(plan)}{', compiled' if plan.device == 'cuda' else ''})")
        if figures:
            bench.row(what, args, figures["tokens"], figures["mfu"], figures["ms"], figures["memory"])
        else:
            bench.row(what, args, failure(status, out, err))


def run_sizes(bench):
    plan = bench.plan
    for name, flags, guesses in plan.searches:
        tried = {}

        def try_batch(batch_size):
            args = train_benchmark_args(plan, name, batch_size, batch_size * plan.block_size, "--compile=False", *flags)
            status, out, err = bench.run(args)
            tried[batch_size] = args
            figures = parse_train_benchmark(out)
            return figures, None if figures else failure(status, out, err)

        batch_size, figures, out_of_memory = largest_micro_batch(try_batch, guesses)
        what = f"{plan.label(name)}{', activation checkpointing' if flags else ''}: largest micro-batch"
        ooms = f"; {', '.join(map(str, out_of_memory))}: OOM" if out_of_memory else ""
        eager = f"{precision(plan)}, eager, one micro-step a step"
        if batch_size is not None:
            bench.row(f"{what} {batch_size} ({eager}{ooms})", tried[batch_size], figures["tokens"], figures["mfu"],
                      figures["ms"], figures["memory"])
        else:
            bench.row(f"{what}: none ran ({eager}{ooms})", tried[min(tried)], figures)


def random_checkpoint(bench):
    """A random GPT-2 124M-shaped checkpoint (small on the CPU), made once: {'model', 'config', 'step'}."""
    path = os.path.join(bench.work_dir, "random_gpt2.pt")
    if not os.path.exists(path):
        n_layer, n_head, n_embd = bench.plan.shapes["gpt2"]
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=bench.plan.hellaswag_block_size, vocab_size=50257, n_layer=n_layer,
                              n_head=n_head, n_embd=n_embd))
        torch.save({"model": model.state_dict(), "config": asdict(model.config), "step": 0}, path)
    return path


INVENTED_WORDS = ("the a man woman child cook player rider team dog horse boat kite ladder rope river road garden "
                  "kitchen table window door wall bread water paint ball bike car hill field house street morning "
                  "evening opens closes lifts pours paints climbs throws holds pulls pushes waves smiles turns walks "
                  "runs jumps sits stands looks takes puts shows slowly quickly carefully again then while near "
                  "under over into onto with after before around behind").split()


def write_invented_hellaswag(path, count, seed=0):
    """count records in HellaSwag's format, made of common words: contexts of 41 to 66 tokens (53 on average)
    and endings of 14 to 28 (20 on average), so that batches are shaped as with the real validation split.
    The same seed writes the same file."""
    rng = random.Random(seed)

    def sentence(words):
        return " ".join(rng.choice(INVENTED_WORDS) for _ in range(words)).capitalize() + "."

    with open(path, "w") as f:
        for index in range(count):
            context = " ".join(sentence(n) for n in (rng.randint(16, 25), rng.randint(16, 25), rng.randint(5, 8)))
            endings = [sentence(rng.randint(13, 23)) for _ in range(4)]
            f.write(json.dumps({"ind": index, "ctx": context, "endings": endings, "label": rng.randrange(4)}) + "\n")
    return path


def run_hellaswag(bench):
    plan = bench.plan
    data = write_invented_hellaswag(os.path.join(bench.work_dir, "hellaswag_invented.jsonl"), plan.hellaswag_examples)
    args = [sys.executable, "hellaswag.py", "--model", random_checkpoint(bench), "--data", data,
            "--device", plan.device, "--benchmark"]
    status, out, err = bench.run(args)
    figures = parse_hellaswag_benchmark(out)
    what = f"HellaSwag --benchmark, random {plan.label('gpt2')}, {plan.hellaswag_examples:,} invented examples"
    if figures:
        bench.row(f"{what}: all {figures['count']:,} in {figures['seconds']:.1f} s "
                  f"(one at a time: {figures['one_at_a_time']:,.1f} examples/s)", args,
                  f"{figures['batched']:,.1f} examples/s")
    else:
        bench.row(what, args, failure(status, out, err))


def run_sample(bench):
    plan = bench.plan
    args = [sys.executable, "sample.py", f"--init_from={random_checkpoint(bench)}", "--benchmark=True",
            f"--max_new_tokens={plan.sample_tokens}", f"--device={plan.device}"]
    status, out, err = bench.run(args)
    speeds = parse_sample_benchmark(out)
    what = f"greedy generation, random {plan.label('gpt2')}, batch 1, {plan.sample_tokens} new tokens, KV cache"
    if speeds:
        bench.row(f"{what} (without: {speeds[1]:,.1f} tokens/s)", args, f"{speeds[0]:,.1f}",
                  ms=f"{1000 / speeds[0]:.2f} a token")
    else:
        bench.row(what, args, failure(status, out, err))


def run_shakespeare(bench):
    plan = bench.plan
    out_dir = os.path.join(bench.work_dir, "shakespeare")
    args = [sys.executable, "train_gpt2.py", "--preset=shakespeare", f"--device={plan.device}", *plan.shakespeare_flags,
            f"--out_dir={out_dir}"]
    if not os.path.exists(os.path.join(ROOT, "input.txt")):
        bench.row("Shakespeare preset: not run, input.txt is missing from the repository root", args)
        return
    status, out, err = bench.run(args)
    log = os.path.join(out_dir, "log.txt")
    steps = parse_train_steps(out)
    what = f"Shakespeare preset on {plan.device}"
    if status != 0 or not steps or not os.path.exists(log):
        bench.row(what, args, failure(status, out, err))
        return
    shutil.copy(log, os.path.join(bench.out_dir, "shakespeare_log.txt"))
    val = [float(value) for _, kind, value in (line.split() for line in open(log)) if kind == "val"]
    steady = steps[len(steps) // 10 + 1:] or steps  # past compilation and warm-up
    mfus = [mfu for *_, mfu in steady if mfu is not None]
    bench.row(f"{what}, {len(steps)} steps: validation loss {' → '.join(f'{v:.2f}' for v in val)} "
              f"(log: shakespeare_log.txt)", args, f"{statistics.median(s[2] for s in steady):,.0f}",
              f"{statistics.median(mfus):.1f}%" if mfus else "n/a", f"{statistics.median(s[1] for s in steady):.0f}")



def profiler_table(text):
    """The table of the costliest kernels (operators on a CPU) that train_gpt2.py --profile prints after its
    benchmark, and the line that ends it: (table, steps, trace path), or None."""
    end = re.search(r"^profile: (\d+) steps, trace in (.+)$", text, flags=re.M)
    if not end:
        return None
    lines = text[:end.start()].splitlines()
    benchmark = max((i for i, line in enumerate(lines) if line.startswith("benchmark:")), default=-1)
    table = lines[benchmark + 1:]
    while table and not table[0].startswith("-----"):  # anything printed between the two
        table.pop(0)
    return "\n".join(table).rstrip(), int(end[1]), end[2].strip()


def run_profile(bench):
    """train_gpt2.py --benchmark --profile: the benchmark, then a few more steps under torch.profiler. One
    micro-step a step keeps the trace small (a few MiB, easy to copy off the machine)."""
    plan = bench.plan
    on_cuda = plan.device == "cuda"
    B, T = plan.profile_batch_size, plan.block_size
    directory = os.path.join(bench.work_dir, "profile")
    args = train_benchmark_args(plan, "gpt2", B, B * T, f"--profile={directory}")
    status, out, err = bench.run(args)
    figures, profiled = parse_train_benchmark(out), profiler_table(out)
    what = f"profile of {plan.label('gpt2')}, micro-batch {B} x {T}, one micro-step a step"
    if status != 0 or not figures or not profiled or not os.path.exists(os.path.join(directory, "trace.json")):
        bench.row(what, args, failure(status, out, err))
        return
    table, steps, _ = profiled
    with open(os.path.join(directory, "trace.json"), "rb") as trace, \
            gzip.open(os.path.join(bench.out_dir, "trace.json.gz"), "wb") as packed:
        shutil.copyfileobj(trace, packed)
    heading = (f"the ten costliest {'kernels' if on_cuda else 'operators'} (by their own time) of {steps} training steps "
               f"of {plan.label('gpt2')}, micro-batch {B} x {T}, one micro-step a step, "
               f"{'bf16, compiled' if on_cuda else 'float32, eager'}; trace: trace.json.gz")
    with open(os.path.join(bench.out_dir, "profile.txt"), "w") as f:
        f.write(heading + "\n" + table + "\n")
    print(heading + "\n" + table + "\n")  # a blank line before what comes next
    bench.row(f"profile: {steps} steps of {plan.label('gpt2')}, micro-batch {B} x {T} under torch.profiler "
              f"(speed: the benchmark just before, without the profiler; top kernels: profile.txt)", args,
              figures["tokens"], figures["mfu"], figures["ms"], figures["memory"])


RUNNERS = {"tests": run_tests, "gpt2": run_gpt2, "sizes": run_sizes, "hellaswag": run_hellaswag, "sample": run_sample,
           "shakespeare": run_shakespeare, "profile": run_profile}

# -----------------------------------------------------------------------------
# Command line


def parse_args(argv):
    """The settings from the command line, checked; --only's values may also be written comma-separated."""
    settings, given = parse_command_line(argv, SETTINGS, __doc__, __file__)
    args = SimpleNamespace(**settings)
    args.only = [part for value in args.only for part in value.split(",") if part]
    unknown = [part for part in args.only if part not in PARTS]
    if "only" in given and not args.only:
        raise UserError(f"--only takes one or more parts: {', '.join(PARTS)}")
    if unknown:
        raise UserError(f"--only: unknown part '{unknown[0]}'; the parts are: {', '.join(PARTS)}")
    if args.time_limit <= 0:
        raise UserError(f"--time_limit takes a number of seconds above 0, not {args.time_limit:g}")
    args.out = args.out or os.environ.get("OUT") or DEFAULT_OUT
    return args


def run(argv):
    """Run the parts asked for, rewriting the table after each, then print it."""
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device here: running the small CPU version (--cpu)")
        args.cpu = True
    plan = CPU_PLAN if args.cpu else GPU_PLAN
    parts = args.only or [part for part in PARTS if part != "profile" or args.profile]
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write into --out={args.out}: {e.strerror}") from None
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as work_dir:
        bench = Bench(plan, os.path.abspath(args.out), work_dir, args.time_limit)
        for part in parts:
            if bench.seconds_left() < 5:
                bench.row(f"{part}: not run, out of time (--time_limit={args.time_limit:g})", None)
            else:
                print(f"[{time.strftime('%H:%M:%S')}] {part}", flush=True)
                RUNNERS[part](bench)
            bench.write_table()
    print(bench.table(), end="")
    print(f"wrote {os.path.join(args.out, 'table.md')} and the outputs of every command in raw.txt beside it")


def main(argv=None):
    run_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
