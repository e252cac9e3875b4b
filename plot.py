"""
See a run: its loss and HellaSwag curves as a picture, and optional Weights & Biases logging.

    python plot.py log/shakespeare                      # writes log/shakespeare/curves.png
    python plot.py log/a log/b -o compare.png           # two runs on the same axes, named a and b
    python plot.py log/ --x=tokens                      # x in tokens (tokens_per_step from log/run.json)

Left panel: the training loss of every step (faint) and its moving average, and the validation loss at
each evaluation. Right panel, where a log has HellaSwag records: acc_norm at each evaluation, beside
GPT-2's and GPT-3's.
train_gpt2.py calls refresh_curves(out_dir) after every evaluation, so {out_dir}/curves.png follows
the run while it goes on. RunLog writes the trainer's log.txt, and WandbRun is its Weights & Biases run
(its --wandb_project setting).
Importing this file does nothing: matplotlib and wandb are imported when they are used.
"""

import json
import os
import sys
from types import SimpleNamespace

from common import UserError, atomic_write, newest_run, run_main
from configurator import parse_command_line, settings_of

# -----------------------------------------------------------------------------
# Settings of the command line (python plot.py --help)

runs = []                # the runs to draw: their out_dirs (the words without --); none: the newest run under log/
output = ""              # the PNG to write (-o works too); empty: curves.png in the first run's directory
x = "step"               # the x axis: step, or tokens (tokens_per_step from each run's run.json)

# Reference lines, as the README's tables give them (build-nanogpt's evaluation method).
GPT2_VAL_LOSS = ("GPT-2 124M, FineWeb-Edu val", 3.2924)
HELLASWAG_LINES = [
    ("GPT-2 XL", 0.4893),
    ("GPT-3 Small", 0.337),
    ("GPT-2 124M", 0.2955),
    ("chance", 0.25),  # four endings: a model that guesses scores 0.25
]
SMOOTHING = 0.04         # the train loss is averaged over this fraction of the run's steps (at least 1)
SKIP_START = 0.05        # the loss axis tops out at the highest loss after the first 5% of the steps:
                         # the start, near ln(50257) = 10.8, would squash the part worth seeing
FIGURE_INCHES = (12, 4.5)
DPI = 100                # 1200 x 450 pixels


class MatplotlibMissing(UserError):
    pass


class WandbUnavailable(UserError):
    """W&B was asked for (a wandb_project) but cannot log; the trainer stops at start with this message."""


# -----------------------------------------------------------------------------
# Reading a run


def read_log(path):
    """log.txt -> {kind: [(step, value), ...]} sorted by step. A resumed run appends to its log, so a
    step may appear twice: the last record counts. A line that does not parse (a run killed in the
    middle of a write leaves half a line) is skipped."""
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist; name a run's out_dir (where train_gpt2.py writes log.txt)")
    series = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) != 3:
                continue
            try:
                step, kind, value = int(fields[0]), fields[1], float(fields[2])
            except ValueError:
                continue
            series.setdefault(kind, {})[step] = value
    if not any(kind in series for kind in ("train", "val", "hella")):
        raise UserError(f"{path} has no train, val or hella records yet")
    return {kind: sorted(by_step.items()) for kind, by_step in series.items()}


def tokens_per_step(run_dir):
    """The x scale of --x=tokens, from the run.json that train_gpt2.py writes beside log.txt."""
    path = os.path.join(run_dir, "run.json")
    if not os.path.isfile(path):
        raise UserError(f"--x=tokens needs {path} (train_gpt2.py writes tokens_per_step there); use --x=step")
    try:
        with open(path, encoding="utf-8") as f:
            return int(json.load(f)["tokens_per_step"])
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} has no number tokens_per_step; use --x=step") from None


def moving_average(values, window):
    """The mean of each value and the window - 1 before it (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def short_count(n):
    """1500 -> 1.5K, 2e9 -> 2B: token counts as the field writes them."""
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= size:
            return f"{n / size:.3g}{suffix}"
    return f"{n:.3g}"


def run_names(run_dirs):
    """Legend names: each run's directory name, or its path where two runs share a name."""
    names = [os.path.basename(os.path.normpath(d)) or os.path.normpath(d) for d in run_dirs]
    if len(set(names)) < len(names):
        names = [os.path.normpath(d) for d in run_dirs]
    return names


# -----------------------------------------------------------------------------
# Drawing


def draw(run_dirs, output, x="step"):
    """Draw the runs' log.txt files into one PNG at output; returns the matplotlib Figure."""
    for d in run_dirs:
        if os.path.isfile(d):
            raise UserError(f"{d} is a file; name the run's directory (its out_dir), where log.txt is")
    logs = [read_log(os.path.join(d, "log.txt")) for d in run_dirs]
    scales = [tokens_per_step(d) if x == "tokens" else 1 for d in run_dirs]
    try:
        # The Agg canvas on a Figure of our own, not pyplot: no display needed, no global backend switched
        # in a notebook that imports this file, and no figure left open by a trainer that redraws often.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        raise MatplotlibMissing("the curves need matplotlib: pip install matplotlib") from None

    fig = Figure(figsize=FIGURE_INCHES, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    # One color a run, in both panels; x in steps or tokens.
    runs = [(name, log, scale, f"C{i % 10}")
            for i, (name, log, scale) in enumerate(zip(run_names(run_dirs), logs, scales))]
    # Without HellaSwag records (hellaswag=False, as in the Shakespeare preset) the loss takes the whole width.
    with_hellaswag = any(log.get("hella") for log in logs)
    axes = list(fig.subplots(1, 2)) if with_hellaswag else [fig.subplots(1, 1)]
    draw_losses(axes[0], runs, note="" if with_hellaswag else "no HellaSwag records in the log")
    if with_hellaswag:
        draw_hellaswag(axes[1], runs)
    for ax in axes:
        ax.set_xlabel("tokens" if x == "tokens" else "step")
        if x == "tokens":
            ax.xaxis.set_major_formatter(FuncFormatter(lambda tokens, _: short_count(tokens)))

    # Written to a temporary name and renamed, so that a viewer open on the file never sees half a picture.
    atomic_write(output, lambda f: fig.savefig(f, format="png"))
    return fig


def draw_losses(ax, runs, note=""):
    """Each run's train loss, raw (faint) and averaged, and its validation loss; note goes in the title."""
    top = bottom = None
    for name, log, scale, color in runs:
        train, val = log.get("train", []), log.get("val", [])
        if train:
            steps, losses = zip(*train)
            window = max(1, round(SMOOTHING * len(losses)))
            ax.plot([s * scale for s in steps], losses, color=color, alpha=0.2, linewidth=0.8)
            ax.plot([s * scale for s in steps], moving_average(losses, window), color=color, linewidth=1.6,
                    label=f"{name} train (mean of {window} steps)" if window > 1 else f"{name} train")
        if val:
            steps, losses = zip(*val)
            ax.plot([s * scale for s in steps], losses, color=color, linestyle="--", marker="o", markersize=3.5,
                    linewidth=1.2, label=f"{name} val")
        if train or val:
            last_step = max(s for s, _ in train + val)
            high = max(v for s, v in train + val if s >= SKIP_START * last_step)
            low = min(v for _, v in train + val)
            top, bottom = (high, low) if top is None else (max(top, high), min(bottom, low))
    notes = [note] if note else []
    ax.set_title("; ".join(["loss"] + notes), fontsize=11)
    ax.set_ylabel("cross-entropy loss (nats per token)")
    ax.grid(alpha=0.3)
    if top is None:  # a log with HellaSwag records only
        return
    span = max(top - bottom, 0.1)
    # GPT-2's loss on FineWeb-Edu's validation shard means nothing beside a loss on other data, such as
    # Shakespeare's, which stays far above it: the line is drawn only when the runs come near it.
    name, value = GPT2_VAL_LOSS
    if bottom - 0.25 * span <= value <= top:
        ax.axhline(value, color="black", linestyle=":", linewidth=1.2, label=f"{name} ({value})")
        bottom = min(bottom, value)
    ax.set_ylim(bottom - 0.05 * span, top + 0.05 * span)
    if any(v > top + 0.05 * span for _, log, _, _ in runs for kind in ("train", "val") for _, v in log.get(kind, [])):
        ax.set_title("; ".join(["loss (the first steps are above the top edge)"] + notes), fontsize=11)
    ax.legend(fontsize=9, loc="upper right")


def draw_hellaswag(ax, runs):
    """Each run's HellaSwag acc_norm, beside the reference models'."""
    ax.set_title("HellaSwag", fontsize=11)
    runs = [(name, log["hella"], scale, color) for name, log, scale, color in runs if log.get("hella")]
    for name, points, scale, color in runs:
        steps, accs = zip(*points)
        ax.plot([s * scale for s in steps], accs, color=color, marker="o", markersize=3.5, label=name)
    for (name, value), style in zip(HELLASWAG_LINES, ["-.", "--", ":", "-"]):
        ax.axhline(value, color="gray" if name == "chance" else "black", linestyle=style, linewidth=1.0,
                   label=f"{name} ({value})")
    # The reference lines cross the whole panel: the legend gets room of its own above the top one.
    values = [value for _, value in HELLASWAG_LINES] + [a for _, points, _, _ in runs for _, a in points]
    legend_rows = (len(HELLASWAG_LINES) + len(runs) + 1) // 2
    ax.set_ylim(min(values) - 0.01, max(values) + 0.015 + 0.03 * legend_rows)
    ax.legend(fontsize=9, loc="upper right", ncols=2)
    ax.set_ylabel("acc_norm")
    ax.grid(alpha=0.3)


_told_to_install = False


def refresh_curves(out_dir):
    """Redraw {out_dir}/curves.png from {out_dir}/log.txt. For the trainer: it never raises, since a
    picture is not worth a training run; a missing matplotlib is said once, other failures each time."""
    global _told_to_install
    path = os.path.join(out_dir, "curves.png")
    try:
        draw([out_dir], path)
    except MatplotlibMissing:
        if not _told_to_install:
            print(f"note: {path} is not drawn: matplotlib is missing (pip install matplotlib)", file=sys.stderr)
            _told_to_install = True
    except Exception as e:
        first_line = (str(e).splitlines() or [""])[0]
        reason = first_line if isinstance(e, UserError) else f"{type(e).__name__}: {first_line}"
        print(f"warning: {path} is not drawn: {reason}", file=sys.stderr)


# -----------------------------------------------------------------------------
# Weights & Biases


class WandbRun:
    """Rank 0's W&B run. The trainer keeps .id in its checkpoints and passes it back as resume_id, so
    a resumed training run continues the same W&B run (wandb's resume="allow": the id is resumed if
    W&B knows it, created if not). WANDB_MODE=offline logs to ./wandb (or WANDB_DIR) without network,
    for `wandb sync` later."""

    def __init__(self, project, run_name, config, resume_id=None):
        try:
            import wandb
        except ImportError:
            raise WandbUnavailable(f"--wandb_project={project} needs the wandb package: pip install wandb "
                                   "(or leave wandb_project empty)") from None
        try:
            # allow_val_change: a resumed run may change a setting (a longer max_steps) without an error.
            # silent: wandb prints nothing of its own; console="off": it leaves our stdout alone (the
            # trainer logs its numbers and samples itself).
            self._run = wandb.init(project=project, name=run_name or None, config=config, id=resume_id or None,
                                   resume="allow", allow_val_change=True,
                                   settings=wandb.Settings(silent=True, console="off"))
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise WandbUnavailable(f"W&B could not start a run ({reason}): run `wandb login`, or set "
                                   "WANDB_MODE=offline to log locally and `wandb sync` later") from None
        self._wandb = wandb
        self.id = self._run.id

    def log(self, metrics, step):
        """Log a dict of numbers at an optimizer step. W&B ignores a step lower than one already logged."""
        self._run.log(metrics, step=step)

    def log_samples(self, step, texts):
        """The samples of an evaluation, as a table with one row per sample."""
        table = self._wandb.Table(columns=["step", "sample"], data=[[step, text] for text in texts])
        self._run.log({"samples": table}, step=step)

    def finish(self):
        self._run.finish()


class RunLog:
    """The records of a training run, each (step, kind, value): a line `{step} {kind} {value}` in a file
    (build-nanogpt's log.txt format, which read_log reads), the same line with its details on the console,
    and everything to W&B when a run is attached (train/loss, val/loss, hella/acc_norm, then train/lr and so
    on). Only rank 0 writes (enabled); the others keep quiet. With curves, each evaluation redraws curves.png."""
    VALUE_NAMES = {"train": "loss", "val": "loss", "hella": "acc_norm"}

    def __init__(self, path, enabled, wandb_run=None, curves=False):
        self.path, self.enabled, self.wandb_run, self.curves = path, enabled, wandb_run, curves

    def record(self, step, kind, value, details=(), metrics=None):
        """details: (text, ...) for the console only; metrics: {name: number} for W&B only."""
        if not self.enabled:
            return
        line = f"{step} {kind} {value:.6f}" if kind == "train" else f"{step} {kind} {value:.4f}"
        print(" | ".join([line, *details]), flush=True)
        try:
            with open(self.path, "a") as f:  # append: a resumed run adds to the run's log
                f.write(line + "\n")
        except OSError as e:  # a full disk, say: the run stops with one line, its last checkpoint whole
            raise UserError(f"cannot write {self.path} ({e.strerror}); free some space (a training run then goes "
                            f"on with --init_from=resume --out_dir={os.path.dirname(self.path)})") from None
        if self.wandb_run is not None:
            metrics = {f"{kind}/{name}": number for name, number in (metrics or {}).items()}
            self.wandb_run.log({f"{kind}/{self.VALUE_NAMES[kind]}": value, **metrics}, step=step)

    def evaluated(self, step, samples):
        """After an evaluation: the samples to W&B, and curves.png beside the log redrawn (never an error)."""
        if self.enabled and self.wandb_run is not None and samples:
            self.wandb_run.log_samples(step, samples)
        if self.enabled and self.curves:
            refresh_curves(os.path.dirname(self.path))


# -----------------------------------------------------------------------------
# Command line


def parse_args(argv):
    """The settings from the command line: the run directories, and -o/--output and --x."""
    args = SimpleNamespace(**parse_command_line(argv, settings_of(globals()), __doc__, __file__, positional="runs",
                                                aliases={"-o": "output"})[0])
    # No run named, or log/ (the trainer's default out_dir) that holds none itself: the newest run below log/.
    args.runs = [newest_run(run_dir) for run_dir in args.runs or ["log"]]
    if args.x not in ("step", "tokens"):
        raise UserError(f"--x takes step or tokens, not '{args.x}'")
    return args


def run(argv):
    args = parse_args(argv)
    output = args.output or os.path.join(args.runs[0], "curves.png")
    try:
        draw(args.runs, output, x=args.x)
    except OSError as e:  # the output's directory is missing or not writable
        raise UserError(f"cannot write {output}: {e.strerror}") from None
    print(f"wrote {output}")


def main(argv=None):
    run_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
