"""The servers' options table: one entry per option, read by the servers, by ``serve``'s
arguments and by the documentation; its defaults are those the servers use."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from elastic_timer import FileTimerServer, _native, cli, options
from elastic_timer.file_based_local_timer import FileTimerRequest
from elastic_timer.options import OPTIONS, DiagnosticsOptions, Option

ROOT = Path(__file__).resolve().parent.parent

BY_NAME = {option.name: option for option in OPTIONS}
# A text no option's parser takes (the paths take any text).
BOGUS = "bogus"
CHECKED = [o for o in OPTIONS if o.parse not in (options.path, options.absolute_path)]
# Those given a value (not a switch).
VALUED = [option for option in CHECKED if option.metavar is not None]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for option in OPTIONS:
        monkeypatch.delenv(option.env, raising=False)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FileTimerServer]:
    server = FileTimerServer(str(tmp_path / "timer.fifo"), "options", signal_self=False)
    yield server
    server.stop()


def test_every_option_has_one_keyword_variable_and_flag() -> None:
    names = [option.name for option in OPTIONS]
    assert set(DiagnosticsOptions.__annotations__) == {*names, "on_event"}
    for field in ("name", "env", "flag"):
        values = [getattr(option, field) for option in OPTIONS]
        assert len(set(values)) == len(values), f"one {field} per option"
    for option in OPTIONS:
        assert option.env == "ELASTIC_TIMER_" + option.name.upper()
        assert option.flag == "--" + option.name.replace("_", "-")
        assert option.help.endswith(".")


def test_the_defaults_the_core_owns_come_from_it() -> None:
    assert _native.DEFAULTS.keys() <= BY_NAME.keys()
    for name, default in _native.DEFAULTS.items():
        assert BY_NAME[name].default == default
    assert _native.DEFAULTS["stack_signal"] == signal.SIGUSR2


def test_a_server_given_nothing_uses_the_tables_defaults(server: FileTimerServer) -> None:
    for option in OPTIONS:
        assert getattr(server._diagnostics, option.name) == option.default, option.name
    native = server._diagnostics.native_options()
    assert native["max_worker_timers"] == BY_NAME["max_worker_timers"].default == 10_000


def test_the_default_cap_on_a_workers_timers_is_the_one_the_server_enforces(
    server: FileTimerServer,
) -> None:
    """Timers of this process, far in the future: nothing expires."""
    cap = BY_NAME["max_worker_timers"].default
    far = 1e12
    server.register_timers(FileTimerRequest(os.getpid(), f"scope-{i}", far) for i in range(cap + 1))
    assert server.stats()["live_timers"] == cap
    assert server.stats()["over_cap"] == 1


def test_a_stack_dumping_server_names_the_default_signal_to_its_workers(
    tmp_path: Path,
) -> None:
    server = FileTimerServer(
        str(tmp_path / "timer.fifo"), "signal", signal_self=False, stack_dump=1.0
    )
    server.start()
    try:
        directory = Path(server._diagnostics.stacks_dir or "")
        assert (directory / "signal").read_text() == f"{int(signal.SIGUSR2)}\n"
        sidecar = _native.stacks_sidecar(str(tmp_path / "timer.fifo"))
        assert sidecar == tmp_path / "timer.fifo.stacks"
        assert sidecar.read_text() == f"{directory}\n"
    finally:
        server.stop()


@pytest.mark.parametrize("option", CHECKED, ids=lambda option: option.name)
def test_a_bad_variable_is_a_warning_naming_it_and_the_default_is_used(
    option: Option,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv(option.env, BOGUS)
    with caplog.at_level(logging.WARNING, logger="elastic_timer"):
        server = FileTimerServer(str(tmp_path / "timer.fifo"), "env", signal_self=False)
    assert getattr(server._diagnostics, option.name) == option.default
    (record,) = [r for r in caplog.records if option.env in r.getMessage()]
    assert record.getMessage().startswith(f"Ignoring {option.env}='{BOGUS}': ")


@pytest.mark.parametrize("option", VALUED, ids=lambda option: option.name)
def test_a_bad_keyword_is_a_value_error_and_a_bad_flag_a_usage_error(
    option: Option, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = str(tmp_path / "timer.fifo")
    with pytest.raises(ValueError) as raised:
        keywords: dict[str, Any] = {option.name: BOGUS}
        FileTimerServer(fifo, "keyword", signal_self=False, **keywords)
    message = str(raised.value)
    assert option.name in message or "signal" in message, message
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--fifo", fifo, option.flag, BOGUS])
    assert exited.value.code == 2
    assert f"argument {option.flag}: " in capsys.readouterr().err


def test_serve_takes_every_option_as_its_flag_and_leaves_the_rest_to_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["serve", "--fifo", str(tmp_path / "f")])
    assert all(getattr(args, option.name) is None for option in OPTIONS)
    assert cli._server_options(args) == {}
    given: list[str] = []
    expected: dict[str, Any] = {}
    for option, text, value in (
        (BY_NAME["stack_dump"], "2.5", 2.5),
        (BY_NAME["stack_signal"], "USR1", int(signal.SIGUSR1)),
        (BY_NAME["dry_run"], None, True),
        (BY_NAME["max_timers"], "7", 7),
    ):
        given += [option.flag] if text is None else [option.flag, text]
        expected[option.name] = value
    args = parser.parse_args(["serve", "--fifo", str(tmp_path / "f"), *given])
    assert cli._server_options(args) == expected
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--help"])
    assert exited.value.code == 0
    help_text = capsys.readouterr().out
    for option in OPTIONS:
        assert option.flag in help_text and option.env in help_text, option.name


def test_the_options_page_is_the_one_the_table_makes() -> None:
    """After a change to the table: ``python3 scripts/options_page.py``."""
    page = (ROOT / "docs" / "options.md").read_text()
    assert page == options.markdown_page()
    assert page.startswith("# Server options\n")
    for option in OPTIONS:
        assert f"| `{option.name}` | `{option.env}` |" in page
