//! Native core of elastic-timer.
//!
//! Everything here is plain Rust that knows nothing of Python, except `bindings`, which is
//! compiled only with the `python` feature and is the one place that translates.
//!
//! Data flow: a [`transport::Transport`] (`transport::fifo`, `transport::queue`, or
//! `transport::direct` for what Python reads) turns bytes into requests with `codec`, and
//! announces the workers' shared-memory rings (`ring`); the one [`deadlines::DeadlineMap`]
//! keeps the requests ordered by deadline, and `server` runs the loop that drains the rings,
//! expires timers and asks `reaper` to signal (after `stacks` has asked the worker where it
//! is stuck, when stack dumps are on). `learned` keeps per-scope durations and the tightened
//! bound they give an acquire. A new transport plugs in where `transport`'s module doc says.
//!
//! The modules, one concept each (each one's own documentation says more; this list is the
//! one the documentation site shows):
//!
//! - [`codec`]: the two wire formats torch's clients speak (JSON lines on the FIFO, pickles on
//!   a queue), decoded into one [`codec::Request`] by strict, bounded parsers that run no code,
//!   and encoded byte for byte as torch's clients do.
//! - [`transport`]: how requests arrive, one file per transport behind one trait:
//!   `transport::fifo` (the named FIFO: the server's end, created, watched with inotify and
//!   created again when deleted; the client's, one atomic `write` per request),
//!   `transport::queue` (a `multiprocessing.Queue`'s pipe, read and written natively under the
//!   queue's own locks) and `transport::direct` (a queue only Python can read). Its module doc
//!   lists where a new transport plugs in.
//! - [`ring`]: the shared-memory request ring between one worker process and our server, on
//!   either transport: requests with no system call.
//! - [`deadlines`]: the one deadline map behind both transports and the Python-visible
//!   methods, keyed by the worker's validated pid, bounded per worker and in all.
//! - [`server`]: the timer server: one native thread in `epoll_wait` that reads requests, keeps
//!   deadlines and reaps, one pass at a time, and reports events and counters.
//! - [`reaper`]: validates pids and signals workers, and only workers: through a pidfd, or by
//!   pid while the process holding it has the start time recorded.
//! - [`procfs`]: what `/proc/<pid>/...` says of a process, readable when the fd table is full.
//! - [`stacks`]: stack dumps: asking an expired worker where it is stuck (its `faulthandler`,
//!   else `py-spy`), without ever blocking the loop.
//! - [`learned`]: timeouts learned from the job (per-scope durations and the bound they give)
//!   and the state file that keeps them across servers.
//! - [`error_file`]: torchrun's per-worker error file (`TORCHELASTIC_ERROR_FILE`), written for a
//!   worker a timer is about to kill.
//! - [`environ`]: one variable of the environment another process started with.
//! - [`untrusted`]: opening a file that someone else may have put at its path (no links, owner
//!   and type checked on the open fd, bounded reads).
//! - [`fork`]: the server fds that a child forked from the server's process must not keep.
//! - `bindings` (only with the `python` feature): the one PyO3 module, `elastic_timer._native`.

pub mod codec;
pub mod deadlines;
pub mod environ;
pub mod error_file;
pub mod fork;
pub mod learned;
pub mod procfs;
pub mod reaper;
pub mod ring;
pub mod server;
pub mod stacks;
pub mod transport;
pub mod untrusted;

#[cfg(feature = "python")]
mod bindings;

#[cfg(test)]
mod test_support;
