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
mod tests {
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
}
