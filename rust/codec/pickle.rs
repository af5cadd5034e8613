//! Queue frames: a pickled `TimerRequest` from `LocalTimerClient`, read by a small restricted
//! machine that knows only the opcodes such an object needs and never imports or calls
//! anything (a class is only ever compared against four names); and written as `Queue.put`
//! writes them.

use std::collections::HashMap;
use std::rc::Rc;

use super::{int_field, number_field, str_field, CodecError, Number, Request, Value, SIGKILL};

/// Decodes one `multiprocessing.Queue` frame payload (the pickle after the 4-byte length
/// header) carrying a `TimerRequest` or `FileTimerRequest`, from torch or from us.
///
/// The Local transport always reaps with SIGKILL, so that is the signal returned. As with
/// `pickle.loads`, bytes after STOP are ignored. Never panics, and never allocates much more
/// than the payload's size.
pub fn decode_pickle(payload: &[u8]) -> Result<Request, CodecError> {
    let object = Machine::new(payload).run()?;
    let Value::Object(state) = object else {
        return Err(CodecError::UnsupportedPickle(format!(
            "the pickle holds {}, not a TimerRequest",
            object.kind()
        )));
    };
    // BUILD's state: a `__dict__`, or `(__dict__ or None, slots or None)` whose slots win.
    let bad_state = |kind: &str| {
        CodecError::UnsupportedPickle(format!(
            "TimerRequest state is {kind}, not a dict or a pair of dicts"
        ))
    };
    let (dict, slots) = match state.as_deref() {
        None => (None, None),
        Some(Value::Dict(dict)) => (Some(dict), None),
        Some(Value::Tuple(pair)) => match &pair[..] {
            [Value::Dict(dict), Value::Dict(slots)] => (Some(dict), Some(slots)),
            [Value::None, Value::Dict(slots)] => (None, Some(slots)),
            [Value::Dict(dict), Value::None] => (Some(dict), None),
            _ => return Err(bad_state("a tuple")),
        },
        Some(other) => return Err(bad_state(other.kind())),
    };
    let field = |key: &str| {
        [slots, dict].into_iter().flatten().find_map(|items| {
            // A pickled dict has unique keys; were one repeated, the last would win.
            items.chunks_exact(2).rev().find_map(|pair| match pair {
                [Value::Str(k), value] if &**k == key => Some(value),
                _ => None,
            })
        })
    };
    Ok(Request {
        // torch's FileTimerRequest kept its pid in a `worker_pid` slot of its own up to 2.9.
        pid: int_field("worker_id", field("worker_id").or_else(|| field("worker_pid")))?,
        scope: str_field("scope_id", field("scope_id"))?,
        expiration: number_field("expiration_time", field("expiration_time"))?,
        signal: SIGKILL,
    })
}

/// Appends one `multiprocessing.Queue` frame (4-byte big-endian length, then the pickle)
/// carrying `elastic_timer.api.TimerRequest(pid, scope, expiration)`, as `Queue.put` would
/// write it: torch's server and Python's `Queue.get` unpickle it like any other item.
pub fn encode_pickle_frame(pid: i64, scope: &str, expiration: Number, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    // Protocol 2: every Python that has multiprocessing reads it.
    out.extend_from_slice(b"\x80\x02celastic_timer.api\nTimerRequest\n)\x81N}(");
    push_pickle_str("worker_id", out);
    push_pickle_int(pid, out);
    push_pickle_str("scope_id", out);
    push_pickle_str(scope, out);
    push_pickle_str("expiration_time", out);
    match expiration {
        Number::Int(value) => push_pickle_int(value, out),
        Number::Float(value) => {
            out.push(b'G');
            out.extend_from_slice(&value.to_be_bytes());
        }
    }
    // SETITEMS, TUPLE2 (None, slots), BUILD, STOP.
    out.extend_from_slice(b"u\x86b.");
    let size = u32::try_from(out.len() - start - 4).unwrap_or(u32::MAX);
    out[start..start + 4].copy_from_slice(&size.to_be_bytes());
}

fn push_pickle_str(value: &str, out: &mut Vec<u8>) {
    out.push(b'X'); // BINUNICODE
    out.extend_from_slice(&u32::try_from(value.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(value.as_bytes());
}

fn push_pickle_int(value: i64, out: &mut Vec<u8>) {
    if let Ok(small) = i32::try_from(value) {
        out.push(b'J'); // BININT
        out.extend_from_slice(&small.to_le_bytes());
    } else {
        out.extend_from_slice(&[0x8a, 8]); // LONG1, 8 bytes of two's complement
        out.extend_from_slice(&value.to_le_bytes());
    }
}

/// The classes a queue frame may name; anything else is refused before it is looked at.
const ACCEPTED_CLASSES: [(&str, &str); 4] = [
    ("torch.distributed.elastic.timer.api", "TimerRequest"),
    ("elastic_timer.api", "TimerRequest"),
    ("torch.distributed.elastic.timer.file_based_local_timer", "FileTimerRequest"),
    ("elastic_timer.file_based_local_timer", "FileTimerRequest"),
];

/// Bounds that keep hostile frames small; a real request needs a stack of 6 (marks
/// included), 10 memo entries, dicts of 5 keys (10 items) and strings of a few dozen bytes.
const MAX_STACK: usize = 64;
const MAX_MEMO: usize = 64;
const MAX_ITEMS: usize = 128;
const MAX_STR: usize = 1 << 16;

/// Pickle opcodes, named as in CPython's `pickle.py`.
mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const BINFLOAT: u8 = b'G';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const BINUNICODE: u8 = b'X';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const APPENDS: u8 = b'e';
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const SETITEMS: u8 = b'u';
    pub const EMPTY_DICT: u8 = b'}';
    pub const EMPTY_LIST: u8 = b']';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const PROTO: u8 = 0x80;
    pub const NEWOBJ: u8 = 0x81;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
}

/// The restricted unpickler: CPython's stack machine for the opcodes a request needs.
struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being run, for error messages.
    at: usize,
    stack: Vec<Value>,
    /// Stack lengths at each MARK; nothing below the last one may be popped.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

impl<'a> Machine<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0, at: 0, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new() }
    }

    fn run(mut self) -> Result<Value, CodecError> {
        if self.data.first() != Some(&op::PROTO) {
            return Err(self.unsupported("no PROTO opcode (protocols 0 and 1 are not supported)"));
        }
        loop {
            self.at = self.pos;
            let [opcode] = self.take()?;
            match opcode {
                op::PROTO => {
                    let [protocol] = self.take()?;
                    if !(2..=5).contains(&protocol) {
                        return Err(self.unsupported(&format!("protocol {protocol}")));
                    }
                }
                op::FRAME => {
                    // Framing only batches reads; the payload is already whole.
                    self.take::<8>()?;
                }
                op::STOP => return self.pop(),
                op::MARK => {
                    self.reserve()?;
                    self.marks.push(self.stack.len());
                }
                op::GLOBAL => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push_class(module, name)?;
                }
                op::STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return Err(self.invalid("STACK_GLOBAL without two strings"));
                    };
                    self.push_class(&module, &name)?;
                }
                op::SHORT_BINUNICODE => {
                    let [len] = self.take()?;
                    self.push_str(len.into())?;
                }
                op::BINUNICODE => {
                    let len = u32::from_le_bytes(self.take()?);
                    self.push_str(usize::try_from(len).unwrap_or(usize::MAX))?;
                }
                op::BINUNICODE8 => {
                    let len = u64::from_le_bytes(self.take()?);
                    self.push_str(usize::try_from(len).unwrap_or(usize::MAX))?;
                }
                op::MEMOIZE => self.memoize(self.memo.len() as u32)?,
                op::BINPUT => {
                    let [index] = self.take()?;
                    self.memoize(index.into())?;
                }
                op::LONG_BINPUT => {
                    let index = u32::from_le_bytes(self.take()?);
                    self.memoize(index)?;
                }
                op::BINGET => {
                    let [index] = self.take()?;
                    self.recall(index.into())?;
                }
                op::LONG_BINGET => {
                    let index = u32::from_le_bytes(self.take()?);
                    self.recall(index)?;
                }
                op::EMPTY_TUPLE => self.push(Value::Tuple(Rc::new([])))?,
                op::TUPLE => {
                    let items = self.pop_mark()?;
                    self.push_tuple(items)?;
                }
                op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                    let mut items = Vec::new();
                    for _ in 0..=opcode - op::TUPLE1 {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push_tuple(items)?;
                }
                op::EMPTY_DICT => self.push(Value::Dict(Rc::default()))?,
                op::SETITEM => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.extend_top(vec![key, value], true)?;
                }
                op::SETITEMS => {
                    let items = self.pop_mark()?;
                    self.extend_top(items, true)?;
                }
                op::EMPTY_LIST => self.push(Value::List(Rc::default()))?,
                op::APPEND => {
                    let value = self.pop()?;
                    self.extend_top(vec![value], false)?;
                }
                op::APPENDS => {
                    let items = self.pop_mark()?;
                    self.extend_top(items, false)?;
                }
                op::NONE => self.push(Value::None)?,
                op::NEWTRUE | op::NEWFALSE => self.push(Value::Bool)?,
                op::BININT => {
                    let int = i32::from_le_bytes(self.take()?);
                    self.push(Value::Int(int.into()))?;
                }
                op::BININT1 => {
                    let [int] = self.take()?;
                    self.push(Value::Int(int.into()))?;
                }
                op::BININT2 => {
                    let int = u16::from_le_bytes(self.take()?);
                    self.push(Value::Int(int.into()))?;
                }
                op::LONG1 => {
                    let [len] = self.take()?;
                    let bytes = self.take_slice(len.into())?;
                    self.push(long(bytes))?;
                }
                op::BINFLOAT => {
                    let float = f64::from_be_bytes(self.take()?);
                    self.push(Value::Float(float))?;
                }
                op::NEWOBJ => {
                    // `cls.__new__(cls, *args)`: our classes take no state from args.
                    let args = self.pop()?;
                    let class = self.pop()?;
                    let (Value::Class, Value::Tuple(_)) = (class, args) else {
                        return Err(self.invalid("NEWOBJ without a class and an argument tuple"));
                    };
                    self.push(Value::Object(None))?;
                }
                op::BUILD => {
                    let state = self.pop()?;
                    // An object inside an object would let nesting, and so dropping, recurse
                    // without bound.
                    if matches!(state, Value::Class | Value::Object(_)) {
                        return Err(
                            self.unsupported(&format!("BUILD with {} as state", state.kind()))
                        );
                    }
                    let Value::Object(slot @ None) = self.top_mut()? else {
                        return Err(self.invalid("BUILD without a fresh TimerRequest"));
                    };
                    *slot = Some(Rc::new(state));
                }
                _ => return Err(self.unsupported(&format!("opcode 0x{opcode:02x}"))),
            }
        }
    }

    fn invalid(&self, why: &str) -> CodecError {
        CodecError::InvalidPickle(format!("{why} at offset {}", self.at))
    }

    fn unsupported(&self, what: &str) -> CodecError {
        CodecError::UnsupportedPickle(format!("{what} at offset {}", self.at))
    }

    fn take_slice(&mut self, len: usize) -> Result<&'a [u8], CodecError> {
        let data = self.data;
        let bytes = self.pos.checked_add(len).and_then(|end| data.get(self.pos..end));
        let bytes = bytes.ok_or_else(|| self.invalid("truncated"))?;
        self.pos += len;
        Ok(bytes)
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let bytes = self.take_slice(N)?;
        bytes.try_into().map_err(|_| self.invalid("truncated"))
    }

    /// A newline-terminated argument of GLOBAL.
    fn line(&mut self) -> Result<&'a str, CodecError> {
        let rest = self.data.get(self.pos..).unwrap_or_default();
        let len = rest.iter().position(|&b| b == b'\n').ok_or_else(|| self.invalid("truncated"))?;
        let line = self.take_slice(len + 1)?;
        std::str::from_utf8(&line[..len]).map_err(|_| self.invalid("invalid UTF-8"))
    }

    /// The stack length below which the innermost MARK forbids popping.
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn reserve(&self) -> Result<(), CodecError> {
        if self.stack.len() + self.marks.len() < MAX_STACK {
            Ok(())
        } else {
            Err(self.unsupported(&format!("more than {MAX_STACK} stack entries")))
        }
    }

    fn push(&mut self, value: Value) -> Result<(), CodecError> {
        self.reserve()?;
        self.stack.push(value);
        Ok(())
    }

    fn pop(&mut self) -> Result<Value, CodecError> {
        if self.stack.len() > self.floor() {
            if let Some(value) = self.stack.pop() {
                return Ok(value);
            }
        }
        Err(self.invalid("stack underflow"))
    }

    fn top_mut(&mut self) -> Result<&mut Value, CodecError> {
        let (len, floor, at) = (self.stack.len(), self.floor(), self.at);
        self.stack
            .last_mut()
            .filter(|_| len > floor)
            .ok_or_else(|| CodecError::InvalidPickle(format!("stack underflow at offset {at}")))
    }

    /// Pops everything above the innermost MARK, and the mark.
    fn pop_mark(&mut self) -> Result<Vec<Value>, CodecError> {
        let mark = self.marks.pop().ok_or_else(|| self.invalid("no MARK"))?;
        // `pop` never goes below a mark, so the stack still reaches it.
        Ok(self.stack.split_off(mark))
    }

    fn push_class(&mut self, module: &str, name: &str) -> Result<(), CodecError> {
        if !ACCEPTED_CLASSES.contains(&(module, name)) {
            return Err(CodecError::UnsupportedClass {
                module: module.to_owned(),
                name: name.to_owned(),
            });
        }
        self.push(Value::Class)
    }

    fn push_str(&mut self, len: usize) -> Result<(), CodecError> {
        if len > MAX_STR {
            return Err(self.unsupported(&format!("string longer than {MAX_STR} bytes")));
        }
        let bytes = self.take_slice(len)?;
        let s = std::str::from_utf8(bytes).map_err(|_| self.invalid("invalid UTF-8"))?;
        self.push(Value::Str(s.into()))
    }

    fn push_tuple(&mut self, items: Vec<Value>) -> Result<(), CodecError> {
        if !items.iter().all(|item| item.nests(true)) {
            return Err(self.unsupported("nested tuple"));
        }
        self.push(Value::Tuple(items.into()))
    }

    /// APPEND(S) into the list, or SETITEM(S) into the dict, on top of the stack.
    fn extend_top(&mut self, items: Vec<Value>, into_dict: bool) -> Result<(), CodecError> {
        if !items.iter().all(|item| item.nests(false)) {
            return Err(self.unsupported("nested container"));
        }
        let target = match self.top_mut()? {
            Value::List(list) if !into_dict => list,
            Value::Dict(dict) if into_dict && items.len().is_multiple_of(2) => dict,
            _ if into_dict => {
                return Err(self.invalid("SETITEM(S) without a dict and key-value pairs"))
            }
            _ => return Err(self.invalid("APPEND(S) without a list")),
        };
        let target = Rc::make_mut(target);
        target.extend(items);
        if target.len() > MAX_ITEMS {
            return Err(self.unsupported(&format!("more than {MAX_ITEMS} items in a container")));
        }
        Ok(())
    }

    fn memoize(&mut self, index: u32) -> Result<(), CodecError> {
        let value = self.top_mut()?.clone();
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&index) {
            return Err(self.unsupported(&format!("more than {MAX_MEMO} memo entries")));
        }
        self.memo.insert(index, value);
        Ok(())
    }

    fn recall(&mut self, index: u32) -> Result<(), CodecError> {
        let value = self.memo.get(&index).cloned();
        let value = value.ok_or_else(|| self.invalid(&format!("memo entry {index} not found")))?;
        self.push(value)
    }
}

/// LONG1's little-endian two's complement, if it fits an i64.
fn long(bytes: &[u8]) -> Value {
    let negative = bytes.last().is_some_and(|b| b & 0x80 != 0);
    let fill = if negative { 0xff } else { 0 };
    let (low, high) = bytes.split_at(bytes.len().min(8));
    // Bytes past the eighth may only repeat the sign, which the eighth must already carry.
    let fits = high.is_empty()
        || (high.iter().all(|&b| b == fill)
            && low.last().is_some_and(|b| (b & 0x80 != 0) == negative));
    if !fits {
        return Value::BigInt;
    }
    let mut le = [fill; 8];
    le[..low.len()].copy_from_slice(low);
    Value::Int(i64::from_le_bytes(le))
}

#[cfg(test)]
mod tests;
