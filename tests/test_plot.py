"""plot.py: the curves of a run as a PNG, from the command line and for the trainer, and W&B logging."""
import glob
import json
import os
import struct
import sys
import time
import types

import pytest
import torch

from conftest import ROOT, TINY, read_log, run_script

import plot

WIDTH, HEIGHT = 1200, 450  # plot.FIGURE_INCHES at plot.DPI


def write_run(directory, records, tokens_per_step=None):
    """A run's directory: log.txt with one `step kind value` line per record, and run.json if asked."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "log.txt"), "w") as f:
        f.writelines(f"{step} {kind} {value}\n" for step, kind, value in records)
    if tokens_per_step is not None:
        with open(os.path.join(directory, "run.json"), "w") as f:
            json.dump({"tokens_per_step": tokens_per_step}, f)
    return str(directory)


def training_records(steps=60, eval_interval=20, hellaswag=False, start=10.8):
    """A run's log as the trainer writes it: evaluation at step 0, every eval_interval and at the last step."""
    records = []
    for step in range(steps):
        if step % eval_interval == 0 or step == steps - 1:
            records.append((step, "val", round(start - 0.05 * step, 4)))
            if hellaswag:
                records.append((step, "hella", round(0.25 + 0.0005 * step, 4)))
        records.append((step, "train", round(start - 0.05 * step + 0.1 * (step % 3), 6)))
    return records


def png_size(path):
    """(width, height) in pixels, read back from the file."""
    from matplotlib.image import imread
    height, width = imread(path).shape[:2]
    return width, height


def one_error_line(result):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# -----------------------------------------------------------------------------
# Reading the log


def test_read_log_a_step_logged_twice_by_a_resumed_run_keeps_the_last_record(tmp_path):
    # The run logged steps 0-3, was killed, resumed from its step-2 checkpoint and logged 2-4 again.
    run = write_run(tmp_path / "run", [(0, "val", 10.8), (0, "train", 10.8), (1, "train", 9.0), (2, "train", 8.0),
                                       (3, "train", 7.5), (2, "val", 8.1), (2, "train", 8.25), (3, "train", 7.25),
                                       (4, "train", 7.0)])
    log = plot.read_log(os.path.join(run, "log.txt"))
    assert log["train"] == [(0, 10.8), (1, 9.0), (2, 8.25), (3, 7.25), (4, 7.0)]
    assert log["val"] == [(0, 10.8), (2, 8.1)]
    assert "hella" not in log


def test_read_log_ignores_unknown_kinds_and_a_half_written_last_line(tmp_path):
    path = tmp_path / "log.txt"
    path.write_text("0 val 10.8\n0 train 10.79\n0 lr 0.0001\n1 train 9.5\n2 tra")
    assert plot.read_log(str(path)) == {"val": [(0, 10.8)], "train": [(0, 10.79), (1, 9.5)], "lr": [(0, 0.0001)]}


def test_moving_average_averages_the_last_window_values():
    assert plot.moving_average([4.0, 2.0, 6.0, 0.0], 2) == [4.0, 3.0, 4.0, 3.0]
    assert plot.moving_average([4.0, 2.0], 1) == [4.0, 2.0]


# -----------------------------------------------------------------------------
# The command line


def test_plot_a_run_without_hellaswag_writes_curves_png_in_its_directory(tmp_path):
    run = write_run(tmp_path / "shakespeare", training_records())
    result = run_script("plot.py", run)
    assert result.returncode == 0, result.stderr
    output = os.path.join(run, "curves.png")
    assert result.stdout.strip() == f"wrote {output}"
    assert png_size(output) == (WIDTH, HEIGHT)


def test_a_log_without_hellaswag_gives_the_loss_the_whole_picture_and_says_why(tmp_path):
    run = write_run(tmp_path / "shakespeare", training_records())
    fig = plot.draw([run], str(tmp_path / "curves.png"))
    (loss_ax,) = fig.axes
    assert "no HellaSwag records in the log" in loss_ax.get_title()
    assert loss_ax.get_xlabel() == "step" and loss_ax.get_ylabel().startswith("cross-entropy loss")


def test_plot_a_run_with_hellaswag_draws_its_accuracy_and_the_reference_lines(tmp_path):
    run = write_run(tmp_path / "fineweb", training_records(hellaswag=True, start=4.0))
    fig = plot.draw([run], str(tmp_path / "curves.png"))
    assert png_size(tmp_path / "curves.png") == (WIDTH, HEIGHT)
    loss_ax, hella_ax = fig.axes
    accs = [line for line in hella_ax.get_lines() if line.get_label() == "fineweb"]
    assert list(accs[0].get_ydata()) == [0.25, 0.26, 0.27, 0.2795]
    labels = [line.get_label() for line in hella_ax.get_lines()]
    assert {"GPT-2 124M (0.2955)", "GPT-3 Small (0.337)", "GPT-2 XL (0.4893)"} <= set(labels)
    # Its losses (4.0 to 1.2) come near GPT-2's 3.2924 on FineWeb-Edu: the line is drawn.
    assert "GPT-2 124M, FineWeb-Edu val (3.2924)" in [line.get_label() for line in loss_ax.get_lines()]


def test_gpt2_fineweb_loss_line_is_left_out_for_a_loss_far_above_it(tmp_path):
    run = write_run(tmp_path / "shakespeare", training_records(start=10.8))  # ends near 7.9
    fig = plot.draw([run], str(tmp_path / "curves.png"))
    assert not any("GPT-2" in line.get_label() for line in fig.axes[0].get_lines())


def test_plot_several_runs_share_the_axes_with_a_legend_named_after_their_directories(tmp_path):
    a = write_run(tmp_path / "lr6e-4", training_records(hellaswag=True))
    b = write_run(tmp_path / "lr1e-3", training_records(steps=40, hellaswag=True, start=10.5))
    result = run_script("plot.py", a, b, "-o", tmp_path / "both.png")
    assert result.returncode == 0, result.stderr
    assert png_size(tmp_path / "both.png") == (WIDTH, HEIGHT)
    assert not os.path.exists(os.path.join(a, "curves.png"))
    fig = plot.draw([a, b], str(tmp_path / "both.png"))
    legend = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert "lr6e-4 val" in legend and "lr1e-3 val" in legend
    assert any(t.startswith("lr6e-4 train") for t in legend) and any(t.startswith("lr1e-3 train") for t in legend)
    assert {"lr6e-4", "lr1e-3"} <= {text.get_text() for text in fig.axes[1].get_legend().get_texts()}


@pytest.mark.parametrize("flags", [["-o", "x.png"], ["--output", "x.png"], ["--output=x.png"]])
def test_the_output_is_named_by_o_or_output(flags):
    assert plot.parse_args(["run", *flags]).output == "x.png"


def test_x_in_tokens_multiplies_steps_by_tokens_per_step_from_run_json(tmp_path):
    run = write_run(tmp_path / "run", training_records(steps=50), tokens_per_step=524288)
    result = run_script("plot.py", run, "--x=tokens")
    assert result.returncode == 0, result.stderr
    fig = plot.draw([run], str(tmp_path / "curves.png"), x="tokens")
    val = [line for line in fig.axes[0].get_lines() if line.get_label() == "run val"][0]
    assert list(val.get_xdata()) == [0, 20 * 524288, 40 * 524288, 49 * 524288]
    assert fig.axes[0].get_xlabel() == "tokens"


def test_x_in_tokens_without_run_json_is_one_error_line(tmp_path):
    run = write_run(tmp_path / "run", training_records())
    line = one_error_line(run_script("plot.py", run, "--x=tokens"))
    assert "run.json" in line and "--x=step" in line
    assert not os.path.exists(os.path.join(run, "curves.png"))


@pytest.mark.parametrize("case", ["empty", "missing", "garbage"])
def test_an_empty_missing_or_unreadable_log_is_one_error_line(tmp_path, case):
    run = tmp_path / "run"
    run.mkdir()
    if case != "missing":
        (run / "log.txt").write_text("" if case == "empty" else "this is not\na log\n")
    line = one_error_line(run_script("plot.py", run))
    assert "log.txt" in line
    assert ("does not exist" in line) if case == "missing" else ("no train, val or hella records" in line)


def test_naming_log_txt_instead_of_its_directory_says_so(tmp_path):
    run = write_run(tmp_path / "run", training_records())
    with pytest.raises(plot.UserError, match="is a file; name the run's directory"):
        plot.draw([os.path.join(run, "log.txt")], str(tmp_path / "curves.png"))


@pytest.mark.parametrize("args", [["--x=epochs", "RUN"], ["--colour=red", "RUN"], []])
def test_a_bad_command_line_is_one_error_line(tmp_path, args):
    run = write_run(tmp_path / "run", training_records())
    # In an empty directory: with no run named, plot.py looks in ./log, which must not be the user's.
    (tmp_path / "empty").mkdir()
    one_error_line(run_script(os.path.join(ROOT, "plot.py"), *[run if a == "RUN" else a for a in args],
                              cwd=tmp_path / "empty"))


def test_help_exits_0_and_names_the_flags():
    result = run_script("plot.py", "--help")
    assert result.returncode == 0
    assert "--output" in result.stdout and "--x" in result.stdout


def test_importing_plot_imports_neither_matplotlib_nor_wandb():
    code = "import sys, plot; print('matplotlib' in sys.modules, 'wandb' in sys.modules)"
    result = run_script("-c", code)
    assert result.stdout.split() == ["False", "False"], result.stderr


# -----------------------------------------------------------------------------
# For the trainer: refresh_curves never raises


def test_refresh_curves_draws_curves_png_in_out_dir(tmp_path):
    run = write_run(tmp_path / "run", training_records())
    plot.refresh_curves(run)
    assert png_size(os.path.join(run, "curves.png")) == (WIDTH, HEIGHT)
    assert not os.path.exists(os.path.join(run, "curves.png.tmp"))


@pytest.mark.parametrize("log", [None, "", "\x00\x01garbage\n" * 3])
def test_refresh_curves_on_a_missing_empty_or_garbage_log_warns_in_one_line(tmp_path, capsys, log):
    if log is not None:
        (tmp_path / "log.txt").write_text(log)
    plot.refresh_curves(str(tmp_path))
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and err.startswith("warning: ")
    assert not os.path.exists(tmp_path / "curves.png")


def test_refresh_curves_without_matplotlib_says_once_how_to_install_it(tmp_path, capsys, monkeypatch):
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: `import` raises ImportError
    monkeypatch.setattr(plot, "_told_to_install", False)
    run = write_run(tmp_path / "run", training_records())
    for _ in range(3):
        plot.refresh_curves(run)
    out, err = capsys.readouterr()
    assert err.count("pip install matplotlib") == 1 and len(err.strip().splitlines()) == 1
    assert not os.path.exists(os.path.join(run, "curves.png"))


# -----------------------------------------------------------------------------
# Weights & Biases


def read_wandb_records(run_dir):
    """The records of an offline run's .wandb file, as wandb's protobuf Records. The file is a header
    (":W&B", magic 0xBEE1, version 0) then 32 KiB blocks of chunks, each 7 bytes of header (crc32,
    length, type: 1 whole, 2 first, 3 middle, 4 last part of a record) and its bytes."""
    from wandb.proto import wandb_internal_pb2
    data = open(glob.glob(os.path.join(run_dir, "*.wandb"))[0], "rb").read()
    assert data[:4] == b":W&B"
    records, pending, position, block = [], b"", 7, 32768
    while position + 7 <= len(data):
        if block - position % block < 7:  # too little room left in the block for a chunk header: padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0 or position + 7 + length > len(data):  # the end, or a chunk not yet written out
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def finished_run_records(run_dir, timeout=20.0):
    """read_wandb_records once wandb's service process has written the run's exit record: finish()
    can return before the file is flushed."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_records(run_dir)
        if records and records[-1].WhichOneof("record_type") == "exit" or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def logged_history(records):
    """[{key: value}] of the history rows, with the values decoded from JSON."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """The real wandb package, offline, writing under tmp_path."""
    pytest.importorskip("wandb")
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": tmp_path, "WANDB_SILENT": "true",
                        "WANDB_CONFIG_DIR": tmp_path / "config", "WANDB_CACHE_DIR": tmp_path / "cache",
                        "WANDB_DATA_DIR": tmp_path / "data"}.items():
        monkeypatch.setenv(name, str(value))
    yield tmp_path / "wandb"
    import wandb
    wandb.teardown()  # stop wandb's service process, so that no test after this one shares it


def test_wandb_offline_logs_metrics_and_samples_and_a_resumed_run_keeps_its_id(wandb_offline, capfd):
    run = plot.WandbRun("gpt2-tests", "tiny", {"max_lr": 6e-4, "n_layer": 2})
    for step in range(3):
        run.log({"train/loss": 5.0 - step, "train/lr": 1e-4 * (step + 1)}, step=step)
    run.log({"val/loss": 2.5, "val/perplexity": 12.18}, step=3)
    run.log_samples(3, ["ROMEO: what light", "JULIET: ay me"])
    run.finish()
    first_id = run.id

    (run_dir,) = glob.glob(str(wandb_offline / f"offline-run-*-{first_id}"))
    records = finished_run_records(run_dir)
    rows = logged_history(records)
    assert [row["train/loss"] for row in rows if "train/loss" in row] == [5.0, 4.0, 3.0]
    assert [row["_step"] for row in rows if "train/loss" in row] == [0, 1, 2]
    (evaluation,) = [row for row in rows if "val/loss" in row]
    assert evaluation["val/loss"] == 2.5 and evaluation["_step"] == 3 and evaluation["samples/_type"] == "table-file"
    table = json.load(open(os.path.join(run_dir, "files", evaluation["samples/path"])))
    assert table["columns"] == ["step", "sample"] and table["data"] == [[3, "ROMEO: what light"], [3, "JULIET: ay me"]]
    config = [r for r in records if r.WhichOneof("record_type") == "run"][0].run.config
    assert {item.key: json.loads(item.value_json) for item in config.update}["max_lr"] == 6e-4

    # wandb names an offline run's directory by the second its session starts: a session resumed within the
    # same second would share the first one's directory. Start it in a later second, whatever the machine's load.
    started = os.path.basename(run_dir).split("-")[2]  # offline-run-YYYYMMDD_HHMMSS-ID
    while time.strftime("%Y%m%d_%H%M%S") <= started:
        time.sleep(0.05)
    resumed = plot.WandbRun("gpt2-tests", "tiny", {"max_lr": 6e-4, "n_layer": 2}, resume_id=first_id)
    resumed.log({"train/loss": 1.5}, step=4)
    resumed.finish()
    assert resumed.id == first_id
    assert len(glob.glob(str(wandb_offline / f"offline-run-*-{first_id}"))) == 2  # one directory per session
    out, err = capfd.readouterr()
    assert "wandb" not in out + err  # silent: wandb prints nothing of its own


def test_wandb_missing_is_an_error_that_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(plot.WandbUnavailable, match="pip install wandb"):
        plot.WandbRun("gpt2", "", {})


def test_wandb_init_failing_is_an_error_that_says_how_to_log_in_or_go_offline(monkeypatch):
    def init(**kwargs):
        raise RuntimeError("No API key configured. Use `wandb login` to log in.\nmore detail")
    fake = types.SimpleNamespace(init=init, Settings=lambda **kwargs: kwargs)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with pytest.raises(plot.WandbUnavailable) as raised:
        plot.WandbRun("gpt2", "", {})
    message = str(raised.value)
    assert "No API key configured" in message and "more detail" not in message
    assert "wandb login" in message and "WANDB_MODE=offline" in message


def test_training_logs_to_wandb_draws_curves_and_a_resumed_run_continues_the_same_wandb_run(wandb_offline, shard_dir, tmp_path):
    out = tmp_path / "run"
    args = [*TINY, f"--data_dir={shard_dir}", f"--out_dir={out}", "--eval_interval=2", "--wandb_project=gpt2-tests"]
    first = run_script("train_gpt2.py", *args, "--max_steps=2")
    assert first.returncode == 0, first.stderr
    assert os.path.exists(out / "curves.png") and json.load(open(out / "run.json"))["tokens_per_step"] == 256
    wandb_id = torch.load(out / "ckpt_0000002.pt", weights_only=True)["wandb_id"]
    (run_dir,) = glob.glob(str(wandb_offline / f"offline-run-*-{wandb_id}"))
    rows = logged_history(finished_run_records(run_dir))
    logged = {(step, kind): value for step, kind, value in read_log(out / "log.txt")}
    assert [(row["_step"], row["train/loss"]) for row in rows if "train/loss" in row] == \
        [(step, pytest.approx(logged[step, "train"], abs=1e-6)) for step in (0, 1)]
    assert [row["val/loss"] for row in rows if "val/loss" in row] == \
        [pytest.approx(logged[step, "val"], abs=1e-4) for step in (0, 2)]

    resumed = run_script("train_gpt2.py", "--init_from=resume", f"--out_dir={out}", "--max_steps=4")
    assert resumed.returncode == 0, resumed.stderr
    assert "changed: --max_steps 2 -> 4" in resumed.stdout
    assert torch.load(out / "ckpt_0000004.pt", weights_only=True)["wandb_id"] == wandb_id
    assert len(glob.glob(str(wandb_offline / f"offline-run-*-{wandb_id}"))) == 2  # the same W&B run, twice
