"""Documentation generated from the schema: the commented default config and the README's config reference.

Both come from the field descriptions in retok/core/config.py, so they cannot drift from the code (a test checks
that the README holds the current reference).
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from retok.core.config import DataSource, RetokConfig

_EXAMPLE_SOURCES = {
    "train": [{"name": "zh", "path": "data/zh/train.jsonl", "text_field": "text"}],
    "eval": [
        {"name": "zh", "path": "data/zh/eval.jsonl"},
        {"name": "en", "path": "data/en/eval.jsonl"},
    ],
}


def _sub_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _list_item_model(annotation: Any) -> type[BaseModel] | None:
    """The section type of a list of sections (data.train, eval.tasks; also when the list may be null)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        found = [m for a in typing.get_args(annotation) if (m := _list_item_model(a)) is not None]
        return found[0] if found else None
    if typing.get_origin(annotation) is list:
        (arg,) = typing.get_args(annotation)
        return _sub_model(arg)
    return None


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        (arg,) = typing.get_args(annotation)
        return f"list[{_type_name(arg)}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> Any:
    if field.default is not PydanticUndefined:
        return field.default
    if field.default_factory is not None:
        return field.default_factory()
    return PydanticUndefined


def _scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _emit(
    model: type[BaseModel], indent: int, lines: list[str], placeholders: dict[str, Any], prefix: str
) -> None:
    pad = "  " * indent
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        desc = field.description or ""
        lines.append(f"{pad}# {desc}")
        sub = _sub_model(field.annotation)
        item = _list_item_model(field.annotation)
        if sub is not None:
            lines.append(f"{pad}{name}:")
            _emit(sub, indent + 1, lines, placeholders, f"{key}.")
        elif item is DataSource:
            examples = placeholders.get(key, _EXAMPLE_SOURCES.get(name, []))
            if not examples:
                lines.append(f"{pad}{name}: []")
                continue
            lines.append(f"{pad}{name}:")
            for ex in examples:
                first = True
                for k, v in ex.items():
                    lines.append(f"{pad}  {'- ' if first else '  '}{k}: {_scalar(v)}")
                    first = False
        else:
            value = placeholders.get(key, _default(field))
            if value is PydanticUndefined:
                value = "CHANGE-ME"
            lines.append(f"{pad}{name}: {_scalar(value)}")
        if indent == 0:
            lines.append("")


def commented_yaml(model_path: str | None = None) -> str:
    """A complete config with every key, its default and its description as a comment."""
    placeholders = {"output_dir": "runs/my-run", "model.path": model_path or "HuggingFaceTB/SmolLM2-135M"}
    lines = [
        "# retok config: every key with its default. Check it with `retok validate FILE`;",
        "# run everything with `retok run FILE`, or one stage, e.g. `retok build-tokenizer --config FILE`.",
        "# Any key can be overridden on the command line: --set train.max_steps=100",
        "",
    ]
    _emit(RetokConfig, 0, lines, placeholders, "")
    text = "\n".join(lines).rstrip() + "\n"
    RetokConfig.model_validate(yaml.safe_load(text))  # the template itself must be valid
    return text


def markdown_reference() -> str:
    """The config reference table for the README, one row per key."""
    rows = ["| key | type | default | what it does |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            sub = _sub_model(field.annotation)
            item = _list_item_model(field.annotation)
            if sub is not None:
                walk(sub, f"{key}.")
                continue
            default = _default(field)
            shown = "required" if default is PydanticUndefined else f"`{_scalar(default)}`"
            if item is not None:
                kind = "list of sources" if item is DataSource else f"list of {item.__name__} or null"
                rows.append(f"| `{key}` | {kind} | {shown} | {field.description} |")
                walk(item, f"{key}[].")
                continue
            desc = (field.description or "").replace("|", "\\|")
            rows.append(f"| `{key}` | {_type_name(field.annotation).replace('|', 'or')} | {shown} | {desc} |")

    walk(RetokConfig, "")
    return "\n".join(rows) + "\n"
