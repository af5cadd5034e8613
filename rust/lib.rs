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
