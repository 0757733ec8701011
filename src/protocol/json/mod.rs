//! JSON exactly as kombu writes it, in plain Rust.
//!
//! - [`PythonFormatter`]: a `serde_json` formatter whose output is byte-for-byte what
//!   Python's `json.dumps` prints by default (`", "` / `": "` separators,
//!   `ensure_ascii=True`, floats as Python's `repr`).
//! - [`write`] / [`to_vec`]: serialize any `serde::Serialize` with that formatter.
//! - [`RawJson`]: text written verbatim (big integers, `NaN`, pre-encoded parts).
//! - [`MarkerType`] / [`Marker`]: kombu's `{"__type__": T, "__value__": V}` objects.
//!
//! Non-finite floats: `serde_json`'s serializer turns a NaN or infinite `f64` into
//! `null` before the formatter sees it, so a plain `f64` field cannot produce `NaN`.
//! Code that must write them as Python does (the Python object walker does) writes
//! [`RawJson`] with [`float_repr`].
//!
//! Parsing: [`Parser`] / [`from_slice`] in `parse.rs`.

use std::io;

use base64::Engine as _;
use serde::ser::{Serialize, SerializeMap, SerializeStruct, Serializer};
use serde_json::ser::{CharEscape, Formatter};

use crate::error::{Error, Result};

const HEX: &[u8; 16] = b"0123456789abcdef";

/// A `serde_json` formatter matching Python's `json.dumps` defaults.
#[derive(Clone, Copy, Debug, Default)]
pub struct PythonFormatter;

impl Formatter for PythonFormatter {
    #[inline]
    fn write_f32<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: f32) -> io::Result<()> {
        let mut buf = Vec::with_capacity(24);
        write_float_repr(&mut buf, f64::from(value), Some(value));
        writer.write_all(&buf)
    }

    #[inline]
    fn write_f64<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: f64) -> io::Result<()> {
        let mut buf = Vec::with_capacity(24);
        write_float_repr(&mut buf, value, None);
        writer.write_all(&buf)
    }

    #[inline]
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let bytes = fragment.as_bytes();
        // serde_json only hands us runs without `"`, `\` and C0 controls; what is left
        // to escape is DEL and everything outside ASCII.
        if bytes.iter().all(|&b| b < 0x7f) {
            return writer.write_all(bytes);
        }
        let mut out = Vec::with_capacity(bytes.len() * 2);
        escape_str_into(&mut out, fragment);
        writer.write_all(&out)
    }

    #[inline]
    fn write_char_escape<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        char_escape: CharEscape,
    ) -> io::Result<()> {
        let s: &[u8] = match char_escape {
            CharEscape::Quote => b"\\\"",
            CharEscape::ReverseSolidus => b"\\\\",
            CharEscape::Solidus => b"/",
            CharEscape::Backspace => b"\\b",
            CharEscape::FormFeed => b"\\f",
            CharEscape::LineFeed => b"\\n",
            CharEscape::CarriageReturn => b"\\r",
            CharEscape::Tab => b"\\t",
            CharEscape::AsciiControl(byte) => {
                let esc = [
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(byte >> 4)],
                    HEX[usize::from(byte & 0xf)],
                ];
                return writer.write_all(&esc);
            }
        };
        writer.write_all(s)
    }

    #[inline]
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    #[inline]
    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    #[inline]
    fn begin_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }
}

/// Serialize `value` into `buf` as Python's `json.dumps` would print it.
pub fn write<T: Serialize + ?Sized>(buf: &mut Vec<u8>, value: &T) -> Result<()> {
    let mut ser = serde_json::Serializer::with_formatter(buf, PythonFormatter);
    value.serialize(&mut ser)?;
    Ok(())
}

/// [`write`] into a new buffer.
pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(128);
    write(&mut buf, value)?;
    Ok(buf)
}

/// JSON text that `serde_json` serializers write verbatim, without validating it.
///
/// Uses `serde_json`'s raw-value hook (feature `raw_value`), so it works with any
/// formatter. The caller guarantees the text is what it wants on the wire.
#[derive(Clone, Copy, Debug)]
pub struct RawJson<'a>(pub &'a str);

/// The struct name and field `serde_json` recognises as "write this text as is".
const RAW_TOKEN: &str = "$serde_json::private::RawValue";

impl Serialize for RawJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct(RAW_TOKEN, 1)?;
        s.serialize_field(RAW_TOKEN, self.0)?;
        s.end()
    }
}

// ---------------------------------------------------------------------------
// Strings

/// Append `s` to `out` with Python's `ensure_ascii` escaping, without quotes.
pub fn escape_str_into(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, ch) in s.char_indices() {
        let code = u32::from(ch);
        if (0x20..0x7f).contains(&code) && ch != '"' && ch != '\\' {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        start = i + ch.len_utf8();
        push_escaped_code_point(out, code);
    }
    out.extend_from_slice(&bytes[start..]);
}

fn push_u16_escape(out: &mut Vec<u8>, unit: u32) {
    out.extend_from_slice(&[
        b'\\',
        b'u',
        HEX[((unit >> 12) & 0xf) as usize],
        HEX[((unit >> 8) & 0xf) as usize],
        HEX[((unit >> 4) & 0xf) as usize],
        HEX[(unit & 0xf) as usize],
    ]);
}

/// One code point that is not printable ASCII (or is `"` / `\`), escaped as Python does.
/// Lone surrogates (possible in Python strings) come out as a single `\udXXX`.
fn push_escaped_code_point(out: &mut Vec<u8>, code: u32) {
    match code {
        0x22 => out.extend_from_slice(b"\\\""),
        0x5c => out.extend_from_slice(b"\\\\"),
        0x08 => out.extend_from_slice(b"\\b"),
        0x0c => out.extend_from_slice(b"\\f"),
        0x0a => out.extend_from_slice(b"\\n"),
        0x0d => out.extend_from_slice(b"\\r"),
        0x09 => out.extend_from_slice(b"\\t"),
        0x10000.. => {
            let v = code - 0x10000;
            push_u16_escape(out, 0xd800 | (v >> 10));
            push_u16_escape(out, 0xdc00 | (v & 0x3ff));
        }
        _ => push_u16_escape(out, code),
    }
}

/// Append a quoted, escaped JSON string for text given as WTF-8: UTF-8 in which lone
/// surrogates are encoded as ordinary 3-byte sequences (Python's
/// `s.encode("utf-8", "surrogatepass")`). Used for Python strings that are not valid
/// Unicode; Python's `json.dumps` escapes such a surrogate as `\udXXX`.
pub fn write_wtf8_string(out: &mut Vec<u8>, wtf8: &[u8]) -> Result<()> {
    out.push(b'"');
    let mut i = 0;
    while i < wtf8.len() {
        let b0 = wtf8[i];
        let (code, len) = if b0 < 0x80 {
            (u32::from(b0), 1)
        } else {
            let len = match b0 {
                0xc2..=0xdf => 2,
                0xe0..=0xef => 3,
                0xf0..=0xf4 => 4,
                _ => return Err(Error::Encode("invalid WTF-8 text".into())),
            };
            let tail = wtf8
                .get(i + 1..i + len)
                .filter(|t| t.iter().all(|&b| b & 0xc0 == 0x80))
                .ok_or_else(|| Error::Encode("invalid WTF-8 text".into()))?;
            let mut code = u32::from(b0) & (0x7f >> len);
            for &b in tail {
                code = (code << 6) | u32::from(b & 0x3f);
            }
            (code, len)
        };
        if (0x20..0x7f).contains(&code) && code != 0x22 && code != 0x5c {
            out.push(b0);
        } else {
            push_escaped_code_point(out, code);
        }
        i += len;
    }
    out.push(b'"');
    Ok(())
}

// ---------------------------------------------------------------------------
// Floats

/// Python's `float.__repr__` as JSON writes it: `1.0`, `1e+16`, `1.5e-05`, and
/// `NaN` / `Infinity` / `-Infinity` for the non-finite values.
pub fn float_repr(value: f64) -> String {
    let mut buf = Vec::with_capacity(24);
    write_float_repr(&mut buf, value, None);
    // Only ASCII is ever written.
    String::from_utf8_lossy(&buf).into_owned()
}

/// When the value lies exactly halfway between two shortest candidates, Rust's `{:e}`
/// takes the upper one and Python's repr (dtoa's mode 0) the even one:
/// 562949953421312.25 is `...312.3` in Rust, `...312.2` in Python. `digits` are Rust's
/// shortest digits of `abs` (`d.ddd` times 10 to `exp`); the last one is lowered when
/// that is such a tie.
fn tie_to_even(digits: &mut [u8], abs: f64, exp: i32) {
    let Some((&last, prefix)) = digits.split_last() else {
        return;
    };
    // Both candidates round-trip only when a unit of the last digit is under an ulp
    // (about 2.2e-16 of the value): 16 or more digits. Shorter ones skip the check.
    if digits.len() < 16 || last % 2 == 0 || last <= b'1' {
        return;
    }
    // The midpoint between the two candidates: the prefix, last - 1, then 5.
    let mut midpoint: Vec<u8> = prefix.to_vec();
    midpoint.push(last - 1);
    midpoint.push(b'5');
    // 40 significant digits show any f64 that equals an 18-digit decimal exactly.
    let exact = format!("{abs:.39e}");
    let (mantissa, exact_exp) = exact.split_once('e').unwrap_or((&exact, "0"));
    if exact_exp.parse::<i32>().ok() != Some(exp) {
        return;
    }
    let exact_digits: Vec<u8> = mantissa.bytes().filter(u8::is_ascii_digit).collect();
    let is_tie = exact_digits.starts_with(&midpoint)
        && exact_digits[midpoint.len()..].iter().all(|&b| b == b'0');
    if !is_tie {
        return;
    }
    let mut lower = String::with_capacity(digits.len() + 8);
    for (i, &d) in digits.iter().enumerate() {
        if i == 1 {
            lower.push('.');
        }
        lower.push(char::from(if i + 1 == digits.len() { d - 1 } else { d }));
    }
    lower.push_str(&format!("e{exp}"));
    if lower.parse::<f64>().ok() == Some(abs) {
        if let Some(d) = digits.last_mut() {
            *d -= 1;
        }
    }
}

/// Append [`float_repr`] of `value` to `out`. `narrow` is set when the value came from
/// an `f32`, whose shortest digits are used then.
fn write_float_repr(out: &mut Vec<u8>, value: f64, narrow: Option<f32>) {
    use std::io::Write as _;
    if value.is_nan() {
        out.extend_from_slice(b"NaN");
        return;
    }
    if value.is_infinite() {
        out.extend_from_slice(if value > 0.0 {
            b"Infinity"
        } else {
            b"-Infinity"
        });
        return;
    }
    if value == 0.0 {
        out.extend_from_slice(if value.is_sign_negative() {
            b"-0.0"
        } else {
            b"0.0"
        });
        return;
    }
    // Rust's `{:e}` gives the shortest digits that round-trip, as Python's repr does.
    let mut sci = [0u8; 40];
    let mut cursor = io::Cursor::new(&mut sci[..]);
    let written = match narrow {
        Some(f) => write!(cursor, "{f:e}"),
        None => write!(cursor, "{value:e}"),
    };
    let used = usize::try_from(cursor.position()).unwrap_or(0);
    let text = &sci[..used];
    if written.is_err() {
        out.extend_from_slice(text);
        return;
    }
    let (negative, text) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    let e_pos = text.iter().position(|&b| b == b'e').unwrap_or(text.len());
    let mut digits = [0u8; 24];
    let mut nd = 0;
    for &b in &text[..e_pos] {
        if b.is_ascii_digit() && nd < digits.len() {
            digits[nd] = b;
            nd += 1;
        }
    }
    let exp: i32 = std::str::from_utf8(text.get(e_pos + 1..).unwrap_or(b"0"))
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if narrow.is_none() {
        tie_to_even(&mut digits[..nd], value.abs(), exp);
    }
    let digits = &digits[..nd];
    if negative {
        out.push(b'-');
    }
    // Python: value = 0.d1d2... * 10**decpt; exponent form when decpt <= -4 or > 16.
    let decpt = exp + 1;
    if decpt > -4 && decpt <= 16 {
        if decpt <= 0 {
            out.extend_from_slice(b"0.");
            out.extend(std::iter::repeat_n(b'0', decpt.unsigned_abs() as usize));
            out.extend_from_slice(digits);
        } else {
            let point = decpt as usize;
            if point >= digits.len() {
                out.extend_from_slice(digits);
                out.extend(std::iter::repeat_n(b'0', point - digits.len()));
                out.extend_from_slice(b".0");
            } else {
                out.extend_from_slice(&digits[..point]);
                out.push(b'.');
                out.extend_from_slice(&digits[point..]);
            }
        }
    } else {
        out.push(digits.first().copied().unwrap_or(b'0'));
        if digits.len() > 1 {
            out.push(b'.');
            out.extend_from_slice(&digits[1..]);
        }
        out.push(b'e');
        out.push(if exp < 0 { b'-' } else { b'+' });
        let abs = exp.unsigned_abs();
        if abs < 10 {
            out.push(b'0');
        }
        out.extend_from_slice(abs.to_string().as_bytes());
    }
}

// ---------------------------------------------------------------------------
// kombu type markers

/// The key naming a marker's type.
pub const TYPE_KEY: &str = "__type__";
/// The key holding a marker's value.
pub const VALUE_KEY: &str = "__value__";

/// The `__type__` names kombu (>= 5.3) understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MarkerType {
    DateTime,
    Date,
    Time,
    Decimal,
    Uuid,
    /// bytes that are valid UTF-8, carried as text
    Bytes,
    /// other bytes, carried as standard base64 with padding
    Base64,
}

impl MarkerType {
    /// The type for a `__type__` name; an unknown name is an error, as in kombu.
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "datetime" => Self::DateTime,
            "date" => Self::Date,
            "time" => Self::Time,
            "decimal" => Self::Decimal,
            "uuid" => Self::Uuid,
            "bytes" => Self::Bytes,
            "base64" => Self::Base64,
            other => {
                return Err(Error::Decode(format!(
                    "unsupported kombu type marker {{\"__type__\": {}}}",
                    String::from_utf8_lossy(&to_vec(other).unwrap_or_default())
                )))
            }
        })
    }

    /// The `__type__` text.
    pub fn name(self) -> &'static str {
        match self {
            Self::DateTime => "datetime",
            Self::Date => "date",
            Self::Time => "time",
            Self::Decimal => "decimal",
            Self::Uuid => "uuid",
            Self::Bytes => "bytes",
            Self::Base64 => "base64",
        }
    }
}

/// A decoded kombu marker. Dates and times keep their ISO text (Python parses it with
/// `fromisoformat`); the rest is decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Marker {
    DateTime(String),
    Date(String),
    Time(String),
    Decimal(String),
    Uuid(uuid::Uuid),
    /// bytes (written as `bytes` when valid UTF-8, else `base64`)
    Bytes(Vec<u8>),
}

impl Marker {
    /// The marker for a `__type__` name and its `__value__`.
    pub fn from_parts(type_name: &str, value: &serde_json::Value) -> Result<Self> {
        let kind = MarkerType::from_name(type_name)?;
        let text = || {
            value.as_str().ok_or_else(|| {
                Error::Decode(format!(
                    "kombu {} marker: __value__ is not a string",
                    kind.name()
                ))
            })
        };
        Ok(match kind {
            MarkerType::DateTime => Self::DateTime(text()?.to_owned()),
            MarkerType::Date => Self::Date(text()?.to_owned()),
            MarkerType::Time => Self::Time(text()?.to_owned()),
            MarkerType::Decimal => Self::Decimal(text()?.to_owned()),
            MarkerType::Uuid => {
                let hex = value
                    .as_object()
                    .filter(|o| o.len() == 1)
                    .and_then(|o| o.get("hex"))
                    .and_then(serde_json::Value::as_str)
                    .ok_or_else(|| {
                        Error::Decode("kombu uuid marker: __value__ is not {\"hex\": str}".into())
                    })?;
                Self::Uuid(parse_uuid_hex(hex)?)
            }
            MarkerType::Bytes => Self::Bytes(text()?.as_bytes().to_vec()),
            MarkerType::Base64 => Self::Bytes(decode_base64(text()?)?),
        })
    }

    /// How kombu writes these bytes: `bytes` with the text when valid UTF-8, else `base64`.
    pub fn bytes_type(data: &[u8]) -> MarkerType {
        if std::str::from_utf8(data).is_ok() {
            MarkerType::Bytes
        } else {
            MarkerType::Base64
        }
    }

    /// The `__type__` this marker is written with.
    pub fn marker_type(&self) -> MarkerType {
        match self {
            Self::DateTime(_) => MarkerType::DateTime,
            Self::Date(_) => MarkerType::Date,
            Self::Time(_) => MarkerType::Time,
            Self::Decimal(_) => MarkerType::Decimal,
            Self::Uuid(_) => MarkerType::Uuid,
            Self::Bytes(data) => Self::bytes_type(data),
        }
    }
}

impl Serialize for Marker {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(2))?;
        map.serialize_entry(TYPE_KEY, self.marker_type().name())?;
        match self {
            Self::DateTime(s) | Self::Date(s) | Self::Time(s) | Self::Decimal(s) => {
                map.serialize_entry(VALUE_KEY, s)?;
            }
            Self::Uuid(u) => {
                map.serialize_entry(VALUE_KEY, &UuidValue(u))?;
            }
            Self::Bytes(data) => match std::str::from_utf8(data) {
                Ok(text) => map.serialize_entry(VALUE_KEY, text)?,
                Err(_) => map.serialize_entry(VALUE_KEY, &encode_base64(data))?,
            },
        }
        map.end()
    }
}

struct UuidValue<'a>(&'a uuid::Uuid);

impl Serialize for UuidValue<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(1))?;
        let mut buf = uuid::Uuid::encode_buffer();
        map.serialize_entry("hex", self.0.simple().encode_lower(&mut buf))?;
        map.end()
    }
}

/// Standard base64 with padding, as `base64.b64encode`.
pub fn encode_base64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Strict standard base64 (with padding). Python's `b64decode` is laxer (it drops
/// characters outside the alphabet); callers that need its exact behaviour fall back to it.
pub fn decode_base64(text: &str) -> Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| Error::Decode(format!("kombu base64 marker: {e}")))
}

/// A UUID from its hex form, accepting what Python's `UUID(hex=...)` accepts: 32 hex
/// digits, optionally with hyphens, braces or a `urn:uuid:` prefix.
pub fn parse_uuid_hex(hex: &str) -> Result<uuid::Uuid> {
    let trimmed = hex.strip_prefix("urn:uuid:").unwrap_or(hex);
    let trimmed = trimmed.trim_matches(|c| c == '{' || c == '}');
    let digits: String = trimmed.chars().filter(|&c| c != '-').collect();
    if digits.len() != 32 {
        return Err(Error::Decode(format!("kombu uuid marker: bad hex {hex:?}")));
    }
    uuid::Uuid::try_parse(&digits)
        .map_err(|_| Error::Decode(format!("kombu uuid marker: bad hex {hex:?}")))
}

mod parse;
pub use parse::*;

#[cfg(test)]
mod tests;
