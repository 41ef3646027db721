"""Training blocks for train-io: documents -> new-tokenizer ids joined with EOS -> packed blocks -> mixed, shuffled.

Everything is a lazy, deterministic stream, so corpora larger than RAM work and a resumed run sees exactly
the same blocks: the stream is rebuilt from the seed and the blocks already consumed are skipped.

    source 0 docs -> ids + EOS -> blocks of seq_len --\
    source 1 docs -> ids + EOS -> blocks of seq_len ---+-> pick a source by weight -> shuffle buffer -> batches
    ...                                              --/

Each ``data.train`` entry is its own stream (blocks never straddle two sources) and restarts from its first
document when it runs out (another epoch), so ``weight`` alone decides how often a source is seen.

With a teacher (``old_tokenizer``: the distillation objectives), every block is a :class:`Pair`: the block's
new ids, the OLD tokenizer's ids of exactly the same bytes, and for each new position the old position that
ends at the same byte (retok.teacher.alignment), so the original model can be run on the same text.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from retok.core.config import DataSource
from retok.core.data import iter_source
from retok.core.errors import RetokError
from retok.teacher.alignment import ByteLengths, align_ends

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


@dataclass
class Pair:
    """The same text in both segmentations: new ids, old ids, and for each new position the old position
    that ends at the same byte (-1: none, in train mode)."""

    new: list[int]
    old: list[int]
    teacher: list[int]


@dataclass
class PairBatch:
    """A micro-batch of Pairs: new (B, T), old (B, T_old) right-padded, teacher (B, T) indices into old."""

    new: torch.Tensor
    old: torch.Tensor
    teacher: torch.Tensor

    def to(self, device: Any) -> PairBatch:
        return PairBatch(self.new.to(device), self.old.to(device), self.teacher.to(device))

    @property
    def shape(self) -> torch.Size:
        return self.new.shape


def doc_pairs(
    new_tok: Any,
    old_tok: Any,
    docs: Iterator[str],
    new_specials: tuple[int | None, int],
    old_specials: tuple[int | None, int],
) -> Iterator[Pair]:
    """Each document in both segmentations (BOS/EOS of each tokenizer around it), aligned by byte ends."""
    lengths_new, lengths_old = ByteLengths(new_tok), ByteLengths(old_tok)
    (nb, ne), (ob, oe) = new_specials, old_specials
    while batch := list(itertools.islice(docs, DOCS_PER_ENCODE)):
        news = new_tok.backend_tokenizer.encode_batch(batch, add_special_tokens=False)
        olds = old_tok.backend_tokenizer.encode_batch(batch, add_special_tokens=False)
        for n, o in zip(news, olds, strict=True):
            amap = align_ends(lengths_old.ends(o.ids), lengths_new.ends(n.ids)).teacher
            shift = 1 if ob is not None else 0
            teacher = np.where(amap >= 0, amap + shift, -1).tolist()
            new = ([nb] if nb is not None else []) + n.ids + [ne]
            old = ([ob] if ob is not None else []) + o.ids + [oe]
            head = [0] if nb is not None and ob is not None else [-1] if nb is not None else []
            yield Pair(new, old, head + teacher + [len(old) - 1])


def pack_pairs(pairs: Iterator[Pair], seq_len: int) -> Iterator[Pair]:
    """Pairs cut into blocks of exactly ``seq_len`` new ids; each block takes the old ids up to its last aligned
    position, so the next block's teacher starts at the same byte as its student."""
    new: list[int] = []
    old: list[int] = []
    teacher: list[int] = []
    for p in pairs:
        base = len(old)
        new.extend(p.new)
        old.extend(p.old)
        teacher.extend(t + base if t >= 0 else -1 for t in p.teacher)
        while len(new) >= seq_len:
            block_t = teacher[:seq_len]
            cut = max((t for t in block_t if t >= 0), default=-1) + 1
            yield Pair(new[:seq_len], old[:cut], block_t)
            del new[:seq_len], teacher[:seq_len], old[:cut]
            teacher = [t - cut if t >= cut else -1 for t in teacher]


def source_blocks(
    src: DataSource,
    key: str,
    tokenizer: Any,
    seq_len: int,
    max_bytes: int | None,
    *,
    cycle: bool = True,
    old_tokenizer: Any = None,
) -> Iterator[torch.Tensor] | Iterator[Pair]:
    """Blocks of one source; with ``cycle`` it starts over at its first document forever (epochs).

    A source whose first pass holds at most CACHE_TOKENS tokens is replayed from memory in later epochs
    (re-opening and re-tokenizing small files every epoch costs more than training on them); larger ones
    are streamed again. Raises a RetokError when one whole pass holds fewer than ``seq_len`` tokens.
    """
    bos, eos = special_ids(tokenizer)
    old_specials = special_ids(old_tokenizer) if old_tokenizer is not None else None

    def one_pass() -> Iterator[Any]:
        docs = iter_source(src, key, max_bytes)
        if old_tokenizer is not None:
            return doc_pairs(tokenizer, old_tokenizer, docs, (bos, eos), old_specials)
        return doc_ids(tokenizer, docs, bos, eos)

    def stream() -> Iterator[Any]:
        cache: list[Any] | None = []
        n = 0
        for ids in one_pass():
            n += len(ids.new) if isinstance(ids, Pair) else len(ids)
            if cache is not None and n <= CACHE_TOKENS:
                cache.append(ids if isinstance(ids, Pair) else torch.tensor(ids, dtype=torch.int32))
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
                yield from (t if isinstance(t, Pair) else t.tolist() for t in cache)
            else:
                yield from one_pass()

    return pack_pairs(stream(), seq_len) if old_tokenizer is not None else pack(stream(), seq_len)


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


def micro_batches(blocks: Iterator[tuple[Any, int]], batch_size: int) -> Iterator[Any]:
    """Stack consecutive blocks into (batch_size, seq_len) int64 batches (PairBatch for Pairs)."""
    while True:
        group = [b for b, _ in itertools.islice(blocks, batch_size)]
        if len(group) < batch_size:
            return
        if isinstance(group[0], Pair):
            yield collate_pairs(group)
        else:
            yield torch.stack(group).long()


def collate_pairs(pairs: list[Pair]) -> PairBatch:
    """Old ids right-padded with their last id (causal attention: padding after a sequence changes nothing
    before it; padded positions are never a teacher position)."""
    width = max(1, max(len(p.old) for p in pairs))
    old = torch.tensor([p.old + [p.old[-1] if p.old else 0] * (width - len(p.old)) for p in pairs])
    return PairBatch(
        torch.tensor([p.new for p in pairs]),
        old,
        torch.tensor([p.teacher for p in pairs]),
    )


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
    old_tokenizer: Any = None,
) -> Iterator[torch.Tensor] | Iterator[PairBatch]:
    """This process's micro-batches of the one global stream, after the first ``skip`` global micro-batches.

    Global micro-batch m goes to rank m % world, so every process reads the same stream and takes its share;
    the order depends only on the config, which is what makes ``--resume`` exact.
    """
    streams = [
        (
            lambda i=i, s=s: source_blocks(
                s, f"data.train.{i}", tokenizer, seq_len, max_bytes, old_tokenizer=old_tokenizer
            )
        )
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
