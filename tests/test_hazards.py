"""Requests that would make torch's servers kill the wrong processes, sent to ours.

torch calls ``os.kill(pid, signal)`` with whatever pid a request names: pid -1 kills every
process of the user, 0 or -pgid a whole process group, 1 is init. These tests send such
requests, already expired, for real. They run only inside a fresh PID namespace (``unshare
--pid --fork --mount-proc``), whose processes are the only ones anything could hit; the
namespace's init is a tiny Python program that runs the scenario as its child.
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import textwrap
from typing import Any

import pytest

# pid 1 of the namespace: runs the scenario as a child (so the server is not init), and
# passes on its exit status. When it exits, the kernel kills what is left in the namespace.
INIT = """
import subprocess, sys
scenario = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
status = scenario.wait()
print(f"scenario exit status: {status}", file=sys.stderr)
sys.exit(0 if status == 0 else 1)
"""

# Shared by the scenarios: log capture and a liveness check that does not count zombies.
PRELUDE = """
import json, logging, multiprocessing as mp, os, signal, subprocess, sys, tempfile, time
from elastic_timer import (
    FileTimerClient, FileTimerRequest, FileTimerServer, LocalTimerClient, LocalTimerServer,
    expires,
)
from elastic_timer.api import TimerRequest

records = []

class Capture(logging.Handler):
    def emit(self, record):
        records.append({"level": record.levelname, "message": record.getMessage()})

logging.getLogger().addHandler(Capture())
logging.getLogger().setLevel(logging.INFO)

def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False

def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.01)
    return predicate()

def report(result):
    print("RESULT " + json.dumps(result), flush=True)
"""


def run_in_new_pid_namespace(
    scenario: str, timeout: float = 60, open_files: int | None = None
) -> dict[str, Any]:
    """Runs Python source ``scenario`` in a fresh PID namespace with its own /proc, and returns
    the dict it reported with ``report(...)``. Fails if it did not exit 0. ``open_files`` sets
    the soft ``RLIMIT_NOFILE`` of the scenario (``ulimit -Sn``)."""
    source = PRELUDE + textwrap.dedent(scenario)

    def limit_open_files() -> None:
        if open_files is not None:
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, hard))

    run = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", INIT, source],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit_open_files,
    )
    assert run.returncode == 0, (run.stdout, run.stderr)
    [line] = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
    return result


HAZARDS_SCENARIO = """
def stuck_file(path):
    with expires(after=0.3, client=FileTimerClient(path)):
        time.sleep(10)

def stuck_local(queue):
    with expires(after=0.3, client=LocalTimerClient(queue)):
        time.sleep(10)

os.setpgrp()  # a process group of our own, with the sentinels in it
ctx = mp.get_context("fork")
sentinels = [subprocess.Popen(["sleep", "30"]) for _ in range(2)]
me = os.getpid()
ghost = next(p for p in range(20000, 30000) if not os.path.exists(f"/proc/{p}"))
path = os.path.join(tempfile.mkdtemp(), "timer.fifo")
file_server = FileTimerServer(path, "hazards", max_interval=0.1, signal_self=False)
file_server.start()
queue = ctx.Queue()
local_server = LocalTimerServer(queue, max_interval=0.1)
local_server.start()

past = time.time() - 1  # every hazardous request is already expired
hazards = {
    "minus-one": -1, "zero": 0, "init": 1, "own-group": -os.getpgrp(),
    "huge": 2**40,
}
client = FileTimerClient(path)
for scope, pid in hazards.items():
    client._send_request(FileTimerRequest(pid, scope, past, signal.SIGKILL))
    queue.put(TimerRequest(pid, scope, past))
client._send_request(FileTimerRequest(sentinels[0].pid, "signal-999", past, 999))
client._send_request(FileTimerRequest(ghost, "ghost", past, signal.SIGKILL))
queue.put(TimerRequest(ghost, "ghost", past))
# Through register_timers, once the above are in: a pid refused before (counted, not logged
# again) and a new one.
wait_for(lambda: file_server.stats()["refused"] >= 6 and local_server.stats()["refused"] >= 5)
file_server.register_timers(
    [FileTimerRequest(p, s, past, signal.SIGKILL) for p, s in ((-1, "again"), (-5, "direct"))]
)
local_server.register_timers([TimerRequest(p, s, past) for p, s in ((0, "again"), (-5, "direct"))])

# Real stuck workers, after all that: the servers must still reap them.
workers = {
    "file": ctx.Process(target=stuck_file, args=(path,)),
    "local": ctx.Process(target=stuck_local, args=(queue,)),
}
for worker in workers.values():
    worker.start()
for worker in workers.values():
    worker.join(10)
wait_for(lambda: file_server.stats()["refused"] >= 8 and local_server.stats()["refused"] >= 7)
wait_for(lambda: sum("Refusing" in r["message"] for r in records) >= 13)
time.sleep(0.3)  # whatever a server would wrongly do, it has done by now

result = {
    "me": me,
    "hazards": hazards,
    "ghost": ghost,
    "sentinels_alive": [alive(s.pid) for s in sentinels],
    "server_alive": alive(me),
    "worker_exitcodes": {name: w.exitcode for name, w in workers.items()},
    "file_stats": file_server.stats(),
    "local_stats": local_server.stats(),
    "file_timers": sorted(file_server._timers),
    "local_timers": sorted(local_server._timers),
    "records": records,
}
file_server.stop()
local_server.stop()
for sentinel in sentinels:
    sentinel.kill()
    sentinel.wait()
report(result)
"""


@pytest.fixture(scope="module")
def hazards() -> dict[str, Any]:
    """One run of the scenario above; the tests below read its outcome."""
    return run_in_new_pid_namespace(HAZARDS_SCENARIO)


def test_other_processes_survive_hazardous_requests(hazards: dict[str, Any]) -> None:
    """Expired requests naming pid -1, 0, 1, our process group or a huge pid kill nobody: the
    namespace's other processes and the server are all alive."""
    assert hazards["sentinels_alive"] == [True, True]
    assert hazards["server_alive"] is True


def test_servers_keep_reaping_real_stuck_workers(hazards: dict[str, Any]) -> None:
    """After refusing all that, both servers still kill a real stuck worker at its deadline."""
    assert hazards["worker_exitcodes"] == {"file": -9, "local": -9}
    assert hazards["file_stats"]["reaped"] == 1
    assert hazards["local_stats"]["reaped"] == 1


def test_refusals_are_counted(hazards: dict[str, Any]) -> None:
    """stats()["refused"] counts every refused request, from the transport or register_timers,
    including those not logged again."""
    # five hazardous pids, signal 999, two through register_timers; Local requests have no signal
    assert hazards["file_stats"]["refused"] == 8
    assert hazards["local_stats"]["refused"] == 7
    assert hazards["file_stats"]["malformed"] == 0
    assert hazards["local_stats"]["malformed"] == 0


def test_each_refusal_is_logged_with_its_reason(hazards: dict[str, Any]) -> None:
    """Each refused pid is logged at ERROR, once, naming the request and why it is refused."""
    reasons = {
        "minus-one": "pid -1 does not name a single worker process",
        "zero": "pid 0 does not name a single worker process",
        "init": "pid 1 does not name a single worker process",
        "own-group": f"pid {hazards['hazards']['own-group']} does not name a single worker",
        "huge": f"pid {2**40} is out of range",
    }
    errors = [r["message"] for r in hazards["records"] if r["level"] == "ERROR"]
    for request_class in ("FileTimerRequest", "TimerRequest"):
        for scope, reason in reasons.items():
            found = [
                m
                for m in errors
                if m.startswith(f"Refusing timer request {request_class}(")
                and f"scope_id='{scope}'" in m
            ]
            assert len(found) == 1, (request_class, scope, errors)
            assert reason in found[0]
            assert "it will never be signalled" in found[0]
    [bad_signal] = [m for m in errors if "scope_id='signal-999'" in m]
    assert "signal 999 is not a valid signal number" in bad_signal
    direct = [m for m in errors if "scope_id='direct'" in m]
    assert len(direct) == 2
    assert all("pid -5 does not name a single worker process" in m for m in direct)
    assert not [m for m in errors if "scope_id='again'" in m]  # a pid is logged only once
    assert len(errors) == 13


def test_nothing_hazardous_or_dead_is_kept(hazards: dict[str, Any]) -> None:
    """Neither server keeps a timer for a refused pid or for a pid no process has."""
    assert hazards["file_timers"] == []
    assert hazards["local_timers"] == []
    assert hazards["file_stats"]["live_timers"] == 0
    assert hazards["local_stats"]["live_timers"] == 0


PID_REUSE_SCENARIO = """
path = os.path.join(tempfile.mkdtemp(), "timer.fifo")
server = FileTimerServer(path, "pid-reuse", max_interval=0.1, signal_self=False)
server.start()

def crash_then_reuse_pid():
    # A worker with a 1 s timer crashes at once; the next process created gets its pid.
    worker = subprocess.Popen(["sleep", "30"])
    server.register_timers(
        [FileTimerRequest(worker.pid, "step", time.time() + 1.0, signal.SIGKILL)]
    )
    worker.kill()
    worker.wait()
    dropped = wait_for(lambda: (worker.pid, "step") not in server._timers, timeout=0.5)
    with open("/proc/sys/kernel/ns_last_pid", "w") as last_pid:
        last_pid.write(str(worker.pid - 1))
    innocent = subprocess.Popen(["sleep", "30"])
    time.sleep(1.3)  # past the dead worker's deadline
    outcome = {
        "pid_reused": innocent.pid == worker.pid,
        "timer_dropped": dropped,
        "innocent_status": innocent.poll(),
    }
    innocent.kill()
    innocent.wait()
    return outcome

result = {"first": crash_then_reuse_pid()}
# Many live workers with timers: 300, more than the server keeps pidfds for (256).
others = [subprocess.Popen(["sleep", "30"]) for _ in range(300)]
far = time.time() + 3600
server.register_timers([FileTimerRequest(p.pid, "busy", far, signal.SIGKILL) for p in others])
result["many"] = crash_then_reuse_pid()
result["fallback_logged"] = [
    r["message"] for r in records if "further workers are signalled by pid" in r["message"]
]
server.stop()
for other in others:
    other.kill()
    other.wait()
report(result)
"""


def test_a_reused_pid_is_never_signalled_for_a_dead_worker() -> None:
    """A worker that crashes before its deadline takes its timer with it: when its pid is
    reused by another process, that process is not killed at the old deadline. This must
    hold however many workers the host runs: here 300, past the 256 pidfds the server keeps
    under ``ulimit -Sn 1024``, so the last worker is tracked by pid and start time."""
    result = run_in_new_pid_namespace(PID_REUSE_SCENARIO, open_files=1024)
    assert result["fallback_logged"] == [
        "more than 256 workers: further workers are signalled by pid, checked against their "
        "start time (reported once)"
    ]
    assert result["first"] == {"pid_reused": True, "timer_dropped": True, "innocent_status": None}
    assert result["many"]["pid_reused"] is True
    assert result["many"]["innocent_status"] is None, "an innocent process was SIGKILLed"
    assert result["many"]["timer_dropped"] is True


FULL_FD_TABLE_SCENARIO = """
import errno, resource

path = os.path.join(tempfile.mkdtemp(), "t.fifo")
# Started while fds are free; it acquires its 1 s timer once told (a line on stdin), and hangs.
worker = subprocess.Popen(
    [sys.executable, "-c", '''
import sys, time
from elastic_timer import FileTimerClient, expires
sys.stdin.readline()
with expires(after=1, client=FileTimerClient(sys.argv[1])):
    time.sleep(30)
''', path],
    stdin=subprocess.PIPE,
)
server = FileTimerServer(path, max_interval=0.1, signal_self=False)
server.start()
# The server's own process: a low limit, and every fd it allows taken.
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
held = []
while True:
    try:
        held.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as e:
        assert e.errno == errno.EMFILE, e
        break
worker.stdin.write(b"go\\n")
worker.stdin.flush()
told = time.monotonic()
try:
    status = worker.wait(20)  # waitpid: no fd needed
except subprocess.TimeoutExpired:
    status = "not reaped"
took = time.monotonic() - told
try:
    os.close(os.open("/dev/null", os.O_RDONLY))
    full = False
except OSError:
    full = True
for fd in held:
    os.close(fd)
worker.kill()
wait_for(lambda: any("Successfully reaped" in r["message"] for r in records))
server.stop()
report({"status": status, "took": took, "full": full, "messages": [r["message"] for r in records]})
"""


def test_a_server_whose_fd_table_is_full_still_reaps_and_never_drops_a_running_worker() -> None:
    """At the fd limit, /proc cannot be opened as usual and no pidfd opens: the worker that
    registers then is tracked by pid (its start time read through the fd the server keeps in
    reserve), is not taken for exited, and is reaped at its deadline."""
    result = run_in_new_pid_namespace(FULL_FD_TABLE_SCENARIO)
    messages = result["messages"]
    assert result["full"], "the fd table was full until the reap"
    assert result["status"] == -signal.SIGKILL, messages
    assert result["took"] >= 0.9
    assert any("cannot open a pidfd" in m and "Too many open files" in m for m in messages)
    assert not [m for m in messages if "exited; dropped" in m]
    assert any("Successfully reaped worker=" in m for m in messages), messages


EARLY_REFUSAL_SCENARIO = """
path = os.path.join(tempfile.mkdtemp(), "timer.fifo")
file_server = FileTimerServer(path, "early", max_interval=0.1, signal_self=False)
local_server = LocalTimerServer(mp.get_context("fork").Queue(), max_interval=0.1)
past = time.time() - 1
file_server.register_timers([FileTimerRequest(-7, "early", past, signal.SIGKILL)])
local_server.register_timers([TimerRequest(0, "early", past)])
result = {"before_start": [r for r in records if "Refusing" in r["message"]]}
for server in (file_server, local_server):
    server.start()
    server.stop()  # after the reporter has said all it had to
result["after_stop"] = [r for r in records if "Refusing" in r["message"]]
result["refused"] = [file_server.stats()["refused"], local_server.stats()["refused"]]
report(result)
"""


def test_a_refusal_before_start_is_logged_at_once_and_only_once() -> None:
    """A request refused by ``register_timers`` before ``start()`` is counted and logged then
    (not left for a loop that may never run), and not logged again when the loop starts."""
    result = run_in_new_pid_namespace(EARLY_REFUSAL_SCENARIO)
    assert result["refused"] == [1, 1]
    before = result["before_start"]
    assert [r["level"] for r in before] == ["ERROR", "ERROR"]
    assert "pid -7 does not name a single worker process" in before[0]["message"]
    assert "pid 0 does not name a single worker process" in before[1]["message"]
    assert result["after_stop"] == before


DESCENDANTS_ONLY_SCENARIO = """
path = os.path.join(tempfile.mkdtemp(), "timer.fifo")
log_path = path + ".log"
# A worker: once the FIFO is there, a 0.3 s timer, then it hangs.
worker = '''
import os, sys, time
from elastic_timer import FileTimerClient, expires
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
with expires(after=0.3, client=FileTimerClient(sys.argv[1], connect_timeout=10)):
    time.sleep(30)
'''
# The descendant: started by the shell that then becomes the server (exec), as a job script
# would do it. The other worker, started here, is not the server's descendant.
serve = f'"{sys.executable}" -m elastic_timer.cli serve --descendants-only --fifo "$1"'
with open(log_path, "w") as log:
    server = subprocess.Popen(
        ["sh", "-c", f'"{sys.executable}" -c "$0" "$1" & exec {serve}', worker, path],
        stderr=log,
    )
def log_text():
    with open(log_path) as log:
        return log.read()
wait_for(lambda: "listening on FIFO" in log_text(), timeout=20)
def children_of(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with open(f"/proc/{entry}/stat") as stat:
                if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found
[descendant] = children_of(server.pid)
outsider = subprocess.Popen([sys.executable, "-c", worker, path])
reaped = wait_for(lambda: not alive(descendant), timeout=20)
# Refused at intake: never registered, so never due.
refused = wait_for(lambda: "is not a descendant" in log_text(), timeout=20)
result = {
    "descendant": descendant,
    "outsider": outsider.pid,
    "descendant_reaped": reaped,
    "refused_logged": refused,
    "outsider_alive": alive(outsider.pid),
}
outsider.kill()
outsider.wait()
server.send_signal(signal.SIGTERM)
result["server_status"] = server.wait(10)
result["log"] = log_text()
report(result)
"""


def test_serve_descendants_only_reaps_its_descendant_and_refuses_another_process() -> None:
    """``elastic-timer serve --descendants-only``, in a PID namespace: a stuck worker that
    descends from the server (started by the script that exec'd it) is reaped; a stuck worker
    the test started beside it is refused, logged, and lives on."""
    result = run_in_new_pid_namespace(DESCENDANTS_ONLY_SCENARIO, timeout=90)
    log = result["log"]
    assert result["descendant_reaped"], log
    assert f"Successfully reaped worker=[{result['descendant']}] with signal=9" in log
    assert result["refused_logged"], log
    assert f"pid {result['outsider']} is not a descendant of the timer server's process" in log
    assert result["outsider_alive"], log
    assert f"Reaping worker_pid=[{result['outsider']}]" not in log
    assert result["server_status"] == 0
