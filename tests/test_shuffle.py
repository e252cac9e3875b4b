"""The training order: every chunk once per epoch, shuffled from (seed, epoch), alike for any world size, resumable;
validation and --shuffle=False read in file order, exactly as the loader did before shuffling."""
import io

import numpy as np
import torch

from conftest import TINY, read_log, run_script
from train_gpt2 import DataLoader, parse_settings

B, T = 2, 8  # chunks of 17 tokens, one every 16
# Shard i holds 1000*i, 1000*i + 1, ...: a chunk's first token says where it came from, and a chunk that
# straddled two shards or skipped tokens would show a jump. Shard 0 leaves a tail of 3 tokens, shard 1 is
# shorter than one chunk, shard 2 has no tail, shard 3 a tail of 1.
LENGTHS = [100, 10, 161, 50]
SOURCES = [(1000 * i + np.arange(n)).astype(np.uint16) for i, n in enumerate(LENGTHS)]
FILE_ORDER = [1000 * i + start for i, n in enumerate(LENGTHS) for start in range(0, n - B * T, B * T)]
CHUNKS_PER_EPOCH = 19


def loader(rank=0, world_size=1, **kwargs):
    return DataLoader(SOURCES, B, T, rank, world_size, 50257, **kwargs)


def first_tokens(data, batches):
    """The first token of each of the next batches: which chunk each one is."""
    return [data.next_batch()[0][0, 0].item() for _ in range(batches)]


def old_order(sources, rank, world_size):
    """The loader before shuffling, written out plainly: a chunk of B*T+1 tokens every B*T tokens, shard after
    shard, round and round, each micro-step taking the next world_size chunks and rank r the r-th."""
    size = B * T + 1

    def chunks():
        while True:
            for tokens in sources:
                for start in range(0, len(tokens) - size + 1, B * T):
                    yield tokens[start:start + size]

    every = chunks()
    while True:
        chunk = torch.from_numpy([next(every) for _ in range(world_size)][rank].astype(np.int64))
        yield chunk[:-1].view(B, T), chunk[1:].view(B, T)


def test_the_test_data_is_what_the_comments_say():
    assert len(FILE_ORDER) == CHUNKS_PER_EPOCH and FILE_ORDER[:7] == [0, 16, 32, 48, 64, 80, 2000]
    assert first_tokens(loader(), CHUNKS_PER_EPOCH + 1) == FILE_ORDER + [0]


def test_without_shuffle_the_order_is_the_old_one():
    for world_size in (1, 2, 3):
        for rank in range(world_size):
            new, old = loader(rank, world_size), old_order(SOURCES, rank, world_size)
            for _ in range(4 * CHUNKS_PER_EPOCH):  # several epochs, for every world size
                (x, y), (old_x, old_y) = new.next_batch(), next(old)
                assert torch.equal(x, old_x) and torch.equal(y, old_y)


def test_an_epoch_reads_every_chunk_once_in_a_new_order():
    data = loader(shuffle=True, seed=1337)
    epochs = []
    for _ in range(4):
        epoch = []
        for _ in range(CHUNKS_PER_EPOCH):
            x, y = data.next_batch()
            assert torch.equal(x.flatten(), x[0, 0] + torch.arange(B * T))  # whole, from one shard
            assert torch.equal(y, x + 1)  # targets are the inputs shifted by one
            epoch.append(x[0, 0].item())
        epochs.append(epoch)
    for epoch in epochs:
        assert sorted(epoch) == FILE_ORDER
    assert FILE_ORDER not in epochs and len({tuple(epoch) for epoch in epochs}) == 4
    shard_orders = {tuple(dict.fromkeys(start // 1000 for start in epoch)) for epoch in epochs}
    assert len(shard_orders) > 1  # the shards too come in a new order


def test_the_order_comes_from_the_seed_alone():
    assert first_tokens(loader(shuffle=True, seed=1), 50) == first_tokens(loader(shuffle=True, seed=1), 50)
    assert first_tokens(loader(shuffle=True, seed=1), 50) != first_tokens(loader(shuffle=True, seed=2), 50)
    assert sorted(first_tokens(loader(shuffle=True, seed=-1), CHUNKS_PER_EPOCH)) == FILE_ORDER  # torch takes it too


def test_the_shuffled_order_is_the_same_for_any_world_size():
    for world_size in (2, 3):
        one = loader(shuffle=True, seed=7)
        ranks = [loader(rank, world_size, shuffle=True, seed=7) for rank in range(world_size)]
        for _ in range(2 * CHUNKS_PER_EPOCH):  # across shards and epochs, which a step of 2 or 3 straddles
            for rank in ranks:
                (x, y), (one_x, one_y) = rank.next_batch(), one.next_batch()
                assert torch.equal(x, one_x) and torch.equal(y, one_y)


def test_a_restored_loader_goes_on_in_the_same_order():
    for read in (0, 1, 6, 7, 9, 19, 20, 45):  # at a shard's start or end, inside one, past an epoch
        data = loader(1, 2, shuffle=True, seed=3)
        first_tokens(data, read)
        buffer = io.BytesIO()
        torch.save(data.state_dict(), buffer)  # as in a checkpoint, which is loaded with weights_only
        buffer.seek(0)
        restored = loader(1, 2, shuffle=True, seed=3)
        restored.load_state_dict(torch.load(buffer, weights_only=True))
        assert first_tokens(restored, 30) == first_tokens(data, 30)


def test_reset_reads_the_first_batches_again():
    for shuffle in (False, True):  # validation reads unshuffled, but reset means the start either way
        data = loader(shuffle=shuffle, seed=3)
        start = first_tokens(data, 5)
        first_tokens(data, 30)
        data.reset()
        assert first_tokens(data, 5) == start


def test_training_shuffles_and_validation_does_not(shard_dir, tmp_path):
    assert parse_settings([])[0]["shuffle"] is True
    logs = {}
    for shuffle in ("True", "False"):
        result = run_script("train_gpt2.py", *TINY, f"--data_dir={shard_dir}", "--max_steps=1",
                            f"--shuffle={shuffle}", f"--out_dir={tmp_path / shuffle}")
        assert result.returncode == 0, result.stderr
        logs[shuffle] = {(step, kind): value for step, kind, value in read_log(tmp_path / shuffle / "log.txt")}
    # The same initial model: the same validation batches give the same loss, other training batches another.
    assert logs["True"][0, "val"] == logs["False"][0, "val"]
    assert logs["True"][0, "train"] != logs["False"][0, "train"]
