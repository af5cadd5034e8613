use super::*;
use crate::codec::test_support::{mistyped, request};
use proptest::prelude::*;

// `pickle.dumps(obj, protocol=...).hex()` from CPython 3.11 and torch 2.15; protocol 4
// (what `ForkingPickler.dumps` uses) unless the name says otherwise.
// torch's TimerRequest(1234, "scope", 1700000000.123456)
const TORCH_P2: &str = "800263746f7263682e64697374726962757465642e656c61737469632e74696d65722e6170690a54696d6572526571756573740a7100298171014e7d7102285809000000776f726b65725f696471034dd204580800000073636f70655f69647104580500000073636f70657105580f00000065787069726174696f6e5f74696d6571064741d954fc4007e6b475867107622e";
const TORCH_P3: &str = "800363746f7263682e64697374726962757465642e656c61737469632e74696d65722e6170690a54696d6572526571756573740a7100298171014e7d7102285809000000776f726b65725f696471034dd204580800000073636f70655f69647104580500000073636f70657105580f00000065787069726174696f6e5f74696d6571064741d954fc4007e6b475867107622e";
const TORCH_P4: &str = "80049580000000000000008c23746f7263682e64697374726962757465642e656c61737469632e74696d65722e617069948c0c54696d6572526571756573749493942981944e7d94288c09776f726b65725f6964944dd2048c0873636f70655f6964948c0573636f7065948c0f65787069726174696f6e5f74696d65944741d954fc4007e6b4758694622e";
const TORCH_P5: &str = "80059580000000000000008c23746f7263682e64697374726962757465642e656c61737469632e74696d65722e617069948c0c54696d6572526571756573749493942981944e7d94288c09776f726b65725f6964944dd2048c0873636f70655f6964948c0573636f7065948c0f65787069726174696f6e5f74696d65944741d954fc4007e6b4758694622e";
// TimerRequest(1234, "scope", -1): the release, an int
const TORCH_RELEASE: &str = "8004957c000000000000008c23746f7263682e64697374726962757465642e656c61737469632e74696d65722e617069948c0c54696d6572526571756573749493942981944e7d94288c09776f726b65725f6964944dd2048c0873636f70655f6964948c0573636f7065948c0f65787069726174696f6e5f74696d65944affffffff758694622e";
// TimerRequest(2**40 + 5, "scope", 1.5): LONG1
const TORCH_BIG_PID: &str = "80049585000000000000008c23746f7263682e64697374726962757465642e656c61737469632e74696d65722e617069948c0c54696d6572526571756573749493942981944e7d94288c09776f726b65725f6964948a060500000000018c0873636f70655f6964948c0573636f7065948c0f65787069726174696f6e5f74696d6594473ff8000000000000758694622e";
// TimerRequest(2**70, "scope", 1.5)
const TORCH_HUGE_PID: &str = "80049588000000000000008c23746f7263682e64697374726962757465642e656c61737469632e74696d65722e617069948c0c54696d6572526571756573749493942981944e7d94288c09776f726b65725f6964948a090000000000000000408c0873636f70655f6964948c0573636f7065948c0f65787069726174696f6e5f74696d6594473ff8000000000000758694622e";
// TimerRequest(-7, "scope", 1.5)
const TORCH_NEG_PID: &str = "80049582000000000000008c23746f7263682e64697374726962757465642e656c61737469632e74696d65722e617069948c0c54696d6572526571756573749493942981944e7d94288c09776f726b65725f6964944af9ffffff8c0873636f70655f6964948c0573636f7065948c0f65787069726174696f6e5f74696d6594473ff8000000000000758694622e";
// TimerRequest(1234, "é中😀\n\"", 1.5)
const TORCH_UNICODE: &str = "80049586000000000000008c23746f7263682e64697374726962757465642e656c61737469632e74696d65722e617069948c0c54696d6572526571756573749493942981944e7d94288c09776f726b65725f6964944dd2048c0873636f70655f6964948c0bc3a9e4b8adf09f98800a22948c0f65787069726174696f6e5f74696d6594473ff8000000000000758694622e";
// FileTimerRequest(1234, "scope", 1.5, 15), protocols 4 and 2
const TORCH_FILE: &str = "800495ae000000000000008c36746f7263682e64697374726962757465642e656c61737469632e74696d65722e66696c655f62617365645f6c6f63616c5f74696d6572948c1046696c6554696d6572526571756573749493942981944e7d94288c0776657273696f6e944b018c067369676e616c944b0f8c09776f726b65725f6964944dd2048c0873636f70655f6964948c0573636f7065948c0f65787069726174696f6e5f74696d6594473ff8000000000000758694622e";
const TORCH_FILE_P2: &str = "800263746f7263682e64697374726962757465642e656c61737469632e74696d65722e66696c655f62617365645f6c6f63616c5f74696d65720a46696c6554696d6572526571756573740a7100298171014e7d710228580700000076657273696f6e71034b0158060000007369676e616c71044b0f5809000000776f726b65725f696471054dd204580800000073636f70655f69647106580500000073636f70657107580f00000065787069726174696f6e5f74696d657108473ff800000000000075867109622e";
// The same FileTimerRequest from torch 2.4 to 2.9, whose pid is in a slot `worker_pid`
const TORCH_2_9_FILE: &str = "800495af000000000000008c36746f7263682e64697374726962757465642e656c61737469632e74696d65722e66696c655f62617365645f6c6f63616c5f74696d6572948c1046696c6554696d6572526571756573749493942981944e7d94288c0776657273696f6e944b018c0a776f726b65725f706964944dd2048c0873636f70655f6964948c0573636f7065948c0f65787069726174696f6e5f74696d6594473ff80000000000008c067369676e616c944b0f758694622e";
// TimerRequests with a wrong field: pid "1234", pid True, scope 5, expiration "soon",
// expiration None
const PID_STR: &str = "80049584000000000000008c23746f7263682e64697374726962757465642e656c61737469632e74696d65722e617069948c0c54696d6572526571756573749493942981944e7d94288c09776f726b65725f6964948c0431323334948c0873636f70655f6964948c0573636f7065948c0f65787069726174696f6e5f74696d6594473ff8000000000000758694622e";
const PID_BOOL: &str = "8004957e000000000000008c23746f7263682e64697374726962757465642e656c61737469632e74696d65722e617069948c0c54696d6572526571756573749493942981944e7d94288c09776f726b65725f696494888c0873636f70655f6964948c0573636f7065948c0f65787069726174696f6e5f74696d6594473ff8000000000000758694622e";
const SCOPE_INT: &str = "8004957a000000000000008c23746f7263682e64697374726962757465642e656c61737469632e74696d65722e617069948c0c54696d6572526571756573749493942981944e7d94288c09776f726b65725f6964944dd2048c0873636f70655f6964944b058c0f65787069726174696f6e5f74696d6594473ff8000000000000758694622e";
const EXPIRATION_STR: &str = "8004957e000000000000008c23746f7263682e64697374726962757465642e656c61737469632e74696d65722e617069948c0c54696d6572526571756573749493942981944e7d94288c09776f726b65725f6964944dd2048c0873636f70655f6964948c0573636f7065948c0f65787069726174696f6e5f74696d65948c04736f6f6e94758694622e";
const EXPIRATION_NONE: &str = "80049578000000000000008c23746f7263682e64697374726962757465642e656c61737469632e74696d65722e617069948c0c54696d6572526571756573749493942981944e7d94288c09776f726b65725f6964944dd2048c0873636f70655f6964948c0573636f7065948c0f65787069726174696f6e5f74696d65944e758694622e";
// A TimerRequest whose expiration_time slot was never set
const NO_EXPIRATION: &str = "80049565000000000000008c23746f7263682e64697374726962757465642e656c61737469632e74696d65722e617069948c0c54696d6572526571756573749493942981944e7d94288c09776f726b65725f6964944dd2048c0873636f70655f6964948c0573636f706594758694622e";
// An object whose __reduce__ returns (os.system, ("echo pwned",)), protocols 4 and 2
const OS_SYSTEM: &str = "80049525000000000000008c05706f736978948c0673797374656d9493948c0a6563686f2070776e656494859452942e";
const OS_SYSTEM_P2: &str =
    "800263706f7369780a73797374656d0a7100580a0000006563686f2070776e656471018571025271032e";
// A plain dict with the right keys
const A_DICT: &str = "8004953d000000000000007d94288c09776f726b65725f6964944b018c0873636f70655f6964948c0173948c0f65787069726174696f6e5f74696d6594473ff0000000000000752e";
// elastic_timer.api.TimerRequest(1234, "scope", 1.5) and
// elastic_timer.file_based_local_timer.FileTimerRequest(1234, "scope", 1.5, 15)
const OURS: &str = "8004956e000000000000008c11656c61737469635f74696d65722e617069948c0c54696d6572526571756573749493942981944e7d94288c09776f726b65725f6964944dd2048c0873636f70655f6964948c0573636f7065948c0f65787069726174696f6e5f74696d6594473ff8000000000000758694622e";
const OURS_FILE: &str = "8004959c000000000000008c24656c61737469635f74696d65722e66696c655f62617365645f6c6f63616c5f74696d6572948c1046696c6554696d6572526571756573749493942981944e7d94288c0776657273696f6e944b018c067369676e616c944b0f8c09776f726b65725f6964944dd2048c0873636f70655f6964948c0573636f7065948c0f65787069726174696f6e5f74696d6594473ff8000000000000758694622e";
// The same request from a TimerRequest without __slots__ (state: its __dict__) and
// from a subclass of a class slotting two fields (state: (__dict__, slots))
const OURS_DICT_STATE: &str = "8004956b000000000000008c11656c61737469635f74696d65722e617069948c0c54696d6572526571756573749493942981947d94288c09776f726b65725f6964944dd2048c0873636f70655f6964948c0573636f7065948c0f65787069726174696f6e5f74696d6594473ff800000000000075622e";
const OURS_MIXED_STATE: &str = "80049570000000000000008c11656c61737469635f74696d65722e617069948c0c54696d6572526571756573749493942981947d948c0f65787069726174696f6e5f74696d6594473ff8000000000000737d94288c09776f726b65725f6964944dd2048c0873636f70655f6964948c0573636f706594758694622e";

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex fixture"))
        .collect()
}

/// Whole pickles of requests, for the tests that cut and mutate them.
const REQUESTS: [&str; 15] = [
    TORCH_P2,
    TORCH_P3,
    TORCH_P4,
    TORCH_P5,
    TORCH_RELEASE,
    TORCH_BIG_PID,
    TORCH_NEG_PID,
    TORCH_UNICODE,
    TORCH_FILE,
    TORCH_FILE_P2,
    TORCH_2_9_FILE,
    OURS,
    OURS_FILE,
    OURS_DICT_STATE,
    OURS_MIXED_STATE,
];

#[test]
fn decodes_timer_requests() {
    let cases = [
        (TORCH_P2, request(1234, "scope", 1700000000.123456, SIGKILL)),
        (TORCH_P3, request(1234, "scope", 1700000000.123456, SIGKILL)),
        (TORCH_P4, request(1234, "scope", 1700000000.123456, SIGKILL)),
        (TORCH_P5, request(1234, "scope", 1700000000.123456, SIGKILL)),
        (TORCH_RELEASE, request(1234, "scope", -1.0, SIGKILL)),
        (TORCH_BIG_PID, request((1 << 40) + 5, "scope", 1.5, SIGKILL)),
        (TORCH_NEG_PID, request(-7, "scope", 1.5, SIGKILL)),
        (TORCH_UNICODE, request(1234, "é中😀\n\"", 1.5, SIGKILL)),
        (TORCH_FILE, request(1234, "scope", 1.5, SIGKILL)),
        (TORCH_FILE_P2, request(1234, "scope", 1.5, SIGKILL)),
        (TORCH_2_9_FILE, request(1234, "scope", 1.5, SIGKILL)),
        (OURS, request(1234, "scope", 1.5, SIGKILL)),
        (OURS_FILE, request(1234, "scope", 1.5, SIGKILL)),
        (OURS_DICT_STATE, request(1234, "scope", 1.5, SIGKILL)),
        (OURS_MIXED_STATE, request(1234, "scope", 1.5, SIGKILL)),
    ];
    for (hex, expected) in cases {
        assert_eq!(decode_pickle(&unhex(hex)), Ok(expected), "{hex}");
    }
    assert!(decode_pickle(&unhex(TORCH_RELEASE)).is_ok_and(|r| r.is_release()));
    // As pickle.loads does, ignore what follows STOP.
    let trailing = [unhex(TORCH_P4), b"junk".to_vec()].concat();
    assert!(decode_pickle(&trailing).is_ok());
    assert_eq!(SIGKILL, 9);
}

#[test]
fn long1_is_read_as_twos_complement() {
    let int = |bytes: &[u8]| match long(bytes) {
        Value::Int(int) => Some(int),
        _ => None,
    };
    assert_eq!(int(&[]), Some(0));
    assert_eq!(int(&[0xff]), Some(-1));
    assert_eq!(int(&[0x00, 0x80]), Some(-32768));
    assert_eq!(int(&[0xff, 0x00]), Some(255));
    assert_eq!(int(&[0xff; 8]), Some(-1));
    assert_eq!(int(&[0xff; 12]), Some(-1));
    assert_eq!(int(&[0, 0, 0, 0, 0, 0, 0, 0x80]), Some(i64::MIN));
    assert_eq!(int(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0]), Some(i64::MAX));
    assert_eq!(int(&[0, 0, 0, 0, 0, 0, 0, 0x80, 0]), None); // 2**63
    assert_eq!(int(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0xff]), None);
    assert_eq!(int(&[0, 0, 0, 0, 0, 0, 0, 0, 1]), None);
}

#[test]
fn pickle_refusals_say_why() {
    let posix_system =
        || CodecError::UnsupportedClass { module: "posix".into(), name: "system".into() };
    let cases = [
        (OS_SYSTEM, posix_system()),
        (OS_SYSTEM_P2, posix_system()),
        (PID_STR, mistyped("worker_id", "an int", "a str")),
        (PID_BOOL, mistyped("worker_id", "an int", "a bool")),
        (SCOPE_INT, mistyped("scope_id", "a str", "an int")),
        (EXPIRATION_STR, mistyped("expiration_time", "an int or a float", "a str")),
        (EXPIRATION_NONE, mistyped("expiration_time", "an int or a float", "None")),
        (NO_EXPIRATION, CodecError::MissingKey("expiration_time")),
        (TORCH_HUGE_PID, CodecError::OutOfRange { key: "worker_id" }),
        (
            A_DICT,
            CodecError::UnsupportedPickle("the pickle holds a dict, not a TimerRequest".into()),
        ),
    ];
    for (hex, expected) in cases {
        assert_eq!(decode_pickle(&unhex(hex)), Err(expected), "{hex}");
    }
}

#[test]
fn hostile_pickles_are_refused_within_bounds() {
    let unsupported = |what: &str| Err(CodecError::UnsupportedPickle(what.into()));
    let invalid = |why: &str| Err(CodecError::InvalidPickle(why.into()));
    let spam = |op: &[u8], times: usize| [&b"\x80\x04"[..], &op.repeat(times), b"."].concat();
    let memo_spam: Vec<u8> =
        (0..100u32).flat_map(|i| [&b"r"[..], &i.to_le_bytes()].concat()).collect();
    let cases: [(Vec<u8>, Result<Request, CodecError>); 18] = [
        (
            b"".to_vec(),
            unsupported("no PROTO opcode (protocols 0 and 1 are not supported) at offset 0"),
        ),
        (
            b"cos\nsystem\n(S'echo'\ntR.".to_vec(),
            unsupported("no PROTO opcode (protocols 0 and 1 are not supported) at offset 0"),
        ),
        (b"\x80\x01N.".to_vec(), unsupported("protocol 1 at offset 0")),
        (b"\x80\x06N.".to_vec(), unsupported("protocol 6 at offset 0")),
        (b"\x80\x04NN\x52.".to_vec(), unsupported("opcode 0x52 at offset 4")),
        (
            b"\x80\x04cos\nsystem\n.".to_vec(),
            Err(CodecError::UnsupportedClass { module: "os".into(), name: "system".into() }),
        ),
        (
            b"\x80\x04X\xff\xff\xff\xff".to_vec(),
            unsupported("string longer than 65536 bytes at offset 2"),
        ),
        (
            b"\x80\x04\x8d\xff\xff\xff\xff\xff\xff\xff\xff".to_vec(),
            unsupported("string longer than 65536 bytes at offset 2"),
        ),
        (b"\x80\x04\x8c\x02\xff\xfe.".to_vec(), invalid("invalid UTF-8 at offset 2")),
        (spam(b"(", 100), unsupported("more than 64 stack entries at offset 66")),
        (spam(b"N", 100), unsupported("more than 64 stack entries at offset 66")),
        (
            [&b"\x80\x04N"[..], &memo_spam, b"."].concat(),
            unsupported("more than 64 memo entries at offset 323"),
        ),
        (
            [&b"\x80\x04]"[..], &spam(b"(NNNNNNNNNNNNNNNNNNNNe", 10)[2..]].concat(),
            unsupported("more than 128 items in a container at offset 156"),
        ),
        (b"\x80\x04))\x85.".to_vec(), unsupported("nested tuple at offset 4")),
        (b"\x80\x04]]a.".to_vec(), unsupported("nested container at offset 4")),
        (b"\x80\x04h\x05.".to_vec(), invalid("memo entry 5 not found at offset 2")),
        (b"\x80\x04N(\x85.".to_vec(), invalid("stack underflow at offset 4")),
        (b"\x80\x04N}b.".to_vec(), invalid("BUILD without a fresh TimerRequest at offset 4")),
    ];
    for (pickle, expected) in cases {
        assert_eq!(decode_pickle(&pickle), expected, "{}", pickle.escape_ascii());
    }
    for pickle in [
        &b"\x80\x04."[..],
        b"\x80\x04N)\x81.",
        b"\x80\x04]NNs.",
        b"\x80\x04}Na.",
        b"\x80\x04}(Nu.",
        b"\x80\x04N\x8c\x01a\x93.",
        b"\x80\x04t.",
        b"\x80\x04\x8c\x11elastic_timer.api\x8c\x0cTimerRequest\x93)\x81NbNb.",
    ] {
        assert!(
            matches!(decode_pickle(pickle), Err(CodecError::InvalidPickle(_))),
            "{}",
            pickle.escape_ascii()
        );
    }
    // An object as another's state: with the memo, that could nest without bound.
    let class = b"\x8c\x11elastic_timer.api\x8c\x0cTimerRequest\x93";
    let fresh = [class, &b")\x81"[..]].concat();
    assert_eq!(
        decode_pickle(&[&b"\x80\x04"[..], &fresh, &fresh, b"b."].concat()),
        unsupported("BUILD with a TimerRequest as state at offset 74")
    );
    // An object BUILD never gave state has none of its fields.
    let bare = b"\x80\x04\x8c\x11elastic_timer.api\x8c\x0cTimerRequest\x93)\x81.";
    assert_eq!(decode_pickle(bare), Err(CodecError::MissingKey("worker_id")));
}

#[test]
fn truncated_pickles_are_errors() {
    for hex in REQUESTS {
        let pickle = unhex(hex);
        for len in 0..pickle.len() {
            let truncated = &pickle[..len];
            assert!(decode_pickle(truncated).is_err(), "{hex} cut at {len}");
        }
    }
}

/// Bytes a fuzzed pickle is made of: every supported opcode and a few arguments.
const PICKLE_SOUP: &[u8] = b"\x80\x95.(c\x93\x8cX\x8d\x94qrhj)t\x85\x86\x87}su]aeN\x88\x89JKM\x8aG\x81b\x00\x01\x02\x05\n\xff";

proptest! {
    #[test]
    fn pickles_never_panic(payload in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_pickle(&payload);
    }

    #[test]
    fn opcode_soup_never_panics(soup in prop::collection::vec(prop::sample::select(PICKLE_SOUP), 0..256)) {
        let _ = decode_pickle(&[&b"\x80\x04"[..], &soup].concat());
    }

    #[test]
    fn mutated_pickles_never_panic(
        fixture in prop::sample::select(&REQUESTS[..]),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut pickle = unhex(fixture);
        for (at, byte) in edits {
            let at = at.index(pickle.len());
            pickle[at] = byte;
        }
        let _ = decode_pickle(&pickle);
    }
}

#[test]
fn encoded_frames_decode_to_the_same_request() {
    for (pid, scope, expiration) in [
        (4242_i64, "step", Number::Float(1.5)),
        (7, "é 中 😀", Number::Int(-1)),
        (1_i64 << 40, "", Number::Float(f64::INFINITY)),
        (-3, "x", Number::Int(i64::MAX)),
    ] {
        let mut frame = Vec::new();
        encode_pickle_frame(pid, scope, expiration, &mut frame);
        let size = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(size, frame.len() - 4);
        let decoded = decode_pickle(&frame[4..]).expect("decodes");
        let expected = match expiration {
            Number::Int(value) => value as f64,
            Number::Float(value) => value,
        };
        assert_eq!(
            (decoded.pid, decoded.scope.as_str(), decoded.expiration),
            (pid, scope, expected)
        );
    }
}
