"""The model card (README.md) of the exported folder: what was done, the eval table, how to use it, the
llama.cpp note, the checks and the config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retok.core.config import RetokConfig
from retok.core.sources import looks_like_hub_id
from retok.core.stages import CONFIG_FILE
from retok.export.verdict import Check


def _llamacpp_section(gguf: dict[str, Any], llama: dict[str, Any]) -> list[str]:
    """How to run the model in llama.cpp: the GGUF export wrote, or how to get one."""
    lines = ["## llama.cpp / GGUF", ""]
    if gguf.get("written"):
        f = gguf["file"]
        lines += [
            f"`{f}` ({gguf['type']}, {gguf['bytes'] / 1e6:.0f} MB) runs in an unmodified llama.cpp (and Ollama, LM Studio): "
            f"architecture `{gguf['architecture']}`, tokenizer `{gguf['tokenizer_model']}` with pre-tokenizer "
            f"`{gguf['pre']}`, {gguf['tokens']} tokens"
            + (f" + {gguf['padding_tokens']} unused padding rows" if gguf["padding_tokens"] else "")
            + ".",
            "",
            "```bash",
            f'llama-cli -m {f} -p "Hello" -n 64',
            f"llama-server -m {f} --port 8080",
            "```",
        ]
    else:
        lines += [
            "No GGUF was written ("
            + str(gguf.get("reason", "export.gguf: off"))
            + "). Set `export.gguf: f16` "
            "(or `q8_0`) and run `retok export --overwrite` to get one that llama.cpp loads as is.",
        ]
    lines += [
        "",
        f"- chkhsh of the old tokenizer: `{llama['old_chkhsh']}`"
        + (f" (llama.cpp name `{llama['pre_name']}`)" if llama.get("pre_name") else ""),
        f"- chkhsh of the new tokenizer: `{llama['new_chkhsh']}`",
        f"- normalizer and pre-tokenizer unchanged: {llama['pre_tokenizer_unchanged']}",
    ]
    return lines


def model_card(
    cfg: RetokConfig,
    src: Path,
    name: str,
    tok: Any,
    conf: dict[str, Any],
    llama: dict[str, Any],
    checks: list[Check],
    eval_table: str | None,
    gguf: dict[str, Any] | None = None,
) -> str:
    """The card's Markdown. ``eval_table``: eval-speed's table.md for this model, or None when not measured;
    ``gguf``: export's GGUF report (written or why not)."""
    head = [
        "---",
        "library_name: transformers",
        "tags:",
        "- retok",
        "- tokenizer-extension",
    ]
    if looks_like_hub_id(cfg.model.path):
        head.append(f"base_model: {cfg.model.path}")
    head.append("---")
    old_len = llama.get("old_tokenizer_len")
    parts = [
        *head,
        "",
        f"# {name}",
        "",
        f"`{cfg.model.path}` with its tokenizer replaced by [retok](https://arxiv.org/abs/2410.04335) (ReTok): "
        f"{old_len} -> {len(tok)} tokens, embedding and LM head re-initialised (`init.method: {cfg.init.method}`) "
        + (
            f"and trained with the body frozen (`train.max_steps: {cfg.train.max_steps}`). "
            if src.name == "model-trained"
            else "and not trained (exported from model-init). "
        )
        + f"tie_word_embeddings: {conf.get('tie_word_embeddings')}, vocab_size (rows): {conf.get('vocab_size')}.",
        "",
        "## Evaluation",
        "",
    ]
    if eval_table:
        parts += [
            "Old vs new model on the same held-out text (`retok eval-speed`): bytes per token, bits per byte, "
            "and decoding bytes/s on the same reference continuations.",
            "",
            eval_table.rstrip(),
        ]
    else:
        parts.append("Not measured: run `retok eval-speed` before `retok export` to embed the table here.")
    parts += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tok = AutoTokenizer.from_pretrained("PATH")',
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        "```",
        "",
        *_llamacpp_section(gguf or {"written": False, "reason": "export.gguf: off"}, llama),
    ]
    parts += ["", "## Checks (`retok check`)", ""]
    parts += [f"- {'PASS' if c.ok else 'FAIL'} {c.name}: {c.detail}" for c in checks]
    # The config that made the exported model (its stage folder keeps it).
    made_by = (
        (src / CONFIG_FILE).read_text(encoding="utf-8").rstrip()
        if (src / CONFIG_FILE).is_file()
        else "(unknown)"
    )
    parts += ["", f"## retok config (the one that made `{src.name}`)", "", "```yaml", made_by, "```", ""]
    return "\n".join(parts)
