//! Native core of elastic-timer.
//!
//! Everything here is plain Rust that knows nothing of Python, except `bindings`, which is
//! compiled only with the `python` feature and is the one place that translates.
//!
//! Data flow: a transport reader (`fifo` or `queue`) turns bytes into frames, `codec` turns
//! frames into [`codec::Request`]s, the one [`deadlines::DeadlineMap`] keeps them ordered by
//! deadline, and `server` runs the loop that expires them and asks `reaper` to signal
//! (after `stacks` has asked the worker where it is stuck, when stack dumps are on).
//! `learned` keeps per-scope durations and the tightened bound they give an acquire.
//!
//! The modules, one concept each (each one's own documentation says more; this list is the
//! one the documentation site shows):
//!
//! - [`codec`]: the two wire formats torch's clients speak (JSON lines on the FIFO, pickles on
//!   a queue), decoded into one [`codec::Request`] by strict, bounded parsers that run no code,
//!   and encoded byte for byte as torch's clients do.
//! - [`fifo`]: the named-FIFO transport: the server's end (created, watched with inotify,
//!   created again when deleted) and the client's (one atomic `write` per request).
//! - [`queue`]: the `multiprocessing.Queue` transport: the queue's pipe read and written
//!   natively, under the queue's own locks, and the mark that tells a client our server reads.
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
pub mod fifo;
pub mod fork;
pub mod learned;
pub mod procfs;
pub mod queue;
pub mod reaper;
pub mod ring;
pub mod server;
pub mod stacks;
pub mod untrusted;

#[cfg(feature = "python")]
mod bindings;

#[cfg(test)]
mod test_support;
