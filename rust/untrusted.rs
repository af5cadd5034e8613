//! Reading files that someone else may have put there.
//!
//! A stacks directory that other users can write, or the directory of a FIFO (often `/tmp`),
//! may hold, under the name the reader expects, a symbolic link to a file it should not show,
//! a FIFO that would block it, a hard link to someone else's file, or a file of another user.
//! A server running as root would follow all of them. Here a path is opened without
//! following a link and without blocking, checked on the open file (so it cannot be swapped
//! between the check and the read), and read up to a bound.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rustix::fs::{self, FileType, Mode, OFlags};
use rustix::io::Errno;

/// Why a file was not read.
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
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Opens `path` for reading if it is a regular file of one of the uids `owners`, is not a
/// symbolic link, and has no other hard link. None if nothing is there.
pub fn open(path: &Path, owners: &[u32]) -> Result<Option<File>, Refused> {
    let flags =
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let fd = match fs::open(path, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        Err(Errno::LOOP) => return Err(Refused::Symlink),
        Err(err) => return Err(Refused::Io(err.into())),
    };
    let stat = fs::fstat(&fd).map_err(io::Error::from)?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return Err(Refused::NotRegular);
    }
    if !owners.contains(&stat.st_uid) {
        let expected = match owners {
            [uid] => format!("uid {uid}"),
            _ => format!("any of uids {owners:?}"),
        };
        return Err(Refused::Owner { owner: stat.st_uid, expected });
    }
    #[allow(clippy::useless_conversion)]
    let links = u64::from(stat.st_nlink);
    if links != 1 {
        return Err(Refused::HardLinked(links));
    }
    Ok(Some(File::from(fd)))
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
    // One byte past the bound tells whether there was more.
    let mut bytes = vec![0; limit + 1];
    let mut len = 0;
    while len < bytes.len() {
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
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("et-untrusted-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    fn me() -> u32 {
        rustix::process::geteuid().as_raw()
    }

    fn refusal(path: &Path, owners: &[u32]) -> String {
        open(path, owners).expect_err("refused").to_string()
    }

    #[test]
    fn a_regular_file_of_the_owner_is_read_up_to_the_bound() {
        let dir = temp_dir("read");
        let path = dir.join("file");
        std::fs::write(&path, b"0123456789").expect("write");
        let file = open(&path, &[me()]).expect("open").expect("there");
        let whole = Bounded { bytes: b"23456789".to_vec(), cut: false };
        assert_eq!(read_bounded(&file, 2, 8).expect("read"), whole);
        let cut = Bounded { bytes: b"234".to_vec(), cut: true };
        assert_eq!(read_bounded(&file, 2, 3).expect("read"), cut);
        assert!(open(&dir.join("missing"), &[me()]).expect("no error").is_none());
        std::fs::remove_dir_all(&dir).expect("rm");
    }

    #[test]
    fn links_fifos_and_other_owners_files_are_refused() {
        let dir = temp_dir("refused");
        let secret = dir.join("secret");
        std::fs::write(&secret, b"not for the log").expect("write");
        let symlink = dir.join("symlink");
        std::os::unix::fs::symlink(&secret, &symlink).expect("symlink");
        assert_eq!(refusal(&symlink, &[me()]), "it is a symbolic link");
        let hard = dir.join("hard");
        std::fs::hard_link(&secret, &hard).expect("link");
        assert_eq!(refusal(&hard, &[me()]), "it has 2 hard links (a link to another file)");
        std::fs::remove_file(&hard).expect("rm");
        // A FIFO with no writer would block a plain open, and a read.
        let fifo = dir.join("fifo");
        fs::mkfifoat(fs::CWD, &fifo, Mode::from_raw_mode(0o600)).expect("mkfifo");
        assert_eq!(refusal(&fifo, &[me()]), "it is not a regular file");
        assert_eq!(refusal(&dir, &[me()]), "it is not a regular file");
        let other = me() + 4242;
        assert_eq!(
            refusal(&secret, &[other]),
            format!("it belongs to uid {}, not to uid {other}", me())
        );
        // As root (as here), chown shows the other side: a file of another user.
        if me() == 0 {
            fs::chown(&secret, Some(rustix::fs::Uid::from_raw(4242)), None).expect("chown");
            assert_eq!(
                refusal(&secret, &[0, 1000]),
                "it belongs to uid 4242, not to any of uids [0, 1000]"
            );
        }
        std::fs::remove_dir_all(&dir).expect("rm");
    }
}
