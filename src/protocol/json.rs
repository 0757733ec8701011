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

// ---------------------------------------------------------------------------
// Parsing

/// Containers nested deeper than this are refused by [`Parser`] (the encoder in
/// `py/codec.rs` uses the same limit).
pub const MAX_DEPTH: u32 = 512;

/// The newtype-struct name under which [`Parser`] hands over an integer that does
/// not fit in `i64`/`u64`: `visit_newtype_struct` gets a deserializer whose
/// `deserialize_any` yields the decimal digits as a string. Visitors that do not
/// implement `visit_newtype_struct` reject such integers.
pub const BIG_INT_TOKEN: &str = "$celeriac::json::BigInt";

/// A JSON syntax error (or an error raised by the visitor), with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    message: String,
    /// 1-based line and column, and 0-based byte offset, when known.
    position: Option<(usize, usize, usize)>,
}

impl ParseError {
    /// The reason, without the position.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// `(line, column, byte offset)`: line and column 1-based, as Python's `json` says.
    pub fn position(&self) -> Option<(usize, usize, usize)> {
        self.position
    }
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.position {
            Some((line, col, pos)) => {
                write!(f, "{}: line {line} column {col} (char {pos})", self.message)
            }
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for ParseError {}

impl serde::de::Error for ParseError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        ParseError {
            message: msg.to_string(),
            position: None,
        }
    }
}

impl From<ParseError> for Error {
    fn from(err: ParseError) -> Self {
        Error::Decode(err.to_string())
    }
}

/// A JSON reader with the grammar of Python's `json.loads` (strict mode), as a serde
/// `Deserializer`:
/// - `NaN`, `Infinity` and `-Infinity` are accepted;
/// - floats are correctly rounded (`str::parse`), so Python's `repr` round-trips;
/// - integers beyond `i64`/`u64` are handed over exactly (see [`BIG_INT_TOKEN`]);
/// - a string whose `\u` escapes leave a lone surrogate cannot be `&str`: it is handed
///   to `visit_bytes` as WTF-8 (surrogates as 3-byte sequences, what Python's
///   `encode("utf-8", "surrogatepass")` gives);
/// - raw control characters inside strings and invalid UTF-8 are errors;
/// - nesting deeper than [`MAX_DEPTH`] is an error.
///
/// Call [`Parser::end`] after the value to refuse trailing data.
pub struct Parser<'de> {
    input: &'de [u8],
    pos: usize,
    depth: u32,
    max_depth: u32,
    scratch: Vec<u8>,
}

enum Text<'de, 's> {
    Borrowed(&'de str),
    Copied(&'s str),
    Wtf8(&'s [u8]),
}

impl<'de> Parser<'de> {
    pub fn new(input: &'de [u8]) -> Self {
        Parser {
            input,
            pos: 0,
            depth: 0,
            max_depth: MAX_DEPTH,
            scratch: Vec::new(),
        }
    }

    /// Change the nesting limit.
    pub fn with_max_depth(mut self, max_depth: u32) -> Self {
        self.max_depth = max_depth;
        self
    }

    /// Succeeds when only whitespace is left.
    pub fn end(&mut self) -> std::result::Result<(), ParseError> {
        self.skip_ws();
        if self.pos < self.input.len() {
            Err(self.error_at("Extra data", self.pos))
        } else {
            Ok(())
        }
    }

    fn error_at(&self, message: &str, pos: usize) -> ParseError {
        let pos = pos.min(self.input.len());
        let before = &self.input[..pos];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        // Python counts characters, not bytes.
        let col = String::from_utf8_lossy(&before[line_start..])
            .chars()
            .count()
            + 1;
        let chars = String::from_utf8_lossy(before).chars().count();
        ParseError {
            message: message.to_owned(),
            position: Some((line, col, chars)),
        }
    }

    fn locate(&self, mut err: ParseError) -> ParseError {
        if err.position.is_none() {
            err.position = self.error_at("", self.pos).position;
        }
        err
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    #[inline]
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn eat_literal(&mut self, lit: &[u8]) -> bool {
        if self.input[self.pos..].starts_with(lit) {
            self.pos += lit.len();
            true
        } else {
            false
        }
    }

    fn enter(&mut self) -> std::result::Result<(), ParseError> {
        if self.depth >= self.max_depth {
            return Err(self.error_at("nesting too deep", self.pos));
        }
        self.depth += 1;
        Ok(())
    }

    fn hex4(&self, at: usize) -> std::result::Result<u32, ParseError> {
        let digits = self
            .input
            .get(at..at + 4)
            .ok_or_else(|| self.error_at("Invalid \\uXXXX escape", at.saturating_sub(1)))?;
        let mut v = 0u32;
        for &d in digits {
            let n = match d {
                b'0'..=b'9' => d - b'0',
                b'a'..=b'f' => d - b'a' + 10,
                b'A'..=b'F' => d - b'A' + 10,
                _ => return Err(self.error_at("Invalid \\uXXXX escape", at - 1)),
            };
            v = (v << 4) | u32::from(n);
        }
        Ok(v)
    }

    /// At the opening quote. Returns the string's text.
    fn parse_string<'s>(&'s mut self) -> std::result::Result<Text<'de, 's>, ParseError> {
        let quote = self.pos;
        self.pos += 1;
        let start = self.pos;
        let input = self.input;
        loop {
            match input.get(self.pos) {
                None => return Err(self.error_at("Unterminated string starting at", quote)),
                Some(b'"') => {
                    let raw = &input[start..self.pos];
                    self.pos += 1;
                    return std::str::from_utf8(raw)
                        .map(Text::Borrowed)
                        .map_err(|e| self.error_at("Invalid UTF-8", start + e.valid_up_to()));
                }
                Some(b'\\') => break,
                Some(&c) if c < 0x20 => {
                    return Err(self.error_at("Invalid control character at", self.pos))
                }
                Some(_) => self.pos += 1,
            }
        }
        // Escapes: copy into the scratch buffer.
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let result = self.parse_escaped(start, &mut scratch);
        self.scratch = scratch;
        let lone_surrogate = result?;
        if lone_surrogate {
            Ok(Text::Wtf8(&self.scratch))
        } else {
            // Every run was checked and every escape written as UTF-8.
            std::str::from_utf8(&self.scratch)
                .map(Text::Copied)
                .map_err(|e| self.error_at("Invalid UTF-8", start + e.valid_up_to()))
        }
    }

    /// From `run_start` (inside a string whose first escape is at `self.pos`) to the
    /// closing quote. Returns whether a lone surrogate was written.
    fn parse_escaped(
        &mut self,
        mut run_start: usize,
        out: &mut Vec<u8>,
    ) -> std::result::Result<bool, ParseError> {
        let input = self.input;
        let quote = run_start - 1;
        let mut lone = false;
        loop {
            match input.get(self.pos) {
                None => return Err(self.error_at("Unterminated string starting at", quote)),
                Some(&c @ (b'"' | b'\\')) => {
                    let run = &input[run_start..self.pos];
                    std::str::from_utf8(run)
                        .map_err(|e| self.error_at("Invalid UTF-8", run_start + e.valid_up_to()))?;
                    out.extend_from_slice(run);
                    if c == b'"' {
                        self.pos += 1;
                        return Ok(lone);
                    }
                    let esc = self.pos;
                    let kind = input
                        .get(esc + 1)
                        .copied()
                        .ok_or_else(|| self.error_at("Unterminated string starting at", quote))?;
                    self.pos += 2;
                    let simple = match kind {
                        b'"' => Some(b'"'),
                        b'\\' => Some(b'\\'),
                        b'/' => Some(b'/'),
                        b'b' => Some(8),
                        b'f' => Some(12),
                        b'n' => Some(b'\n'),
                        b'r' => Some(b'\r'),
                        b't' => Some(b'\t'),
                        b'u' => None,
                        _ => return Err(self.error_at("Invalid \\escape", esc)),
                    };
                    if let Some(b) = simple {
                        out.push(b);
                    } else {
                        let mut code = self.hex4(esc + 2)?;
                        self.pos = esc + 6;
                        if (0xd800..0xdc00).contains(&code)
                            && input.get(self.pos..self.pos + 2) == Some(b"\\u")
                        {
                            let low = self.hex4(self.pos + 2)?;
                            if (0xdc00..0xe000).contains(&low) {
                                code = 0x10000 + ((code - 0xd800) << 10) + (low - 0xdc00);
                                self.pos += 6;
                            }
                        }
                        if (0xd800..0xe000).contains(&code) {
                            lone = true;
                        }
                        push_wtf8(out, code);
                    }
                    run_start = self.pos;
                }
                Some(&c) if c < 0x20 => {
                    return Err(self.error_at("Invalid control character at", self.pos))
                }
                Some(_) => self.pos += 1,
            }
        }
    }

    /// At `-` or a digit. Python's grammar: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?`.
    fn parse_number<V: serde::de::Visitor<'de>>(
        &mut self,
        visitor: V,
    ) -> std::result::Result<V::Value, ParseError> {
        let input = self.input;
        let start = self.pos;
        let mut i = start;
        let negative = input.get(i) == Some(&b'-');
        if negative {
            i += 1;
        }
        let digits_start = i;
        match input.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => {
                while let Some(b'0'..=b'9') = input.get(i) {
                    i += 1;
                }
            }
            _ => return Err(self.error_at("Expecting value", start)),
        }
        let int_end = i;
        let mut is_float = false;
        if input.get(i) == Some(&b'.') && matches!(input.get(i + 1), Some(b'0'..=b'9')) {
            is_float = true;
            i += 2;
            while let Some(b'0'..=b'9') = input.get(i) {
                i += 1;
            }
        }
        if let Some(b'e' | b'E') = input.get(i) {
            let mut j = i + 1;
            if let Some(b'+' | b'-') = input.get(j) {
                j += 1;
            }
            if let Some(b'0'..=b'9') = input.get(j) {
                is_float = true;
                i = j;
                while let Some(b'0'..=b'9') = input.get(i) {
                    i += 1;
                }
            }
        }
        self.pos = i;
        // Only ASCII digits, signs, `.` and `e` were accepted above.
        let text = std::str::from_utf8(&input[start..i]).unwrap_or("0");
        if is_float {
            let v: f64 = text
                .parse()
                .map_err(|_| self.error_at("Expecting value", start))?;
            return visitor.visit_f64(v);
        }
        if int_end - digits_start <= 20 {
            if negative {
                if let Ok(v) = text.parse::<i64>() {
                    return visitor.visit_i64(v);
                }
            } else if let Ok(v) = text.parse::<u64>() {
                return visitor.visit_u64(v);
            }
        }
        visitor.visit_newtype_struct(BigIntDeserializer(text))
    }

    fn parse_value<V: serde::de::Visitor<'de>>(
        &mut self,
        visitor: V,
    ) -> std::result::Result<V::Value, ParseError> {
        self.skip_ws();
        let start = self.pos;
        match self.peek() {
            Some(b'"') => match self.parse_string()? {
                Text::Borrowed(s) => visitor.visit_borrowed_str(s),
                Text::Copied(s) => visitor.visit_str(s),
                Text::Wtf8(b) => visitor.visit_bytes(b),
            },
            Some(b'{') => {
                self.enter()?;
                self.pos += 1;
                let mut access = Access {
                    parser: self,
                    first: true,
                    done: false,
                };
                let value = visitor.visit_map(&mut access)?;
                let done = access.done;
                self.depth -= 1;
                if done {
                    Ok(value)
                } else {
                    Err(self.error_at("object not fully read", start))
                }
            }
            Some(b'[') => {
                self.enter()?;
                self.pos += 1;
                let mut access = Access {
                    parser: self,
                    first: true,
                    done: false,
                };
                let value = visitor.visit_seq(&mut access)?;
                let done = access.done;
                self.depth -= 1;
                if done {
                    Ok(value)
                } else {
                    Err(self.error_at("array not fully read", start))
                }
            }
            Some(b'n') if self.eat_literal(b"null") => visitor.visit_unit(),
            Some(b't') if self.eat_literal(b"true") => visitor.visit_bool(true),
            Some(b'f') if self.eat_literal(b"false") => visitor.visit_bool(false),
            Some(b'N') if self.eat_literal(b"NaN") => visitor.visit_f64(f64::NAN),
            Some(b'I') if self.eat_literal(b"Infinity") => visitor.visit_f64(f64::INFINITY),
            Some(b'-') if self.input[self.pos..].starts_with(b"-Infinity") => {
                self.pos += 9;
                visitor.visit_f64(f64::NEG_INFINITY)
            }
            Some(b'-' | b'0'..=b'9') => self.parse_number(visitor),
            _ if start == 0 && self.input.starts_with(b"\xef\xbb\xbf") => {
                Err(self.error_at("Unexpected UTF-8 BOM (decode using utf-8-sig)", start))
            }
            _ => Err(self.error_at("Expecting value", start)),
        }
    }
}

fn push_wtf8(out: &mut Vec<u8>, code: u32) {
    // Like `char::encode_utf8`, but surrogates are allowed (3-byte sequences).
    match code {
        0..=0x7f => out.push(code as u8),
        0x80..=0x7ff => {
            out.extend_from_slice(&[0xc0 | (code >> 6) as u8, 0x80 | (code & 0x3f) as u8])
        }
        0x800..=0xffff => out.extend_from_slice(&[
            0xe0 | (code >> 12) as u8,
            0x80 | ((code >> 6) & 0x3f) as u8,
            0x80 | (code & 0x3f) as u8,
        ]),
        _ => out.extend_from_slice(&[
            0xf0 | (code >> 18) as u8,
            0x80 | ((code >> 12) & 0x3f) as u8,
            0x80 | ((code >> 6) & 0x3f) as u8,
            0x80 | (code & 0x3f) as u8,
        ]),
    }
}

/// Hands an integer's digits to a visitor (see [`BIG_INT_TOKEN`]).
pub struct BigIntDeserializer<'a>(pub &'a str);

impl<'de> serde::de::Deserializer<'de> for BigIntDeserializer<'_> {
    type Error = ParseError;

    fn deserialize_any<V: serde::de::Visitor<'de>>(
        self,
        visitor: V,
    ) -> std::result::Result<V::Value, ParseError> {
        visitor.visit_str(self.0)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

struct Access<'a, 'de> {
    parser: &'a mut Parser<'de>,
    first: bool,
    done: bool,
}

impl Access<'_, '_> {
    /// Before an element or key: `]`/`}` ends (returns false), else `,` unless first.
    fn more(&mut self, close: u8, what: &str) -> std::result::Result<bool, ParseError> {
        let p = &mut *self.parser;
        p.skip_ws();
        if self.first {
            self.first = false;
            if p.peek() == Some(close) {
                p.pos += 1;
                self.done = true;
                return Ok(false);
            }
            return Ok(true);
        }
        match p.peek() {
            Some(c) if c == close => {
                p.pos += 1;
                self.done = true;
                Ok(false)
            }
            Some(b',') => {
                p.pos += 1;
                p.skip_ws();
                Ok(true)
            }
            _ => Err(p.error_at(what, p.pos)),
        }
    }
}

impl<'de> serde::de::SeqAccess<'de> for &mut Access<'_, 'de> {
    type Error = ParseError;

    fn next_element_seed<T: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> std::result::Result<Option<T::Value>, ParseError> {
        if self.done || !self.more(b']', "Expecting ',' delimiter")? {
            return Ok(None);
        }
        let p = &mut *self.parser;
        seed.deserialize(&mut *p).map(Some)
    }
}

impl<'de> serde::de::MapAccess<'de> for &mut Access<'_, 'de> {
    type Error = ParseError;

    fn next_key_seed<K: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> std::result::Result<Option<K::Value>, ParseError> {
        if self.done || !self.more(b'}', "Expecting ',' delimiter")? {
            return Ok(None);
        }
        let p = &mut *self.parser;
        if p.peek() != Some(b'"') {
            return Err(p.error_at("Expecting property name enclosed in double quotes", p.pos));
        }
        seed.deserialize(&mut *p).map(Some)
    }

    fn next_value_seed<V: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> std::result::Result<V::Value, ParseError> {
        let p = &mut *self.parser;
        p.skip_ws();
        if p.peek() != Some(b':') {
            return Err(p.error_at("Expecting ':' delimiter", p.pos));
        }
        p.pos += 1;
        seed.deserialize(&mut *p)
    }
}

impl<'de> serde::de::Deserializer<'de> for &mut Parser<'de> {
    type Error = ParseError;

    fn deserialize_any<V: serde::de::Visitor<'de>>(
        self,
        visitor: V,
    ) -> std::result::Result<V::Value, ParseError> {
        self.parse_value(visitor).map_err(|e| self.locate(e))
    }

    fn deserialize_option<V: serde::de::Visitor<'de>>(
        self,
        visitor: V,
    ) -> std::result::Result<V::Value, ParseError> {
        self.skip_ws();
        if self.input[self.pos..].starts_with(b"null") {
            self.pos += 4;
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_newtype_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> std::result::Result<V::Value, ParseError> {
        visitor.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

/// Parse one JSON value (Python's grammar) into `T`, refusing trailing data.
pub fn from_slice<'de, T: serde::Deserialize<'de>>(input: &'de [u8]) -> Result<T> {
    let mut parser = Parser::new(input);
    let value = T::deserialize(&mut parser)?;
    parser.end()?;
    Ok(value)
}

#[cfg(test)]
#[path = "json_tests.rs"]
mod tests;
