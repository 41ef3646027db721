"""HTML to plain text."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from retok_assets.roff import tidy_text

# fmt: off
_HTML_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source",
              "track", "wbr"}
_HTML_SKIP_TAGS = {"script", "style", "head", "nav", "header", "footer", "aside", "noscript", "template",
                   "button", "svg"}
_HTML_SKIP_CLASSES = {"navheader", "navfooter", "toc"}
_HTML_PARAGRAPH = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "table", "ul", "ol", "dl",
                   "figure", "section", "article"}
_HTML_LINE = {"div", "li", "tr", "dt", "dd", "br", "hr", "caption", "tbody", "thead"}
# fmt: on


class _TextExtractor(HTMLParser):
    def __init__(self, root_id: str | None):
        super().__init__(convert_charrefs=True)
        self.root_id = root_id
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, skipped, is_root)
        self.parts: list[str] = []
        self.newlines = 0  # newlines at the end of the text so far
        self.pre = 0

    def _active(self) -> bool:
        if any(skip for _, skip, _ in self.stack):
            return False
        return self.root_id is None or any(root for _, _, root in self.stack)

    def _emit(self, s: str) -> None:
        self.parts.append(s)
        stripped = s.rstrip("\n")
        self.newlines = self.newlines + len(s) if not stripped else len(s) - len(stripped)

    def _break(self, newlines: int) -> None:
        """End the current line (1) or paragraph (2), without piling up blank lines."""
        if self._active() and self.parts and newlines > self.newlines:
            self._emit("\n" * (newlines - self.newlines))

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        skip = tag in _HTML_SKIP_TAGS or bool(classes & _HTML_SKIP_CLASSES)
        if tag in _HTML_PARAGRAPH:
            self._break(2)
        elif tag in _HTML_LINE:
            self._break(1)
        elif tag in ("td", "th"):
            self._break_cell()
        if tag in _HTML_VOID:
            return
        self.stack.append((tag, skip, self.root_id is not None and a.get("id") == self.root_id))
        if tag == "pre":
            self.pre += 1

    def _break_cell(self) -> None:
        if self._active() and self.parts and not self.newlines and not self.parts[-1].endswith(" "):
            self._emit(" ")

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in _HTML_VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag):
        if tag in _HTML_VOID or all(t != tag for t, _, _ in self.stack):
            return
        while self.stack:
            t, _, _ = self.stack.pop()
            if t == "pre":
                self.pre -= 1
            if t == tag:
                break
        if tag in _HTML_PARAGRAPH:
            self._break(2)
        elif tag in _HTML_LINE:
            self._break(1)

    def handle_data(self, data):
        if not self._active():
            return
        if not self.pre:
            data = re.sub(r"\s+", " ", data)
            if not self.parts or self.newlines:
                data = data.lstrip()
        if data:
            self._emit(data)


def html_to_text(src: str, root_id: str | None = None) -> str:
    """Plain text of an HTML page: tags, scripts, styles and navigation dropped, entities unescaped,
    paragraph breaks kept. With ``root_id``, only the element with that id is read."""
    parser = _TextExtractor(root_id)
    parser.feed(src)
    parser.close()
    return tidy_text("".join(parser.parts))
