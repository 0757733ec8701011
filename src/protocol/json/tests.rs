//! Tests of `protocol::json`: byte-for-byte what Python's `json.dumps` and kombu write.
use super::*;
use serde_json::json;

fn dump<T: Serialize + ?Sized>(v: &T) -> String {
    String::from_utf8(to_vec(v).unwrap()).unwrap()
}

#[test]
fn separators_and_nesting_match_python() {
    // python3 -c 'import json; print(json.dumps({"a": [1, 2, {"b": None}], "c": True, "d": {}, "e": []}))'
    let v = json!({"a": [1, 2, {"b": null}], "c": true, "d": {}, "e": []});
    assert_eq!(
        dump(&v),
        r#"{"a": [1, 2, {"b": null}], "c": true, "d": {}, "e": []}"#
    );
}

#[test]
fn ascii_escaping_matches_python() {
    // python3 -c 'import json; print(json.dumps("a\"b\\c\n\r\t\b\f\x00\x1f\x7f é € 😀 /"))'
    let s = "a\"b\\c\n\r\t\u{8}\u{c}\u{0}\u{1f}\u{7f} é € 😀 /";
    assert_eq!(
        dump(s),
        r#""a\"b\\c\n\r\t\b\f\u0000\u001f\u007f \u00e9 \u20ac \ud83d\ude00 /""#
    );
    // keys too
    assert_eq!(
        dump(&json!({"ключ": "ü"})),
        r#"{"\u043a\u043b\u044e\u0447": "\u00fc"}"#
    );
}

#[test]
fn floats_match_python_repr() {
    // python3 -c 'for f in [...]: print(repr(f))'
    let cases: &[(f64, &str)] = &[
        (1.0, "1.0"),
        (-1.0, "-1.0"),
        (0.0, "0.0"),
        (-0.0, "-0.0"),
        (0.1, "0.1"),
        (0.1 + 0.2, "0.30000000000000004"),
        (1.5, "1.5"),
        (1e15, "1000000000000000.0"),
        (1e16, "1e+16"),
        (1.5e16, "1.5e+16"),
        (123456789012345680.0, "1.2345678901234568e+17"),
        (0.0001, "0.0001"),
        (0.00001, "1e-05"),
        (1.5e-5, "1.5e-05"),
        (1e-100, "1e-100"),
        (1e100, "1e+100"),
        (5e-324, "5e-324"),
        (f64::MAX, "1.7976931348623157e+308"),
        (f64::MIN_POSITIVE, "2.2250738585072014e-308"),
        (123.456, "123.456"),
        (9007199254740993.0, "9007199254740992.0"),
        (1234567890123456.7, "1234567890123456.8"),
    ];
    for &(v, want) in cases {
        assert_eq!(float_repr(v), want, "{v:?}");
        if v.is_finite() {
            assert_eq!(dump(&v), want);
        }
    }
    assert_eq!(float_repr(f64::NAN), "NaN");
    assert_eq!(float_repr(f64::INFINITY), "Infinity");
    assert_eq!(float_repr(f64::NEG_INFINITY), "-Infinity");
}

#[test]
fn raw_json_is_written_verbatim() {
    let v = vec![RawJson("NaN"), RawJson("123456789012345678901234567890")];
    assert_eq!(dump(&v), "[NaN, 123456789012345678901234567890]");
}

#[test]
fn wtf8_lone_surrogates() {
    // python3 -c 'import json; print(json.dumps("a\ud800b\U0001F600"))'
    let mut out = Vec::new();
    // "a" + surrogatepass(U+D800) + "b" + U+1F600
    let wtf8 = b"a\xed\xa0\x80b\xf0\x9f\x98\x80";
    write_wtf8_string(&mut out, wtf8).unwrap();
    assert_eq!(out, br#""a\ud800b\ud83d\ude00""#);
    assert!(write_wtf8_string(&mut Vec::new(), b"\xff").is_err());
}

#[test]
fn markers_round_trip() {
    let u = uuid::Uuid::from_u128(1);
    let m = Marker::Uuid(u);
    let text = dump(&m);
    assert_eq!(
        text,
        r#"{"__type__": "uuid", "__value__": {"hex": "00000000000000000000000000000001"}}"#
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(Marker::from_parts("uuid", &v[VALUE_KEY]).unwrap(), m);

    let b = Marker::Bytes(vec![0xff]);
    assert_eq!(dump(&b), r#"{"__type__": "base64", "__value__": "/w=="}"#);
    assert_eq!(Marker::from_parts("base64", &json!("/w==")).unwrap(), b);
    let b = Marker::Bytes(b"hi".to_vec());
    assert_eq!(dump(&b), r#"{"__type__": "bytes", "__value__": "hi"}"#);
    let d = Marker::DateTime("2024-01-02T03:04:05".into());
    assert_eq!(
        dump(&d),
        r#"{"__type__": "datetime", "__value__": "2024-01-02T03:04:05"}"#
    );
    assert!(MarkerType::from_name("set").is_err());
    assert!(Marker::from_parts("date", &json!(5)).is_err());
    assert!(Marker::from_parts("uuid", &json!({"hex": "zz"})).is_err());
    assert_eq!(
        parse_uuid_hex("{00000000-0000-0000-0000-000000000001}").unwrap(),
        u
    );
}

// ---- parser

/// Collects what a visitor is handed, to see the parser's extensions.
#[derive(Debug, PartialEq)]
enum Seen {
    Big(String),
    Wtf8(Vec<u8>),
    Float(f64),
    Other(serde_json::Value),
}

struct SeenVisitor;

impl<'de> serde::de::Visitor<'de> for SeenVisitor {
    type Value = Seen;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("anything")
    }
    fn visit_newtype_struct<D: serde::Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<Seen, D::Error> {
        String::deserialize(d).map(Seen::Big)
    }
    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> std::result::Result<Seen, E> {
        Ok(Seen::Wtf8(v.to_vec()))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<Seen, E> {
        Ok(Seen::Float(v))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Seen, E> {
        Ok(Seen::Other(v.into()))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Seen, E> {
        Ok(Seen::Other(v.into()))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Seen, E> {
        Ok(Seen::Other(v.into()))
    }
}

use serde::Deserialize as _;

fn seen(text: &str) -> Seen {
    let mut p = Parser::new(text.as_bytes());
    let v = serde::Deserializer::deserialize_any(&mut p, SeenVisitor).unwrap();
    p.end().unwrap();
    v
}

fn parse_err(text: &[u8]) -> String {
    from_slice::<serde_json::Value>(text)
        .map(|v| format!("parsed: {v}"))
        .unwrap_or_else(|e| e.to_string())
}

#[test]
fn parser_python_extensions() {
    assert!(matches!(seen("NaN"), Seen::Float(f) if f.is_nan()));
    assert_eq!(seen(" Infinity "), Seen::Float(f64::INFINITY));
    assert_eq!(seen("-Infinity"), Seen::Float(f64::NEG_INFINITY));
    assert_eq!(seen("1e400"), Seen::Float(f64::INFINITY));
    assert_eq!(seen("18446744073709551615"), Seen::Other(u64::MAX.into()));
    assert_eq!(seen("-9223372036854775808"), Seen::Other(i64::MIN.into()));
    assert_eq!(
        seen("18446744073709551616"),
        Seen::Big("18446744073709551616".into())
    );
    assert_eq!(
        seen("-9223372036854775809"),
        Seen::Big("-9223372036854775809".into())
    );
    assert_eq!(seen("-0"), Seen::Other(0.into()));
    // a surrogate pair is one character; a lone surrogate stays (as WTF-8)
    assert_eq!(seen(r#""\ud83d\ude00""#), Seen::Other("😀".into()));
    assert_eq!(seen(r#""\uD83D\uDE00x""#), Seen::Other("😀x".into()));
    assert_eq!(
        seen(r#""a\ud800b""#),
        Seen::Wtf8(b"a\xed\xa0\x80b".to_vec())
    );
    assert_eq!(
        seen(r#""\udc00\ud800\u0041""#),
        Seen::Wtf8(b"\xed\xb0\x80\xed\xa0\x80A".to_vec())
    );
    assert_eq!(
        seen(r#""\"\\\/\b\f\n\r\t\u00e9é""#),
        Seen::Other("\"\\/\u{8}\u{c}\n\r\té\u{e9}".into())
    );
}

#[test]
fn parser_errors_read_like_python() {
    // python3 -c 'import json; json.loads(...)' messages (3.11)
    assert_eq!(parse_err(b""), "Expecting value: line 1 column 1 (char 0)");
    assert_eq!(
        parse_err(b"[1,"),
        "Expecting value: line 1 column 4 (char 3)"
    );
    assert_eq!(
        parse_err(b"[1 2]"),
        "Expecting ',' delimiter: line 1 column 4 (char 3)"
    );
    assert_eq!(
        parse_err(b"{\"a\" 1}"),
        "Expecting ':' delimiter: line 1 column 6 (char 5)"
    );
    assert_eq!(
        parse_err(b"{1: 2}"),
        "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
    );
    assert_eq!(
        parse_err(b"{\"a\": 1,}"),
        "Expecting property name enclosed in double quotes: line 1 column 9 (char 8)"
    );
    assert_eq!(
        parse_err(b"[1,]"),
        "Expecting value: line 1 column 4 (char 3)"
    );
    assert_eq!(parse_err(b"1 2"), "Extra data: line 1 column 3 (char 2)");
    assert_eq!(
        parse_err(b"\"abc"),
        "Unterminated string starting at: line 1 column 1 (char 0)"
    );
    assert_eq!(
        parse_err(b"[\"a\nb\"]"),
        "Invalid control character at: line 1 column 4 (char 3)"
    );
    assert_eq!(
        parse_err(b"\"\\x\""),
        "Invalid \\escape: line 1 column 2 (char 1)"
    );
    assert_eq!(
        parse_err(b"\"\\u12x4\""),
        "Invalid \\uXXXX escape: line 1 column 3 (char 2)"
    );
    assert_eq!(
        parse_err(b"\"ab\\u12\""),
        "Invalid \\uXXXX escape: line 1 column 5 (char 4)"
    );
    assert_eq!(
        parse_err(b"\"\\ud800\\u12x4\""),
        "Invalid \\uXXXX escape: line 1 column 9 (char 8)"
    );
    assert_eq!(
        parse_err(b"\"\\"),
        "Unterminated string starting at: line 1 column 1 (char 0)"
    );
    assert_eq!(
        parse_err(b"[1"),
        "Expecting ',' delimiter: line 1 column 3 (char 2)"
    );
    assert_eq!(
        parse_err(b"{\"a\":1"),
        "Expecting ',' delimiter: line 1 column 7 (char 6)"
    );
    assert_eq!(
        parse_err(b"{\"a\""),
        "Expecting ':' delimiter: line 1 column 5 (char 4)"
    );
    assert_eq!(
        parse_err(b"{"),
        "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
    );
    assert_eq!(
        parse_err(b"\n\n  nul"),
        "Expecting value: line 3 column 3 (char 4)"
    );
    assert_eq!(parse_err(b"01"), "Extra data: line 1 column 2 (char 1)");
    assert_eq!(parse_err(b"1."), "Extra data: line 1 column 2 (char 1)");
    assert_eq!(parse_err(b"-"), "Expecting value: line 1 column 1 (char 0)");
    assert!(parse_err(b"\"\xff\"").starts_with("Invalid UTF-8"));
    assert!(parse_err(b"\"\xed\xa0\x80\"").starts_with("Invalid UTF-8"));
    assert_eq!(
        parse_err(b"\xef\xbb\xbf1"),
        "Unexpected UTF-8 BOM (decode using utf-8-sig): line 1 column 1 (char 0)"
    );
}

#[test]
fn parser_depth_limit() {
    let ok = "[".repeat(64) + &"]".repeat(64);
    assert!(from_slice::<serde::de::IgnoredAny>(ok.as_bytes()).is_ok());
    let deep = "[".repeat(MAX_DEPTH as usize + 1) + &"]".repeat(MAX_DEPTH as usize + 1);
    let mut p = Parser::new(deep.as_bytes()).with_max_depth(100);
    let err = serde::de::IgnoredAny::deserialize(&mut p).unwrap_err();
    assert!(err.message().contains("nesting too deep"), "{err}");
}

fn arb_value() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
    use proptest::prelude::*;
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        any::<String>().prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::from),
            proptest::collection::vec((any::<String>(), inner), 0..8)
                .prop_map(|kv| { serde_json::Value::Object(kv.into_iter().collect()) }),
        ]
    })
}

proptest::proptest! {
    // No regression files in the repository: failures print their input.
    #![proptest_config(proptest::test_runner::Config {
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    })]

    #[test]
    fn value_round_trip(v in arb_value()) {
        let text = to_vec(&v).unwrap();
        proptest::prop_assert!(text.is_ascii());
        let back: serde_json::Value = from_slice(&text).unwrap();
        proptest::prop_assert_eq!(&back, &v);
        // serde_json reads our output as the same value (floats aside, which it may
        // round differently without its `float_roundtrip` feature).
        let theirs: serde_json::Value = serde_json::from_slice(&text).unwrap();
        if !text.contains(&b'.') && !text.contains(&b'e') {
            proptest::prop_assert_eq!(&theirs, &v);
        }
    }

    #[test]
    fn compact_json_parses_the_same(v in arb_value()) {
        let text = serde_json::to_vec(&v).unwrap();
        let back: serde_json::Value = from_slice(&text).unwrap();
        proptest::prop_assert_eq!(&back, &v);
    }

    #[test]
    fn floats_round_trip_exactly(bits in proptest::prelude::any::<u64>()) {
        let f = f64::from_bits(bits);
        let text = float_repr(f);
        match seen(&text) {
            Seen::Float(g) if f.is_nan() => proptest::prop_assert!(g.is_nan()),
            Seen::Float(g) => proptest::prop_assert_eq!(g.to_bits(), f.to_bits(), "{}", text),
            other => proptest::prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn strings_round_trip(s in proptest::prelude::any::<String>()) {
        let text = to_vec(&s).unwrap();
        proptest::prop_assert!(text.is_ascii());
        let back: String = from_slice(&text).unwrap();
        proptest::prop_assert_eq!(back, s);
    }

    #[test]
    fn wtf8_writer_matches_escaper(s in proptest::prelude::any::<String>()) {
        let mut a = Vec::new();
        write_wtf8_string(&mut a, s.as_bytes()).unwrap();
        proptest::prop_assert_eq!(a, to_vec(&s).unwrap());
    }

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
        let _ = from_slice::<serde::de::IgnoredAny>(&bytes);
        let _ = from_slice::<serde_json::Value>(&bytes);
    }

    #[test]
    fn json_ish_garbage_never_panics(s in "[\\[\\]{}\":,0-9eE.+\\-a-z\\\\ ]{0,40}") {
        let _ = from_slice::<serde_json::Value>(s.as_bytes());
    }
}

#[test]
fn a_float_halfway_between_two_shortest_forms_takes_the_even_one_as_python() {
    // Python: repr(562949953421312.2) == '562949953421312.2' (the value is ...312.25).
    assert_eq!(float_repr(562949953421312.2), "562949953421312.2");
    assert_eq!(float_repr(-562949953421312.2), "-562949953421312.2");
    // Not a tie: the shortest form as before.
    assert_eq!(float_repr(0.3), "0.3");
    assert_eq!(float_repr(1.5e-5), "1.5e-05");
    assert_eq!(float_repr(2.5), "2.5");
}
