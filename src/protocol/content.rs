//! kombu's serializers as the wire names them: `content-type` and `content-encoding`.
//!
//! JSON is encoded and decoded in Rust; the others by their Python packages
//! (`celeriac.serialization`), which hand the bytes over.

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serializer {
    Json,
    Pickle,
    Msgpack,
    Yaml,
}

/// Name, content type and content encoding of each, as kombu registers them.
const SERIALIZERS: [(Serializer, &str, &str, &str); 4] = [
    (Serializer::Json, "json", "application/json", "utf-8"),
    (
        Serializer::Pickle,
        "pickle",
        "application/x-python-serialize",
        "binary",
    ),
    (
        Serializer::Msgpack,
        "msgpack",
        "application/x-msgpack",
        "binary",
    ),
    (Serializer::Yaml, "yaml", "application/x-yaml", "utf-8"),
];

impl Serializer {
    /// By name (`msgpack`) or content type (`application/x-msgpack`).
    pub fn from_name(name: &str) -> Option<Self> {
        SERIALIZERS
            .iter()
            .find(|(_, short, content_type, _)| *short == name || *content_type == name)
            .map(|(serializer, ..)| *serializer)
    }

    /// By content type only: what a message's `content-type` names.
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        SERIALIZERS
            .iter()
            .find(|(_, _, known, _)| *known == content_type)
            .map(|(serializer, ..)| *serializer)
    }

    /// `from_name`, or a `Config` error naming the serializers there are.
    pub fn parse(name: &str) -> Result<Self> {
        Self::from_name(name).ok_or_else(|| {
            Error::Config(format!(
                "unknown serializer {name:?}: use one of json, pickle, msgpack, yaml"
            ))
        })
    }

    fn row(self) -> &'static (Serializer, &'static str, &'static str, &'static str) {
        // Every variant has its row.
        &SERIALIZERS[self as usize]
    }

    pub fn name(self) -> &'static str {
        self.row().1
    }

    pub fn content_type(self) -> &'static str {
        self.row().2
    }

    pub fn content_encoding(self) -> &'static str {
        self.row().3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kombu_content_types() {
        for (serializer, name, content_type, encoding) in SERIALIZERS {
            assert_eq!(Serializer::from_name(name), Some(serializer));
            assert_eq!(Serializer::from_name(content_type), Some(serializer));
            assert_eq!(
                Serializer::from_content_type(content_type),
                Some(serializer)
            );
            assert_eq!(Serializer::from_content_type(name), None);
            assert_eq!(serializer.name(), name);
            assert_eq!(serializer.content_type(), content_type);
            assert_eq!(serializer.content_encoding(), encoding);
        }
        assert_eq!(
            Serializer::Pickle.content_type(),
            "application/x-python-serialize"
        );
        assert!(Serializer::parse("xml")
            .unwrap_err()
            .to_string()
            .contains("unknown serializer \"xml\""));
    }
}
