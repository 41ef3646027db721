"""The stage contract, in one place: what each stage is, what it reads, what it leaves, and how its inputs
are checked.

A stage turns the config (and the folders of the stages before it) into one folder under ``output_dir``:

    key            command           folder under output_dir    inputs
    tokenizer      build-tokenizer   tokenizer/                 -
    model-init     init-embeddings   model-init/                tokenizer
    model-trained  train-io          model-trained/             tokenizer, model-init
    eval           eval-speed        eval/                      model-trained (or model-init)
    export         export            export/                    model-trained (or model-init), eval

The key is the folder's name and the stage's one name in code and reports; the command is what users type.
eval and export read "the model": model-trained if its folder exists, else model-init (or export.source, or
eval.candidate_model); :func:`stage_inputs` resolves that, and the folder actually read is what counts.
Every stage folder holds ``retok_config.yaml`` (the resolved config that made it) and ``retok_stage.json``
(written by :func:`mark_stage`: key, fingerprint, a run id, the folders it read with their fingerprints and
run ids, whether it is complete, retok version, time, command). The fingerprint hashes the config fields the
stage reads (``Stage.reads``) and the fingerprints of the inputs it reads, so a change upstream reaches every
stage after it. A stage that reads another stage's folder checks it with :func:`require_stage`: a folder made
by another config is refused with the key that differs and the command that remakes it. Whether a finished
folder is still up to date, and why not, is ``retok.core.freshness``. ``tests/test_stage_contract.py`` runs every
stage with a config that records every field it reads and fails when one is missing from ``Stage.reads``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from retok import __version__
from retok.core.config import RetokConfig, to_yaml
from retok.core.errors import PartialOutput, RetokError
from retok.core.fileio import disk_error

STAGE_FILE = "retok_stage.json"
CONFIG_FILE = "retok_config.yaml"


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline."""

    key: str  # its folder under output_dir, and its name in code, reports and `retok run --stages`
    command: str  # the CLI command that runs it
    entry: str  # "module:function" called as function(cfg, out_folder, **options)
    inputs: tuple[str, ...]  # stages whose folders it may read (their fingerprints are part of its own)
    reads: tuple[str, ...]  # config fields (dotted prefixes) its output depends on
    report: str | None  # its machine-readable report, in its folder
    # (field, switch): fields it reads only when the switch (a bool field in ``reads``) is on
    reads_if: tuple[tuple[str, str], ...] = ()


STAGES: dict[str, Stage] = {
    s.key: s
    for s in (
        Stage(
            "tokenizer",
            "build-tokenizer",
            "retok.tokenizer.stage:build_tokenizer",
            (),
            ("model", "data.train", "data.eval", "tokenizer"),
            "compression.json",
        ),
        Stage(
            "model-init",
            "init-embeddings",
            "retok.embeddings.stage:init_embeddings",
            ("tokenizer",),
            ("model", "compute.dtype", "data", "init", "fit.at_init", "seed", "eval.window", "eval.stride"),
            "init_report.json",
            (("fit", "fit.at_init"),),
        ),
        Stage(
            "model-trained",
            "train-io",
            "retok.train.stage:train_io",
            ("tokenizer", "model-init"),
            (
                "model",
                "compute.dtype",
                "data",
                "train",
                "fit.after_train",
                "seed",
                "eval.window",
                "eval.stride",
            ),
            "train_report.json",
            (("fit", "fit.after_train"),),
        ),
        Stage(
            "eval",
            "eval-speed",
            "retok.evaluate.stage:eval_speed",
            ("model-trained",),
            ("model", "compute.device", "compute.dtype", "data.eval", "eval"),
            "report.json",
        ),
        Stage(
            "export",
            "export",
            "retok.export.stage:export_model",
            ("model-trained", "eval"),
            ("model", "export"),
            "retok_export.json",
        ),
    )
}
ORDER = tuple(STAGES)
MODEL_STAGES = ("model-trained", "model-init")  # what eval and export read, newest first

# Fields a stage may read that do not change what it makes, with the reason.
NOT_FINGERPRINTED = {
    "output_dir": "where the folders go, not what is in them",
    "cache_dir": "where converted models and assets are cached",
    "compute.threads": "how fast, not what",
    "compute.device": "where it runs (init-embeddings and train-io); eval-speed's timings do depend on it",
    "train.log_with": "extra trackers of the same run",
    "train.distributed": "how processes share the work (the same training within float tolerance: nothing in the "
    "recipe depends on the strategy, see train.piece_map); a resume under another strategy is refused by the "
    "checkpoint itself",
    "compute.memory_gb": "what the memory plan checks against (and so ddp or fsdp), not what is made",
}

# The Hugging Face files of a tokenizer folder, plus retok's own metadata of it. init-embeddings copies them
# into model-init/, train-io into model-trained/.
TOKENIZER_META = "retok_tokenizer.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    TOKENIZER_META,
)


def stage(key: str) -> Stage:
    try:
        return STAGES[key]
    except KeyError:
        raise AssertionError(f"unknown stage {key!r}") from None


def stage_dir(cfg: RetokConfig, key: str) -> Path:
    """``output_dir/<key>``."""
    return cfg.out / stage(key).key


# ------------------------------------------------------------------------------------------ fingerprints


def _unwrap(cfg: Any) -> RetokConfig:
    # A config wrapped to record what a stage reads (tests) hashes its underlying values.
    return getattr(cfg, "__wrapped__", cfg)


def field_value(dump: dict[str, Any], dotted: str) -> Any:
    node: Any = dump
    for part in dotted.split("."):
        node = node[part]
    return node


Present = Callable[[str], bool]


def _exists(cfg: RetokConfig) -> Present:
    return lambda key: stage_dir(cfg, key).is_dir()


def model_source(cfg: RetokConfig, key: str, present: Present | None = None) -> str | None:
    """The model stage that eval or export reads: eval.candidate_model (None: no stage), export.source, or
    model-trained when its folder is there (``present``; default: exists now), else model-init."""
    if key == "eval" and _unwrap(cfg).eval.candidate_model:
        return None
    wanted = _unwrap(cfg).export.source if key == "export" else "auto"
    if wanted != "auto":
        return wanted
    present = present or _exists(cfg)
    return next((k for k in MODEL_STAGES if present(k)), None)


def stage_inputs(cfg: RetokConfig, key: str, present: Present | None = None) -> tuple[str, ...]:
    """The stage folders ``key`` reads with this config: its inputs, with "the model" resolved for eval and
    export (``present`` says which folders are there; default: those that exist now)."""
    st = stage(key)
    if key not in ("eval", "export"):
        return st.inputs
    src = model_source(cfg, key, present)
    return ((src,) if src else ()) + tuple(k for k in st.inputs if k not in MODEL_STAGES)


def stage_reads(dump: dict[str, Any], key: str) -> tuple[str, ...]:
    """The fields stage ``key`` reads with this config (``dump``): its reads, and those of ``reads_if`` whose
    switch is on (train-io reads the fit section only when fit.after_train is set)."""
    st = stage(key)
    return st.reads + tuple(f for f, switch in st.reads_if if field_value(dump, switch))


def fingerprint(cfg: RetokConfig, key: str, present: Present | None = None) -> str:
    """Hash of the fields ``key`` reads and of the fingerprints of the inputs it reads (``stage_inputs``)."""
    dump = _unwrap(cfg).model_dump(mode="json")
    reads = stage_reads(dump, key)
    # Leave out what does not change the output, also inside a section read whole (train.distributed).
    for name in set(NOT_FINGERPRINTED) - set(reads):
        section, _, leaf = name.rpartition(".")
        if section and isinstance(dump.get(section), dict):
            dump[section].pop(leaf, None)
    part = {
        "reads": {f: field_value(dump, f) for f in reads},
        "inputs": {k: fingerprint(cfg, k, present) for k in stage_inputs(cfg, key, present)},
    }
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


def upstream_fields(key: str) -> list[str]:
    """Every field that reaches ``key``'s fingerprint: those of its inputs (transitively), then its own."""
    out: list[str] = []
    own = list(stage(key).reads) + [f for f, _ in stage(key).reads_if]
    for f in [f for k in stage(key).inputs for f in upstream_fields(k)] + own:
        if f not in out:
            out.append(f)
    return out


# ------------------------------------------------------------------------------------------ metadata


def inputs_read(cfg: RetokConfig, key: str) -> dict[str, dict[str, Any]]:
    """The stage folders ``key`` reads now, each with the fingerprint and run id its own metadata records:
    what :func:`mark_stage` keeps, so a later run can tell when an input was remade or another one is read."""
    out: dict[str, dict[str, Any]] = {}
    for k in stage_inputs(cfg, key):
        try:
            made = read_stage_meta(stage_dir(cfg, k))
        except RetokError:
            continue  # not there (eval for export's card) or not retok's: nothing to record
        out[k] = {"fingerprint": made.get("fingerprint"), "run_id": made.get("run_id")}
    return out


def mark_stage(
    folder: Path,
    cfg: RetokConfig,
    key: str,
    *,
    seconds: float | None = None,
    inputs: dict[str, dict[str, Any]] | None = None,
    made_by: str | None = None,
    incomplete: str | None = None,
) -> None:
    """Write ``retok_config.yaml`` and ``retok_stage.json`` into ``folder``: this is what makes a folder a
        stage output (stages, tests and benchmarks all mark their folders through here). ``inputs``: the folders
        it read (:func:`inputs_read`) and ``made_by`` its fingerprint, both taken when the stage started (default:
    now). ``incomplete``: why an optional
        part the config asks for is missing (the folder is kept, and stays stale until it is made). ``seconds``:
        the stage's wall time, recorded when known."""
    plain = _unwrap(cfg)
    (folder / CONFIG_FILE).write_text(to_yaml(plain), encoding="utf-8")
    inputs = inputs_read(plain, key) if inputs is None else inputs
    meta: dict[str, Any] = {
        "stage": key,
        "fingerprint": made_by or fingerprint(plain, key),
        "run_id": uuid.uuid4().hex[:16],
        "inputs": inputs,
        "complete": incomplete is None,
        "retok_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:]),
    }
    if incomplete is not None:
        meta["incomplete"] = incomplete
    if seconds is not None:
        meta["seconds"] = round(seconds, 1)
    (folder / STAGE_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_stage_meta(folder: Path) -> dict[str, Any]:
    """The ``retok_stage.json`` of a folder made by retok, or a clear error if it is not one."""
    meta = folder / STAGE_FILE
    if not meta.is_file():
        raise RetokError(
            f"{folder} was not made by retok (no {STAGE_FILE}); run the stage that makes it first"
        )
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("stage"), str):
        raise RetokError(f"{meta} is damaged (not retok's JSON); remove {folder} and run the stage again")
    return data


def _diff(path: str, before: Any, after: Any) -> list[str]:
    """Dotted keys under ``path`` whose values differ (lists compare whole)."""
    if isinstance(before, dict) and isinstance(after, dict):
        keys = list(dict.fromkeys([*before, *after]))
        return [d for k in keys for d in _diff(f"{path}.{k}", before.get(k), after.get(k))]
    return [] if before == after else [path]


def changed_fields(cfg: RetokConfig, folder: Path, key: str) -> list[str]:
    """The keys reaching ``key``'s fingerprint whose value in ``folder``'s retok_config.yaml differs from
    ``cfg`` (best effort: [] when the saved config cannot be read)."""
    try:
        saved = yaml.safe_load((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return []
    now = _unwrap(cfg).model_dump(mode="json")
    out: list[str] = []
    for f in upstream_fields(key):
        try:
            before = field_value(saved, f)
        except (KeyError, TypeError):
            before = None
        for d in _diff(f, before, field_value(now, f)):
            if d not in out:
                out.append(d)
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def own_changes(cfg: RetokConfig, folder: Path, key: str) -> list[str]:
    """The keys ``key`` reads itself (not through its inputs) whose value in ``folder``'s retok_config.yaml
    differs from ``cfg``, each as "key: before -> after" ([] when the saved config cannot be read: the
    fingerprint still tells)."""
    try:
        saved = yaml.safe_load((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        if not isinstance(saved, dict):
            raise ValueError
    except (OSError, ValueError, yaml.YAMLError):
        return []
    now = _unwrap(cfg).model_dump(mode="json")
    out: list[str] = []
    try:
        then_reads = stage_reads(saved, key)
    except (KeyError, TypeError):
        then_reads = stage(key).reads
    reads = list(dict.fromkeys(stage_reads(now, key) + then_reads))
    for f in reads:
        try:
            before: Any = field_value(saved, f)
        except (KeyError, TypeError):
            before = None
        after = field_value(now, f)
        for d in _diff(f, before, after):
            if d in NOT_FINGERPRINTED and d not in reads:
                continue
            b_val, a_val = (_value_at(x, d) for x in (saved, now))
            line = f"{d}: {_short(b_val)} -> {_short(a_val)}"
            if line not in out:
                out.append(line)
    return out


def _value_at(dump: Any, dotted: str) -> Any:
    try:
        return field_value(dump, dotted)
    except (KeyError, TypeError):
        return None


def require_stage(cfg: RetokConfig, key: str, needed_by: str) -> Path:
    """The folder of stage ``key``, checked: made by retok, by this config (and so by these inputs)."""
    folder = stage_dir(cfg, key)
    cmd = stage(key).command
    if not folder.is_dir():
        raise RetokError(f"{needed_by} needs {folder}; run `retok {cmd}` with this config first")
    made = read_stage_meta(folder)
    if made["stage"] != key:
        raise RetokError(
            f"{folder} holds a {made['stage']!r} stage, not {key!r}; remove it and run `retok {cmd}`"
        )
    if made.get("fingerprint") != fingerprint(cfg, key):
        diff = changed_fields(cfg, folder, key)
        what = f" ({', '.join(diff[:4])}{' ...' if len(diff) > 4 else ''} changed)" if diff else ""
        raise RetokError(
            f"{needed_by}: {folder} was made by a different config{what}; run `retok {cmd} --overwrite` "
            "(or `retok run`) to remake it, or set output_dir to a new folder"
        )
    return folder


# ------------------------------------------------------------------------------------- tokenizer meta


def read_tokenizer_meta(tok_dir: Path) -> dict[str, Any]:
    """``retok_tokenizer.json`` of a tokenizer folder: old model, family, mode, vocabulary sizes, new ids."""
    path = tok_dir / TOKENIZER_META
    if not path.is_file():
        raise RetokError(
            f"{tok_dir} has no {TOKENIZER_META}, so it was not made by `retok build-tokenizer`; run it with this config"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict):
        raise RetokError(f"{path} is not a JSON object; rebuild the tokenizer with `retok build-tokenizer`")
    return meta


def write_tokenizer_meta(
    tok_dir: Path,
    *,
    new_ids: list[int],
    old_vocab_size: int,
    new_vocab_size: int,
    family: str | None = None,
    mode: str = "extend",
    old_model: str | None = None,
    old_model_dir: str | None = None,
) -> dict[str, Any]:
    """Write ``retok_tokenizer.json`` (build-tokenizer, and tests or benchmarks that make a tokenizer folder by
    hand, so every writer agrees on its keys); returns what was written."""
    meta = {
        "old_model": old_model,
        "old_model_dir": old_model_dir,
        "family": family,
        "mode": mode,
        "old_vocab_size": old_vocab_size,
        "new_vocab_size": new_vocab_size,
        "num_new_tokens": len(new_ids),
        # extend appends contiguous ids after the old ones; a tokenizer trained anew has no such first id
        "first_new_id": min(new_ids) if new_ids and mode == "extend" else None,
        "new_ids": list(new_ids),
    }
    (tok_dir / TOKENIZER_META).write_text(json.dumps(meta) + "\n", encoding="utf-8")
    return meta


def new_token_ids(tok_dir: Path, n_tokens: int) -> list[int]:
    """The ids build-tokenizer added (``new_ids``), checked against the tokenizer's length."""
    meta = read_tokenizer_meta(tok_dir)
    try:
        ids = [int(i) for i in meta["new_ids"]]
    except (KeyError, TypeError, ValueError):
        raise RetokError(
            f"{tok_dir / TOKENIZER_META} has no list of new_ids; rerun `retok build-tokenizer --overwrite`"
        ) from None
    bad = [i for i in ids if not 0 <= i < n_tokens]
    if bad:
        raise RetokError(
            f"{tok_dir / TOKENIZER_META}: new_ids holds {bad[0]}, outside the tokenizer's {n_tokens} ids; "
            "rerun `retok build-tokenizer --overwrite`"
        )
    return ids


# ------------------------------------------------------------------------------------ the stage folder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temporaries(out: Path, keys: tuple[str, ...] = ORDER) -> list[str]:
    """Remove ``.<key>.tmp-<pid>-*`` / ``.<key>.old-<pid>-*`` folders left by a killed run of any of these
    stages (their process is gone); a live run's folders are left alone."""
    removed = []
    if not out.is_dir():
        return removed
    for key in keys:
        for p in out.glob(f".{key}.*-*"):
            parts = p.name[len(key) + 2 :].split("-", 2)  # "tmp", "<pid>", "<random>"
            if len(parts) < 3 or parts[0] not in ("tmp", "old") or not parts[1].isdigit():
                continue
            if int(parts[1]) != os.getpid() and _pid_alive(int(parts[1])):
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def foreign_folder(folder: Path, key: str) -> str | None:
    """Why ``folder`` may not be replaced by stage ``key`` (it is not a folder retok made for that stage), or
    None when it may (or is not there)."""
    if not folder.exists() and not folder.is_symlink():
        return None
    if folder.is_symlink() or not folder.is_dir():
        return (
            f"{folder} exists and is not a folder retok made; move it away or set output_dir to a new folder"
        )
    meta = folder / STAGE_FILE
    if not meta.is_file():
        return (
            f"{folder} holds files retok did not make (no {STAGE_FILE}); retok never replaces them: move them "
            "away or set output_dir to a new folder"
        )
    try:
        made = read_stage_meta(folder)
    except RetokError as e:
        return str(e)
    if made["stage"] != key:
        return f"{folder} holds a {made['stage']!r} stage, not {key!r}; move it away or set output_dir to a new folder"
    return None


def input_paths(cfg: RetokConfig) -> list[tuple[str, Path]]:
    """Local paths the config reads (the model, the compared models, the data), as (key, resolved path)."""
    from retok.core.config import expand

    plain = _unwrap(cfg)
    named = [("model.path", plain.model.path)]
    named += [
        ("eval.baseline_model", plain.eval.baseline_model),
        ("eval.candidate_model", plain.eval.candidate_model),
    ]
    for section in ("train", "eval"):
        for i, src in enumerate(getattr(plain.data, section)):
            named.append((f"data.{section}.{i}.path", src.path))
    named += [(f"eval.tasks.{i}.path", t.path) for i, t in enumerate(plain.eval.tasks or [])]
    out = []
    for name, value in named:
        if not value:
            continue
        try:
            text = expand(value)
        except RetokError:
            continue  # reported where the path is used
        # a glob reads below its first wildcard
        cut = min([i for i, c in enumerate(text) if c in "*?["] or [len(text)])
        path = Path(text[:cut] or ".")
        if cut < len(text) and not text[:cut].endswith(os.sep):
            path = path.parent
        if path.exists():
            out.append((name, path.resolve()))
    return out


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def protect_inputs(cfg: RetokConfig, keys: tuple[str, ...] | list[str]) -> None:
    """Refuse, before anything is written, a stage folder that would replace or hold something the config
    reads (``model.path: <output_dir>/export`` would be overwritten by export), or one that lies inside a
    data folder (its files would become training text)."""
    for key in keys:
        folder = stage_dir(cfg, key).resolve()
        for name, path in input_paths(cfg):
            if _inside(path, folder):
                raise RetokError(
                    f"{name} ({path}) lies inside {folder}, which `retok {stage(key).command}` replaces; "
                    "set output_dir to another folder (retok never writes over what it reads)"
                )
            if name.startswith("data.") and path.is_dir() and _inside(folder, path):
                raise RetokError(
                    f"output_dir puts {folder} inside {name}'s folder {path}, so its files would become "
                    "text to read; set output_dir outside the data folders"
                )


def _make_out(cfg: RetokConfig) -> Path:
    out = cfg.out
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".retok-probe").exists()  # a path too long for the file system fails here, not mid-stage
    except FileExistsError:
        raise RetokError(f"output_dir {out} exists and is not a folder; set output_dir to a folder") from None
    except OSError as e:
        raise RetokError(
            f"output_dir {out} cannot be created ({e.strerror or e.__class__.__name__}); "
            "set output_dir to a writable folder"
        ) from None
    if not out.is_dir():
        raise RetokError(f"output_dir {out} exists and is not a folder; set output_dir to a folder")
    return out


@contextmanager
def stage_output(cfg: RetokConfig, key: str, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it is marked and becomes ``output_dir/<key>``, on failure
    it is removed and the previous folder (if any) is left as it was. A folder retok did not make for this
    stage is never replaced, and nothing the config reads may lie in the folder."""
    start = time.perf_counter()
    final = stage_dir(cfg, key)
    out = _make_out(cfg)
    if final.exists() or final.is_symlink():
        why = foreign_folder(final, key)
        if why:
            raise RetokError(why)
        if not overwrite:
            raise RetokError(
                f"{final} already exists; pass --overwrite to replace it, or set output_dir to a new folder"
            )
    protect_inputs(cfg, [key])
    for name in remove_stale_temporaries(out):
        print(f"retok: removed {out / name}, left by an interrupted run", flush=True)
    inputs, made_by = inputs_read(cfg, key), fingerprint(cfg, key)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-{os.getpid()}-", dir=out))
    except OSError as e:
        raise RetokError(
            f"output_dir {out}: cannot create a folder there ({disk_error(e) or e.strerror or e.__class__.__name__}); "
            "set output_dir to a writable folder with a shorter path"
        ) from None
    tmp.chmod(0o755)  # mkdtemp makes 0700; the finished folder should read like any other
    partial: PartialOutput | None = None
    try:
        try:
            yield tmp
        except PartialOutput as e:
            partial = e  # the main output is complete: keep it, then report what is missing
        seconds = time.perf_counter() - start
        mark_stage(
            tmp,
            cfg,
            key,
            seconds=seconds,
            inputs=inputs,
            made_by=made_by,
            incomplete=partial and str(partial),
        )
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{key}.old-{os.getpid()}-", dir=out))
            old.rmdir()
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = disk_error(e) if not isinstance(e, RetokError) else None
        if why is None:
            raise
        kept = (
            f"the previous {final} is kept as it was"
            if final.exists()
            else f"nothing of {final.name}/ was kept"
        )
        if key == "model-trained" and (out / "train-state").is_dir():
            kept += (
                "; the last checkpoint in train-state/ is kept (`retok train-io --resume` continues from it)"
            )
        raise RetokError(
            f"{stage(key).command}: writing into {out} failed: {why}; {kept}; free space or set output_dir "
            "elsewhere, then run it again"
        ) from None
    if partial is not None:
        raise partial


def entry_function(key: str) -> Any:
    """The function that makes stage ``key`` (imported when called: stage packages load torch)."""
    import importlib

    module, _, name = stage(key).entry.partition(":")
    return getattr(importlib.import_module(module), name)
