"""Config files, as nanoGPT has them: `python train_gpt2.py config/NAME.py --flag=...` reads plain `name = value`
lines (never running them), the flags win, and a new run prints every setting that differs from the constants at
the top of train_gpt2.py with where its value came from, so that an edit at the top is never silently undone."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, read_log
from train_gpt2 import GPT, GPTConfig, parse_settings

# The files a copy of the repository needs to train (the tests edit the copy's train_gpt2.py, never the real one).
SOURCES = ["train_gpt2.py", "common.py", "configurator.py", "checkpoints.py", "fsdp.py", "huggingface.py", "hellaswag.py",
           "plot.py", "sample.py"]


@pytest.fixture
def copy(tmp_path):
    """A copy of the repository's training files in tmp_path, with its own config/ directory."""
    for name in SOURCES:
        os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    (tmp_path / "config").mkdir()
    return tmp_path


def insert_after(copy, anchor, line):
    """Add a line of code to the copy's train_gpt2.py after the first line that holds anchor, indented alike."""
    path = copy / "train_gpt2.py"
    lines = path.read_text().split("\n")
    i = next(i for i, text in enumerate(lines) if anchor in text)
    lines.insert(i + 1, " " * (len(lines[i]) - len(lines[i].lstrip())) + line)
    path.write_text("\n".join(lines))


def edit_top(copy, name, value):
    """Change the constant `name` at the top of the copy's train_gpt2.py, as a user would in an editor."""
    path = copy / "train_gpt2.py"
    text, count = re.subn(rf"^{name} = \S+", f"{name} = {value}", path.read_text(), count=1, flags=re.M)
    assert count == 1
    path.write_text(text)


def train(copy, *args):
    """train_gpt2.py of the copy, with TINY's settings but for n_layer, which the tests set at the top or in a file."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    tiny = [arg for arg in TINY if not arg.startswith("--n_layer=")]
    return subprocess.run([sys.executable, "train_gpt2.py", *tiny, *map(str, args)], cwd=copy, capture_output=True,
                          text=True, timeout=300, env=env)


def tiny_parameters(n_layer):
    """The parameters of TINY's model with n_layer blocks."""
    return GPT(GPTConfig(vocab_size=256, n_layer=n_layer, n_head=2, n_embd=32, block_size=32)).num_params()


def parameters(stdout):
    return int(re.search(r"^([\d,]+) parameters \|", stdout, flags=re.M)[1].replace(",", ""))


def test_the_shakespeare_config_file_sets_the_quick_start_and_flags_win():
    settings, sources = parse_settings(["config/shakespeare.py", "--max_steps=100"])
    assert (settings["data_dir"], settings["n_layer"], settings["n_embd"], settings["max_steps"]) == ("input.txt", 4, 128, 100)
    assert sources["n_layer"] == "config/shakespeare.py" and sources["max_steps"] == "--max_steps"
    # A flag before the file wins too: files first, then every flag.
    settings, sources = parse_settings(["--n_layer=2", "config/shakespeare.py"])
    assert settings["n_layer"] == 2 and sources["n_layer"] == "--n_layer"


def test_an_edit_at_the_top_takes_effect_where_the_config_file_does_not_set_it(copy, shard_dir):
    edit_top(copy, "n_layer", "1")
    (copy / "config" / "mine.py").write_text('"""Only the learning rate."""\nmax_lr = 1e-3  # a comment\n')
    result = train(copy, "config/mine.py", f"--data_dir={shard_dir}", "--out_dir=log/a", "--max_steps=1")
    assert result.returncode == 0, result.stderr
    assert parameters(result.stdout) == tiny_parameters(n_layer=1)  # the edit took effect
    assert "n_layer" not in result.stdout.split(" parameters |")[0]  # the run's own value is the file's: not listed
    assert re.search(r"^  max_lr = 0\.001 +# config/mine\.py$", result.stdout, flags=re.M)
    assert [kind for _, kind, _ in read_log(copy / "log" / "a" / "log.txt")].count("train") == 1


def test_an_edit_at_the_top_that_the_config_file_overrides_is_printed_with_its_source(copy, shard_dir):
    edit_top(copy, "n_layer", "1")
    (copy / "config" / "mine.py").write_text("n_layer = 3\n")
    result = train(copy, "config/mine.py", f"--data_dir={shard_dir}", "--out_dir=log/a", "--max_steps=1")
    assert result.returncode == 0, result.stderr
    head = result.stdout.split(" parameters |")[0]
    assert head.startswith("settings that differ from the top of train_gpt2.py:\n")
    assert re.search(r"^  n_layer = 3 +# config/mine\.py$", head, flags=re.M)
    assert re.search(r"^  max_steps = 1 +# --max_steps$", head, flags=re.M)
    assert parameters(result.stdout) == tiny_parameters(n_layer=3)  # the config file's 3 blocks, not the edit's 1


@pytest.mark.parametrize("text, message", [
    ("n_layers = 4\n", "mine.py:1: unknown setting 'n_layers'; did you mean 'n_layer'?"),
    ("max_lr = 1e-3\nn_layer = 2 * 2\n", "mine.py:2: n_layer = 2 * 2: the value must be a literal"),
    ("import os\n", "mine.py:1: a config file holds only `name = value` lines, each value a literal"),
    ("print('ran')\n", "mine.py:1: a config file holds only `name = value` lines"),
    ("n_layer = \n", "mine.py:1: not valid Python"),
    ("n_layer = '4'\n", "mine.py:1: n_layer = '4': it takes a whole number, like its default 12"),
    ("hellaswag = 0\n", "mine.py:1: hellaswag = 0: it takes True or False"),
])
def test_a_bad_config_file_is_one_line_naming_the_file_and_line(copy, text, message):
    (copy / "config" / "mine.py").write_text(text)
    result = train(copy, "config/mine.py")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: config/") and message in result.stderr
    assert "ran" not in result.stdout and not os.path.exists(copy / "log")  # nothing ran, nothing was made


def test_a_missing_config_file_and_a_stray_word_are_one_line(copy):
    missing = train(copy, "config/nothing.py")
    assert missing.returncode == 2 and "error: config file config/nothing.py does not exist" in missing.stderr
    stray = train(copy, "max_lr=1")
    assert stray.returncode == 2 and "cannot read 'max_lr=1'" in stray.stderr and "config file" in stray.stderr


def test_a_number_setting_takes_a_whole_number_from_a_config_file_and_a_float_takes_an_int(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("max_lr = 1\nbatch_size = 'auto'\nshuffle = False\n")
    settings, sources = parse_settings([str(path)])
    assert settings["max_lr"] == 1.0 and isinstance(settings["max_lr"], float)
    assert settings["batch_size"] == "auto" and settings["shuffle"] is False and sources["shuffle"] == str(path)


def test_a_constant_added_at_the_top_takes_its_flag_and_its_config_file_everywhere(copy, shard_dir):
    """The nanoGPT habit: add a constant at the top, read it in the model, set it from the command line. The model
    sees the value that the run prints, not the one written at the top."""
    insert_after(copy, "dropout = 0.0", "mlp_probe = 1.0                 # a setting of the user's own")
    insert_after(copy, "self.c_fc = nn.Linear(", 'print(f"the MLP sees mlp_probe={mlp_probe}")')
    (copy / "config" / "mine.py").write_text("mlp_probe = 0.25\n")
    for args, value, source in ((["--mlp_probe=0.5"], 0.5, "--mlp_probe"), (["config/mine.py"], 0.25, "config/mine.py"),
                                (["config/mine.py", "--mlp_probe=0.75"], 0.75, "--mlp_probe")):
        out = f"log/{source.strip('-').replace('/', '_')}_{value}"
        result = train(copy, *args, f"--data_dir={shard_dir}", f"--out_dir={out}", "--max_steps=1", "--n_layer=1")
        assert result.returncode == 0, result.stderr
        assert re.search(rf"^  mlp_probe = {value} +# {source}$", result.stdout, flags=re.M)
        assert result.stdout.count(f"the MLP sees mlp_probe={value}") == 1 and "mlp_probe=1.0" not in result.stdout
    help_text = train(copy, "--help").stdout
    assert "--mlp_probe=1.0" in help_text and "a setting of the user's own" in help_text


def test_a_gradient_print_added_in_the_loop_sees_numbers(copy, shard_dir):
    """The first thing people add to a training loop: a look at the gradients before the optimizer steps."""
    insert_after(copy, "norm = clip_gradients(", 'print(f"grad of wpe: {model.transformer.wpe.weight.grad.norm().item():.6f}")')
    result = train(copy, f"--data_dir={shard_dir}", "--out_dir=log/a", "--max_steps=3", "--n_layer=1")
    assert result.returncode == 0, result.stderr
    norms = [float(n) for n in re.findall(r"^grad of wpe: ([0-9.]+)$", result.stdout, flags=re.M)]
    assert len(norms) == 3 and all(n > 0 for n in norms)
