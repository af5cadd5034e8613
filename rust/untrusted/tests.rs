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
        assert_eq!(refusal(&secret, &[0, 1000]), "it belongs to uid 4242, not to uid 1000 or root");
    }
    std::fs::remove_dir_all(&dir).expect("rm");
}

#[test]
fn a_private_file_is_one_that_group_and_others_cannot_write() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("private");
    let path = dir.join("state");
    std::fs::write(&path, b"{}").expect("write");
    for (mode, refused) in [(0o600, false), (0o644, false), (0o620, true), (0o606, true)] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        match open_private(&path, &us_or_root()) {
            Ok(Some(_)) => assert!(!refused, "{mode:o} read"),
            Err(err) => {
                assert!(refused, "{mode:o}: {err}");
                assert_eq!(
                    err.to_string(),
                    format!("group or others may write it (mode {mode:04o})")
                );
            }
            Ok(None) => panic!("there"),
        }
    }
    std::fs::remove_dir_all(&dir).expect("rm");
}

#[test]
fn appending_creates_a_private_file_and_refuses_what_it_must_not_write() {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("append");
    let path = dir.join("events");
    open_append(&path).expect("created").write_all(b"one\n").expect("write");
    let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    open_append(&path).expect("opened").write_all(b"two\n").expect("write");
    assert_eq!(std::fs::read(&path).expect("read"), b"one\ntwo\n");

    let target = dir.join("target");
    let symlink = dir.join("symlink");
    std::os::unix::fs::symlink(&target, &symlink).expect("symlink");
    assert_eq!(open_append(&symlink).expect_err("link").to_string(), "it is a symbolic link");
    assert!(!target.exists(), "a dangling link's target is not created");
    let hard = dir.join("hard");
    std::fs::hard_link(&path, &hard).expect("link");
    assert!(matches!(open_append(&hard), Err(Refused::HardLinked(2))));
    // A FIFO is refused at once, whether or not something reads it.
    let fifo = dir.join("fifo");
    fs::mkfifoat(fs::CWD, &fifo, Mode::from_raw_mode(0o600)).expect("mkfifo");
    assert!(matches!(open_append(&fifo), Err(Refused::NotRegular)));
    let reader = fs::open(&fifo, OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty()).expect("open");
    assert!(matches!(open_append(&fifo), Err(Refused::NotRegular)));
    drop(reader);
    if me() == 0 {
        let theirs = dir.join("theirs");
        std::fs::write(&theirs, b"kept").expect("write");
        fs::chown(&theirs, Some(rustix::fs::Uid::from_raw(4242)), None).expect("chown");
        assert!(matches!(open_append(&theirs), Err(Refused::Owner { owner: 4242, .. })));
        assert_eq!(std::fs::read(&theirs).expect("read"), b"kept");
    }
    std::fs::remove_dir_all(&dir).expect("rm");
}
