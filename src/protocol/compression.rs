//! kombu's body compression (`kombu.compression`): the methods kombu 5.x registers
//! without extra packages, under kombu's names and content types.
//!
//! A compressed task message keeps its serializer's `content-type` and names the
//! compression in its `compression` header (the content type below). A compressed
//! result is stored as Celery 5.7's in-band payload: [`RESULT_MAGIC`], the content
//! type, a NUL byte, then the compressed bytes.

use std::borrow::Cow;
use std::io::{Read, Write};

use crate::error::{Error, Result};

/// The marker Celery puts in front of a compressed result payload.
pub const RESULT_MAGIC: &[u8] = b"\x00celery-compressed\x00";

/// A decompressed body larger than this is refused rather than filling the memory
/// (a few hundred bytes of zeros can expand to gigabytes).
pub const MAX_DECOMPRESSED: u64 = 512 * 1024 * 1024;

/// One of kombu's compression methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// `zlib.compress` (zlib framing): kombu's `gzip`/`zlib` aliases share it.
    Zlib,
    Bzip2,
    /// `lzma.compress`: the xz container.
    Lzma,
    Zstd,
}

/// Every method with its content type and the aliases kombu accepts for it.
const METHODS: [(Compression, &str, &[&str]); 4] = [
    (Compression::Zlib, "application/x-gzip", &["gzip", "zlib"]),
    (Compression::Bzip2, "application/x-bz2", &["bzip2", "bzip"]),
    (Compression::Lzma, "application/x-lzma", &["lzma", "xz"]),
    (
        Compression::Zstd,
        "application/zstd",
        &["zstd", "zstandard"],
    ),
];

impl Compression {
    /// The method for a kombu alias (`gzip`, `bzip2`, ...) or content type.
    pub fn from_name(name: &str) -> Option<Self> {
        METHODS
            .iter()
            .find(|(_, content_type, aliases)| *content_type == name || aliases.contains(&name))
            .map(|(method, _, _)| *method)
    }

    /// `from_name`, or a `Config` error listing the methods there are.
    pub fn parse(name: &str) -> Result<Self> {
        Self::from_name(name).ok_or_else(|| {
            Error::Config(format!(
                "unknown compression {name:?}: use one of {}",
                known_names()
            ))
        })
    }

    /// The value of the `compression` header.
    pub fn content_type(self) -> &'static str {
        METHODS
            .iter()
            .find(|(method, _, _)| *method == self)
            .map_or("", |(_, content_type, _)| content_type)
    }

    pub fn compress(self, data: &[u8]) -> Result<Vec<u8>> {
        let failed = |err: std::io::Error| Error::Encode(format!("{self:?} compression: {err}"));
        match self {
            Self::Zlib => {
                let mut encoder = flate2::write::ZlibEncoder::new(
                    Vec::with_capacity(data.len() / 2 + 64),
                    flate2::Compression::default(),
                );
                encoder.write_all(data).map_err(failed)?;
                encoder.finish().map_err(failed)
            }
            Self::Bzip2 => {
                let mut encoder = bzip2::write::BzEncoder::new(
                    Vec::with_capacity(data.len() / 2 + 64),
                    bzip2::Compression::best(),
                );
                encoder.write_all(data).map_err(failed)?;
                encoder.finish().map_err(failed)
            }
            Self::Lzma => {
                let mut encoder =
                    liblzma::write::XzEncoder::new(Vec::with_capacity(data.len() / 2 + 64), 6);
                encoder.write_all(data).map_err(failed)?;
                encoder.finish().map_err(failed)
            }
            Self::Zstd => zstd::bulk::compress(data, 0).map_err(failed),
        }
    }

    /// The original bytes; a `Decode` error when `data` is not what this method makes.
    pub fn decompress(self, data: &[u8]) -> Result<Vec<u8>> {
        self.decompress_at_most(data, MAX_DECOMPRESSED)
    }

    fn decompress_at_most(self, data: &[u8], limit: u64) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(data.len().saturating_mul(3));
        let read = match self {
            Self::Zlib => bounded(flate2::read::ZlibDecoder::new(data), limit, &mut out),
            Self::Bzip2 => bounded(bzip2::read::BzDecoder::new(data), limit, &mut out),
            Self::Lzma => bounded(liblzma::read::XzDecoder::new(data), limit, &mut out),
            Self::Zstd => zstd::stream::read::Decoder::new(data)
                .and_then(|decoder| bounded(decoder, limit, &mut out)),
        };
        match read {
            Ok(n) if n > limit => Err(Error::Decode(format!(
                "the body decompresses ({}) to more than {limit} bytes",
                self.content_type(),
            ))),
            Ok(_) => Ok(out),
            Err(err) => Err(Error::Decode(format!(
                "the body is not {} data: {err}",
                self.content_type()
            ))),
        }
    }
}

/// Read everything up to one byte past the limit (so that "too large" can be told).
fn bounded(reader: impl Read, limit: u64, out: &mut Vec<u8>) -> std::io::Result<u64> {
    reader.take(limit + 1).read_to_end(out).map(|n| n as u64)
}

/// The names a user can give, for error messages.
pub fn known_names() -> String {
    METHODS
        .iter()
        .flat_map(|(_, _, aliases)| aliases.iter().copied())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A result payload compressed as Celery 5.7 stores it.
pub fn compress_result(method: Compression, payload: &[u8]) -> Result<Vec<u8>> {
    let body = method.compress(payload)?;
    let content_type = method.content_type().as_bytes();
    let mut out = Vec::with_capacity(RESULT_MAGIC.len() + content_type.len() + 1 + body.len());
    out.extend_from_slice(RESULT_MAGIC);
    out.extend_from_slice(content_type);
    out.push(0);
    out.extend_from_slice(&body);
    Ok(out)
}

/// A stored result payload, decompressed when it carries Celery's marker (whatever
/// this reader's own `result_compression`), else as it is.
pub fn decompress_result(payload: &[u8]) -> Result<Cow<'_, [u8]>> {
    let Some(rest) = payload.strip_prefix(RESULT_MAGIC) else {
        return Ok(Cow::Borrowed(payload));
    };
    let split = rest
        .iter()
        .position(|&byte| byte == 0)
        .ok_or_else(|| Error::Decode("a compressed result has no content type".into()))?;
    let name = std::str::from_utf8(&rest[..split])
        .map_err(|_| Error::Decode("a compressed result's content type is not UTF-8".into()))?;
    let method = Compression::from_name(name).ok_or_else(|| {
        Error::Decode(format!(
            "a result is compressed with an unknown method {name:?}"
        ))
    })?;
    method.decompress(&rest[split + 1..]).map(Cow::Owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Compression; 4] = [
        Compression::Zlib,
        Compression::Bzip2,
        Compression::Lzma,
        Compression::Zstd,
    ];

    #[test]
    fn names_and_content_types_are_kombus() {
        assert_eq!(Compression::from_name("gzip"), Some(Compression::Zlib));
        assert_eq!(Compression::from_name("zlib"), Some(Compression::Zlib));
        assert_eq!(
            Compression::from_name("application/x-gzip"),
            Some(Compression::Zlib)
        );
        assert_eq!(Compression::from_name("bzip2"), Some(Compression::Bzip2));
        assert_eq!(Compression::from_name("xz"), Some(Compression::Lzma));
        assert_eq!(Compression::from_name("zstd"), Some(Compression::Zstd));
        assert_eq!(Compression::Zlib.content_type(), "application/x-gzip");
        assert_eq!(Compression::Bzip2.content_type(), "application/x-bz2");
        assert_eq!(Compression::Lzma.content_type(), "application/x-lzma");
        assert_eq!(Compression::Zstd.content_type(), "application/zstd");
        let err = Compression::parse("brotli").unwrap_err().to_string();
        assert!(err.contains("unknown compression \"brotli\""), "{err}");
        assert!(err.contains("gzip"), "{err}");
    }

    #[test]
    fn round_trips_and_shrinks() {
        let data = b"[[1, 2], {}, {\"callbacks\": null}]".repeat(100);
        for method in ALL {
            let packed = method.compress(&data).unwrap();
            assert!(packed.len() < data.len() / 4, "{method:?}");
            assert_eq!(method.decompress(&packed).unwrap(), data, "{method:?}");
        }
    }

    #[test]
    fn garbage_is_a_decode_error() {
        for method in ALL {
            let err = method.decompress(b"not compressed at all").unwrap_err();
            assert!(matches!(err, Error::Decode(_)), "{method:?}");
            assert!(err.to_string().contains(method.content_type()), "{err}");
        }
    }

    #[test]
    fn a_bomb_is_refused() {
        let zeros = vec![0u8; 1 << 20];
        for method in ALL {
            let packed = method.compress(&zeros).unwrap();
            let err = method.decompress_at_most(&packed, 1000).unwrap_err();
            assert!(err.to_string().contains("more than 1000 bytes"), "{err}");
            assert_eq!(method.decompress_at_most(&packed, 1 << 20).unwrap(), zeros);
        }
    }

    #[test]
    fn result_payloads_carry_their_method() {
        let meta = br#"{"status": "SUCCESS", "result": 4}"#;
        for method in ALL {
            let stored = compress_result(method, meta).unwrap();
            assert!(stored.starts_with(RESULT_MAGIC));
            assert_eq!(decompress_result(&stored).unwrap().as_ref(), meta);
        }
        assert!(matches!(decompress_result(meta).unwrap(), Cow::Borrowed(_)));
        let unknown = [RESULT_MAGIC, b"application/x-brotli\x00xx"].concat();
        let err = decompress_result(&unknown).unwrap_err().to_string();
        assert!(err.contains("unknown method"), "{err}");
    }
}
