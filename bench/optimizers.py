"""
Time to quality: the gpt2 recipe (AdamW, cosine) at the best of a sweep of peak rates, against config/fast.py, on
the same model, data and tokens.

    python bench/optimizers.py                                  # 2 sizes x 2 seeds x (4 rates + 2 fast): 24 runs
    python bench/optimizers.py --sizes 4x256 --seeds 1337 --steps 100 --lrs 1e-3
    python bench/optimizers.py --data=input.txt                 # tiny Shakespeare instead of Python's documentation
    python bench/optimizers.py --fast_flags="--zero_init=False"  # the fast recipe less one lever, to measure it

Each run is `python train_gpt2.py` in a subprocess with its own --out_dir; the two recipes differ by nothing but
config/fast.py (and the gpt2 recipe's rate). The default data is Python's own documentation, which every Python carries
offline: the reference manual's topics (pydoc_data) and the docstrings of the standard library, about 500,000
GPT-2 tokens of English technical prose with code in it, written once into a .txt file (the first 90% trains, the
last 10% validates). The script prints every validation curve, then for each size and seed the fraction of the
gpt2 recipe's steps that fast needs to reach the gpt2 recipe's best final validation loss, read off fast's curve
by linear interpolation between evaluations (an upper bound: that run spreads its schedule over all the steps),
the final loss of a fast run of --short of the steps (the direct test: a run planned that short), both final
losses, and each recipe's median time per step.

A size NxC is N blocks of width C with C/64 heads.
"""

import ast
import hashlib
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script, this file's own folder bench/ is on the path, not the repository root
    sys.path.insert(0, ROOT)

from common import UserError, atomic_write, run_main  # noqa: E402
from configurator import parse_command_line, settings_of  # noqa: E402

# -----------------------------------------------------------------------------
# Settings (python bench/optimizers.py --help). Lists take several values or one with commas: --seeds 1 2, --seeds=1,2

sizes = ["4x256", "6x384"]       # the models, as layers x width (one head per 64 of width)
seeds = ["1337", "1338"]         # one run of each recipe and rate for each size and seed
steps = 200                      # optimizer steps of 256 tokens per run
eval_interval = 25               # steps between evaluations: how fine the curves are
lrs = ["5e-4", "1e-3", "2e-3", "4e-3"]  # the gpt2 recipe's peak rates to sweep (cosine to a tenth of each)
short = 0.4                      # also a fast run of this fraction of the steps, its schedule fitted to them; 0: none
fast_flags = ""                  # more train_gpt2.py flags for the fast runs, e.g. "--zero_init=False"
data = "pydocs"                  # pydocs (Python's documentation), or a .txt file, or a directory of token shards
threads = 1                      # threads per run (OMP_NUM_THREADS)
jobs = 2                         # runs at a time
device = ""                      # passed to train_gpt2.py; empty: the best available
out_dir = ""                     # keep the runs here, and reuse those finished alike; empty: a temporary directory

SETTINGS = settings_of(globals())

# What every run shares; everything else is train_gpt2.py's default or the recipe's.
TOKENS_PER_STEP = 256
RUN_SETTINGS = ["--batch_size=4", "--block_size=64", f"--total_batch_size={TOKENS_PER_STEP}", "--eval_iters=16",
                "--hellaswag=False", "--num_samples=0"]
WARMUP_FRACTION = 0.1   # of the steps, linear warmup, in both recipes
MIN_LR_FRACTION = 0.1   # the gpt2 recipe's cosine ends at this fraction of its peak, as GPT-2's does


def pydocs_text():
    """Python's documentation as one text: the reference manual's topics and every docstring of 200 characters or
    more in the standard library's sources (its tests left out), ordered by their hashes, so that the validation
    tail is a sample of the whole rather than the last modules of the alphabet."""
    from pydoc_data.topics import topics
    pieces = set(topics.values())
    for root, dirs, files in os.walk(sysconfig.get_paths()["stdlib"]):
        dirs[:] = sorted(d for d in dirs if d not in ("test", "tests", "site-packages", "idlelib", "__pycache__"))
        for name in sorted(f for f in files if f.endswith(".py")):
            try:
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= 200:
                        pieces.add(doc)
    return "\n\n".join(sorted(pieces, key=lambda piece: hashlib.sha256(piece.encode()).hexdigest()))


def parse_args(argv):
    args = SimpleNamespace(**parse_command_line(argv, SETTINGS, __doc__, __file__)[0])
    for name in ("sizes", "seeds", "lrs"):  # --seeds=1337,1338 as well as --seeds 1337 1338
        setattr(args, name, [part for value in getattr(args, name) for part in value.split(",") if part])
    try:
        args.sizes = [tuple(int(n) for n in size.split("x")) for size in args.sizes]
        args.seeds = [int(seed) for seed in args.seeds]
        args.lrs = [float(lr) for lr in args.lrs]
    except ValueError:
        raise UserError("--sizes takes layers x width like 4x256 6x384, --seeds whole numbers like 1337 1338, "
                        "--lrs numbers like 1e-3 2e-3") from None
    if any(len(size) != 2 or size[1] % 64 for size in args.sizes):
        raise UserError("each size is layers x width, with the width a multiple of 64 (one head per 64)")
    if min(args.steps, args.eval_interval, args.threads, args.jobs) < 1 or not args.lrs or min(args.lrs) <= 0:
        raise UserError("--steps, --eval_interval, --threads, --jobs and every rate of --lrs must be positive")
    if not 0 <= args.short < 1 or 0 < args.short * args.steps < 2:
        raise UserError(f"--short is a fraction of --steps, at least 0 and below 1, of 2 steps or more (or 0): "
                        f"got {args.short}")
    return args


def run_command(args, recipe, size, seed, steps, data, out_dir):
    """The train_gpt2.py command line of one run of so many steps: recipe is a peak rate for the gpt2 recipe, or
    'fast'."""
    n_layer, n_embd = size
    command = [sys.executable, "train_gpt2.py", f"--data_dir={data}", f"--out_dir={out_dir}",
               f"--n_layer={n_layer}", f"--n_head={n_embd // 64}", f"--n_embd={n_embd}", f"--seed={seed}",
               f"--max_steps={steps}", f"--warmup_steps={max(1, round(steps * WARMUP_FRACTION))}",
               f"--eval_interval={args.eval_interval}", f"--checkpoint_interval={steps}", *RUN_SETTINGS]
    if recipe == "fast":
        command = [*command[:2], "config/fast.py", *command[2:], *shlex.split(args.fast_flags)]
    else:
        command += [f"--max_lr={recipe:g}", f"--min_lr={recipe * MIN_LR_FRACTION:g}"]
    return command + ([f"--device={args.device}"] if args.device else [])


def train(command, out_dir, threads):
    """Run one training, unless out_dir holds a finished run with the same settings. Returns ({step: validation
    loss} from its log.txt, its median milliseconds per step, the first left out: it compiles and warms up)."""
    os.makedirs(out_dir, exist_ok=True)
    settings = " ".join(arg for arg in command[1:] if not arg.startswith("--out_dir="))
    finished = os.path.join(out_dir, "settings.txt")  # written once the run has ended well
    output = os.path.join(out_dir, "output.txt")
    if not os.path.exists(finished) or open(finished).read() != settings:
        shutil.rmtree(out_dir)  # a resumed run would append to an old log
        os.makedirs(out_dir)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        with open(output, "w") as f:
            result = subprocess.run(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            with open(output) as f:
                last = f.read().strip().splitlines()[-1:] or ["(no output)"]
            raise UserError(f"{' '.join(command[1:])} exited with {result.returncode}: {last[0]}")
        with open(finished, "w") as f:
            f.write(settings)
    curve = {}
    with open(os.path.join(out_dir, "log.txt")) as f:
        for line in f:
            step, kind, value = line.split()
            if kind == "val":
                curve[int(step)] = float(value)
    with open(output) as f:
        times = [int(ms) for ms in re.findall(r"\| step \d+ of \d+ \|.*?\| (\d+) ms \|", f.read())]
    return curve, statistics.median(times[1:] or times)


def steps_to_reach(curve, target):
    """The first step at which the curve is at or below target, interpolated linearly between its
    evaluations; None if it never gets there."""
    points = sorted(curve.items())
    for (step0, loss0), (step1, loss1) in zip(points, points[1:]):
        if loss1 <= target:
            if loss0 <= target:
                return step0
            return step0 + (step1 - step0) * (loss0 - target) / (loss0 - loss1)
    return None


def run(argv):
    args = parse_args(argv)
    base = args.out_dir or tempfile.mkdtemp(prefix="bench_optimizers_")
    os.makedirs(base, exist_ok=True)
    data = args.data
    if data == "pydocs":
        data = os.path.join(base, "pydocs.txt")
        text = pydocs_text()
        if not os.path.exists(data) or open(data, encoding="utf-8").read() != text:
            atomic_write(data, lambda f: f.write(text.encode()))
        print(f"data: Python {sys.version.split()[0]}'s documentation, {len(text):,} characters in {data}")
    recipes = [*args.lrs, "fast"]
    short = round(args.short * args.steps)
    runs = [(size, seed, recipe, args.steps) for size in args.sizes for seed in args.seeds for recipe in recipes]
    runs += [(size, seed, "fast", short) for size in args.sizes for seed in args.seeds if short]
    print(f"{len(runs)} runs of {args.steps} steps x {TOKENS_PER_STEP} tokens, {args.jobs} at a time, "
          f"{args.threads} thread(s) each, in {base}")

    def one(run):
        size, seed, recipe, steps = run
        name = "fast" if recipe == "fast" else f"gpt2_lr{recipe:g}"
        name += f"_{steps}steps" if steps != args.steps else ""
        out_dir = os.path.join(base, f"{size[0]}x{size[1]}_seed{seed}_{name}")
        command = run_command(args, recipe, size, seed, steps, data, out_dir)
        t0 = time.time()
        result = train(command, out_dir, args.threads)
        print(f"  {time.time() - t0:5.0f} s  python {' '.join(command[1:])}", flush=True)
        return result

    try:
        with ThreadPoolExecutor(args.jobs) as pool:
            results = dict(zip(runs, pool.map(one, runs)))
    finally:
        if not args.out_dir:
            shutil.rmtree(base, ignore_errors=True)

    names = [f"gpt2 {lr:g}" for lr in args.lrs] + ["fast"]
    summary = []
    for size in args.sizes:
        for seed in args.seeds:
            curves = [results[size, seed, recipe, args.steps][0] for recipe in recipes]
            print(f"\nvalidation loss, {size[0]}x{size[1]}, seed {seed}")
            print("| step | " + " | ".join(names) + " |")
            print("|---:|" + "---:|" * len(curves))
            for step in sorted(curves[0]):
                print(f"| {step} | " + " | ".join(f"{curve[step]:.4f}" for curve in curves) + " |")
            best = min(args.lrs, key=lambda lr: results[size, seed, lr, args.steps][0][args.steps])
            gpt2, gpt2_ms = results[size, seed, best, args.steps]
            fast, fast_ms = results[size, seed, "fast", args.steps]
            reached = steps_to_reach(fast, gpt2[args.steps])
            short_final = results[size, seed, "fast", short][0][short] if short else None
            summary.append((size, seed, best, gpt2[args.steps], fast[args.steps], reached, short_final, gpt2_ms,
                            fast_ms))
    print(f"\nthe gpt2 recipe (at its best rate) against the fast recipe, {args.steps} steps; 'fast reaches it' reads "
          f"the step off fast's {args.steps}-step curve, and 'fast in {short} steps' is the final loss of a fast "
          f"run of {short} steps ({args.short:.0%}), its schedule fitted to them")
    print(f"| size | seed | gpt2 rate | gpt2 final | fast final | fast reaches it at step | fraction of the steps "
          f"| fast in {short} steps | ms/step gpt2 | ms/step fast |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size, seed, best, target, final, reached, short_final, gpt2_ms, fast_ms in summary:
        at, share = (f"{reached:.1f}", f"{reached / args.steps:.0%}") if reached is not None else ("never", "> 100%")
        in_short = "-" if short_final is None else f"{short_final:.4f}"
        print(f"| {size[0]}x{size[1]} | {seed} | {best:g} | {target:.4f} | {final:.4f} | {at} | {share} "
              f"| {in_short} | {gpt2_ms:.0f} | {fast_ms:.0f} |")


def main(argv=None):
    run_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
