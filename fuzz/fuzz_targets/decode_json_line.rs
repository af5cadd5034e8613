//! Any bytes read from the FIFO: decoding them, and salvaging a request from their end, must
//! return, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = elastic_timer::codec::decode_json_line(data);
    let _ = elastic_timer::codec::salvage_json_line(data);
});
