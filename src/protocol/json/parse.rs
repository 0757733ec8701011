//! Parsing JSON as kombu and Python write it: big integers kept whole, lone surrogates
//! kept (WTF-8), nesting bounded.

use super::*;

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
