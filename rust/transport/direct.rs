//! The transport of a queue only Python can read.
//!
//! `LocalTimerServer` reads a plain `multiprocessing.Queue` natively ([`super::queue`]): its
//! items come down a pipe we can read. A manager proxy's queue (`Manager().Queue()`) has no
//! such pipe: its items live in the manager process, behind a socket spoken to in Python. For
//! such a queue the Python server runs a thread that takes the items with `get` and hands
//! them to [`crate::server::Server::register`]; the native server has nothing to read.

use std::io;
use std::os::fd::BorrowedFd;

use super::{Arrival, Transport};

/// No fd and nothing to read: every request comes through [`crate::server::Server::register`]
/// (a manager-proxy queue, read from Python). Its workers send no rings.
#[derive(Debug, Clone, Copy, Default)]
pub struct Direct;

impl Transport for Direct {
    fn open(&mut self) -> io::Result<Option<String>> {
        Ok(None)
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    fn read(&mut self, _out: &mut Vec<Arrival>) -> io::Result<usize> {
        Ok(0)
    }

    fn close(&mut self, _out: &mut Vec<Arrival>) {}
}
