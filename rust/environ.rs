//! The environment another process started with (`/proc/<pid>/environ`, readable for a
//! process of the same user): what its launcher told it. What it set since, in its own
//! memory, is not seen there.

use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStringExt;

/// How much of an environment is read (Linux allows a few MiB).
const MAX_ENVIRON: u64 = 4 << 20;

/// The value of `name` in the environment process `pid` started with, if it is set there and
/// can be read.
pub fn value(pid: i32, name: &str) -> Option<OsString> {
    let mut environ = Vec::new();
    File::open(format!("/proc/{pid}/environ"))
        .ok()?
        .take(MAX_ENVIRON)
        .read_to_end(&mut environ)
        .ok()?;
    let prefix = format!("{name}=");
    environ
        .split(|&b| b == 0)
        .find_map(|entry| entry.strip_prefix(prefix.as_bytes()))
        .map(|value| OsString::from_vec(value.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::shell_with_env;

    #[test]
    fn a_variable_is_read_from_the_environment_the_process_started_with() {
        let mut child = shell_with_env("ELASTIC_TIMER_TEST_VALUE", "a b=c");
        let pid = i32::try_from(child.id()).unwrap();
        assert_eq!(value(pid, "ELASTIC_TIMER_TEST_VALUE"), Some("a b=c".into()));
        assert_eq!(value(pid, "ELASTIC_TIMER_TEST_VAL"), None);
        assert_eq!(value(pid, "ELASTIC_TIMER_TEST_VALUE_NOT_SET"), None);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(value(pid, "ELASTIC_TIMER_TEST_VALUE"), None, "read after it was reaped");
    }
}
