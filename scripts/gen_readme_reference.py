"""Rewrite the config reference in README.md from the schema (between the two marker comments).

python scripts/gen_readme_reference.py
"""

from __future__ import annotations

from pathlib import Path

from retok.core.config_doc import markdown_reference

BEGIN = "<!-- config-reference:begin -->"
END = "<!-- config-reference:end -->"


def main() -> None:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{markdown_reference()}{END}{tail}")
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
