"""The retok command line: one thin command per stage (load config -> run the stage -> say where it went).

Every command takes ``--config FILE`` (or the file as first argument) and repeatable ``--set a.b=value``.
Bad input ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Annotated

import typer

from retok.core.errors import RetokError

app = typer.Typer(
    name="retok",
    help="Replace the tokenizer of a pretrained LLM and keep the model good (ReTok).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigArg = Annotated[
    Path | None, typer.Argument(help="The YAML config (same as --config).", show_default=False)
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="The YAML config.", show_default=False)
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a key: --set train.max_steps=50 (repeatable; value is YAML)."),
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace this stage's existing output folder.")
]


def _config(arg: Path | None, opt: Path | None, sets: list[str] | None):
    from retok.core.config import load_config

    if arg is not None and opt is not None and arg != opt:
        raise RetokError(f"two configs given ({arg} and --config {opt}); give one")
    path = opt or arg
    if path is None and not sets:
        raise RetokError("no config given; pass --config FILE (`retok init-config FILE` writes one)")
    return load_config(path, sets)


def _done(stage: str, folder: Path, extra: str = "") -> None:
    typer.echo(f"retok {stage}: wrote {folder}{extra}")


# ---------------------------------------------------------------------------------------- stages


@app.command("build-tokenizer")
def build_tokenizer_cmd(
    config: ConfigArg = None,
    config_opt: ConfigOpt = None,
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
):
    """Extend the model's tokenizer with tokens learned on data.train (or train a new one); report compression."""
    from retok.pipeline import run_stage

    cfg = _config(config, config_opt, set_)
    _done("build-tokenizer", run_stage(cfg, "tokenizer", overwrite=overwrite))


@app.command("init-embeddings")
def init_embeddings_cmd(
    config: ConfigArg = None,
    config_opt: ConfigOpt = None,
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
):
    """Rebuild the input embedding and LM head for the new tokenizer (tensor by tensor)."""
    from retok.pipeline import run_stage

    cfg = _config(config, config_opt, set_)
    _done("init-embeddings", run_stage(cfg, "model-init", overwrite=overwrite))


@app.command("train-io")
def train_io_cmd(
    config: ConfigArg = None,
    config_opt: ConfigOpt = None,
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last checkpoint in output_dir/train-state.")
    ] = False,
):
    """Train the input embedding and LM head with the body frozen (Accelerate; resumable)."""
    from retok.pipeline import run_stage

    cfg = _config(config, config_opt, set_)
    _done("train-io", run_stage(cfg, "model-trained", overwrite=overwrite, resume=resume))


@app.command("eval-speed")
def eval_speed_cmd(
    config: ConfigArg = None,
    config_opt: ConfigOpt = None,
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
):
    """Bytes/token, bits per byte and long-text decoding bytes/s: original vs new model on the same text."""
    from retok.pipeline import run_stage

    cfg = _config(config, config_opt, set_)
    _done("eval-speed", run_stage(cfg, "eval", overwrite=overwrite))


@app.command("export")
def export_cmd(
    config: ConfigArg = None,
    config_opt: ConfigOpt = None,
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
):
    """Write the final Hugging Face folder (sharded safetensors, tokenizer, model card) and check it."""
    from retok.pipeline import run_stage

    cfg = _config(config, config_opt, set_)
    _done("export", run_stage(cfg, "export", overwrite=overwrite))


@app.command("run")
def run_cmd(
    config: ConfigArg = None,
    config_opt: ConfigOpt = None,
    set_: SetOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Redo every selected stage even if its output is up to date.")
    ] = False,
    stages: Annotated[
        str | None, typer.Option("--stages", help="Comma-separated subset, e.g. tokenizer,model-init.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", "-n", help="Say which stages would run and why; run nothing.")
    ] = False,
):
    """Run every stage in order, like make: a stage is redone when a key it reads changed, when what it reads
    was remade, or when it is missing or incomplete (each reason printed); the rest is kept."""
    from retok.pipeline import run_all

    cfg = _config(config, config_opt, set_)
    run_all(
        cfg, force=force, only=[s.strip() for s in stages.split(",")] if stages else None, dry_run=dry_run
    )


@app.command("check")
def check_cmd(folder: Annotated[Path, typer.Argument(help="A model folder to check.")]):
    """Check that a model folder loads with plain transformers and its tokenizer, ids and head agree.

    Exit code 0: every check passes; 1: a check fails; 2: not a model folder; 3: retok's own error."""
    from retok.export.check import check_folder, print_checks

    results = check_folder(folder)
    print_checks(results)
    if any(r.internal for r in results):
        raise typer.Exit(3)  # retok's own error, not a verdict on the folder
    if not all(r.ok for r in results):
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------------ config


@app.command("validate")
def validate_cmd(config: ConfigArg = None, config_opt: ConfigOpt = None, set_: SetOpt = None):
    """Check a config without running anything."""
    from retok.pipeline import preflight

    cfg = _config(config, config_opt, set_)
    for line in preflight(cfg):
        typer.echo(line)
    typer.echo(f"config ok: {config_opt or config or '(from --set)'}")


@app.command("plan")
def plan_cmd(
    config: ConfigArg = None,
    config_opt: ConfigOpt = None,
    set_: SetOpt = None,
    processes: Annotated[
        int, typer.Option("--processes", "-n", min=1, help="Processes train-io will be launched with.")
    ] = 1,
    strategy: Annotated[
        str | None,
        typer.Option(help="ddp or fsdp (default: what train.distributed picks for this many processes)."),
    ] = None,
    model_config: Annotated[
        Path | None,
        typer.Option(help="The model's config.json, when model.path cannot be read here (a hub id offline)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
):
    """Memory per device for each train-io phase (and the time, when measured) before anything is loaded.

    Exit 1 when the plan does not fit the device (compute.memory_gb, a GPU's memory, or the RAM available)."""
    import json

    from retok.plan import advice, plan

    cfg = _config(config, config_opt, set_)
    if strategy not in (None, "ddp", "fsdp", "auto"):
        raise RetokError(f"--strategy {strategy}: use ddp or fsdp")
    if strategy == "fsdp" and processes == 1:
        raise RetokError("--strategy fsdp shards over several processes; give --processes N (N >= 2)")
    p = plan(cfg, processes, None if strategy == "auto" else strategy, model_config=model_config)
    if as_json:
        typer.echo(json.dumps(p.to_json(), indent=2))
    else:
        for line in p.lines():
            typer.echo(line)
        if not p.fits:
            typer.echo(f"  to fit: {advice(p, cfg)}")
    if not p.fits:
        raise typer.Exit(1)


@app.command("init-config")
def init_config_cmd(
    path: Annotated[Path, typer.Argument(help="Where to write the commented default config.")],
    model: Annotated[str | None, typer.Option(help="model.path to put in the file.")] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", "--force", help="Replace an existing file (the same flag as the stages')."
        ),
    ] = False,
):
    """Write a commented config with every key, its default and what it does."""
    from retok.core.config_doc import commented_yaml

    if path.is_dir():
        raise RetokError(f"{path} is a folder; give a file name such as {path / 'retok.yaml'}")
    if path.exists() and not overwrite:
        raise RetokError(f"{path} already exists; pass --overwrite to replace it or choose another name")
    from retok.core.fileio import disk_error, write_text_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, commented_yaml(model_path=model))  # a full disk keeps the old file whole
    except OSError as e:
        kept = "; the existing file is kept as it was" if path.exists() else ""
        raise RetokError(
            f"cannot write {path} ({disk_error(e) or e.strerror or e.__class__.__name__}){kept}; free space or "
            "choose another path"
        ) from None
    typer.echo(f"wrote {path}; edit model.path and data, then `retok validate {path}`")


def _click_modules() -> list:
    """The click exception modules in use: the typer pinned here vendors its own click (``typer._click``), older
    typers use the ``click`` package; usage errors may come from either."""
    mods = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            mods.append(importlib.import_module(name))
        except ImportError:
            pass
    return mods


def usage_error_line(e: BaseException) -> str | None:
    """One line for a click usage error (unknown option, missing argument, bad value), or None if ``e`` is
    not one."""
    for mod in _click_modules():
        if isinstance(e, mod.ClickException):
            msg = " ".join(e.format_message().split()) or type(e).__name__
            return f"{msg} (see `{_command(getattr(e, 'ctx', None))} --help`)"
    return None


def _command(ctx) -> str:
    # the subcommand names from the context chain; the program is always "retok" (click would name it
    # after argv[0], which is "-" or "python -m ..." under some launchers)
    names = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    return " ".join(["retok", *reversed(names)])


def _is_abort(e: BaseException) -> bool:
    aborts = [getattr(typer, "Abort", None)] + [getattr(mod, "Abort", None) for mod in _click_modules()]
    return any(isinstance(e, a) for a in aborts if isinstance(a, type))


def main() -> None:
    """Entry point: a RetokError or a usage error is one line and exit code 2; Ctrl-C one line and 130."""
    try:
        rc = app(standalone_mode=False)
    except RetokError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("retok: interrupted", err=True)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:
        if _is_abort(e):  # click turns Ctrl-C (and EOF at a prompt) into Abort
            typer.echo("retok: interrupted", err=True)
            sys.exit(130)
        line = usage_error_line(e)
        if line is None:
            raise
        if type(e).__name__ == "NoArgsIsHelpError":  # `retok` alone: the help is printed already
            sys.exit(2)
        typer.echo(f"error: {line}", err=True)
        sys.exit(2)
    # In non-standalone mode click returns the code of typer.Exit instead of exiting with it; typer turns
    # Ctrl-C into Exit(130) without a word.
    if rc == 130:
        typer.echo("retok: interrupted", err=True)
    if isinstance(rc, int) and rc:
        sys.exit(rc)


if __name__ == "__main__":
    main()
