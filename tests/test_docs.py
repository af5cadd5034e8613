"""The documentation against the code: every variable, keyword and flag users can set is
documented on the site (docs/), the module lists (rust/lib.rs's and the package's own module
docs, which the site renders) name every module, and the README keeps its two commands."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
from pathlib import Path

import pytest

from elastic_timer import FileTimerClient, FileTimerServer, LocalTimerClient, LocalTimerServer
from elastic_timer.cli import build_parser
from elastic_timer.options import OPTIONS
from elastic_timer.run import HELP_PREAMBLE

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PACKAGE = ROOT / "python" / "elastic_timer"


def site_text() -> str:
    return "\n".join(page.read_text() for page in sorted(DOCS.glob("**/*.md")))


def test_every_environment_variable_the_package_reads_is_documented() -> None:
    sources = "\n".join(path.read_text() for path in sorted(PACKAGE.glob("**/*.py")))
    sources += "\n".join(path.read_text() for path in sorted((ROOT / "rust").glob("**/*.rs")))
    variables = set(re.findall(r"\b(?:ELASTIC_TIMER|TORCHELASTIC)_[A-Z_]*[A-Z]\b", sources))
    # The Rust unit tests' own variables (a child's environment read back) are not settings.
    variables = {name for name in variables if not name.startswith("ELASTIC_TIMER_TEST_")}
    assert "ELASTIC_TIMER_STACK_DUMP" in variables and "ELASTIC_TIMER_WATCH" in variables
    text = site_text()
    missing = sorted(name for name in variables if not re.search(rf"\b{name}\b", text))
    assert missing == [], f"not in docs/: {missing}"


def test_every_server_and_client_keyword_is_documented() -> None:
    text = site_text()
    keywords = {option.name for option in OPTIONS} | {"on_event"}
    for cls in (FileTimerServer, LocalTimerServer, FileTimerClient, LocalTimerClient):
        code = cls.__init__.__code__
        keywords.update(code.co_varnames[1 : code.co_argcount + code.co_kwonlyargcount])
    keywords -= {"file_path", "mp_queue"}  # the positional transport, shown in every example
    assert {"stack_dump", "signal_self", "connect_timeout", "send_timeout"} <= keywords
    missing = sorted(name for name in keywords if not re.search(rf"`{name}[`=(]", text))
    assert missing == [], f"not in docs/: {missing}"


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {
        option
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }


def test_every_command_line_flag_is_in_the_command_line_page() -> None:
    page = (DOCS / "cli.md").read_text()
    commands = next(
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    assert set(commands.choices) == {"serve", "timeouts", "report"}
    for name in commands.choices:
        assert f"`elastic-timer {name}`" in page
    flags = option_strings(commands.choices["serve"])
    # elastic-timer-run's own flags, from its help (the rest are the launcher's).
    run_flags = set(re.findall(r"^  (--[a-z-]+)", HELP_PREAMBLE, re.MULTILINE))
    assert run_flags == {"--launcher", "--adaptive", "--watch"}
    assert {"--fifo", "--metrics", "--descendants-only"} <= flags
    missing = sorted(flag for flag in flags | run_flags if f"`{flag}" not in page)
    assert missing == [], f"not in docs/cli.md: {missing}"


def test_the_crates_module_doc_names_every_module() -> None:
    lib = (ROOT / "rust" / "lib.rs").read_text()
    modules = re.findall(r"^(?:pub )?mod (\w+);", lib, re.MULTILINE)
    doc = "\n".join(line for line in lib.splitlines() if line.startswith("//!"))
    named = set(re.findall(r"^//! - \[?`(\w+)`", doc, re.MULTILINE))
    assert "ring" in modules and "bindings" in modules
    assert sorted(set(modules) - {"test_support"}) == sorted(named)


def test_the_packages_docstring_names_every_module() -> None:
    modules = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}
    modules |= {path.parent.name for path in PACKAGE.glob("*/*.py")}
    modules |= {"_native"}
    doc = ast.get_docstring(ast.parse((PACKAGE / "__init__.py").read_text())) or ""
    named = set(re.findall(r"^- ``(\w+)``", doc, re.MULTILINE))
    assert {"api", "watch", "_native"} <= modules
    assert sorted(modules) == sorted(named)


def test_the_modules_page_renders_the_code_s_own_module_docs() -> None:
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "scripts" / "docs_hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    page = hooks.on_page_markdown((DOCS / "modules.md").read_text())
    assert "<!-- module-docs" not in page
    assert "- `ring`: the shared-memory request ring" in page  # rustdoc's link made plain code
    assert "- ``hang_report``: one hang report" in page


@pytest.mark.parametrize(
    "command", ["pip install . && python examples/demo.py", "bash scripts/test.sh"]
)
def test_the_readme_keeps_its_two_commands(command: str) -> None:
    readme = (ROOT / "README.md").read_text()
    assert f"```bash\n{command}\n```" in readme
    assert "exec bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
