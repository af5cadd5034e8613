//! Any queue item: the restricted pickle reader must return, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = elastic_timer::codec::decode_pickle(data);
});
