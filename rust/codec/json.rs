//! FIFO lines: `json.dumps(...) + "\n"` from `FileTimerClient`, read as Python's `json` reads
//! them and written byte for byte as CPython writes them.

use std::rc::Rc;

use jiter::{Jiter, Peek};

use super::{int_field, number_field, str_field, CodecError, Number, Request, Value};

/// The keys torch's `FileTimerServer` reads, in the order our fields are filled.
const JSON_KEYS: [&str; 4] = ["pid", "scope_id", "expiration_time", "signal"];

/// Decodes one line of the FIFO transport (without its newline; trailing whitespace is fine).
///
/// Like torch's server (`json.loads` then indexing), other keys are ignored and a duplicate
/// key's last value wins, even over an earlier value of the wrong type. Never panics.
pub fn decode_json_line(line: &[u8]) -> Result<Request, CodecError> {
    let mut jiter = Jiter::new(line).with_allow_inf_nan();
    let peek = jiter.peek()?;
    if peek != Peek::Object {
        // Say "not an object" only about valid JSON.
        jiter.known_skip(peek)?;
        jiter.finish()?;
        return Err(CodecError::NotAnObject);
    }
    let index_of = |key: &str| JSON_KEYS.iter().position(|known| *known == key);
    let mut fields: [Option<Value>; 4] = Default::default();
    let mut next = jiter.known_object()?.map(index_of);
    while let Some(index) = next {
        match index {
            Some(i) => fields[i] = Some(json_value(&mut jiter)?),
            None => jiter.next_skip()?,
        }
        next = jiter.next_key()?.map(index_of);
    }
    jiter.finish()?;
    let [pid, scope, expiration, signal] = fields;
    Ok(Request {
        pid: int_field("pid", pid.as_ref())?,
        scope: str_field("scope_id", scope.as_ref())?,
        expiration: number_field("expiration_time", expiration.as_ref())?,
        signal: int_field("signal", signal.as_ref())?,
    })
}

/// How every line torch's client (and ours) writes begins: `json.dumps` puts "version" first.
const LINE_START: &[u8] = b"{\"version\"";

/// Recovers the request at the end of a line that does not decode (or is too long).
///
/// A writer that leaves bytes without a newline in the FIFO (garbage, or a process killed in
/// the middle of a write) glues them to the front of the next client's line. A client's
/// line is written whole, in one write of at most `PIPE_BUF` bytes, and is the only place
/// `{"version"` occurs in it (inside a JSON string the quote would be escaped), so the
/// request is what follows the last `{"version"`. Returns how many bytes came before it, and
/// the request; None if there is no such suffix or it does not decode either.
pub fn salvage_json_line(line: &[u8]) -> Option<(usize, Request)> {
    let start = line.windows(LINE_START.len()).rposition(|window| window == LINE_START)?;
    if start == 0 {
        return None;
    }
    decode_json_line(&line[start..]).ok().map(|request| (start, request))
}

/// Reads one JSON value as the [`Value`] Python's `json` would have made of it; containers
/// are skipped and kept only by kind, since no field may be one.
fn json_value(jiter: &mut Jiter) -> Result<Value, CodecError> {
    let peek = jiter.peek()?;
    Ok(match peek {
        Peek::Null => {
            jiter.known_null()?;
            Value::None
        }
        Peek::True | Peek::False => {
            jiter.known_bool(peek)?;
            Value::Bool
        }
        Peek::String => Value::Str(jiter.known_str()?.into()),
        Peek::Array => {
            jiter.known_skip(peek)?;
            Value::List(Rc::default())
        }
        Peek::Object => {
            jiter.known_skip(peek)?;
            Value::Dict(Rc::default())
        }
        _ => json_number(jiter.known_number_bytes(peek)?)?,
    })
}

/// Classifies a number jiter has validated the way Python does: digits alone make an int
/// (of any size: ours must fit an i64), anything else a float (`1e400` is `inf`).
fn json_number(bytes: &[u8]) -> Result<Value, CodecError> {
    let unparsable =
        || CodecError::InvalidJson(format!("unparsable number {}", String::from_utf8_lossy(bytes)));
    let text = std::str::from_utf8(bytes).map_err(|_| unparsable())?;
    if text.bytes().all(|b| b == b'-' || b.is_ascii_digit()) {
        Ok(text.parse().map_or(Value::BigInt, Value::Int))
    } else {
        text.parse().map(Value::Float).map_err(|_| unparsable())
    }
}

/// Appends exactly the bytes torch's `FileTimerClient` writes: Python's
/// `json.dumps({"version": 1, "pid": pid, "scope_id": scope, "expiration_time": expiration,
/// "signal": signal}) + "\n"`.
pub fn encode_json_line(pid: i64, scope: &str, expiration: Number, signal: i64, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"version\": 1, \"pid\": ");
    out.extend_from_slice(pid.to_string().as_bytes());
    out.extend_from_slice(b", \"scope_id\": ");
    push_json_str(scope, out);
    out.extend_from_slice(b", \"expiration_time\": ");
    match expiration {
        Number::Int(int) => out.extend_from_slice(int.to_string().as_bytes()),
        Number::Float(float) => push_float_repr(float, out),
    }
    out.extend_from_slice(b", \"signal\": ");
    out.extend_from_slice(signal.to_string().as_bytes());
    out.extend_from_slice(b"}\n");
}

/// Appends `s` quoted as `json.dumps` does with `ensure_ascii=True`: printable ASCII as is,
/// the usual short escapes, and every other char as `\uXXXX` UTF-16 code units.
fn push_json_str(s: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            ' '..='~' => out.push(c as u8),
            _ => {
                for unit in c.encode_utf16(&mut [0; 2]) {
                    out.extend_from_slice(b"\\u");
                    out.extend([12, 8, 4, 0].map(|shift| HEX[usize::from(*unit >> shift & 0xf)]));
                }
            }
        }
    }
    out.push(b'"');
}

/// Appends Python's `float.__repr__` of `x`, with `json.dumps`'s names for non-finite values.
fn push_float_repr(x: f64, out: &mut Vec<u8>) {
    if !x.is_finite() {
        let name: &[u8] = match x {
            _ if x.is_nan() => b"NaN",
            _ if x > 0.0 => b"Infinity",
            _ => b"-Infinity",
        };
        out.extend_from_slice(name);
        return;
    }
    if x.is_sign_negative() {
        out.push(b'-');
    }
    // `{:e}` writes the fewest digits that round-trip, as repr does, but breaks a tie between
    // two such strings upwards where repr takes the even one. Rounding the exact value to
    // that many digits (ties to even) gives repr's choice whenever it still round-trips,
    // which it may not next to a power of two, where the gaps are uneven.
    let (digits, exponent) = split_scientific(&format!("{:e}", x.abs()));
    let nearest = format!("{:.*e}", digits.len() - 1, x.abs());
    let (digits, exponent) = match nearest.parse::<f64>() {
        Ok(y) if y == x.abs() => split_scientific(&nearest),
        _ => (digits, exponent),
    };
    let digits = digits.as_bytes();
    if (-4..16).contains(&exponent) {
        // Fixed notation, as repr uses for 1e-4 <= |x| < 1e16, always with a fraction.
        if exponent < 0 {
            out.extend_from_slice(b"0.");
            out.extend(std::iter::repeat_n(b'0', exponent.unsigned_abs() as usize - 1));
            out.extend_from_slice(digits);
        } else {
            let (int, frac) = digits.split_at(digits.len().min(exponent as usize + 1));
            out.extend_from_slice(int);
            out.extend(std::iter::repeat_n(b'0', exponent as usize + 1 - int.len()));
            out.push(b'.');
            out.extend_from_slice(if frac.is_empty() { b"0" } else { frac });
        }
    } else {
        let (first, rest) = digits.split_at(1);
        out.extend_from_slice(first);
        if !rest.is_empty() {
            out.push(b'.');
            out.extend_from_slice(rest);
        }
        let sign = if exponent < 0 { '-' } else { '+' };
        out.extend_from_slice(format!("e{sign}{:02}", exponent.unsigned_abs()).as_bytes());
    }
}

/// Splits Rust's `{:e}` output, e.g. `1.25e-7`, into its digits `125` and exponent `-7`.
fn split_scientific(scientific: &str) -> (String, i32) {
    let (mantissa, exponent) = scientific.split_once('e').expect("`{:e}` writes an exponent");
    let exponent = exponent.parse().expect("`{:e}` writes an integer exponent");
    (mantissa.replace('.', ""), exponent)
}

#[cfg(test)]
mod tests;
