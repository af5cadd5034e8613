//! Server fds that a child forked from the server's process must not keep.
//!
//! A forked child gets copies of all the fds (`CLOEXEC` closes them only on `exec`), and
//! workers forked from the agent's process are such children. A child holding the FIFO's
//! read end keeps writes to it from failing: a client that kept the FIFO open would write,
//! unread, into the FIFO of a server that stopped or moved on, instead of getting `EPIPE`
//! and opening the path again. A child holding a queue's mark (`transport::queue::Mark`)
//! would keep it after the server stopped, and keep a restarted server from marking the queue.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Once;

/// The fds closed in every forked child (-1: a free slot).
static CLOSED_IN_CHILDREN: [AtomicI32; 64] = [const { AtomicI32::new(-1) }; 64];
static AT_FORK: Once = Once::new();

extern "C" fn close_server_fds_in_child() {
    // Runs in the child right after fork: atomics and close(2) only (async-signal-safe).
    for slot in &CLOSED_IN_CHILDREN {
        let fd = slot.swap(-1, Ordering::Relaxed);
        if fd >= 0 {
            // SAFETY: the child's copy of a server fd, which nothing in the child uses (the
            // server's thread, its only user, does not exist in the child).
            unsafe { libc::close(fd) };
        }
    }
}

/// `fd` is closed in the children forked from now on, until `keep_in_children`.
pub fn close_in_children(fd: RawFd) {
    AT_FORK.call_once(|| {
        // SAFETY: registers a handler that only closes fds; it cannot fail in a way that
        // matters (without it, children keep the fds, as before).
        unsafe { libc::pthread_atfork(None, None, Some(close_server_fds_in_child)) };
    });
    // Past 64 server fds, further ones stay open in children.
    let _ = CLOSED_IN_CHILDREN
        .iter()
        .find(|slot| slot.compare_exchange(-1, fd, Ordering::Relaxed, Ordering::Relaxed).is_ok());
}

/// Call before `fd` closes (its number can then be reused by something a child needs).
pub fn keep_in_children(fd: RawFd) {
    let _ = CLOSED_IN_CHILDREN
        .iter()
        .find(|slot| slot.compare_exchange(fd, -1, Ordering::Relaxed, Ordering::Relaxed).is_ok());
}
