"""Writes docs/options.md, the server options page, from elastic_timer.options's table."""

from pathlib import Path

from elastic_timer.options import markdown_page

PAGE = Path(__file__).resolve().parent.parent / "docs" / "options.md"

if __name__ == "__main__":
    PAGE.write_text(markdown_page())
