"""The wire formats, checked against torch byte for byte (``elastic_timer._native``).

FIFO lines must be exactly what torch's ``FileTimerRequest.to_json()`` writes, so either side
of the FIFO can be torch's. Queue items are pickles, which the server reads without
unpickling: it must decode every pickle torch's and our ``LocalTimerClient`` put on a
``multiprocessing.Queue`` and refuse, without running anything, every other pickle.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
import sys
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.elastic.timer.api import TimerRequest as TorchTimerRequest
from torch.distributed.elastic.timer.file_based_local_timer import (
    FileTimerRequest as TorchFileTimerRequest,
)

from elastic_timer import FileTimerRequest, TimerRequest
from elastic_timer._native import decode_json_line, decode_pickle, encode_json_line

I64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
I32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
EDGE_FLOATS = [
    0.0,
    -0.0,
    5e-324,  # the smallest subnormal
    2.2250738585072014e-308,
    1e-300,
    1e-5,
    0.0001,  # repr switches notation at 1e-4 ...
    9.999999999999999e15,
    1e16,  # ... and at 1e16
    1.7976931348623157e308,
    1e300,
    9007199254740993.0,
    0.1 + 0.2,
    1795000000.123456,
    -1.5,
    math.inf,
    -math.inf,
    math.nan,
]
FLOATS = st.one_of(st.floats(), st.sampled_from(EDGE_FLOATS))
EXPIRATIONS = st.one_of(FLOATS, I64)
# Any text but lone surrogates (which UTF-8, and so Rust, cannot hold).
SCOPES = st.text(st.characters(codec="utf-8"), max_size=40)


def same_float(a: float, b: float) -> bool:
    """Equal as floats, with nan equal to nan and -0.0 distinct from 0.0."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1, a) == math.copysign(1, b)


def same_request(got: tuple[int, str, float, int], want: tuple[int, str, float, int]) -> bool:
    return (
        got[0] == want[0]
        and got[1] == want[1]
        and same_float(got[2], want[2])
        and (got[3] == want[3])
    )


# -- FIFO lines -------------------------------------------------------------------------------


@settings(max_examples=400)
@given(pid=I64, scope=SCOPES, expiration=EXPIRATIONS, signal=I64)
def test_encoded_line_is_torchs_to_json_byte_for_byte(
    pid: int, scope: str, expiration: float, signal: int
) -> None:
    """Our client writes exactly the line torch's writes: same keys, order, spacing, escapes
    and float repr (tiny, huge, inf and nan included), and an int expiration stays an int."""
    ours = (FileTimerRequest(pid, scope, expiration, signal).to_json() + "\n").encode()
    torchs = (TorchFileTimerRequest(pid, scope, expiration, signal).to_json() + "\n").encode()
    assert ours == torchs
    assert encode_json_line(pid, scope, expiration, signal) == torchs


@settings(max_examples=300)
@given(pid=I64, scope=SCOPES, expiration=EXPIRATIONS, signal=I32)
def test_torchs_line_decodes_to_the_request(
    pid: int, scope: str, expiration: float, signal: int
) -> None:
    """What torch's client writes, the server reads back unchanged (with or without its
    newline); an int expiration becomes the float Python's float() gives."""
    line = TorchFileTimerRequest(pid, scope, expiration, signal).to_json().encode()
    want = (pid, scope, float(expiration), signal)
    assert same_request(decode_json_line(line), want)
    assert same_request(decode_json_line(line + b"\n"), want)


def typed_reading(line: bytes) -> tuple[int, str, float, int]:
    """torch's server reading of a line (json.loads, then the four keys), with the types it
    assumes enforced: raises on anything a FileTimerRequest could not be made of."""
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError("not an object")
    pid, scope, expiration, signal = (
        obj[k] for k in ("pid", "scope_id", "expiration_time", "signal")
    )
    for value, kinds in ((pid, int), (scope, str), (expiration, (int, float)), (signal, int)):
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ValueError("wrong type")
    if not (-(2**63) <= pid < 2**63 and -(2**31) <= signal < 2**31):
        raise ValueError("out of range")
    return pid, scope, float(expiration), signal


JSON_SCALARS = st.one_of(st.none(), st.booleans(), I64, st.integers(), FLOATS, SCOPES)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(SCOPES, inner, max_size=3),
    max_leaves=6,
)
REQUEST_KEYS = st.sampled_from(["pid", "scope_id", "expiration_time", "signal", "version", "x"])


@settings(max_examples=400)
@given(
    obj=st.one_of(
        st.dictionaries(REQUEST_KEYS, JSON_VALUES, max_size=6),
        st.fixed_dictionaries(
            {
                "pid": I64 | JSON_VALUES,
                "scope_id": SCOPES | JSON_VALUES,
                "expiration_time": EXPIRATIONS | JSON_VALUES,
                "signal": I32 | JSON_VALUES,
            },
            optional={"version": JSON_VALUES, "x": JSON_VALUES},
        ),
        JSON_VALUES,
    )
)
def test_decoding_agrees_with_torchs_typed_reading(obj: Any) -> None:
    """For any JSON document, the server accepts exactly the lines torch's server could make a
    well-typed request of, with the same values; every other one is a ValueError."""
    line = json.dumps(obj).encode()
    try:
        want = typed_reading(line)
    except (ValueError, KeyError):
        with pytest.raises(ValueError):
            decode_json_line(line)
        return
    assert same_request(decode_json_line(line), want)


@settings(max_examples=500)
@given(
    line=st.one_of(
        st.binary(max_size=200),
        st.builds(
            lambda good, at, junk: good[:at] + junk + good[at:],
            st.just(
                b'{"version": 1, "pid": 42, "scope_id": "s", "expiration_time": 1.5, "signal": 9}'
            ),
            st.integers(0, 80),
            st.binary(min_size=1, max_size=4),
        ),
    )
)
def test_any_bytes_decode_or_raise_value_error(line: bytes) -> None:
    """Garbage on the FIFO never crashes the decoder: a request tuple or a ValueError."""
    try:
        pid, scope, expiration, signal = decode_json_line(line)
    except ValueError:
        return
    assert isinstance(pid, int) and isinstance(scope, str)
    assert isinstance(expiration, float) and isinstance(signal, int)


# -- queue pickles ----------------------------------------------------------------------------

REQUEST_CLASSES = [TorchTimerRequest, TimerRequest, FileTimerRequest]
# A queue carries torch's FileTimerRequest only where it sets worker_id as TimerRequest does
# (torch 2.15's). torch 2.8's, the newest torch for Python 3.9, keeps the pid in worker_pid
# alone, and torch's own Local server cannot take it either; ours refuses it as a request
# without worker_id.
if hasattr(TorchFileTimerRequest(1, "scope", 0.0), "worker_id"):
    REQUEST_CLASSES.append(TorchFileTimerRequest)


@settings(max_examples=200)
@given(
    cls=st.sampled_from(REQUEST_CLASSES),
    protocol=st.integers(2, 5),
    pid=I64,
    scope=SCOPES,
    expiration=EXPIRATIONS,
)
def test_request_pickles_decode(
    cls: type[Any], protocol: int, pid: int, scope: str, expiration: float
) -> None:
    """TimerRequest (torch's or ours, File or not) pickled with protocol 2 to 5 decodes to
    (pid, scope, float(expiration), SIGKILL): the Local transport always reaps with SIGKILL."""
    payload = pickle.dumps(cls(pid, scope, expiration), protocol=protocol)
    assert same_request(decode_pickle(payload), (pid, scope, float(expiration), 9))


@settings(max_examples=100)
@given(cls=st.sampled_from(REQUEST_CLASSES), pid=I64, scope=SCOPES, expiration=EXPIRATIONS)
def test_what_a_multiprocessing_queue_sends_decodes(
    cls: type[Any], pid: int, scope: str, expiration: float
) -> None:
    """The bytes Queue.put puts on the pipe (ForkingPickler.dumps) decode to the request."""
    payload = bytes(ForkingPickler.dumps(cls(pid, scope, expiration)))
    assert same_request(decode_pickle(payload), (pid, scope, float(expiration), 9))


def touch(path: str) -> None:
    """What a malicious pickle would run on load (module level, so pickle can name it)."""
    Path(path).touch()


class Touches:
    """Unpickling this calls ``touch(path)``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (touch, (self.path,))


class RunsShell:
    """Unpickling this runs a shell command through ``os.system``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_malicious_pickles_are_refused_without_running(protocol: int, tmp_path: Path) -> None:
    """A pickle that would run code when unpickled is a ValueError, and nothing runs. (The same
    bytes do run code under pickle.loads: the payloads are live.)"""
    marker = tmp_path / "marker"
    shell_marker = tmp_path / "shell-marker"
    payloads = [
        pickle.dumps(Touches(str(marker)), protocol=protocol),
        pickle.dumps(RunsShell(f"touch {shell_marker}"), protocol=protocol),
    ]
    for payload in payloads:
        with pytest.raises(ValueError, match="refusing to unpickle"):
            decode_pickle(payload)
    assert not marker.exists()
    assert not shell_marker.exists()
    for payload in payloads:
        pickle.loads(payload)
    assert marker.exists() and shell_marker.exists()


def test_pickle_naming_an_unimported_module_imports_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoding never imports: a pickle naming a module whose import has side effects leaves
    that module unimported (pickle.loads would import it)."""
    marker = tmp_path / "imported"
    module = "elastic_timer_test_side_effect"
    (tmp_path / f"{module}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nclass TimerRequest: pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    payload = b"\x80\x02c" + module.encode() + b"\nTimerRequest\n)\x81}b."
    with pytest.raises(ValueError, match="refusing to unpickle"):
        decode_pickle(payload)
    assert module not in sys.modules
    assert not marker.exists()
    pickle.loads(payload)
    assert marker.exists()
    del sys.modules[module]


@pytest.mark.parametrize(
    "obj",
    [
        {"worker_id": 42, "scope_id": "s", "expiration_time": 1.0},
        "TimerRequest",
        [42, "s", 1.0],
        (42, "s", 1.0),
        42,
        1.5,
        None,
    ],
    ids=["dict", "str", "list", "tuple", "int", "float", "None"],
)
@pytest.mark.parametrize("protocol", [2, 5])
def test_pickles_of_other_objects_are_refused(obj: Any, protocol: int) -> None:
    """Only a TimerRequest is a request: any other pickled object is a ValueError."""
    with pytest.raises(ValueError):
        decode_pickle(pickle.dumps(obj, protocol=protocol))


def test_a_timer_request_of_another_module_is_refused() -> None:
    """Classes are matched by module and name: a TimerRequest of __main__ is not a request."""
    genuine = pickle.dumps(TimerRequest(42, "s", 1.0), protocol=2)
    assert decode_pickle(genuine) == (42, "s", 1.0, 9)
    lookalike = genuine.replace(b"celastic_timer.api\nTimerRequest\n", b"c__main__\nTimerRequest\n")
    assert lookalike != genuine
    with pytest.raises(ValueError, match=r"refusing to unpickle \W*__main__\W+TimerRequest"):
        decode_pickle(lookalike)


# Hand-made pickles: (payload, whether pickle.loads accepts it, running it harmlessly).
CRAFTED: dict[str, tuple[bytes, bool]] = {
    # the accepted class, but called through REDUCE with arguments
    "reduce-on-accepted-class": (
        b"\x80\x02celastic_timer.api\nTimerRequest\n"  # GLOBAL
        + b"K*X\x01\x00\x00\x00sG"  # 42, "s", and a float:
        + struct.pack(">d", 1.0)
        + b"\x87R.",  # TUPLE3, REDUCE: TimerRequest(42, "s", 1.0)
        True,
    ),
    "protocol-0-os-system": (b"cposix\nsystem\n(S'true'\ntR.", True),
    "protocol-2-os-system": (b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00true\x85R.", True),
    "builtins-eval": (
        b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93X\x01\x00\x00\x001\x85R.",
        True,
    ),
    "empty": (b"", False),
    "stop-only": (b"\x80\x04.", False),
    "truncated": (pickle.dumps(TimerRequest(42, "s", 1.0), protocol=4)[:-5], False),
    "list-scope": (pickle.dumps(TimerRequest(42, ["s"], 1.0), protocol=4), True),  # type: ignore[arg-type]
    "bool-pid": (pickle.dumps(TimerRequest(True, "s", 1.0), protocol=4), True),
    "pid-beyond-i64": (pickle.dumps(TimerRequest(2**70, "s", 1.0), protocol=4), True),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_pickles_are_refused(case: str) -> None:
    """Hand-made pickles: calls, truncation, protocol 0, mistyped fields: all ValueError."""
    payload, loadable = CRAFTED[case]
    with pytest.raises(ValueError):
        decode_pickle(payload)
    if loadable:
        pickle.loads(payload)  # a valid pickle: refused for what it holds, not its syntax


VALID_PICKLE = pickle.dumps(TimerRequest(4242, "scope", 1795000000.5), protocol=4)


@settings(max_examples=500)
@given(
    payload=st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda at, junk: VALID_PICKLE[:at] + junk + VALID_PICKLE[at + len(junk) :],
            st.integers(0, len(VALID_PICKLE)),
            st.binary(min_size=1, max_size=3),
        ),
        st.integers(0, len(VALID_PICKLE)).map(lambda n: VALID_PICKLE[:n]),
    )
)
def test_any_bytes_unpickle_or_raise_value_error(payload: bytes) -> None:
    """Garbage in a queue item never crashes the decoder: a request tuple or a ValueError."""
    try:
        pid, scope, expiration, signal = decode_pickle(payload)
    except ValueError:
        return
    assert isinstance(pid, int) and isinstance(scope, str)
    assert isinstance(expiration, float) and signal == 9
