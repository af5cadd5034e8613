//! Files that someone else may have put there.
//!
//! A stacks directory that other users can write, or the directory of a FIFO (often `/tmp`),
//! may hold, under the name the reader expects, a symbolic link to a file it should not show,
//! a FIFO that would block it, a hard link to someone else's file, or a file of another user.
//! A server running as root would follow all of them. Here a path is opened without
//! following a link and without blocking, checked on the open file (so it cannot be swapped
//! between the check and the read), and read up to a bound. The same checks guard the files
//! the server appends to (`open_append`).

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rustix::fs::{self, FileType, Mode, OFlags};
use rustix::io::Errno;

/// Why a file was not used.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("it is a symbolic link")]
    Symlink,
    #[error("it is not a regular file")]
    NotRegular,
    #[error("it belongs to uid {owner}, not to {expected}")]
    Owner { owner: u32, expected: String },
    #[error("it has {0} hard links (a link to another file)")]
    HardLinked(u64),
    #[error("group or others may write it (mode {0:04o})")]
    Writable(u32),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The owners a file this process trusts may have: this process's effective uid, and root.
pub fn us_or_root() -> [u32; 2] {
    [rustix::process::geteuid().as_raw(), 0]
}

const NEVER_BLOCK: OFlags =
    OFlags::NOFOLLOW.union(OFlags::NONBLOCK).union(OFlags::NOCTTY).union(OFlags::CLOEXEC);

/// Opens `path` for reading if it is a regular file of one of the uids `owners`, is not a
/// symbolic link, and has no other hard link. None if nothing is there.
pub fn open(path: &Path, owners: &[u32]) -> Result<Option<File>, Refused> {
    open_checked(path, owners, false)
}

/// [`open`], refusing also a file that group or others may write (whoever could write it
/// could choose what this process reads).
pub fn open_private(path: &Path, owners: &[u32]) -> Result<Option<File>, Refused> {
    open_checked(path, owners, true)
}

fn open_checked(path: &Path, owners: &[u32], private: bool) -> Result<Option<File>, Refused> {
    match fs::open(path, OFlags::RDONLY | NEVER_BLOCK, Mode::empty()) {
        Ok(fd) => checked(fd, owners, private).map(Some),
        Err(Errno::NOENT) => Ok(None),
        Err(err) => Err(refusal(err)),
    }
}

/// The content of `path`, up to `limit + 1` bytes (more than `limit`: the file is larger),
/// if it is a regular file of this process's user or root that group and others cannot
/// write, not a link, with no other hard link ([`open_private`]). None if nothing is there.
/// For files whose content this process acts on (a state file, a signal number).
pub fn read_private(path: &Path, limit: usize) -> Result<Option<Vec<u8>>, Refused> {
    let Some(file) = open_private(path, &us_or_root())? else {
        return Ok(None);
    };
    Ok(Some(read_bounded(&file, 0, limit + 1)?.bytes))
}

/// Opens `path` for appending, creating it (mode 0600) if nothing is there, if it is a
/// regular file of this process's effective uid that is not a symbolic link and has no
/// other hard link. Never waits: a FIFO there is refused at once, with or without a reader.
pub fn open_append(path: &Path) -> Result<File, Refused> {
    let flags = OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE | NEVER_BLOCK;
    let fd = fs::open(path, flags, Mode::from_raw_mode(0o600)).map_err(refusal)?;
    checked(fd, &[rustix::process::geteuid().as_raw()], false)
}

fn refusal(err: Errno) -> Refused {
    match err {
        Errno::LOOP => Refused::Symlink,
        // A FIFO (or socket) without a reader, opened to write without blocking.
        Errno::NXIO => Refused::NotRegular,
        err => Refused::Io(err.into()),
    }
}

/// The open file `fd`, if it is what the caller expects (checked on the fd itself, so the
/// path cannot be swapped meanwhile).
fn checked(fd: OwnedFd, owners: &[u32], private: bool) -> Result<File, Refused> {
    let stat = fs::fstat(&fd).map_err(io::Error::from)?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return Err(Refused::NotRegular);
    }
    if !owners.contains(&stat.st_uid) {
        let mut uids = owners.to_vec();
        uids.sort_unstable();
        uids.dedup();
        let expected = match uids.as_slice() {
            [uid] => format!("uid {uid}"),
            [0, uid] => format!("uid {uid} or root"),
            uids => format!("any of uids {uids:?}"),
        };
        return Err(Refused::Owner { owner: stat.st_uid, expected });
    }
    #[allow(clippy::useless_conversion)]
    let links = u64::from(stat.st_nlink);
    if links != 1 {
        return Err(Refused::HardLinked(links));
    }
    #[allow(clippy::unnecessary_cast)]
    let mode = stat.st_mode as u32 & 0o7777;
    if private && mode & 0o022 != 0 {
        return Err(Refused::Writable(mode));
    }
    Ok(File::from(fd))
}

/// What [`read_bounded`] read.
#[derive(Debug, PartialEq, Eq)]
pub struct Bounded {
    pub bytes: Vec<u8>,
    /// Whether the file held more than the bound from the offset (and the rest was left).
    pub cut: bool,
}

/// Up to `limit` bytes of `file` from `offset`.
pub fn read_bounded(file: &File, offset: u64, limit: usize) -> io::Result<Bounded> {
    // One byte past the bound tells whether there was more. The buffer grows as the file
    // turns out to be long (a bound of 64 MiB is no reason to allocate it for a small file).
    let mut bytes = Vec::new();
    let mut len = 0;
    while len <= limit {
        if len == bytes.len() {
            bytes.resize((len * 2).max(4096).min(limit + 1), 0);
        }
        match file.read_at(&mut bytes[len..], offset + len as u64) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    let cut = len > limit;
    bytes.truncate(len.min(limit));
    Ok(Bounded { bytes, cut })
}

#[cfg(test)]
mod tests;
