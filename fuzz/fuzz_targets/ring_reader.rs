//! Any bytes a worker left in its ring, from any offset, and any FIFO line that may be a ring
//! announcement: parsing them must return, never panic, and keep every bound.
#![no_main]

use elastic_timer::ring;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((head, pending)) = data.split_first_chunk::<4>() else { return };
    let start = (u32::from_le_bytes(*head) as usize % ring::CAPACITY) & !7;
    let (entries, _) = ring::parse(pending, start, ring::CAPACITY);
    assert!(entries.len() <= pending.len() / 16);
    assert!(entries.iter().all(|entry| entry.scope.len() <= ring::MAX_SCOPE));
    let _ = ring::parse_announcement(data);
});
