"""MkDocs hook: the "Modules" page shows the crate's and the package's own module docs.

The list of modules lives in one place, ``rust/lib.rs``'s ``//!`` documentation and
``python/elastic_timer/__init__.py``'s docstring; ``docs/modules.md`` holds a marker for each,
replaced here at build time, so the site can never disagree with the code.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"<!-- module-docs: (?P<path>[\w/.]+) -->")


def rust_module_doc(path: Path) -> str:
    """A file's `//!` lines as Markdown, rustdoc's intra-doc links as plain code."""
    lines = path.read_text().splitlines()
    doc = "\n".join(line[3:].removeprefix(" ") for line in lines if line.startswith("//!"))
    return re.sub(r"\[(`[^`\]]+`)\](?!\()", r"\1", doc)


def python_module_doc(path: Path) -> str:
    """A module's docstring as Markdown: a paragraph ending in `::` introduces a code block."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return re.sub(r"::$", ":", doc, flags=re.MULTILINE)


def on_page_markdown(markdown: str, **_: Any) -> str:
    def render(match: re.Match[str]) -> str:
        path = ROOT / match["path"]
        return rust_module_doc(path) if path.suffix == ".rs" else python_module_doc(path)

    return MARKER.sub(render, markdown)
