//! The Python bindings: the only module that knows Python. It translates, nothing more;
//! the classes users see are written in Python on top of these.

use std::os::fd::IntoRawFd;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use pyo3::exceptions::{
    PyBrokenPipeError, PyFileNotFoundError, PyRuntimeError, PyTimeoutError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::codec::{self, CodecError, Number, Request};
use crate::deadlines::Caps;
use crate::learned::{self, LearnConfig, ScopeSummary, StateError};
use crate::server::{Adaptive, Config, Event, Owner, ReapOutcome, Server, Stats};
use crate::stacks;
use crate::transport::fifo::{self, SendError, SendOptions};
use crate::transport::queue::{self, Semaphore};
use crate::transport::{direct::Direct, Transport};
use crate::{environ, reaper, ring, untrusted};

/// `(pid, scope_id, expiration_time, signal)`, the shape requests cross the boundary in.
type RequestTuple = (i64, String, f64, i32);

fn to_tuple(request: Request) -> RequestTuple {
    (request.pid, request.scope, request.expiration, request.signal)
}

fn from_tuple((pid, scope, expiration, signal): RequestTuple) -> Request {
    Request { pid, scope, expiration, signal }
}

impl From<SendError> for PyErr {
    fn from(err: SendError) -> Self {
        match err {
            SendError::NoServer { .. } => PyBrokenPipeError::new_err(format!(
                "Could not send the FileTimerRequest because FileTimerServer is not available ({err})"
            )),
            SendError::TooLong(_) => PyRuntimeError::new_err(err.to_string()),
            SendError::Timeout(_) => PyTimeoutError::new_err(err.to_string()),
            SendError::Io(io) => io.into(),
        }
    }
}

impl From<CodecError> for PyErr {
    fn from(err: CodecError) -> Self {
        PyValueError::new_err(err.to_string())
    }
}

fn seconds(value: f64, name: &str) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| {
        PyValueError::new_err(format!("{name} must be a non-negative number of seconds"))
    })
}

/// A server's options, as the dict `elastic_timer._server.native_options` builds.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct Options {
    max_interval: f64,
    signal_self: bool,
    descendants_only: bool,
    dry_run: bool,
    escalate_after: Option<f64>,
    stack_dump: Option<f64>,
    stack_signal: i32,
    stack_hold: f64,
    stacks_dir: Option<PathBuf>,
    py_spy: Option<PathBuf>,
    error_files: bool,
    fifo_mode: Option<u32>,
    adaptive: bool,
    adaptive_factor: f64,
    adaptive_floor: f64,
    state_file: Option<PathBuf>,
    max_timers: usize,
    max_worker_timers: usize,
}

impl Options {
    /// The native configuration (the pidfd budget is the process's).
    fn config(self) -> PyResult<Config> {
        let stack_dump = match (self.stack_dump, self.stacks_dir) {
            (Some(grace), Some(dir)) => Some(stacks::Config {
                grace: seconds(grace, "stack_dump")?,
                signal: reaper::validate_signal(self.stack_signal)
                    .map_err(|err| PyValueError::new_err(format!("stack_signal: {err}")))?,
                dir,
                py_spy: self.py_spy,
                hold: seconds(self.stack_hold, "stack_hold")?,
            }),
            _ => None,
        };
        let adaptive = if self.adaptive {
            let learn = LearnConfig {
                factor: self.adaptive_factor,
                floor: seconds(self.adaptive_floor, "adaptive_floor")?,
                ..LearnConfig::default()
            };
            learn.validate().map_err(|err| PyValueError::new_err(err.to_string()))?;
            Some(Adaptive { learn, state_file: self.state_file })
        } else {
            None
        };
        Ok(Config {
            adaptive,
            max_interval: seconds(self.max_interval, "max_interval")?,
            signal_self: self.signal_self,
            // Decided at each start (`PyServer::start`).
            delegate_reaps: false,
            max_pidfds: reaper::pidfd_budget(),
            descendants_only: self.descendants_only,
            dry_run: self.dry_run,
            escalate_after: self
                .escalate_after
                .map(|s| seconds(s, "escalate_after"))
                .transpose()?,
            stack_dump,
            error_files: self.error_files,
            caps: Caps { per_worker: self.max_worker_timers, total: self.max_timers },
            fifo_mode: self
                .fifo_mode
                .map(|mode| match mode {
                    0..=0o777 => Ok(rustix::fs::Mode::from_raw_mode(mode)),
                    _ => Err(PyValueError::new_err(format!(
                        "fifo_mode must be permission bits (0 to 0o777), got {mode:#o}"
                    ))),
                })
                .transpose()?,
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How an expiry ended (`server::ReapOutcome`, without its error: that goes in `detail`).
/// `str()` of a member is its name in the event log ("signalled", ...).
#[pyclass(
    module = "elastic_timer._native",
    frozen,
    eq,
    eq_int,
    rename_all = "SCREAMING_SNAKE_CASE"
)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    NotSignalled,
    Signalled,
    Gone,
    Failed,
    Delegated,
    DryRun,
    Spared,
}

impl Outcome {
    fn of(outcome: &ReapOutcome) -> Self {
        match outcome {
            ReapOutcome::NotSignalled => Self::NotSignalled,
            ReapOutcome::Signalled => Self::Signalled,
            ReapOutcome::Gone => Self::Gone,
            ReapOutcome::Failed(_) => Self::Failed,
            ReapOutcome::Delegated => Self::Delegated,
            ReapOutcome::DryRun => Self::DryRun,
            ReapOutcome::Spared => Self::Spared,
        }
    }
}

#[pymethods]
impl Outcome {
    fn __str__(&self) -> &'static str {
        ReapOutcome::NAMES[*self as usize]
    }
}

/// The stacks taken of a worker before its reap.
#[pyclass(module = "elastic_timer._native", frozen, get_all)]
struct Stacks {
    /// "faulthandler" or "py-spy".
    source: &'static str,
    text: String,
    /// False when the grace period cut the dump short.
    complete: bool,
}

impl From<stacks::Stacks> for Stacks {
    fn from(stacks: stacks::Stacks) -> Self {
        Self { source: stacks.source.name(), text: stacks.text, complete: stacks.complete }
    }
}

/// One worker with expired timers, and what was done about it.
#[pyclass(module = "elastic_timer._native", frozen, get_all)]
struct Expiry {
    pid: i32,
    /// Its expired timers, in expiration order.
    timers: Vec<RequestTuple>,
    /// The chosen signal (0: none).
    signal: i32,
    outcome: Outcome,
    /// Why a reap failed.
    detail: Option<String>,
    stacks: Option<Py<Stacks>>,
    /// The learned bound that fired, when one undercut the `after` asked for.
    learned: Option<Py<LearnedBound>>,
    /// The torchrun error file the server wrote for it before the signal.
    error_file: Option<String>,
}

/// A learned bound (seconds): `max(floor, factor x max)`, from `samples` blocks, when it
/// undercuts the `after` asked for.
#[pyclass(module = "elastic_timer._native", frozen, get_all)]
struct LearnedBound {
    bound: f64,
    samples: u64,
    max: f64,
    after: f64,
}

/// One scope's learned figures, in seconds (None: no value yet).
#[pyclass(module = "elastic_timer._native", frozen, get_all)]
struct ScopeTimeout {
    scope: String,
    samples: u64,
    p50: Option<f64>,
    p99: Option<f64>,
    max: Option<f64>,
    after: Option<f64>,
    suggested: Option<f64>,
}

impl From<ScopeSummary> for ScopeTimeout {
    fn from(summary: ScopeSummary) -> Self {
        let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
        Self {
            scope: summary.scope,
            samples: summary.samples,
            p50: secs(summary.p50),
            p99: secs(summary.p99),
            max: secs(summary.max),
            after: secs(summary.after),
            suggested: secs(summary.suggested),
        }
    }
}

/// One pass's expiries. With `signals_self` the loop signals its own process once the report
/// is acknowledged (`ack_expired`): the pass reaped this process's own timer, or (for torch's
/// File server) `signal_self` is set and the pass signalled a worker.
#[pyclass(module = "elastic_timer._native", frozen, get_all)]
struct Expired {
    expiries: Vec<Py<Expiry>>,
    signals_self: bool,
}

#[pyclass(module = "elastic_timer._native", frozen, get_all)]
struct Malformed {
    reason: String,
}

#[pyclass(module = "elastic_timer._native", frozen, get_all)]
struct Refused {
    request: RequestTuple,
    reason: String,
}

#[pyclass(module = "elastic_timer._native", frozen, get_all)]
struct WorkerExited {
    pid: i32,
    dropped: usize,
}

/// Something the operator should know that is not about one request.
#[pyclass(module = "elastic_timer._native", frozen, get_all)]
struct Notice {
    message: String,
}

/// A worker whose timers expired is having its stacks taken; its `Expired` follows.
#[pyclass(module = "elastic_timer._native", frozen, get_all)]
struct Dumping {
    pid: i32,
    scopes: Vec<String>,
}

#[pyclass(module = "elastic_timer._native", frozen, get_all)]
struct Escalated {
    pid: i32,
    signal: i32,
    after: f64,
}

#[pyclass(module = "elastic_timer._native", frozen, get_all)]
struct Unreapable {
    pid: i32,
    after: f64,
    state: String,
}

/// The loop has stopped and every event has been read.
#[pyclass(module = "elastic_timer._native", frozen)]
struct Closed;

fn raw(pid: rustix::process::Pid) -> i32 {
    pid.as_raw_nonzero().get()
}

/// One pass's expiries as the Python `Expired` event.
fn expired_object(
    py: Python<'_>,
    expiries: Vec<crate::server::Expiry>,
    signals_self: bool,
) -> PyResult<Py<PyAny>> {
    let expiries = expiries
        .into_iter()
        .map(|expiry| {
            let stacks =
                expiry.stacks.map(|stacks| Py::new(py, Stacks::from(stacks))).transpose()?;
            let learned = expiry
                .learned
                .map(|l| {
                    let (bound, max) = (l.bound.as_secs_f64(), l.max.as_secs_f64());
                    let (samples, after) = (l.samples, l.after.as_secs_f64());
                    Py::new(py, LearnedBound { bound, samples, max, after })
                })
                .transpose()?;
            let detail = match &expiry.outcome {
                ReapOutcome::Failed(err) => Some(err.to_string()),
                _ => None,
            };
            let expiry = Expiry {
                pid: raw(expiry.pid),
                timers: expiry.timers.into_iter().map(to_tuple).collect(),
                signal: expiry.signal,
                outcome: Outcome::of(&expiry.outcome),
                detail,
                stacks,
                learned,
                error_file: expiry.error_file.map(|path| path.to_string_lossy().into_owned()),
            };
            Py::new(py, expiry)
        })
        .collect::<PyResult<_>>()?;
    Ok(Py::new(py, Expired { expiries, signals_self })?.into_any())
}

/// A native timer server (see `elastic_timer._server` for how the Python classes use it).
#[pyclass(module = "elastic_timer._native", name = "Server")]
struct PyServer {
    server: Mutex<Server>,
    events: Mutex<Option<Receiver<Event>>>,
    ack: Mutex<Option<SyncSender<()>>>,
    /// The Python queue whose pipe and semaphores a queue server reads: kept alive with it.
    _keepalive: Option<Py<PyAny>>,
    /// The server's owner, read without its lock: in a forked child the lock may be held
    /// (fork copied it as it was).
    owner: Owner,
}

impl PyServer {
    fn build(
        transport: impl Transport + 'static,
        config: Config,
        keepalive: Option<Py<PyAny>>,
    ) -> PyResult<Self> {
        let server = Server::new(transport, config)?;
        Ok(Self {
            owner: server.owner(),
            server: Mutex::new(server),
            events: Mutex::new(None),
            ack: Mutex::new(None),
            _keepalive: keepalive,
        })
    }

    /// An event as the Python object of its class. An `Expired`'s acknowledgement is kept
    /// for `ack_expired`.
    fn event_object(&self, py: Python<'_>, event: Event) -> PyResult<Py<PyAny>> {
        let object = match event {
            Event::Malformed(reason) => Py::new(py, Malformed { reason })?.into_any(),
            Event::Refused { request, reason } => {
                Py::new(py, Refused { request: to_tuple(request), reason: reason.to_string() })?
                    .into_any()
            }
            Event::WorkerExited { pid, dropped } => {
                Py::new(py, WorkerExited { pid: raw(pid), dropped })?.into_any()
            }
            Event::Warning(message) => Py::new(py, Notice { message })?.into_any(),
            Event::Escalated { pid, signal, after } => {
                let after = after.as_secs_f64();
                Py::new(py, Escalated { pid: raw(pid), signal, after })?.into_any()
            }
            Event::Dumping { pid, scopes } => {
                Py::new(py, Dumping { pid: raw(pid), scopes })?.into_any()
            }
            Event::Unreapable { pid, after, state } => {
                let after = after.as_secs_f64();
                Py::new(py, Unreapable { pid: raw(pid), after, state })?.into_any()
            }
            Event::Expired { expiries, ack } => {
                let signals_self = ack.is_some();
                *lock(&self.ack) = ack;
                expired_object(py, expiries, signals_self)?
            }
        };
        Ok(object)
    }

    /// Refuses calls that would change the original's server from a forked child.
    fn owned(&self) -> PyResult<()> {
        if self.owner.is_forked_copy() {
            return Err(PyRuntimeError::new_err(self.owner.forked_copy_error().to_string()));
        }
        Ok(())
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        if self.owner.is_forked_copy() {
            // Dropping the channel ends could take locks another thread held at the fork.
            if let Ok(events) = self.events.get_mut() {
                std::mem::forget(events.take());
            }
            if let Ok(ack) = self.ack.get_mut() {
                std::mem::forget(ack.take());
            }
        }
    }
}

#[pymethods]
impl PyServer {
    /// A server reading the FIFO at `path` (created now, replacing what is there).
    #[staticmethod]
    fn fifo(path: PathBuf, options: Options) -> PyResult<Self> {
        let config = options.config()?;
        let endpoint = fifo::Endpoint::create(path, config.fifo_mode)?;
        Self::build(endpoint, config, None)
    }

    /// A server reading a `multiprocessing.Queue` through its pipe `fd` and the addresses of
    /// its `_rlock` and `_sem` semaphores; `queue` is the queue itself, kept alive.
    #[staticmethod]
    fn queue(
        queue: Py<PyAny>,
        fd: i32,
        read_lock: usize,
        items: usize,
        options: Options,
    ) -> PyResult<Self> {
        let config = options.config()?;
        // SAFETY: the fd and semaphores belong to `queue`, which this object keeps alive; the
        // fd is duplicated at once.
        let reader = unsafe {
            let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
            queue::Reader::new(
                fd,
                Semaphore::from_raw(read_lock as *mut libc::sem_t),
                Semaphore::from_raw(items as *mut libc::sem_t),
            )?
        };
        Self::build(reader, config, Some(queue))
    }

    /// A server whose requests all come through `register` (a queue read from Python).
    #[staticmethod]
    fn direct(options: Options) -> PyResult<Self> {
        Self::build(Direct, options.config()?, None)
    }

    /// Whether this process is a fork of the server's (the one fork guard; see `Owner`).
    #[getter]
    fn forked_copy(&self) -> bool {
        self.owner.is_forked_copy()
    }

    /// The pid of the process the server belongs to.
    #[getter]
    fn owner(&self) -> i32 {
        self.owner.pid()
    }

    /// Starts the loop; `delegate_reaps`: hand expiries to the caller (a `_reap_worker`
    /// override) instead of signalling them.
    fn start(&self, py: Python<'_>, delegate_reaps: bool) -> PyResult<()> {
        self.owned()?;
        let receiver = py.detach(|| {
            let mut server = lock(&self.server);
            server.delegate_reaps(delegate_reaps)?;
            server.start()
        })?;
        *lock(&self.events) = Some(receiver);
        Ok(())
    }

    /// Stops the loop and removes the FIFO if it is still this server's (also when it never
    /// ran). Does nothing in a process forked from the server's.
    fn stop(&self, py: Python<'_>) {
        if !self.owner.is_forked_copy() {
            py.detach(|| lock(&self.server).stop());
        }
    }

    fn run_once(&self, py: Python<'_>) -> PyResult<()> {
        self.owned()?;
        py.detach(|| lock(&self.server).run_once());
        Ok(())
    }

    #[getter]
    fn running(&self, py: Python<'_>) -> bool {
        py.detach(|| lock(&self.server).is_running())
    }

    fn register(&self, py: Python<'_>, requests: Vec<RequestTuple>) -> PyResult<()> {
        self.owned()?;
        py.detach(|| lock(&self.server).register(requests.into_iter().map(from_tuple)));
        Ok(())
    }

    fn clear(&self, py: Python<'_>, pids: Vec<i64>) -> PyResult<()> {
        self.owned()?;
        py.detach(|| lock(&self.server).clear(pids));
        Ok(())
    }

    /// `{pid: [request, ...]}` for timers whose expiration is at or before `deadline`.
    fn expired(&self, py: Python<'_>, deadline: f64) -> Vec<(i64, Vec<RequestTuple>)> {
        let by_worker = py.detach(|| lock(&self.server).expired(deadline));
        by_worker
            .into_iter()
            .map(|(pid, requests)| (pid, requests.into_iter().map(to_tuple).collect()))
            .collect()
    }

    fn timers(&self, py: Python<'_>) -> Vec<RequestTuple> {
        py.detach(|| lock(&self.server).timers()).into_iter().map(to_tuple).collect()
    }

    /// The events reported while no loop runs (see `Server::take_undelivered`).
    fn take_undelivered(&self, py: Python<'_>) -> PyResult<Vec<Py<PyAny>>> {
        let events = py.detach(|| lock(&self.server).take_undelivered());
        events.into_iter().map(|event| self.event_object(py, event)).collect()
    }

    /// Counts and reports a request that Python could not make sense of.
    fn reject(&self, py: Python<'_>, reason: String) {
        py.detach(|| lock(&self.server).reject(reason));
    }

    /// Spares `pid`'s next reap (see `server::Server::spare`); a pid that is not a running
    /// worker of this server is ignored.
    fn spare(&self, py: Python<'_>, pid: i64) -> PyResult<()> {
        self.owned()?;
        let pid =
            reaper::validate_pid(pid).map_err(|err| PyValueError::new_err(err.to_string()))?;
        py.detach(|| lock(&self.server).spare(pid));
        Ok(())
    }

    /// The answer to a delegated reap of `pid` (an `Expiry`'s, so a valid pid).
    fn complete_reap(&self, py: Python<'_>, pid: i64, reaped: bool) -> PyResult<()> {
        self.owned()?;
        let pid =
            reaper::validate_pid(pid).map_err(|err| PyValueError::new_err(err.to_string()))?;
        py.detach(|| lock(&self.server).complete_reap(pid, reaped));
        Ok(())
    }

    /// The stacks of these workers now (None for one that gave none), as before a reap;
    /// waits at most the stack grace, holding neither the GIL nor the server.
    fn peek_stacks(&self, py: Python<'_>, pids: Vec<i64>) -> PyResult<Vec<(i64, Option<Stacks>)>> {
        self.owned()?;
        let peek = py.detach(|| lock(&self.server).peek_stacks(&pids));
        let stacks = py.detach(|| peek.wait());
        Ok(stacks.into_iter().map(|(pid, stacks)| (pid, stacks.map(Stacks::from))).collect())
    }

    /// Every counter of `server::Stats`, by name.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let stats = py.detach(|| lock(&self.server).stats());
        let dict = PyDict::new(py);
        for (field, value) in Stats::FIELDS.iter().zip(stats.values()) {
            dict.set_item(field.name, value)?;
        }
        Ok(dict)
    }

    /// Every learned scope's figures (empty unless adaptive).
    fn timeouts(&self, py: Python<'_>) -> Vec<ScopeTimeout> {
        let timeouts = py.detach(|| lock(&self.server).timeouts());
        timeouts.into_iter().map(ScopeTimeout::from).collect()
    }

    fn last_progress(&self, py: Python<'_>) -> f64 {
        py.detach(|| lock(&self.server).last_progress())
    }

    /// The next event, None after `timeout` seconds, or `Closed` once the loop has stopped
    /// and every event has been read.
    fn next_event(&self, py: Python<'_>, timeout: f64) -> PyResult<Option<Py<PyAny>>> {
        let timeout = seconds(timeout, "timeout")?;
        let received = py.detach(|| match lock(&self.events).as_ref() {
            Some(events) => events.recv_timeout(timeout),
            None => Err(RecvTimeoutError::Disconnected),
        });
        match received {
            Ok(event) => Ok(Some(self.event_object(py, event)?)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Ok(Some(Py::new(py, Closed)?.into_any())),
        }
    }

    /// Tells the loop the last `Expired` event has been reported (it may signal itself now).
    fn ack_expired(&self) {
        if let Some(ack) = lock(&self.ack).take() {
            let _ = ack.try_send(());
        }
    }
}

/// A client's channel to its server (the FIFO, the queue's pipe), as `send_request` uses it.
trait Client: Sync {
    type Channel: ring::Channel + Sync;
    type Error: Send;
    fn channel(&self) -> &Self::Channel;
    fn ring(&self) -> &ring::Sender;
    /// The request as the channel carries it.
    fn encode(pid: i64, scope_id: &str, expiration: Number, signal: i64, out: &mut Vec<u8>);
    /// Sends `bytes` at once if it can; false, having sent nothing, if not (`send` then).
    fn try_send(&self, bytes: &[u8]) -> Result<bool, Self::Error>;
    /// Sends `bytes`, waiting (bounded) for the server or for room.
    fn send(&self, bytes: &[u8]) -> Result<(), Self::Error>;
    /// After a request sent by the channel: whether to offer a ring now.
    fn ring_due(&self) -> bool;
}

/// Sends one request: in the ring our server took, if the client holds one, else by the
/// channel; then offers a ring when it is time. True if it went by the ring.
fn send_request<C: Client>(
    py: Python<'_>,
    client: &C,
    pid: i64,
    scope_id: &str,
    expiration: Number,
    signal: i64,
) -> Result<bool, C::Error> {
    if send_by_ring(py, client.ring(), client.channel(), pid, scope_id, expiration, signal) {
        return Ok(true);
    }
    let mut bytes = Vec::with_capacity(160 + scope_id.len());
    C::encode(pid, scope_id, expiration, signal, &mut bytes);
    // Keep the GIL for a write that cannot wait; let go of it for one that may.
    if !client.try_send(&bytes)? {
        py.detach(|| client.send(&bytes))?;
    }
    if client.ring_due() {
        py.detach(|| client.ring().offer(client.channel()));
    }
    Ok(false)
}

/// Puts the request in the client's ring, if it holds one our server took: no system call,
/// and no waiting but for a full ring. False if it must go by the channel.
fn send_by_ring(
    py: Python<'_>,
    sender: &ring::Sender,
    channel: &(impl ring::Channel + Sync),
    pid: i64,
    scope_id: &str,
    expiration: Number,
    signal: i64,
) -> bool {
    // An entry holds an f64 and an i32: other numbers go by the channel, exactly.
    let exact = match expiration {
        Number::Float(x) => Some(x),
        Number::Int(i) if i.unsigned_abs() < 1 << 53 => Some(i as f64),
        Number::Int(_) => None,
    };
    let (Some(exact), Ok(signal)) = (exact, i32::try_from(signal)) else { return false };
    match sender.push(channel, pid, scope_id, exact, signal) {
        ring::Pushed::Sent => true,
        ring::Pushed::Full => {
            py.detach(|| sender.push_when_room(channel, pid, scope_id, exact, signal))
        }
        ring::Pushed::Channel => false,
    }
}

/// A client's connection to a FIFO server: each request is one JSON line in one `write`.
#[pyclass(module = "elastic_timer._native", name = "FifoClient", frozen)]
struct PyFifoClient(fifo::Client);

#[pymethods]
impl PyFifoClient {
    #[new]
    fn new(path: PathBuf, connect_timeout: f64, send_timeout: f64) -> PyResult<Self> {
        let options = SendOptions {
            connect_timeout: seconds(connect_timeout, "connect_timeout")?,
            send_timeout: seconds(send_timeout, "send_timeout")?,
        };
        Ok(Self(fifo::Client::new(path, options)))
    }

    /// Sends one request as torch's FileTimerClient does, but waiting (bounded) for a server
    /// that is starting and for room in a full pipe. If this request opened a new connection
    /// to a server taking stacks, returns the stacks directory it named (or why its sidecar
    /// was refused, a str); else None.
    fn send(
        &self,
        py: Python<'_>,
        pid: i64,
        scope_id: &str,
        expiration_time: &Bound<'_, PyAny>,
        signal: i64,
    ) -> PyResult<Option<fifo::Announced>> {
        let expiration = number(expiration_time)?;
        // Before the ring too: a FIFO path that now leads elsewhere lets go of the ring.
        self.0.check_path();
        if send_request(py, self, pid, scope_id, expiration, signal)? {
            return Ok(None);
        }
        Ok(self.0.take_announced())
    }

    /// `send` for a request of this process (its pid known without a system call).
    fn send_own(
        &self,
        py: Python<'_>,
        scope_id: &str,
        expiration_time: &Bound<'_, PyAny>,
        signal: i64,
    ) -> PyResult<Option<fifo::Announced>> {
        let pid = i64::from(ring::this_process().0);
        self.send(py, pid, scope_id, expiration_time, signal)
    }
}

impl Client for PyFifoClient {
    type Channel = fifo::Client;
    type Error = SendError;

    fn channel(&self) -> &fifo::Client {
        &self.0
    }

    fn ring(&self) -> &ring::Sender {
        &self.0.ring
    }

    fn encode(pid: i64, scope_id: &str, expiration: Number, signal: i64, out: &mut Vec<u8>) {
        codec::encode_json_line(pid, scope_id, expiration, signal, out);
    }

    fn try_send(&self, line: &[u8]) -> Result<bool, SendError> {
        self.0.try_send(line)
    }

    fn send(&self, line: &[u8]) -> Result<(), SendError> {
        self.0.send(line)
    }

    fn ring_due(&self) -> bool {
        self.0.ring.due()
    }
}

/// The stacks directory as a `Path`, a refused sidecar as the `str` that says why.
impl<'py> IntoPyObject<'py> for fifo::Announced {
    type Target = PyAny;
    type Output = Bound<'py, PyAny>;
    type Error = PyErr;

    fn into_pyobject(self, py: Python<'py>) -> PyResult<Self::Output> {
        match self {
            Self::StacksDir(dir) => Ok(dir.into_pyobject(py)?.into_any()),
            Self::Refused(why) => Ok(why.into_pyobject(py)?.into_any()),
        }
    }
}

impl From<queue::SendError> for PyErr {
    fn from(err: queue::SendError) -> Self {
        match err {
            queue::SendError::TooLarge(_) => PyValueError::new_err(err.to_string()),
            queue::SendError::Timeout(_) => PyTimeoutError::new_err(err.to_string()),
            queue::SendError::Io(io) => io.into(),
        }
    }
}

/// A client's writer to a `multiprocessing.Queue`: puts a `TimerRequest` frame on the
/// queue's pipe directly, as `put` and its feeder thread would.
#[pyclass(module = "elastic_timer._native", name = "QueueWriter", frozen)]
struct PyQueueWriter {
    writer: queue::Writer,
    timeout: Duration,
    /// The queue owning the fd and semaphores, kept alive with the writer.
    _queue: Py<PyAny>,
}

#[pymethods]
impl PyQueueWriter {
    /// `fd` is the queue's `_writer` pipe end, `write_lock` and `items` the addresses of its
    /// `_wlock` and `_sem` semaphores; `queue` is the queue itself.
    #[new]
    fn new(
        queue: Py<PyAny>,
        fd: i32,
        write_lock: usize,
        items: usize,
        timeout: f64,
    ) -> PyResult<Self> {
        // SAFETY: the fd and semaphores belong to `queue`, which this object keeps alive; the
        // fd is duplicated at once.
        let writer = unsafe {
            queue::Writer::new(
                std::os::fd::BorrowedFd::borrow_raw(fd),
                Semaphore::from_raw(write_lock as *mut libc::sem_t),
                Semaphore::from_raw(items as *mut libc::sem_t),
            )?
        };
        Ok(Self { writer, timeout: seconds(timeout, "send_timeout")?, _queue: queue })
    }

    /// Puts `TimerRequest(<this process>, scope_id, expiration_time)` on the queue (or in
    /// the ring our server took). Returns False, having sent nothing, if the frame is too
    /// large to write atomically (use `put` then).
    fn send_own(
        &self,
        py: Python<'_>,
        scope_id: &str,
        expiration_time: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        let pid = i64::from(ring::this_process().0);
        let expiration = number(expiration_time)?;
        match send_request(py, self, pid, scope_id, expiration, i64::from(codec::SIGKILL)) {
            Ok(_) => Ok(true),
            Err(queue::SendError::TooLarge(_)) => Ok(false),
            Err(err) => Err(err.into()),
        }
    }
}

impl Client for PyQueueWriter {
    type Channel = queue::Writer;
    type Error = queue::SendError;

    fn channel(&self) -> &queue::Writer {
        &self.writer
    }

    fn ring(&self) -> &ring::Sender {
        &self.writer.ring
    }

    /// A `TimerRequest` has no signal: its server kills (the ring's entry says SIGKILL).
    fn encode(pid: i64, scope_id: &str, expiration: Number, _signal: i64, out: &mut Vec<u8>) {
        codec::encode_pickle_frame(pid, scope_id, expiration, out);
    }

    fn try_send(&self, frame: &[u8]) -> Result<bool, queue::SendError> {
        self.writer.try_send(frame)
    }

    fn send(&self, frame: &[u8]) -> Result<(), queue::SendError> {
        self.writer.send(frame, self.timeout)
    }

    fn ring_due(&self) -> bool {
        self.writer.ring_due()
    }
}

/// A Python int or float as the JSON number torch would write.
fn number(value: &Bound<'_, PyAny>) -> PyResult<Number> {
    if value.is_instance_of::<pyo3::types::PyInt>() {
        Ok(Number::Int(value.extract()?))
    } else {
        Ok(Number::Float(value.extract()?))
    }
}

/// The exact line torch's FileTimerClient writes for this request (with its newline).
#[pyfunction]
fn encode_json_line<'py>(
    py: Python<'py>,
    pid: i64,
    scope_id: &str,
    expiration_time: &Bound<'py, PyAny>,
    signal: i64,
) -> PyResult<Bound<'py, PyBytes>> {
    let mut line = Vec::new();
    codec::encode_json_line(pid, scope_id, number(expiration_time)?, signal, &mut line);
    Ok(PyBytes::new(py, &line))
}

pyo3::create_exception!(
    _native,
    UnsafeFile,
    pyo3::exceptions::PyOSError,
    "A file refused because someone else may have put it there: a link, not a regular file, \
     another user's, writable by others; the message says which, never what the file holds."
);

impl From<untrusted::Refused> for PyErr {
    fn from(err: untrusted::Refused) -> Self {
        match err {
            untrusted::Refused::Io(io) => io.into(),
            refused => UnsafeFile::new_err(refused.to_string()),
        }
    }
}

/// The content of a file this process acts on (a state file, a signal number), up to
/// `limit + 1` bytes (more than `limit`: it is larger), if it is private to this process's
/// user or root (`untrusted::read_private`). UnsafeFile says why not.
#[pyfunction]
fn read_private_file<'py>(
    py: Python<'py>,
    path: PathBuf,
    limit: usize,
) -> PyResult<Bound<'py, PyBytes>> {
    match py.detach(|| untrusted::read_private(&path, limit))? {
        Some(bytes) => Ok(PyBytes::new(py, &bytes)),
        None => {
            let args = (libc::ENOENT, "No such file or directory", path.into_os_string());
            Err(PyFileNotFoundError::new_err(args))
        }
    }
}

/// A descriptor open for appending to `path`, created (mode 0600) if missing, if it is a
/// regular file of this process's user (`untrusted::open_append`). UnsafeFile says why not.
#[pyfunction]
fn open_append(py: Python<'_>, path: PathBuf) -> PyResult<i32> {
    let file = py.detach(|| untrusted::open_append(&path))?;
    Ok(file.into_raw_fd())
}

pyo3::create_exception!(
    elastic_timer._native,
    StateFileError,
    pyo3::exceptions::PyException,
    "A learned-timeouts state file that cannot be read, or is not one; the message is one line."
);

impl From<StateError> for PyErr {
    fn from(err: StateError) -> Self {
        StateFileError::new_err(err.to_string())
    }
}

/// The scopes of the learned-timeouts state file at `path`, as saved, in the file's order:
/// the server's own reader (`learned::read_state`), with its rules for a file someone else
/// may have put there. StateFileError says why not.
#[pyfunction]
fn read_state_file(py: Python<'_>, path: PathBuf) -> PyResult<Vec<ScopeTimeout>> {
    let scopes = py.detach(|| learned::read_state(&path))?;
    Ok(scopes.into_iter().map(|saved| saved.summary.into()).collect())
}

/// Decodes one FIFO line the way the server does; ValueError says why it is refused.
#[pyfunction]
fn decode_json_line(line: &[u8]) -> PyResult<RequestTuple> {
    Ok(to_tuple(codec::decode_json_line(line)?))
}

/// Decodes one queue item's pickle the way the server does, without unpickling it.
#[pyfunction]
fn decode_pickle(payload: &[u8]) -> PyResult<RequestTuple> {
    Ok(to_tuple(codec::decode_pickle(payload)?))
}

/// The value of `name` in the environment process `pid` started with (`/proc/<pid>/environ`),
/// if set there and readable.
#[pyfunction]
fn environ_value(py: Python<'_>, pid: i32, name: &str) -> Option<std::ffi::OsString> {
    py.detach(|| environ::value(pid, name))
}

// -- server options and the stacks protocol: the core owns their defaults and names --------

/// The defaults of the server options the core owns, by keyword (`elastic_timer.options`).
fn option_defaults(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let learn = LearnConfig::default();
    let defaults = PyDict::new(py);
    defaults.set_item("stack_signal", stacks::DEFAULT_SIGNAL.as_raw())?;
    defaults.set_item("adaptive_factor", learn.factor)?;
    defaults.set_item("adaptive_floor", learn.floor.as_secs_f64())?;
    defaults.set_item("max_timers", Caps::DEFAULT.total)?;
    defaults.set_item("max_worker_timers", Caps::DEFAULT.per_worker)?;
    Ok(defaults)
}

/// The file this process arms `faulthandler` to write its stacks to in the stacks directory
/// `dir`: the one the server reads for it (`<pid>-<start time>.stacks`).
#[pyfunction]
fn stacks_file(dir: PathBuf) -> PyResult<PathBuf> {
    Ok(stacks::own_armed_path(&dir)?)
}

/// The file beside the FIFO `fifo` where a server taking stacks names its stacks directory
/// (`<fifo>.stacks`), which the FIFO client reads when it connects.
#[pyfunction]
fn stacks_sidecar(fifo: PathBuf) -> PathBuf {
    fifo::stacks_sidecar(&fifo)
}

#[pymodule]
mod _native {
    use pyo3::prelude::*;

    use crate::server::{Kind, Stats};

    #[pymodule_export]
    use super::{
        decode_json_line, decode_pickle, encode_json_line, environ_value, open_append,
        read_private_file, stacks_file, stacks_sidecar, Closed, Dumping, Escalated, Expired,
        Expiry, LearnedBound, Malformed, Notice, Outcome, PyFifoClient, PyQueueWriter, PyServer,
        Refused, ScopeTimeout, Stacks, Unreapable, UnsafeFile, WorkerExited,
    };

    // The learned-timeouts state file: its reader, and its format (`learned::state`).
    #[pymodule_export]
    use super::{read_state_file, StateFileError};
    #[pymodule_export]
    const STATE_FORMAT: &str = crate::learned::state::STATE_FORMAT;
    #[pymodule_export]
    const STATE_VERSION: u64 = crate::learned::state::STATE_VERSION;
    #[pymodule_export]
    const MAX_STATE_BYTES: u64 = crate::learned::state::MAX_STATE_BYTES;

    #[pymodule_export]
    const PIPE_BUF: usize = crate::transport::fifo::MAX_LINE;

    /// Cargo.toml's version, the package's only one (maturin writes it into the metadata too).
    #[pymodule_export]
    #[expect(non_upper_case_globals)]
    const __version__: &str = env!("CARGO_PKG_VERSION");

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        // (name, "counter" | "gauge", help) of each `stats()` key, in order: what metrics expose.
        let fields: Vec<(&str, &str, &str)> = Stats::FIELDS
            .iter()
            .map(|field| {
                let kind = match field.kind {
                    Kind::Counter => "counter",
                    Kind::Gauge => "gauge",
                };
                (field.name, kind, field.help)
            })
            .collect();
        m.add("STATS", fields)?;
        m.add("DEFAULTS", super::option_defaults(m.py())?)
    }
}
