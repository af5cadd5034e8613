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
