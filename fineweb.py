"""
Tokenize FineWeb-Edu, or any corpus, into the GPT-2 token shards that train_gpt2.py reads.

    python fineweb.py                                  # FineWeb-Edu sample-10BT -> edu_fineweb10B/ (10B tokens, 20 GB)
    python fineweb.py --streaming                      # the same, tokenizing as it downloads: no copy of the corpus
    python fineweb.py --dataset Salesforce/wikitext --name wikitext-103-raw-v1 --out_dir wikitext103 --prefix wikitext
    python fineweb.py --input input.txt --out_dir shakespeare --prefix shakespeare
    python fineweb.py --input corpus/ --benchmark      # tokens/s on a local corpus; keeps no shards

Every document becomes <|endoftext|> followed by its GPT-2 tokens. The stream of tokens is cut into shards
of --shard_size tokens in llm.c's .bin format: the first shard is validation, the rest training, as in
build-nanogpt. A corpus smaller than two shards gives its last tenth to validation instead, the rule of
`train_gpt2.py --data_dir=FILE.txt`: for one .txt file, both hold out the very same tokens.

manifest.json beside the shards says where they came from, and records each shard's length and checksum.
One run at a time owns --out_dir. Stopped midway, the same command resumes after the last whole shard; a
shard that is missing or no longer the one the manifest records is made again, with those after it.
"""

import hashlib
import itertools
import json
import multiprocessing
import os
import re
import signal
import sys
import tempfile
import time
from collections import deque
from contextlib import contextmanager
from types import SimpleNamespace

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from common import (SHARD_HEADER_BYTES, SHARD_MAGIC, SHARD_VERSION, UserError, atomic_write, check_writable_dir,
                    get_tokenizer, lock_dir, open_shard, run_main, split_text_tokens)
from configurator import parse_command_line, settings_of

# -----------------------------------------------------------------------------
# Settings. The defaults make the data of the GPT-2 124M recipe (python fineweb.py --help).

dataset = "HuggingFaceFW/fineweb-edu"  # a Hugging Face dataset, or a local dataset directory
name = "sample-10BT"                   # its configuration ('' for none): sample-10BT is ~9.67M documents, 10B GPT-2 tokens
split = "train"                        # the dataset's split
streaming = False                      # tokenize the dataset as it downloads, keeping no copy on disk
input = []                             # local files instead of --dataset: .txt (one file is one document), .jsonl, .json, .parquet, or directories of them
text_field = "text"                    # the field that holds a document's text (.json, .jsonl, .parquet, datasets)
out_dir = "edu_fineweb10B"             # where the shards go: train_gpt2.py's default data_dir
prefix = "edufineweb"                  # shards are named {prefix}_{val|train}_{index:06d}.bin
shard_size = 100_000_000               # tokens per shard: 200 MB on disk
overwrite = False                      # delete the shards already in out_dir when they come from another source or other settings
workers = os.cpu_count() or 1          # tokenizer processes (default: one per core)
benchmark = False                      # tokenize into a temporary directory and print tokens/s, and those of one core of tiktoken

SETTINGS = settings_of(globals())

DOCS_PER_TASK = 256       # documents a worker tokenizes in one go: enough to make the hand-off cheap
MANIFEST = "manifest.json"
CHECKSUM_BYTES = 1 << 20  # a shard's checksum covers its first and last MiB: see shard_checksum
LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # --input: datasets builder


def parse_args(argv):
    args = SimpleNamespace(**parse_command_line(argv, SETTINGS, __doc__, __file__)[0])
    if args.shard_size < 1 or args.workers < 1:
        raise UserError("--shard_size and --workers take a positive integer")
    if args.shard_size > 2**31 - 1:  # llm.c's header counts a shard's tokens in an int32
        raise UserError(f"--shard_size={args.shard_size}: a shard holds at most 2,147,483,647 tokens (its header "
                        f"counts them in an int32); the default is 100,000,000")
    # train_gpt2.py tells training from validation shards by 'train' and 'val' in the file name.
    if not re.fullmatch(r"[\w.-]+", args.prefix) or "train" in args.prefix or "val" in args.prefix:
        raise UserError(f"--prefix={args.prefix}: use letters, digits, '_', '-' or '.', without 'train' or 'val'")
    args.name = args.name or None
    return args

# -----------------------------------------------------------------------------
# Sources: a Hugging Face dataset, or local files read by the same datasets loaders


def list_local_files(paths):
    """[(path, builder)] for the --input paths: files as given, directories walked in sorted order."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found += [os.path.join(root, n) for n in names if not n.startswith(".") and extension(n) in LOCAL_FORMATS]
            if not found:
                raise UserError(f"directory {path} holds no {', '.join(LOCAL_FORMATS)} files")
            files += sorted(found)
        elif os.path.isfile(path):
            if extension(path) not in LOCAL_FORMATS:
                raise UserError(f"cannot read {path}: --input takes {', '.join(LOCAL_FORMATS)} files or directories of them")
            files.append(path)
        else:
            raise UserError(f"{path} does not exist")
    # An empty .txt file is an empty document; an empty .json(l) file is no documents, which datasets can't read.
    return [(path, LOCAL_FORMATS[extension(path)]) for path in files
            if LOCAL_FORMATS[extension(path)] != "json" or os.path.getsize(path) > 0]


def extension(path):
    return os.path.splitext(path)[1].lower()


def check_local_file(path, builder, text_field):
    """Fail before the first shard, naming the file, on what datasets would only report mid-run."""
    if builder == "parquet":
        try:
            fields = pq.read_schema(path).names
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"cannot read {path} as Parquet: {first_line(e)}") from None
    elif builder == "json":
        with open(path, "rb") as f:
            line = f.readline(1 << 20).strip()  # a longer first record is datasets' to judge
        try:
            record = json.loads(line) if line else None
        except ValueError:
            record = None
            if not line.startswith((b"[", b"{")):  # a JSON array or a pretty-printed object is datasets' to judge
                raise UserError(f"cannot read {path}: its first line is not JSON (a .jsonl file holds one JSON object a line)") from None
        if not isinstance(record, dict):
            return
        fields = list(record)
    else:
        return  # .txt: any bytes will do; invalid UTF-8 is replaced
    if text_field not in fields:
        raise UserError(missing_field(path, text_field, fields))


def missing_field(where, text_field, fields):
    return f"{where} has no field '{text_field}'; its fields are: {', '.join(fields)} (choose one with --text_field)"


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def count_invalid_utf8(paths):
    """How many invalid UTF-8 sequences these files hold: reading replaces each with U+FFFD."""
    count = 0
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            count += data.decode("utf-8", errors="replace").count("\ufffd") - data.count("\ufffd".encode())
    return count


def load_parts(args, files):
    """The corpus as [(dataset, text field, name)], read one after another. Local files go through
    datasets' own json, parquet and text loaders, as a dataset on the hub does; streamed, so that
    datasets keeps no second copy of them."""
    if files is None:
        try:
            ds = datasets.load_dataset(args.dataset, name=args.name, split=args.split, streaming=args.streaming)
        except Exception as e:  # no network, no such dataset, configuration or split: datasets raises many kinds
            raise UserError(f"cannot load dataset {args.dataset} (name {args.name}, split {args.split}): {first_line(e)}") from None
        name = f"dataset {args.dataset}"
        if ds.column_names is not None and args.text_field not in ds.column_names:
            raise UserError(missing_field(name, args.text_field, ds.column_names))
        return [(ds, args.text_field, name)]
    parts = []
    for builder, group in itertools.groupby(files, key=lambda file: file[1]):
        paths = [path for path, _ in group]
        name = paths[0] if len(paths) == 1 else f"{paths[0]} and {len(paths) - 1} more {builder} files"
        # One .txt file is one document; open() with errors="replace" turns invalid UTF-8 into U+FFFD.
        options = dict(sample_by="document", encoding_errors="replace") if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=paths, split="train", streaming=True, **options)
        except Exception as e:
            raise UserError(f"cannot read {name}: {first_line(e)}") from None
        parts.append((ds, "text" if builder == "text" else args.text_field, name))
    return parts


def count_documents(parts, files):
    """How many documents there are, for the progress bar's time left; None when that would take parsing."""
    if files is not None:
        counts = [documents_in(path, builder) for path, builder in files]
        return None if None in counts else sum(counts)
    ds = parts[0][0]
    if isinstance(ds, datasets.Dataset):
        return len(ds)
    split = (ds.info.splits or {}).get(str(ds.split)) if ds.info else None
    return split.num_examples if split is not None and split.num_examples else None


def documents_in(path, builder):
    """How many documents a local file holds, when that takes no parsing, else None."""
    if builder == "text":
        return 1
    if builder == "parquet":
        return pq.ParquetFile(path).metadata.num_rows
    if extension(path) == ".jsonl":
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 24), b""))
    return None  # .json: one array, or one object a line


def document_batches(parts, skip=0):
    """Lists of up to DOCS_PER_TASK texts, the parts one after another, after the first `skip` documents."""
    for ds, field, name in parts:
        try:
            # Arrow tables: skipping documents, and every column but the text, costs no conversion to Python.
            for table in ds.with_format("arrow").iter(batch_size=DOCS_PER_TASK):
                if field not in table.column_names:
                    raise UserError(missing_field(name, field, table.column_names))
                if skip >= table.num_rows:
                    skip -= table.num_rows
                    continue
                column = table.column(field).slice(skip)
                skip = 0
                if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                    raise UserError(f"field '{field}' of {name} holds {column.type}, not text; choose another with --text_field")
                yield [text or "" for text in column.to_pylist()]  # a null text is an empty document
        except UserError:
            raise
        except Exception as e:  # datasets and pyarrow raise many kinds of errors on a file they cannot parse
            raise UserError(f"cannot read {name}: {type(e).__name__}: {first_line(e)}") from None

# -----------------------------------------------------------------------------
# Tokenizing on every core


def encode_documents(enc, texts):
    """(tokens, lengths): <|endoftext|> then the tokens of each text, as one uint16 array, and each
    document's length in tokens."""
    eot = np.array([enc.eot_token], dtype=np.uint32)
    # As encode_ordinary, a literal "<|endoftext|>" in the text is text, but without a Python list of ints.
    pieces = [ids for text in texts for ids in (eot, enc.encode_to_numpy(text, disallowed_special=()))]
    lengths = np.array([len(ids) + 1 for ids in pieces[1::2]], dtype=np.int64)
    return np.concatenate(pieces, dtype=np.uint16, casting="unsafe"), lengths


worker_tokenizer = None  # in a worker process, the tokenizer that start_worker was given
held_lock = None         # while a run owns out_dir, the descriptor of its lock (claim_out_dir)


def start_worker(enc):
    global worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the main process to handle
    if held_lock is not None:
        # A forked worker shares the main process's lock on out_dir. Let go of it, or a run killed mid-batch
        # would keep out_dir locked until each of its workers finished its batch and found the run gone.
        os.close(held_lock)
    worker_tokenizer = enc  # pickled where processes are spawned: far cheaper than building it again


def encode_in_worker(texts):
    return encode_documents(worker_tokenizer, texts)


def tokenize(batches, enc, workers):
    """encode_documents of each batch of texts, in order, in `workers` processes. Threads would save
    sending the text over (tiktoken releases the GIL), but on 2 cores tiktoken did about 30% less work
    per CPU-second in two threads of one process than in two processes."""
    with multiprocessing.Pool(workers, initializer=start_worker, initargs=(enc,)) as pool:
        pending = deque()
        for texts in batches:
            pending.append(pool.apply_async(encode_in_worker, (texts,)))
            if len(pending) > 2 * workers:  # enough queued to keep every worker busy; no more in memory
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

# -----------------------------------------------------------------------------
# Shards and the manifest


def write_shard(path, tokens):
    """llm.c's format, under a temporary name renamed once whole: a shard with its final name is complete."""
    header = np.zeros(SHARD_HEADER_BYTES // 4, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    def write(f):
        f.write(header.tobytes())
        f.write(memoryview(tokens.astype("<u2", copy=False)))  # no copy on a little-endian machine
    atomic_write(path, write, size=SHARD_HEADER_BYTES + 2 * len(tokens))


def shard_checksum(path):
    """sha256 of a shard's first and last CHECKSUM_BYTES (of all of it, if it is smaller than both). It tells a
    shard from one of another corpus, or from another place of this one, and checking 20 GB of shards on each
    run reads 200 MB of them, not 20 GB."""
    with open(path, "rb") as f:
        head = f.read(CHECKSUM_BYTES)
        f.seek(max(f.tell(), os.fstat(f.fileno()).st_size - CHECKSUM_BYTES))
        return hashlib.sha256(head + f.read()).hexdigest()


def save_manifest(out_dir, manifest):
    data = json.dumps(manifest, indent=1).encode()
    atomic_write(os.path.join(out_dir, MANIFEST), lambda f: f.write(data), size=len(data))


def shard_files(out_dir):
    """The files in out_dir that train_gpt2.py would read as shards."""
    return sorted(n for n in os.listdir(out_dir) if n.endswith((".bin", ".npy")) and ("train" in n or "val" in n))


def prepare_out_dir(out_dir, config, overwrite):
    """The manifest to go on with: a new one, or an earlier run's with the same config, cut back to the shards
    that are on disk as it records them. Refuses a directory holding shards of anything else, unless overwrite."""
    path = os.path.join(out_dir, MANIFEST)
    existing = shard_files(out_dir)
    if overwrite:
        for name in existing + [MANIFEST]:
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
        existing = []
    fresh = {**config, "shards": [], "complete": False}
    if not os.path.exists(path):
        if existing:
            raise UserError(f"{out_dir} holds shards that fineweb.py did not make ({existing[0]}, no {MANIFEST}); "
                            f"choose another --out_dir, or pass --overwrite to delete them")
        return fresh
    try:
        with open(path) as f:
            manifest = json.load(f)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise UserError(f"{path} is not a manifest of fineweb.py; pass --overwrite to start again")
    for key, value in config.items():
        if manifest.get(key) != value:
            raise UserError(f"{out_dir} holds shards made with another {key} ({json.dumps(manifest.get(key))[:200]}); "
                            f"choose another --out_dir, or pass --overwrite to delete them")
    ours = re.compile(rf"{re.escape(config['prefix'])}_(val|train)_\d{{6}}\.bin")
    strangers = [name for name in existing if not ours.fullmatch(name)]
    if strangers:
        raise UserError(f"{out_dir} also holds {strangers[0]}, which train_gpt2.py would read with these shards; "
                        f"move it, or pass --overwrite to delete it")
    whole = []
    for shard in manifest["shards"]:
        problem = shard_problem(out_dir, shard, config["tokenizer"]["n_vocab"])
        if problem:
            print(f"{shard['file']} is not the shard that {MANIFEST} records ({problem}); making it again, "
                  f"and the shards after it")
            break
        whole.append(shard)
    if len(whole) == len(manifest["shards"]) and manifest["complete"]:
        return manifest
    # Go on from the last whole shard that says where the next one starts (the last shards of a run don't).
    while whole and "next_document" not in whole[-1]:
        whole.pop()
    return {**fresh, "shards": whole}


def shard_problem(out_dir, shard, vocab_size):
    """Why a shard that the manifest lists is not on disk as the manifest records it, or None. Manifests of an
    older fineweb.py record no checksums: their shards are checked by length alone."""
    path = os.path.join(out_dir, shard["file"])
    if not os.path.exists(path):
        return "it is missing"
    try:
        tokens = len(open_shard(path, vocab_size, check_ids=False))
    except (UserError, OSError):
        return "it is truncated, or not a shard"
    if tokens != shard["tokens"]:
        return f"it holds {tokens:,} tokens, not {shard['tokens']:,}"
    if "checksum" in shard and shard_checksum(path) != shard["checksum"]:
        return "it holds other tokens"
    return None


class ShardWriter:
    """Cuts the stream of tokens into shards of shard_size tokens and records each in the manifest.

    The first shard is validation. It waits in memory until a second shard is full: only then is the
    corpus known to be two shards or more. A smaller corpus is split at the end as train_gpt2.py splits a
    .txt file: the last tenth is validation. Each shard written mid-run records where the next begins (a
    document, and tokens into it), to resume.
    """

    def __init__(self, out_dir, manifest):
        self.out_dir, self.manifest = out_dir, manifest
        self.shard_size = manifest["shard_size"]
        self.full = len(manifest["shards"])         # shards of shard_size tokens behind us
        self.position = self.full * self.shard_size  # tokens of the stream behind us
        self.buffer = np.empty(self.shard_size, dtype=np.uint16)
        self.fill = 0
        self.val = None                              # (tokens, where the next shard begins) of the first shard

    def add(self, tokens, lengths, first_document, start):
        """Documents first_document, first_document + 1, ...: their tokens, each one's length, and where the
        first one starts in the stream (before self.position only when resuming inside it)."""
        assert start <= self.position
        tokens = tokens[self.position - start:]
        starts = start + np.cumsum(lengths) - lengths
        while len(tokens):
            take = min(len(tokens), self.shard_size - self.fill)
            self.buffer[self.fill:self.fill + take] = tokens[:take]
            self.fill, self.position, tokens = self.fill + take, self.position + take, tokens[take:]
            if self.fill == self.shard_size:
                i = int(np.searchsorted(starts, self.position, side="right")) - 1
                self.shard_full({"next_document": first_document + i, "offset": self.position - int(starts[i])})

    def shard_full(self, resume):
        if self.full == 0:
            self.val, self.buffer = (self.buffer, resume), np.empty(self.shard_size, dtype=np.uint16)
        else:
            if self.val is not None:
                self.write("val", 0, *self.val)
                self.val = None
            self.write("train", self.full - 1, self.buffer, resume)
            save_manifest(self.out_dir, self.manifest)
        self.full, self.fill = self.full + 1, 0

    def finish(self, totals):
        tokens = self.buffer[:self.fill]
        if self.full >= 2:
            if len(tokens):
                self.write("train", self.full - 1, tokens)
        else:
            if self.val is not None:
                tokens = np.concatenate([self.val[0], tokens])
            # The last tenth of the tokens after the <|endoftext|> that opens the stream: train_gpt2.py tokenizes
            # a .txt file without that token, so from one .txt file both hold out the same tokens.
            val = split_text_tokens(tokens[1:])[1]
            train = tokens[:len(tokens) - len(val)]
            for index, start in enumerate(range(0, len(train), self.shard_size)):
                self.write("train", index, train[start:start + self.shard_size])
            self.write("val", 0, val)  # listed last, so that the manifest lists the stream in order
        self.manifest.update(totals, complete=True)
        save_manifest(self.out_dir, self.manifest)

    def write(self, split, index, tokens, resume=None):
        name = f"{self.manifest['prefix']}_{split}_{index:06d}.bin"
        path = os.path.join(self.out_dir, name)
        if not os.path.exists(os.path.join(self.out_dir, MANIFEST)):
            # Claim the directory first: a run killed after its first shard must find it, to resume.
            save_manifest(self.out_dir, self.manifest)
        write_shard(path, tokens)
        self.manifest["shards"].append({"file": name, "tokens": len(tokens), "checksum": shard_checksum(path),
                                        **(resume or {})})
        tqdm.write(f"wrote {name}: {len(tokens):,} tokens")

# -----------------------------------------------------------------------------
# The run


def tokenize_corpus(parts, enc, out_dir, manifest, workers, total_documents=None):
    """Write the shards that the manifest does not list yet; return (documents, tokens, seconds), the
    tokens counting this run's only."""
    writer = ShardWriter(out_dir, manifest)
    done = manifest["shards"]
    document, offset = (done[-1]["next_document"], done[-1]["offset"]) if done else (0, 0)
    if done:
        print(f"resuming after {len(done)} whole shards in {out_dir}, at document {document:,}")
    start, first_position = writer.position - offset, writer.position
    t0 = time.perf_counter()
    bars = dict(disable=None, dynamic_ncols=True, smoothing=0.1)  # shown on a terminal only
    with tqdm(total=total_documents, initial=document, unit="doc", desc="all", **bars) as overall, \
            tqdm(total=writer.shard_size, unit="tok", unit_scale=True, desc=f"shard {writer.full}", **bars) as shard:
        shard_t0, shard_documents = t0, 0
        for tokens, lengths in tokenize(document_batches(parts, skip=document), enc, workers):
            before = writer.full
            writer.add(tokens, lengths, document, start)
            document, start = document + len(lengths), start + int(lengths.sum())
            now = time.perf_counter()
            overall.update(len(lengths))
            overall.set_postfix_str(f"{(writer.position - first_position) / (now - t0) / 1e6:.2f}M tok/s", refresh=False)
            if writer.full != before:
                shard.reset()
                shard.set_postfix_str("", refresh=False)
                shard.set_description(f"shard {writer.full}")
                shard_t0, shard_documents = now, 0
            shard.update(writer.fill - shard.n)
            shard_documents += len(lengths)
            if now - shard_t0 > 1:  # a rate over less would mostly measure the batch that opened the shard
                shard.set_postfix_str(f"{shard_documents / (now - shard_t0):,.0f} doc/s", refresh=False)
    if document == 0:
        raise UserError("the corpus is empty: it has no documents")
    if writer.position == document:
        raise UserError(f"the corpus is empty: its {document:,} documents have no text")
    writer.finish({"documents": document, "tokens": writer.position})
    return document, writer.position - first_position, time.perf_counter() - t0


def run_config(args, files, enc):
    """What the shards depend on. The manifest records it, and a run resumes only shards made with the same."""
    if files is None:
        source = dict(dataset=args.dataset, name=args.name, split=args.split, streaming=args.streaming)
    else:
        source = dict(input=[dict(path=path, bytes=os.path.getsize(path)) for path, _ in files])
    return {
        "source": source,
        "text_field": args.text_field,
        "tokenizer": dict(name=enc.name, n_vocab=enc.n_vocab, eot=enc.eot_token),
        "prefix": args.prefix,
        "shard_size": args.shard_size,
        "format": "llm.c .bin: 256 int32 (20240520, 1, token count, 0...), then uint16 tokens; "
                  "each document is <|endoftext|> then its tokens",
    }


def set_up(args):
    """(files, tokenizer, config): the --input files, checked; GPT-2's tokenizer; what the shards depend on."""
    enc = get_tokenizer()
    if enc.n_vocab > 2**16:
        raise UserError(f"the tokenizer has {enc.n_vocab} tokens: more than uint16 shards can hold")
    files = list_local_files(args.input) if args.input else None
    for path, builder in files or []:
        check_local_file(path, builder, args.text_field)
    return files, enc, run_config(args, files, enc)


@contextmanager
def claim_out_dir(out_dir):
    """Make out_dir if need be, and own it while the run lasts: a second run into it meanwhile gets one line
    naming this one's process, instead of writing shards between this one's. What killed runs were writing
    goes first (lock_dir). The lock file stays; out_dir goes if this run made it and leaves nothing else in it."""
    global held_lock
    made = []  # the directories of out_dir's path that this run makes, deepest first
    path = os.path.normpath(out_dir)
    while path and not os.path.exists(path):
        made.append(path)
        path = os.path.dirname(path)
    check_writable_dir(out_dir, "out_dir")
    try:
        held_lock = lock_dir(out_dir, "another fineweb.py run")
        yield
    finally:
        if held_lock is not None:
            os.close(held_lock)
            held_lock = None
        for directory in made:
            if set(os.listdir(directory)) - {".lock"}:
                break
            if os.path.exists(os.path.join(directory, ".lock")):
                os.remove(os.path.join(directory, ".lock"))
            os.rmdir(directory)


def make_shards(args, files, enc, config):
    manifest = prepare_out_dir(args.out_dir, config, args.overwrite)
    if manifest["complete"]:
        print(f"{args.out_dir} already holds the {len(manifest['shards'])} shards of this corpus; nothing to do")
        return
    parts = load_parts(args, files)
    invalid = count_invalid_utf8([path for path, builder in files or [] if builder == "text"])
    documents, tokens, seconds = tokenize_corpus(parts, enc, args.out_dir, manifest, args.workers,
                                                 count_documents(parts, files))
    shards = manifest["shards"]
    val_tokens = sum(shard["tokens"] for shard in shards if "_val_" in shard["file"])
    print(f"{documents:,} documents, {manifest['tokens']:,} tokens: {len(shards)} shards in {args.out_dir} "
          f"({val_tokens:,} validation tokens); {tokens / seconds / 1e6:.2f}M tokens/s")
    if invalid:
        print(f"{invalid:,} invalid UTF-8 sequences in the .txt files were replaced with U+FFFD")


def run(argv):
    args = parse_args(argv)
    if args.benchmark:  # it writes into a temporary directory of its own
        return benchmark_speed(args, *set_up(args))
    with claim_out_dir(args.out_dir):  # before the slow set-up, so that a bad --out_dir is said at once
        make_shards(args, *set_up(args))


def benchmark_speed(args, files, enc, config):
    """End-to-end tokens/s (reading, tokenizing, writing shards), then one core of tiktoken on the same documents."""
    parts = load_parts(args, files)
    with tempfile.TemporaryDirectory() as out_dir:
        documents, tokens, seconds = tokenize_corpus(parts, enc, out_dir, {**config, "shards": [], "complete": False}, args.workers)
    rate = tokens / seconds
    print(f"benchmark: {documents:,} documents, {tokens:,} tokens in {seconds:.2f} s: {rate / 1e6:.2f}M tokens/s "
          f"end to end, {args.workers} worker processes")
    encode_seconds, encoded = 0.0, 0
    for texts in document_batches(parts):
        t0 = time.perf_counter()
        encoded += sum(len(enc.encode_ordinary(text)) for text in texts)
        encode_seconds += time.perf_counter() - t0
    one_core = encoded / encode_seconds
    print(f"one core of tiktoken (encode_ordinary alone, same documents): {one_core / 1e6:.2f}M tokens/s; "
          f"ratio {rate / one_core:.2f}")


def main(argv=None):
    # datasets logs its errors before raising them; run_main reports each in one line of its own.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    run_main(run, sys.argv[1:] if argv is None else argv,
             interrupted="run the same command again to resume after the last whole shard")


if __name__ == "__main__":
    main()
