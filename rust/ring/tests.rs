use super::*;

fn accepted() -> (Writer, Reader) {
    let writer = Writer::create().unwrap();
    let reader = Reader::open(writer.memfd.try_clone().unwrap()).unwrap();
    reader.set_state(ACCEPTED);
    (writer, reader)
}

#[test]
fn entries_arrive_in_order_across_the_wrap() {
    let (mut writer, mut reader) = accepted();
    let mut expected = std::collections::VecDeque::new();
    let check = |reader: &mut Reader, expected: &mut std::collections::VecDeque<Entry>| {
        let (got, error) = reader.drain();
        assert_eq!(error, None);
        for entry in got {
            assert_eq!(Some(entry), expected.pop_front());
        }
    };
    for i in 0..20_000 {
        let scope = format!("scope {i} {}", "x".repeat(i % 50));
        let entry = Entry { scope, expiration: i as f64, signal: (i % 3) as i32 };
        while writer.push(entry.scope.as_bytes(), entry.expiration, entry.signal, false)
            == Push::Full
        {
            check(&mut reader, &mut expected);
        }
        expected.push_back(entry);
    }
    check(&mut reader, &mut expected);
    assert!(expected.is_empty());
}

#[test]
fn a_full_ring_says_so_and_an_unaccepted_one_is_closed() {
    let mut writer = Writer::create().unwrap();
    assert_eq!(writer.push(b"s", 1.0, 9, false), Push::Closed);
    let reader = Reader::open(writer.memfd.try_clone().unwrap()).unwrap();
    reader.set_state(ACCEPTED);
    let mut written = 0;
    while let Push::Written { .. } = writer.push(&[b'a'; 100], 1.0, 9, false) {
        written += 1;
    }
    assert_eq!(written, CAPACITY / entry_len(100));
    assert_eq!(writer.push(&[b'a'; 100], 1.0, 9, false), Push::Full);
    assert_eq!(writer.push(&[b'a'; MAX_SCOPE + 1], 1.0, 9, false), Push::TooLong);
}

#[test]
fn the_lease_and_near_deadlines_decide_the_wake() {
    let (mut writer, reader) = accepted();
    assert_eq!(writer.push(b"s", 1.0, 9, false), Push::Written { wake: true });
    reader.set_lease(monotonic_ns() + 60_000_000_000);
    assert_eq!(writer.push(b"s", 1.0, 9, false), Push::Written { wake: false });
    assert_eq!(writer.push(b"s", 1.0, 9, true), Push::Written { wake: true });
}

#[test]
fn a_taken_or_foreign_file_is_refused() {
    let (writer, _reader) = accepted();
    assert!(Reader::open(writer.memfd.try_clone().unwrap()).unwrap_err().contains("taken"));
    let file = tempfile::tempfile().unwrap();
    file.set_len(RING_BYTES as u64).unwrap();
    assert!(Reader::open(file.into()).unwrap_err().contains("memfd"));
}

#[test]
fn garbage_yields_the_entries_before_it_and_an_error() {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&2u32.to_le_bytes());
    bytes.extend_from_slice(&15i32.to_le_bytes());
    bytes.extend_from_slice(&5.0f64.to_le_bytes());
    bytes.extend_from_slice(b"ok\0\0\0\0\0\0");
    bytes.extend_from_slice(&9999u32.to_le_bytes());
    bytes.extend_from_slice(&[0; 12]);
    let (entries, error) = parse(&bytes, 0, CAPACITY);
    assert_eq!(entries, vec![Entry { scope: "ok".into(), expiration: 5.0, signal: 15 }]);
    assert!(error.unwrap().contains("9999"));
    let (_, error) = parse(
        &[0xff, 0xfe, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0, 0, 0, 0, 0, 0, 0],
        0,
        CAPACITY,
    );
    assert!(error.is_some());
}

#[test]
fn announcements_round_trip_and_others_are_not_ones() {
    let line = announcement(1234, 7);
    assert_eq!(parse_announcement(&line[..line.len() - 1]), Some(Ok((1234, 7))));
    assert_eq!(parse_announcement(br#"{"version": 1, "pid": 5}"#), None);
    assert!(matches!(parse_announcement(br#"{"elastic_timer_ring": 1, "pid": 5}"#), Some(Err(_))));
}
