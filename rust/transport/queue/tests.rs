use super::*;
use std::mem::MaybeUninit;

/// An unnamed semaphore standing in for one of a Python queue's.
struct TestSemaphore(Box<MaybeUninit<libc::sem_t>>);

impl TestSemaphore {
    fn new(value: u32) -> Self {
        let mut sem = Box::new(MaybeUninit::uninit());
        // SAFETY: a fresh, process-private semaphore.
        assert_eq!(unsafe { libc::sem_init(sem.as_mut_ptr(), 0, value) }, 0);
        Self(sem)
    }

    fn handle(&mut self) -> Semaphore {
        // SAFETY: the test keeps the semaphore alive longer than the reader.
        unsafe { Semaphore::from_raw(self.0.as_mut_ptr()) }
    }

    fn value(&mut self) -> i32 {
        let mut value = 0;
        // SAFETY: initialised above.
        unsafe { libc::sem_getvalue(self.0.as_mut_ptr(), &mut value) };
        value
    }
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as i32).to_be_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

fn setup() -> (OwnedFd, OwnedFd, TestSemaphore, TestSemaphore) {
    let (read, write) = rustix::pipe::pipe().expect("pipe");
    (read, write, TestSemaphore::new(1), TestSemaphore::new(0))
}

fn collect(reader: &mut Reader) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    reader
        .read_frames(|frame| match frame {
            Frame::Payload(bytes) => frames.push(bytes.to_vec()),
            Frame::TooLarge(n) => frames.push(format!("<{n}>").into_bytes()),
            Frame::Corrupt { claimed, dropped } => {
                frames.push(format!("<corrupt {claimed}, dropped {dropped}>").into_bytes())
            }
        })
        .expect("read");
    frames
}

#[test]
fn a_reader_marks_its_queue_for_either_end_until_it_unmarks() {
    let (read, write, mut lock, mut items) = setup();
    let mut reader = Reader::new(read.as_fd(), lock.handle(), items.handle()).expect("reader");
    assert!(!Mark::is_on(write.as_fd()));
    reader.mark().expect("mark");
    assert!(Mark::is_on(write.as_fd()) && Mark::is_on(read.as_fd()));
    assert!(Mark::claim(write.as_fd()).is_err(), "one mark per queue");
    let (other, _) = rustix::pipe::pipe().expect("pipe");
    assert!(!Mark::is_on(other.as_fd()), "another queue is not marked");
    reader.unmark();
    assert!(!Mark::is_on(write.as_fd()));
}

#[test]
fn a_writer_arms_its_ring_only_on_a_marked_queue_and_announces_in_a_release() {
    use crate::ring::Channel;
    let (read, write, mut lock, mut items) = setup();
    let mut wlock = TestSemaphore::new(1);
    let mut slots = TestSemaphore::new(10);
    let unmarked = Writer::new(write.as_fd(), wlock.handle(), slots.handle()).expect("writer");
    assert!(!unmarked.ring.is_armed());
    let mut reader = Reader::new(read.as_fd(), lock.handle(), items.handle()).expect("reader");
    reader.mark().expect("mark");
    let marked = Writer::new(write.as_fd(), wlock.handle(), slots.handle()).expect("writer");
    assert!(marked.ring.is_armed());
    assert!(marked.announce(1234, 7) && marked.wake());
    let frames = collect(&mut reader);
    let requests: Vec<_> =
        frames.iter().map(|f| codec::decode_pickle(f).expect("a TimerRequest")).collect();
    assert_eq!(requests[0].expiration, -1.0);
    assert_eq!(ring::parse_announcement(requests[0].scope.as_bytes()), Some(Ok((1234, 7))));
    assert_eq!(requests[1].scope, RING_WAKE);
    assert_eq!(requests[1].expiration, -1.0);
}

#[test]
fn a_wake_waits_for_another_writers_lock() {
    use crate::ring::Channel;
    let (read, write, mut lock, mut items) = setup();
    let mut wlock = TestSemaphore::new(0); // another writer holds it
    let mut slots = TestSemaphore::new(10);
    let writer = Writer::new(write.as_fd(), wlock.handle(), slots.handle()).expect("writer");
    let held = wlock.handle();
    let other = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(2));
        held.post().expect("post");
    });
    assert!(writer.wake());
    other.join().expect("other writer");
    let mut reader = Reader::new(read.as_fd(), lock.handle(), items.handle()).expect("reader");
    let frames = collect(&mut reader);
    assert_eq!(frames.len(), 1, "the wake went out once the lock was free");
    assert_eq!(codec::decode_pickle(&frames[0]).expect("request").scope, RING_WAKE);
}

#[test]
fn reads_frames_and_gives_back_one_item_each() {
    let (read, write, mut lock, mut items) = setup();
    let mut reader = Reader::new(read.as_fd(), lock.handle(), items.handle()).expect("reader");
    assert!(collect(&mut reader).is_empty());
    let bytes = [frame(b"first"), frame(b""), frame(b"third")].concat();
    rustix::io::write(&write, &bytes).expect("write");
    assert_eq!(collect(&mut reader), [b"first".to_vec(), vec![], b"third".to_vec()]);
    assert_eq!(items.value(), 3, "one post per frame");
    assert_eq!(lock.value(), 1, "the read lock is given back");
}

#[test]
fn a_frame_split_across_writes_is_reassembled_without_waiting_for_its_rest() {
    let (read, write, mut lock, mut items) = setup();
    let mut reader = Reader::new(read.as_fd(), lock.handle(), items.handle()).expect("reader");
    let bytes = frame(b"0123456789");
    rustix::io::write(&write, &bytes[..6]).expect("write");
    // The rest never comes yet: the reader returns at once, holding the read lock so that
    // no other reader takes the rest of the frame for a frame of its own.
    assert!(collect(&mut reader).is_empty());
    assert_eq!((lock.value(), items.value()), (0, 0));
    assert!(collect(&mut reader).is_empty(), "it reads on while holding the lock");
    rustix::io::write(&write, &bytes[6..]).expect("write");
    assert_eq!(collect(&mut reader), [b"0123456789".to_vec()]);
    assert_eq!((lock.value(), items.value()), (1, 1), "the lock is given back");
}

#[test]
fn a_reader_dropped_mid_frame_gives_the_read_lock_back() {
    let (read, write, mut lock, mut items) = setup();
    let mut reader = Reader::new(read.as_fd(), lock.handle(), items.handle()).expect("reader");
    rustix::io::write(&write, &frame(b"0123456789")[..3]).expect("write");
    collect(&mut reader);
    assert_eq!(lock.value(), 0);
    drop(reader);
    assert_eq!(lock.value(), 1);
}

#[test]
fn an_absurd_length_is_corruption_and_the_stream_gets_back_in_step() {
    let (read, write, mut lock, mut items) = setup();
    let mut reader = Reader::new(read.as_fd(), lock.handle(), items.handle()).expect("reader");
    let mut long = (-1i32).to_be_bytes().to_vec();
    long.extend_from_slice(&u64::MAX.to_be_bytes());
    for header in [i32::MAX.to_be_bytes().to_vec(), long] {
        // The absurd header, what came with it, and a frame written before the read.
        let bytes = [header.as_slice(), b"junk", &frame(b"lost")].concat();
        rustix::io::write(&write, &bytes).expect("write");
        let claimed = if header.len() == 4 { i32::MAX as u64 } else { u64::MAX };
        let dropped = bytes.len() - header.len();
        let corrupt = format!("<corrupt {claimed}, dropped {dropped}>").into_bytes();
        assert_eq!(collect(&mut reader), [corrupt]);
        assert_eq!(lock.value(), 1, "nothing is held for the rest of a corrupt frame");
        rustix::io::write(&write, &frame(b"after")).expect("write");
        assert_eq!(collect(&mut reader), [b"after".to_vec()]);
    }
    assert_eq!(items.value(), 4, "one item each for the corruption and the frame after it");
}

#[test]
fn the_largest_claim_is_still_a_frame_skipped() {
    let (read, write, mut lock, mut items) = setup();
    let mut reader = Reader::new(read.as_fd(), lock.handle(), items.handle()).expect("reader");
    let claim = u32::try_from(MAX_CLAIMED).expect("small").to_be_bytes();
    rustix::io::write(&write, &claim).expect("write");
    assert_eq!(collect(&mut reader), [format!("<{MAX_CLAIMED}>").into_bytes()]);
    assert_eq!(lock.value(), 0, "held while the frame is skipped");
}

#[test]
fn an_oversized_frame_is_skipped_and_the_stream_stays_in_step() {
    let (read, write, mut lock, mut items) = setup();
    let mut reader = Reader::new(read.as_fd(), lock.handle(), items.handle()).expect("reader");
    let big = vec![7u8; MAX_FRAME + 1];
    let writer = std::thread::spawn(move || {
        let bytes = [frame(&big), frame(b"after")].concat();
        let mut rest = bytes.as_slice();
        while !rest.is_empty() {
            let n = rustix::io::write(&write, rest).expect("write");
            rest = &rest[n..];
        }
    });
    let mut got = Vec::new();
    while got.len() < 2 {
        got.extend(collect(&mut reader));
    }
    writer.join().expect("writer");
    assert_eq!(got, [format!("<{}>", MAX_FRAME + 1).into_bytes(), b"after".to_vec()]);
    assert_eq!(items.value(), 2);
}

#[test]
fn long_headers_are_understood() {
    let (read, write, mut lock, mut items) = setup();
    let mut reader = Reader::new(read.as_fd(), lock.handle(), items.handle()).expect("reader");
    let mut bytes = (-1i32).to_be_bytes().to_vec();
    bytes.extend_from_slice(&3u64.to_be_bytes());
    bytes.extend_from_slice(b"abc");
    rustix::io::write(&write, &bytes).expect("write");
    assert_eq!(collect(&mut reader), [b"abc".to_vec()]);
}

#[test]
fn a_held_read_lock_defers_reading() {
    let (read, write, mut lock, mut items) = setup();
    let mut reader = Reader::new(read.as_fd(), lock.handle(), items.handle()).expect("reader");
    rustix::io::write(&write, &frame(b"x")).expect("write");
    // Someone else (a Python `get`) holds the lock.
    assert!(lock.handle().wait_for(Duration::ZERO).expect("take"));
    assert!(collect(&mut reader).is_empty());
    assert_eq!(items.value(), 0);
    lock.handle().post().expect("give back");
    assert_eq!(collect(&mut reader), [b"x".to_vec()]);
}

#[test]
fn a_writer_frames_what_a_reader_reads_and_keeps_the_count() {
    let (read, write, mut lock, mut items) = setup();
    let mut write_lock = TestSemaphore::new(1);
    let mut slots = TestSemaphore::new(2); // a queue with maxsize=2
    let writer = Writer::new(write.as_fd(), write_lock.handle(), slots.handle()).expect("writer");
    writer.send(&frame(b"one"), Duration::from_millis(50)).expect("send");
    writer.send(&frame(b"two"), Duration::from_millis(50)).expect("send");
    assert_eq!(slots.value(), 0);
    // Full: the third waits for a slot, then gives up.
    assert!(matches!(
        writer.send(&frame(b"three"), Duration::from_millis(20)),
        Err(SendError::Timeout(_))
    ));
    assert_eq!(write_lock.value(), 1, "the write lock is given back");
    let mut reader = Reader::new(read.as_fd(), lock.handle(), slots.handle()).expect("reader");
    assert_eq!(collect(&mut reader), [b"one".to_vec(), b"two".to_vec()]);
    assert_eq!(slots.value(), 2, "reading gives the slots back");
    assert_eq!(items.value(), 0);
    assert!(matches!(
        writer.send(&vec![0; libc::PIPE_BUF + 1], Duration::ZERO),
        Err(SendError::TooLarge(_))
    ));
}

#[test]
fn the_transport_reads_requests_and_ring_offers_but_no_wake_ups() {
    let (read, write, mut lock, mut items) = setup();
    let mut reader = Reader::new(read.as_fd(), lock.handle(), items.handle()).expect("reader");
    let offer = String::from_utf8(ring::announcement(4321, 9)).expect("utf-8");
    let mut bytes = Vec::new();
    codec::encode_pickle_frame(4321, "train", Number::Float(12.5), &mut bytes);
    codec::encode_pickle_frame(4321, offer.trim_end(), Number::Int(-1), &mut bytes);
    codec::encode_pickle_frame(4321, RING_WAKE, Number::Int(-1), &mut bytes);
    bytes.extend(frame(b"not a pickle"));
    rustix::io::write(&write, &bytes).expect("write");
    let mut arrivals = Vec::new();
    assert_eq!(Transport::read(&mut reader, &mut arrivals).expect("read"), 4);
    assert!(
        matches!(&arrivals[..], [
            Arrival::Request(request),
            Arrival::Ring(Ok((4321, 9))),
            Arrival::Malformed(_),
        ] if request.pid == 4321 && request.scope == "train" && request.expiration == 12.5),
        "{arrivals:?}"
    );
    assert_eq!(items.value(), 4, "the wake-up is taken off the queue too");
}
