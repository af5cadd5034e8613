use super::*;
use crate::codec::test_support::{mistyped, request};
use proptest::prelude::*;

#[test]
fn decodes_torch_lines() {
    let line = br#"{"version": 1, "pid": 1234, "scope_id": "train step \ud83d\ude00", "expiration_time": 1700000000.123456, "signal": 9}"#;
    assert_eq!(decode_json_line(line), Ok(request(1234, "train step 😀", 1700000000.123456, 9)));
    let release = decode_json_line(
        br#"{"version": 1, "pid": -5, "scope_id": "s", "expiration_time": -1, "signal": 0}"#,
    );
    assert_eq!(release, Ok(request(-5, "s", -1.0, 0)));
    assert!(release.is_ok_and(|r| r.is_release()));
}

#[test]
fn json_is_read_as_python_reads_it() {
    let cases: &[(&[u8], Request)] = &[
        // Any key order, unknown keys ignored, no version needed, whitespace around.
        (
            b" {\"signal\":15,\"extra\":[{\"x\":null}],\"expiration_time\":2,\"scope_id\":\"\",\"pid\":7} \r\n",
            request(7, "", 2.0, 15),
        ),
        // Duplicate keys: the last wins, even over a value of the wrong type.
        (
            br#"{"pid": true, "pid": 2, "scope_id": 3, "scope_id": "\u00e9\n", "expiration_time": 1, "signal": 9}"#,
            request(2, "é\n", 1.0, 9),
        ),
        (
            br#"{"pid": 1, "scope_id": "s", "expiration_time": -Infinity, "signal": -9}"#,
            request(1, "s", f64::NEG_INFINITY, -9),
        ),
        (
            br#"{"pid": 1, "scope_id": "s", "expiration_time": 1e400, "signal": 2147483647}"#,
            request(1, "s", f64::INFINITY, i32::MAX),
        ),
        (
            br#"{"pid": -9223372036854775808, "scope_id": "s", "expiration_time": -0.0, "signal": -0}"#,
            request(i64::MIN, "s", -0.0, 0),
        ),
    ];
    for (line, expected) in cases {
        assert_eq!(decode_json_line(line).as_ref(), Ok(expected), "{}", line.escape_ascii());
    }
    let nan = br#"{"pid": 1, "scope_id": "s", "expiration_time": NaN, "signal": 9}"#;
    assert!(decode_json_line(nan).is_ok_and(|r| r.expiration.is_nan() && !r.is_release()));
}

#[test]
fn json_refusals_say_why() {
    let invalid = |line: &[u8]| matches!(decode_json_line(line), Err(CodecError::InvalidJson(_)));
    let deep = [b"{\"a\": ".repeat(10_000), b"1".to_vec(), b"}".repeat(10_000)].concat();
    for line in [
        &b""[..],
        b"   ",
        b"{",
        br#"{"pid": 1, "scope_id": "s", "expiration_time": 1, "signal": 9"#,
        br#"{"pid": 1, "scope_id": "s", "expiration_time": 1, "signal": 9} x"#,
        br#"{"pid": 1, "scope_id": "s", "expiration_time": 1, "signal": 9}{}"#,
        br#"{"pid": 01}"#,
        br#"{"pid": 1,}"#,
        br#"{"pid": +1}"#,
        br#"{"pid": 1, "scope_id": "\ud800", "expiration_time": 1, "signal": 9}"#,
        b"{\"pid\": 1, \"scope_id\": \"\xff\", \"expiration_time\": 1, \"signal\": 9}",
        b"{\"pid\": 1, \"scope_id\": \"a\tb\", \"expiration_time\": 1, \"signal\": 9}",
        b"\xef\xbb\xbf{}",
        &deep,
        b"hello",
    ] {
        assert!(invalid(line), "{}", line.escape_ascii());
    }
    // A valid line with `key` set to the JSON `value`, or left out if `value` is empty.
    let with = |key: &str, value: &str| {
        let fields: Vec<String> =
            [("pid", "1"), ("scope_id", r#""s""#), ("expiration_time", "1.5"), ("signal", "9")]
                .into_iter()
                .map(|(k, v)| (k, if k == key { value } else { v }))
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| format!("\"{k}\": {v}"))
                .collect();
        format!("{{{}}}", fields.join(", ")).into_bytes()
    };
    let cases = [
        (b"[]".to_vec(), CodecError::NotAnObject),
        (b" \"{}\" ".to_vec(), CodecError::NotAnObject),
        (b"1".to_vec(), CodecError::NotAnObject),
        (with("pid", ""), CodecError::MissingKey("pid")),
        (with("scope_id", ""), CodecError::MissingKey("scope_id")),
        (with("expiration_time", ""), CodecError::MissingKey("expiration_time")),
        (with("signal", ""), CodecError::MissingKey("signal")),
        (with("pid", "true"), mistyped("pid", "an int", "a bool")),
        (with("pid", "1.0"), mistyped("pid", "an int", "a float")),
        (with("pid", r#""1""#), mistyped("pid", "an int", "a str")),
        (with("pid", "null"), mistyped("pid", "an int", "None")),
        (with("pid", "9223372036854775808"), CodecError::OutOfRange { key: "pid" }),
        (with("pid", "1e3"), mistyped("pid", "an int", "a float")),
        (with("scope_id", "5"), mistyped("scope_id", "a str", "an int")),
        (with("scope_id", r#"["s"]"#), mistyped("scope_id", "a str", "a list")),
        (with("scope_id", "{}"), mistyped("scope_id", "a str", "a dict")),
        (
            with("expiration_time", "false"),
            mistyped("expiration_time", "an int or a float", "a bool"),
        ),
        (
            with("expiration_time", r#""1""#),
            mistyped("expiration_time", "an int or a float", "a str"),
        ),
        (
            with("expiration_time", "123456789012345678901234567890"),
            CodecError::OutOfRange { key: "expiration_time" },
        ),
        (with("signal", "2147483648"), CodecError::OutOfRange { key: "signal" }),
        (with("signal", "-2147483649"), CodecError::OutOfRange { key: "signal" }),
        (with("signal", "9.0"), mistyped("signal", "an int", "a float")),
    ];
    for (line, expected) in cases {
        assert_eq!(decode_json_line(&line), Err(expected), "{}", line.escape_ascii());
    }
}

#[test]
fn error_messages_read_well() {
    let message = |line: &[u8]| decode_json_line(line).map_err(|e| e.to_string()).err();
    assert_eq!(
        message(br#"{"pid": "1", "scope_id": "s", "expiration_time": 1, "signal": 9}"#).as_deref(),
        Some("pid must be an int, not a str")
    );
    assert_eq!(message(br#"{"pid": 1}"#).as_deref(), Some("scope_id is missing"));
    assert_eq!(
        message(b"{\"pid\": 1} x").as_deref(),
        Some("invalid JSON: trailing characters at index 11")
    );
    assert_eq!(
        CodecError::UnsupportedClass {
            module: "posix".into(),
            name: "system".into()
        }
        .to_string(),
        "refusing to unpickle \"posix\".\"system\": only TimerRequest and FileTimerRequest are accepted"
    );
}

/// `(x, json.dumps(x))` from CPython 3.11.
const PYTHON_FLOATS: &[(f64, &str)] = &[
    (0.1, "0.1"),
    (1e16, "1e+16"),
    (9999999999999998.0, "9999999999999998.0"),
    (1e-5, "1e-05"),
    (5e-324, "5e-324"),
    (1.7976931348623157e308, "1.7976931348623157e+308"),
    (123456789.123, "123456789.123"),
    (-0.0, "-0.0"),
    (0.0, "0.0"),
    (1e22, "1e+22"),
    (1.0, "1.0"),
    (0.0001, "0.0001"),
    (0.00012345, "0.00012345"),
    (1700000000.123456, "1700000000.123456"),
    (-1.5, "-1.5"),
    (1.5e-5, "1.5e-05"),
    (1.2345e100, "1.2345e+100"),
    (2.5e-310, "2.5e-310"),
    (1e15, "1000000000000000.0"),
    (1.2345678901234568e17, "1.2345678901234568e+17"),
    (f64::INFINITY, "Infinity"),
    (f64::NEG_INFINITY, "-Infinity"),
    (f64::NAN, "NaN"),
    (0.3333333333333333, "0.3333333333333333"),
    (9007199254740992.0, "9007199254740992.0"),
    (9.9999e-5, "9.9999e-05"),
    (100.0, "100.0"),
    (1.2345678901234568e16, "1.2345678901234568e+16"),
    // A tie between two shortest strings: repr takes the even digit.
    (-1113178120592002.2, "-1113178120592002.2"),
    (-33714033845255.812, "-33714033845255.812"),
];

#[test]
fn floats_are_written_as_python_repr() {
    for &(x, python) in PYTHON_FLOATS {
        let mut out = Vec::new();
        push_float_repr(x, &mut out);
        assert_eq!(String::from_utf8_lossy(&out), python, "{x:e}");
    }
}

#[test]
fn strings_are_escaped_as_python_does() {
    // `(s, json.dumps(s))` from CPython 3.11.
    let cases = [
        ("", r#""""#),
        ("scope", r#""scope""#),
        ("a\"b", r#""a\"b""#),
        ("back\\slash", r#""back\\slash""#),
        ("\n\r\t\u{8}\u{c}", r#""\n\r\t\b\f""#),
        ("\0\u{1}\u{1f}", r#""\u0000\u0001\u001f""#),
        ("\u{7f}", r#""\u007f""#),
        ("~ ", r#""~ ""#),
        ("é", r#""\u00e9""#),
        ("中", r#""\u4e2d""#),
        ("😀", r#""\ud83d\ude00""#),
        ("mix é中😀 \u{7f}\"\\", r#""mix \u00e9\u4e2d\ud83d\ude00 \u007f\"\\""#),
        ("\u{2028}\u{feff}", r#""\u2028\ufeff""#),
    ];
    for (s, python) in cases {
        let mut out = Vec::new();
        push_json_str(s, &mut out);
        assert_eq!(String::from_utf8_lossy(&out), python);
    }
}

#[test]
fn lines_are_written_as_torch_writes_them() {
    // `json.dumps({...}) + "\n"` from CPython 3.11.
    let cases = [
        (
            1234,
            "train step 😀",
            Number::Float(1700000000.123456),
            9,
            "{\"version\": 1, \"pid\": 1234, \"scope_id\": \"train step \\ud83d\\ude00\", \"expiration_time\": 1700000000.123456, \"signal\": 9}\n",
        ),
        (
            -5,
            "s",
            Number::Int(-1),
            0,
            "{\"version\": 1, \"pid\": -5, \"scope_id\": \"s\", \"expiration_time\": -1, \"signal\": 0}\n",
        ),
        (
            1,
            "s",
            Number::Float(f64::INFINITY),
            15,
            "{\"version\": 1, \"pid\": 1, \"scope_id\": \"s\", \"expiration_time\": Infinity, \"signal\": 15}\n",
        ),
    ];
    for (pid, scope, expiration, signal, python) in cases {
        let mut out = b"kept".to_vec();
        encode_json_line(pid, scope, expiration, signal, &mut out);
        assert_eq!(String::from_utf8_lossy(&out), format!("kept{python}"));
    }
}

fn finite() -> impl Strategy<Value = f64> {
    use proptest::num::f64::{NEGATIVE, NORMAL, POSITIVE, SUBNORMAL, ZERO};
    POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO
}

proptest! {
    #[test]
    fn json_lines_round_trip(pid: i64, scope: String, expiration in finite(), signal: i32) {
        let mut line = Vec::new();
        encode_json_line(pid, &scope, Number::Float(expiration), signal.into(), &mut line);
        prop_assert!(line.is_ascii());
        let decoded = decode_json_line(&line).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(decoded.pid, pid);
        prop_assert_eq!(decoded.scope, scope);
        prop_assert_eq!(decoded.expiration.to_bits(), expiration.to_bits());
        prop_assert_eq!(decoded.signal, signal);
    }

    #[test]
    fn json_never_panics(line in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_json_line(&line);
    }

    #[test]
    fn json_never_panics_near_valid(
        at in 0..90usize,
        junk in prop::collection::vec(prop::sample::select(&b"{}[]\":,-0123456789.eE+\\ufINaNtrnl \xff"[..]), 0..8),
    ) {
        let mut line = br#"{"pid": 1234, "scope_id": "s", "expiration_time": -1.5e3, "signal": 9}"#.to_vec();
        let at = at.min(line.len());
        line.splice(at..at, junk);
        let _ = decode_json_line(&line);
    }

    #[test]
    fn a_request_after_garbage_is_salvaged(
        garbage in prop::collection::vec(any::<u8>(), 0..512),
        pid: i64,
        scope: String,
        expiration in finite(),
        signal: i32,
    ) {
        let mut line = garbage.clone();
        encode_json_line(pid, &scope, Number::Float(expiration), signal.into(), &mut line);
        line.pop(); // the newline
        let salvaged = salvage_json_line(&line);
        if !garbage.is_empty() {
            let (skipped, request) = salvaged.expect("salvaged");
            prop_assert_eq!(skipped, garbage.len());
            prop_assert_eq!(request.pid, pid);
            prop_assert_eq!(request.scope, scope);
            prop_assert_eq!(request.signal, signal);
        }
        let _ = salvage_json_line(&garbage);
    }
}

#[test]
fn only_a_whole_request_at_the_end_of_a_line_is_salvaged() {
    let good = br#"{"version": 1, "pid": 7, "scope_id": "{\"version\": 2}", "expiration_time": 1.5, "signal": 15}"#;
    let glued = [&b"\x00garbage{\"version\" no newline"[..], good].concat();
    let (skipped, request) = salvage_json_line(&glued).expect("salvaged");
    assert_eq!(skipped, glued.len() - good.len());
    assert_eq!(request, self::request(7, "{\"version\": 2}", 1.5, 15));
    assert_eq!(salvage_json_line(good), None, "nothing before it: nothing to salvage");
    assert_eq!(salvage_json_line(&glued[..glued.len() - 1]), None, "a cut request");
    assert_eq!(salvage_json_line(b"junk{\"pid\": 7}"), None, "not torch's format");
}
