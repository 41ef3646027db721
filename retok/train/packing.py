"""Training blocks for train-io: documents -> new-tokenizer ids joined with EOS -> packed blocks -> mixed, shuffled.

Everything is a lazy, deterministic stream, so corpora larger than RAM work and a resumed run sees exactly
the same blocks: the stream is rebuilt from the seed and the blocks already consumed are skipped.

    source 0 docs -> ids + EOS -> blocks of seq_len --\
    source 1 docs -> ids + EOS -> blocks of seq_len ---+-> pick a source by weight -> shuffle buffer -> batches
    ...                                              --/

Each ``data.train`` entry is its own stream (blocks never straddle two sources) and restarts from its first
document when it runs out (another epoch), so ``weight`` alone decides how often a source is seen.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch

from retok.config import DataSource
from retok.data import iter_source
from retok.errors import RetokError

DOCS_PER_ENCODE = 64  # documents per encode_batch call: the fast tokenizer parallelises over a batch
CACHE_TOKENS = 16_000_000  # sources up to this many tokens (64 MB as int32) are kept in memory after epoch 1


def special_ids(tokenizer: Any) -> tuple[int | None, int]:
    """(bos or None, eos): BOS only when the tokenizer adds it by itself (Llama-2, Gemma), as the model saw it."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise RetokError(
            "train-io: the new tokenizer has no eos_token, which joins the training documents; "
            "set eos_token in the tokenizer folder's tokenizer_config.json"
        )
    with_specials = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and len(with_specials) > 0 and with_specials[0] == bos
    return (bos if adds_bos else None), int(eos)


def doc_ids(tokenizer: Any, docs: Iterator[str], bos: int | None, eos: int) -> Iterator[list[int]]:
    """New-tokenizer ids of each document (no specials of the tokenizer's own), with BOS/EOS around it."""
    backend = tokenizer.backend_tokenizer
    head = [bos] if bos is not None else []
    while batch := list(itertools.islice(docs, DOCS_PER_ENCODE)):
        for enc in backend.encode_batch(batch, add_special_tokens=False):
            yield head + enc.ids + [eos]


def pack(token_lists: Iterator[list[int]], seq_len: int) -> Iterator[torch.Tensor]:
    """Concatenate token lists and cut them into blocks of exactly ``seq_len`` ids (the tail waits for more)."""
    buf: list[int] = []
    for ids in token_lists:
        buf.extend(ids)
        while len(buf) >= seq_len:
            yield torch.tensor(buf[:seq_len], dtype=torch.int32)
            del buf[:seq_len]


def source_blocks(
    src: DataSource, key: str, tokenizer: Any, seq_len: int, max_bytes: int | None, *, cycle: bool = True
) -> Iterator[torch.Tensor]:
    """Blocks of one source; with ``cycle`` it starts over at its first document forever (epochs).

    A source whose first pass holds at most CACHE_TOKENS tokens is replayed from memory in later epochs
    (re-opening and re-tokenizing small files every epoch costs more than training on them); larger ones
    are streamed again. Raises a RetokError when one whole pass holds fewer than ``seq_len`` tokens.
    """
    bos, eos = special_ids(tokenizer)

    def one_pass() -> Iterator[list[int]]:
        return doc_ids(tokenizer, iter_source(src, key, max_bytes), bos, eos)

    def stream() -> Iterator[list[int]]:
        cache: list[torch.Tensor] | None = []
        n = 0
        for ids in one_pass():
            n += len(ids)
            if cache is not None and n <= CACHE_TOKENS:
                cache.append(torch.tensor(ids, dtype=torch.int32))
            else:
                cache = None  # too large to hold: later epochs stream it again
            yield ids
        if n < seq_len:
            raise RetokError(
                f"{key} ({src.name}): only {n} tokens with the new tokenizer, fewer than one block of "
                f"train.seq_len={seq_len}; add text or lower train.seq_len"
            )
        while cycle:
            if cache is not None:
                yield from (t.tolist() for t in cache)
            else:
                yield from one_pass()

    return pack(stream(), seq_len)


def mixed_blocks(
    streams: list[Callable[[], Iterator[torch.Tensor]]], weights: list[float], seed: int, shuffle_buffer: int
) -> Iterator[tuple[torch.Tensor, int]]:
    """An endless stream of (block, source index): each block's source drawn by weight, then a shuffle buffer.

    The buffer holds ``shuffle_buffer`` blocks and emits a random one for each block it takes in, so memory
    stays bounded however large the corpora are. One seeded RNG drives both draws: same seed, same order.
    """
    rng = random.Random(seed)
    its = [s() for s in streams]
    buffer: list[tuple[torch.Tensor, int]] = []
    idx = list(range(len(its)))
    while True:
        i = rng.choices(idx, weights=weights)[0]
        item = (next(its[i]), i)
        if len(buffer) < shuffle_buffer:
            buffer.append(item)
            continue
        j = rng.randrange(len(buffer))
        buffer[j], item = item, buffer[j]
        yield item


def micro_batches(blocks: Iterator[tuple[torch.Tensor, int]], batch_size: int) -> Iterator[torch.Tensor]:
    """Stack consecutive blocks into (batch_size, seq_len) int64 batches."""
    while True:
        group = list(itertools.islice(blocks, batch_size))
        if len(group) < batch_size:
            return
        yield torch.stack([b for b, _ in group]).long()


def train_batches(
    sources: list[DataSource],
    tokenizer: Any,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle_buffer: int,
    max_bytes: int | None,
    skip: int = 0,
    rank: int = 0,
    world: int = 1,
) -> Iterator[torch.Tensor]:
    """This process's micro-batches of the one global stream, after the first ``skip`` global micro-batches.

    Global micro-batch m goes to rank m % world, so every process reads the same stream and takes its share;
    the order depends only on the config, which is what makes ``--resume`` exact.
    """
    streams = [
        (lambda i=i, s=s: source_blocks(s, f"data.train.{i}", tokenizer, seq_len, max_bytes))
        for i, s in enumerate(sources)
    ]
    blocks = mixed_blocks(streams, [s.weight for s in sources], seed, shuffle_buffer)
    batches = micro_batches(blocks, batch_size)
    return itertools.islice(batches, skip + rank, None, world)


def check_sources(
    sources: list[DataSource], tokenizer: Any, seq_len: int, max_bytes: int | None
) -> torch.Tensor:
    """Fail early (before any model is loaded) when a source cannot fill one block; returns the first block."""
    if not sources:
        raise RetokError("train-io needs training text: add at least one data.train source")
    firsts = [
        next(source_blocks(src, f"data.train.{i}", tokenizer, seq_len, max_bytes, cycle=False), None)
        for i, src in enumerate(sources)
    ]
    return firsts[0]
