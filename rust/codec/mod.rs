//! The two wire formats torch's timer clients speak, decoded into one [`Request`].
//!
//! * FIFO lines: `json.dumps(...) + "\n"` from `FileTimerClient`. We also encode them, byte
//!   for byte as CPython does, so our client is indistinguishable from torch's.
//! * Queue frames: a pickled `TimerRequest` from `LocalTimerClient`. The pickle is read by a
//!   small restricted machine that knows only the opcodes such an object needs and never
//!   imports or calls anything: a class is only ever compared against four names.
//!
//! Pure functions: no I/O, no Python.

use std::rc::Rc;

use jiter::JiterError;

mod json;
mod pickle;

pub use json::{decode_json_line, encode_json_line, salvage_json_line};
pub use pickle::{decode_pickle, encode_pickle_frame};

/// One timer request as both transports carry it.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The worker's pid as sent (range and safety checks happen elsewhere).
    pub pid: i64,
    /// `scope_id`.
    pub scope: String,
    /// Wall-clock seconds (`time.time()`); negative means "release"; may be ±inf or NaN.
    pub expiration: f64,
    /// Signal to reap with; `<= 0` means "do not signal".
    pub signal: i32,
}

impl Request {
    /// torch releases a timer by sending a negative expiration (the client sends `-1`).
    pub fn is_release(&self) -> bool {
        self.expiration < 0.0
    }
}

/// A JSON number as the client wants it written (torch writes the release's `-1` as an int).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    Int(i64),
    Float(f64),
}

/// Why a request was refused; the message ends up in "skipping malformed request: ...".
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CodecError {
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("request is not a JSON object")]
    NotAnObject,
    #[error("{0} is missing")]
    MissingKey(&'static str),
    #[error("{key} must be {expected}, not {found}")]
    WrongType { key: &'static str, expected: &'static str, found: &'static str },
    #[error("{key} is out of range")]
    OutOfRange { key: &'static str },
    #[error("invalid pickle: {0}")]
    InvalidPickle(String),
    #[error("unsupported pickle: {0}")]
    UnsupportedPickle(String),
    #[error(
        "refusing to unpickle {module:?}.{name:?}: only TimerRequest and FileTimerRequest are accepted"
    )]
    UnsupportedClass { module: String, name: String },
}

impl From<JiterError> for CodecError {
    fn from(err: JiterError) -> Self {
        Self::InvalidJson(err.to_string())
    }
}

/// The signal the Local (queue) transport always reaps with.
pub const SIGKILL: i32 = libc::SIGKILL;

/// A value on the pickle machine's stack (and, reduced to scalars, a decoded JSON value).
///
/// Shared by `Rc` so a memo fetch never copies. Containers are copy-on-write: a memo entry
/// keeps a dict as it was when memoized, which the objects we accept never observe. Nesting
/// is limited to a tuple of dicts or lists of scalars, so there can be no deep recursion
/// and no cycles.
#[derive(Clone)]
enum Value {
    None,
    /// True or False; a bool is never a valid field, so which one does not matter.
    Bool,
    Int(i64),
    /// An int beyond i64, kept only to report it as out of range.
    BigInt,
    Float(f64),
    Str(Rc<str>),
    /// One of [`ACCEPTED_CLASSES`]; no other class gets this far.
    Class,
    Tuple(Rc<[Value]>),
    List(Rc<Vec<Value>>),
    /// Keys and values alternate, as SETITEMS lists them.
    Dict(Rc<Vec<Value>>),
    /// An instance of an accepted class, with the state BUILD gave it.
    Object(Option<Rc<Value>>),
}

impl Value {
    /// The kind as a Python user would name it, for error messages.
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool => "a bool",
            Value::Int(_) | Value::BigInt => "an int",
            Value::Float(_) => "a float",
            Value::Str(_) => "a str",
            Value::Class => "a class",
            Value::Tuple(_) => "a tuple",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dict",
            Value::Object(_) => "a TimerRequest",
        }
    }

    /// Whether this may be an item of a tuple (`in_tuple`) or of a list or dict.
    fn nests(&self, in_tuple: bool) -> bool {
        match self {
            Value::Class | Value::Tuple(_) | Value::Object(_) => false,
            Value::List(_) | Value::Dict(_) => in_tuple,
            _ => true,
        }
    }
}

fn int_field<T: TryFrom<i64>>(key: &'static str, value: Option<&Value>) -> Result<T, CodecError> {
    match value.ok_or(CodecError::MissingKey(key))? {
        Value::Int(int) => T::try_from(*int).map_err(|_| CodecError::OutOfRange { key }),
        Value::BigInt => Err(CodecError::OutOfRange { key }),
        other => Err(wrong_type(key, "an int", other)),
    }
}

fn str_field(key: &'static str, value: Option<&Value>) -> Result<String, CodecError> {
    match value.ok_or(CodecError::MissingKey(key))? {
        Value::Str(s) => Ok(s.to_string()),
        other => Err(wrong_type(key, "a str", other)),
    }
}

fn number_field(key: &'static str, value: Option<&Value>) -> Result<f64, CodecError> {
    match value.ok_or(CodecError::MissingKey(key))? {
        Value::Int(int) => Ok(*int as f64),
        Value::Float(float) => Ok(*float),
        Value::BigInt => Err(CodecError::OutOfRange { key }),
        other => Err(wrong_type(key, "an int or a float", other)),
    }
}

fn wrong_type(key: &'static str, expected: &'static str, found: &Value) -> CodecError {
    CodecError::WrongType { key, expected, found: found.kind() }
}

#[cfg(test)]
mod test_support {
    use super::{CodecError, Request};

    pub fn request(pid: i64, scope: &str, expiration: f64, signal: i32) -> Request {
        Request { pid, scope: scope.to_owned(), expiration, signal }
    }

    pub fn mistyped(key: &'static str, expected: &'static str, found: &'static str) -> CodecError {
        CodecError::WrongType { key, expected, found }
    }
}
