"""
Time to quality: AdamW against Muon on the same model, data and tokens.

    python bench/optimizers.py                                   # 2 sizes x 2 seeds x 2 optimizers
    python bench/optimizers.py --sizes 4x256 --seeds 1337 --steps 100 --jobs 1
    python bench/optimizers.py --optimizers=muon --muon_lr=4e-3  # one side only, e.g. to sweep its lr

Each run is `python train_gpt2.py` in a subprocess with its own --out_dir, on tiny Shakespeare (the first
90% trains, the last 10% validates) with GPT-2's 50,257-token vocabulary. The script prints each run's
validation loss curve side by side with the other optimizer's, and the fraction of AdamW's steps that
Muon needs to reach AdamW's final validation loss, read off the curve by linear interpolation between
evaluations (--eval_interval sets how fine the curve is).

A size NxC is N blocks of width C with C/64 heads. At these widths the token embedding is still most of
the model, but the blocks' matrices (which Muon trains) hold a fair share of it: 20% at 4x256, 35% at
6x384 (68% in GPT-2 124M). The default 200 steps of 256 tokens read the first sixth of the training text:
the curves show early training, a few CPU minutes per run.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script, this file's own folder bench/ is on the path, not the repository root
    sys.path.insert(0, ROOT)

from common import UserError, parse_command_line, run_main, settings_of  # noqa: E402
from train_gpt2 import SETTINGS as TRAIN_SETTINGS  # noqa: E402

# -----------------------------------------------------------------------------
# Settings (python bench/optimizers.py --help). Lists take several values or one with commas: --seeds 1 2, --seeds=1,2

sizes = ["4x256", "6x384"]       # the models, as layers x width (one head per 64 of width)
seeds = ["1337", "1338"]         # one run per optimizer for each size and seed
steps = 200                      # optimizer steps of 256 tokens per run
eval_interval = 25               # steps between evaluations: how fine the curves are
optimizers = ["adamw", "muon"]   # which optimizers to run
adamw_lr = 1e-3                  # AdamW's peak learning rate (in a Muon run, that of its AdamW part): the best of a sweep at 4x256
muon_lr = TRAIN_SETTINGS["muon_lr"]  # Muon's peak learning rate: train_gpt2.py's default, the best of a sweep at 4x256
data = "input.txt"               # a .txt file, or a directory of token shards
threads = 1                      # threads per run (OMP_NUM_THREADS)
jobs = 2                         # runs at a time
device = ""                      # passed to train_gpt2.py; empty: the best available
out_dir = ""                     # keep the runs here, and reuse those finished with the same settings; empty: a temporary directory

SETTINGS = settings_of(globals())

# What both optimizers share; everything else (betas, weight decay, clipping) is train_gpt2.py's default.
TOKENS_PER_STEP = 256
RUN_SETTINGS = ["--batch_size=4", "--block_size=64", f"--total_batch_size={TOKENS_PER_STEP}", "--eval_iters=16",
                "--hellaswag=False", "--num_samples=0"]
WARMUP_FRACTION = 0.1   # of the steps, linear warmup
MIN_LR_FRACTION = 0.1   # the cosine ends at this fraction of each optimizer's peak


def parse_args(argv):
    args = SimpleNamespace(**parse_command_line(argv, SETTINGS, __doc__, __file__)[0])
    for name in ("sizes", "seeds", "optimizers"):  # --seeds=1337,1338 as well as --seeds 1337 1338
        setattr(args, name, [part for value in getattr(args, name) for part in value.split(",") if part])
    try:
        args.sizes = [tuple(int(n) for n in size.split("x")) for size in args.sizes]
        args.seeds = [int(seed) for seed in args.seeds]
    except ValueError:
        raise UserError("--sizes takes layers x width like 4x256 6x384, and --seeds whole numbers like 1337 1338") from None
    if any(len(size) != 2 or size[1] % 64 for size in args.sizes):
        raise UserError("each size is layers x width, with the width a multiple of 64 (one head per 64)")
    if not set(args.optimizers) <= {"adamw", "muon"} or not args.optimizers:
        raise UserError(f"--optimizers takes adamw and/or muon, not {','.join(args.optimizers)}")
    if min(args.steps, args.eval_interval, args.threads, args.jobs) < 1 or min(args.adamw_lr, args.muon_lr) <= 0:
        raise UserError("--steps, --eval_interval, --threads, --jobs and the learning rates must be positive")
    return args


def run_command(args, optimizer, size, seed, out_dir):
    """The train_gpt2.py command line of one run."""
    n_layer, n_embd = size
    # AdamW trains everything in an AdamW run, and all but the blocks' matrices in a Muon run; Muon follows
    # the same schedule, scaled to its own peak.
    command = [sys.executable, "train_gpt2.py", f"--data_dir={args.data}", f"--out_dir={out_dir}",
               f"--n_layer={n_layer}", f"--n_head={n_embd // 64}", f"--n_embd={n_embd}", f"--seed={seed}",
               f"--optimizer={optimizer}", f"--max_lr={args.adamw_lr}", f"--min_lr={args.adamw_lr * MIN_LR_FRACTION:g}",
               f"--max_steps={args.steps}",
               f"--warmup_steps={max(1, round(args.steps * WARMUP_FRACTION))}",
               f"--eval_interval={args.eval_interval}", f"--checkpoint_interval={args.steps}", *RUN_SETTINGS]
    command += [f"--muon_lr={args.muon_lr}"] if optimizer == "muon" else []
    return command + ([f"--device={args.device}"] if args.device else [])


def train(command, out_dir, threads):
    """Run one training, unless out_dir holds a finished run with the same settings; returns {step: validation
    loss} from its log.txt, and the seconds the run took (0 for a finished one)."""
    os.makedirs(out_dir, exist_ok=True)
    settings = " ".join(arg for arg in command[1:] if not arg.startswith("--out_dir="))
    finished = os.path.join(out_dir, "settings.txt")  # written once the run has ended well
    t0 = time.time()
    if not os.path.exists(finished) or open(finished).read() != settings:
        shutil.rmtree(out_dir)  # a resumed run would append to an old log
        os.makedirs(out_dir)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        with open(os.path.join(out_dir, "output.txt"), "w") as output:
            result = subprocess.run(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            with open(os.path.join(out_dir, "output.txt")) as f:
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
    return curve, time.time() - t0


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
    runs = [(size, seed, optimizer) for size in args.sizes for seed in args.seeds for optimizer in args.optimizers]
    print(f"{len(runs)} runs of {args.steps} steps x {TOKENS_PER_STEP} tokens, {args.jobs} at a time, {args.threads} thread(s) each, "
          f"in {base}; peak lr: AdamW {args.adamw_lr:g}, Muon {args.muon_lr:g}")

    def one(run):
        size, seed, optimizer = run
        out_dir = os.path.join(base, f"{size[0]}x{size[1]}_seed{seed}_{optimizer}")
        command = run_command(args, optimizer, size, seed, out_dir)
        curve, seconds = train(command, out_dir, args.threads)
        print(f"  {seconds:5.0f} s  python {' '.join(command[1:])}", flush=True)
        return curve

    try:
        with ThreadPoolExecutor(args.jobs) as pool:
            curves = dict(zip(runs, pool.map(one, runs)))
    finally:
        if not args.out_dir:
            shutil.rmtree(base, ignore_errors=True)

    summary = []
    for size in args.sizes:
        for seed in args.seeds:
            pair = [curves[size, seed, optimizer] for optimizer in args.optimizers]
            print(f"\nvalidation loss, {size[0]}x{size[1]}, seed {seed}")
            print("| step | " + " | ".join(args.optimizers) + " |")
            print("|---:|" + "---:|" * len(pair))
            for step in sorted(pair[0]):
                print(f"| {step} | " + " | ".join(f"{curve[step]:.4f}" for curve in pair) + " |")
            if len(pair) == 2:
                adamw, muon = pair
                target = adamw[args.steps]
                reached = steps_to_reach(muon, target)
                fraction = reached / args.steps if reached is not None else None
                summary.append((size, seed, target, muon[args.steps], reached, fraction))
    if summary:
        print("\nsteps Muon needs to reach AdamW's final validation loss (interpolated between evaluations)")
        print("| size | seed | AdamW final | Muon final | Muon reaches it at step | fraction of AdamW's steps |")
        print("|---|---:|---:|---:|---:|---:|")
        for size, seed, target, muon_final, reached, fraction in summary:
            at = f"{reached:.1f}" if reached is not None else "never"
            share = f"{fraction:.0%}" if fraction is not None else "> 100%"
            print(f"| {size[0]}x{size[1]} | {seed} | {target:.4f} | {muon_final:.4f} | {at} | {share} |")


def main(argv=None):
    run_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
