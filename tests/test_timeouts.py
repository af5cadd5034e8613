"""``elastic-timer timeouts STATE_FILE``: the table of what a server learned, from its state file.

The CLI runs as a real subprocess. Its input is ``tests/fixtures/learned-state.json``, which the
Rust tests (``learned::tests::the_fixture_is_what_save_writes``) check is exactly what the
server saves, or files written here in the format ``rust/learned/state.rs`` documents. The CLI
reads it with the server's own reader (``_native.read_state_file``): the messages are its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import run_cli

from elastic_timer.learned import (
    MAX_STATE_BYTES,
    STATE_FORMAT,
    StateFileError,
    read_state,
)

FIXTURE = Path(__file__).parent / "fixtures" / "learned-state.json"


def state(*scopes: object) -> dict[str, Any]:
    return {"format": STATE_FORMAT, "version": 1, "scopes": list(scopes)}


def scope(name: str, **fields: Any) -> dict[str, Any]:
    """A scope record; the figures a test does not give are those of an unlearned scope."""
    record: dict[str, Any] = {
        "scope": name,
        "samples": 0,
        "max": None,
        "after": None,
        "p50": None,
        "p99": None,
        "suggested": None,
        "histogram": [],
    }
    return record | fields


def write(tmp_path: Path, content: object) -> Path:
    """``content`` (bytes, text, or a value to write as JSON) as a state file."""
    path = tmp_path / "state.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def table(path: Path) -> list[list[str]]:
    """The rows ``timeouts`` prints for ``path`` (which must succeed), split into cells."""
    result = run_cli("timeouts", str(path))
    assert (result.returncode, result.stderr) == (0, ""), result
    return [line.split() for line in result.stdout.splitlines()]


def test_prints_one_row_per_scope_from_the_servers_file() -> None:
    assert table(FIXTURE) == [
        ["scope", "samples", "p50", "p99", "max", "after", "suggested"],
        ["checkpoint.py:10", "0", "-", "-", "-", "3600.000", "-"],
        ["train.py:42", "12", "1.049", "1.250", "1.250", "1800.000", "6.250"],
        ["train.py:57", "2", "0.500", "0.500", "0.500", "60.000", "-"],
    ]


def test_columns_line_up() -> None:
    # Scopes left-aligned, numbers right-aligned under their heading.
    assert run_cli("timeouts", str(FIXTURE)).stdout == (
        "scope             samples    p50    p99    max     after  suggested\n"
        "checkpoint.py:10        0      -      -      -  3600.000          -\n"
        "train.py:42            12  1.049  1.250  1.250  1800.000      6.250\n"
        "train.py:57             2  0.500  0.500  0.500    60.000          -\n"
    )


def test_a_file_in_the_documented_format(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        state(
            scope("zeta.py:3", samples=20, max=300, after=1800, p50=120.5, p99=299.0,
                  suggested=1500.0, histogram=[[250, 20]]),
            scope("alpha.py:9", after=0.25),
            scope("new\nline", samples=1, max=2.0, p50=2.0, p99=2.0),
        ),
    )  # fmt: skip
    assert table(path) == [
        ["scope", "samples", "p50", "p99", "max", "after", "suggested"],
        ["alpha.py:9", "0", "-", "-", "-", "0.250", "-"],
        # A name that would break the row is shown escaped.
        ["'new\\nline'", "1", "2.000", "2.000", "2.000", "-", "-"],
        ["zeta.py:3", "20", "120.500", "299.000", "300.000", "1800.000", "1500.000"],
    ]


def test_a_file_without_scopes_prints_the_header(tmp_path: Path) -> None:
    assert table(write(tmp_path, state())) == [
        ["scope", "samples", "p50", "p99", "max", "after", "suggested"]
    ]


def assert_fails(path: Path, *message: str) -> None:
    """``timeouts`` exits 1 with one line on stderr that says ``message``, and prints nothing."""
    result = run_cli("timeouts", str(path))
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert result.stderr.startswith("elastic-timer timeouts: error: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    for part in message:
        assert part in result.stderr


def test_a_missing_file_fails(tmp_path: Path) -> None:
    path = tmp_path / "none.json"
    assert_fails(path, f"cannot read the state file {path}: there is no such file")


def test_a_directory_fails(tmp_path: Path) -> None:
    assert_fails(tmp_path, f"cannot read the state file {tmp_path}: it is not a regular file")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is not valid JSON"),
        (FIXTURE.read_text()[:100], "is not valid JSON"),
        (b"\xff\xfe", "is not valid JSON"),
        ("[1, 2]", "is not an elastic-timer state file"),
        ({"scopes": []}, "is not an elastic-timer state file"),
        ({"format": STATE_FORMAT, "version": 2, "scopes": {}}, "has format version 2"),
        ({"format": STATE_FORMAT, "version": True, "scopes": []}, "has format version true"),
        ({"format": STATE_FORMAT, "scopes": []}, "has format version null"),
        ({"format": STATE_FORMAT, "version": 1}, "is corrupt: missing field `scopes`"),
        (state(5), "is corrupt: invalid type: integer `5`, expected a scope's record"),
        (state(scope("s", samples=-1)), "is corrupt: invalid value: integer `-1`"),
        (state(scope("s", samples=1.5)), "invalid type: floating point `1.5`"),
        (state(scope("s", max=-0.5)), 'is corrupt: scope "s": max is -0.5, not a duration'),
        (state(scope("s", p99="1s")), 'invalid type: string "1s"'),
        (state(scope("s", after=True)), "invalid type: boolean `true`"),
        # Python's json writes NaN, which JSON has not.
        (json.dumps(state(scope("s", max=float("nan")))), "is not valid JSON"),
        # What the server could not have written.
        (state(scope("s", samples=1, max=1.0, histogram=[[143, 2]])), "holds more than samples"),
        (state(scope("s", max=1.0)), "max must be null exactly when samples is 0"),
        (state(scope("s", histogram=[[320, 1]])), "no histogram bucket 320"),
        (state(scope("s"), scope("s")), 'scope "s": listed twice'),
    ],
)  # fmt: skip
def test_a_corrupt_or_foreign_file_fails(tmp_path: Path, content: object, message: str) -> None:
    path = write(tmp_path, content)
    assert_fails(path, f"error: cannot load the state file {path}: ", message)


def test_a_file_larger_than_a_state_file_can_be_fails_unread(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    with open(path, "wb") as f:
        f.truncate(MAX_STATE_BYTES + 1)
    assert_fails(path, f"is larger than {MAX_STATE_BYTES} bytes")


def test_the_reader_is_the_servers_and_refuses_with_one_clear_error(tmp_path: Path) -> None:
    """``read_state``, in process: the figures as the server saved them, and StateFileError,
    one line naming the file, for a foreign, corrupt, oversized or hostile one."""
    figures = [
        (s.scope, s.samples, s.p50, s.p99, s.max, s.after, s.suggested)
        for s in read_state(str(FIXTURE))
    ]
    assert figures == [
        ("train.py:42", 12, 1.048576, 1.25, 1.25, 1800.0, 6.25),
        ("train.py:57", 2, 0.5, 0.5, 0.5, 60.0, None),
        ("checkpoint.py:10", 0, None, None, None, 3600.0, None),
    ]
    # Not an OSError: a file that reads but is not a state file is no I/O failure.
    assert StateFileError.__mro__[1:] == (Exception, BaseException, object)
    path = tmp_path / "state.json"
    link = tmp_path / "link.json"

    def refused(path: Path, *message: str) -> None:
        with pytest.raises(StateFileError) as raised:
            read_state(str(path))
        text = str(raised.value)
        assert "\n" not in text
        for part in message:
            assert part in text

    path.write_text(json.dumps({"format": "something else", "version": 1, "scopes": []}))
    refused(path, f"cannot load the state file {path}: it is not an elastic-timer state file")
    path.write_text(json.dumps(state(scope("s", samples=3))))
    refused(path, f'{path}: it is corrupt: scope "s": max must be null exactly when samples is 0')
    with open(path, "wb") as f:
        f.truncate(MAX_STATE_BYTES + 1)
    refused(path, f"{path}: it is larger than {MAX_STATE_BYTES} bytes")
    path.write_text(json.dumps(state()))
    assert read_state(str(path)) == []
    path.chmod(0o620)
    refused(path, f"cannot read the state file {path}: group or others may write it (mode 0620)")
    path.chmod(0o600)
    link.symlink_to(path)
    refused(link, f"cannot read the state file {link}: it is a symbolic link")


def test_bad_usage_exits_2() -> None:
    missing = run_cli("timeouts")
    assert missing.returncode == 2, missing
    assert "usage: elastic-timer timeouts" in missing.stderr
    assert "the following arguments are required: STATE_FILE" in missing.stderr
    extra = run_cli("timeouts", "a", "b")
    assert extra.returncode == 2, extra
    assert "unrecognized arguments: b" in extra.stderr


def test_help_names_the_columns() -> None:
    result = run_cli("timeouts", "--help")
    assert result.returncode == 0
    for word in [*"samples p50 p99 max after suggested".split(), "ELASTIC_TIMER_STATE_FILE"]:
        assert word in result.stdout
    top = run_cli("--help")
    assert "timeouts" in top.stdout
