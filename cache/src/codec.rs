//! How a typed value becomes the bytes a cache stores, and back.

use std::fmt::Debug;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{CacheError, Result};

/// Encodes values of type `T` to the bytes a cache stores, and decodes
/// them back.
///
/// Used by [`Tiered::get_or_load_with_codec`](crate::Tiered::get_or_load_with_codec)
/// and [`CacheLayer`](crate::CacheLayer). Implementations here:
/// [`BytesCodec`] (raw bytes, stored as they are), [`HttpCodec`]
/// (`http::Response<B>`: status, the headers worth keeping, body) and
/// [`JsonCodec`] (any serde type).
///
/// `decode(encode(v))` must give back a value equal to `v` (for what the
/// codec keeps of it).
pub trait Codec<T>: Debug + Clone + Send + Sync + 'static {
    /// Whether `value` may be stored at all. A value that may not (an HTTP
    /// error response, a `Cache-Control: no-store` one) is still handed to
    /// every caller that waited for its load, and the next call loads
    /// again. Default: every value may.
    fn cacheable(&self, value: &T) -> bool {
        let _ = value;
        true
    }

    /// The bytes to store for `value`.
    ///
    /// # Errors
    ///
    /// [`CacheError::Codec`] when `value` cannot be encoded.
    fn encode(&self, value: &T) -> Result<Bytes>;

    /// The value stored as `bytes`.
    ///
    /// # Errors
    ///
    /// [`CacheError::Codec`] when `bytes` are not an encoding of a `T`.
    fn decode(&self, bytes: Bytes) -> Result<T>;
}

/// Raw bytes, stored as they are: encoding and decoding are a reference
/// count, never a copy.
///
/// ```
/// use bytes::Bytes;
/// use keel_cache::{BytesCodec, Codec};
///
/// let body = Bytes::from_static(b"\x00\xffraw");
/// assert_eq!(BytesCodec.encode(&body).unwrap(), body);
/// assert_eq!(BytesCodec.decode(body.clone()).unwrap(), body);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BytesCodec;

impl Codec<Bytes> for BytesCodec {
    fn encode(&self, value: &Bytes) -> Result<Bytes> {
        Ok(value.clone())
    }

    fn decode(&self, bytes: Bytes) -> Result<Bytes> {
        Ok(bytes)
    }
}

/// Any serde type, stored as JSON.
///
/// ```
/// use keel_cache::{Codec, JsonCodec};
///
/// let bytes = JsonCodec.encode(&vec![1, 2, 3]).unwrap();
/// assert_eq!(&bytes[..], b"[1,2,3]");
/// let back: Vec<u32> = JsonCodec.decode(bytes).unwrap();
/// assert_eq!(back, vec![1, 2, 3]);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JsonCodec;

impl<T: Serialize + DeserializeOwned + Send + 'static> Codec<T> for JsonCodec {
    fn encode(&self, value: &T) -> Result<Bytes> {
        crate::ext::to_json(value)
    }

    fn decode(&self, bytes: Bytes) -> Result<T> {
        crate::ext::from_json(&bytes)
    }
}

/// An HTTP response: its status, the headers worth keeping and its body,
/// in a compact binary frame (the body is stored as it is, after the
/// header block).
///
/// # What is kept
///
/// The status and every header except the hop-by-hop ones (`Connection`
/// and those it names, `Keep-Alive`, `Proxy-Authenticate`,
/// `Proxy-Authorization`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`)
/// and `Set-Cookie` (one client's cookie must never be served to
/// another). Header values are kept byte for byte. The HTTP version and
/// extensions are not kept (a decoded response has the defaults).
///
/// # What is cached
///
/// Only success (2xx) responses without `Cache-Control: no-store` or
/// `private`; others reach every caller waiting on that load and are not
/// stored.
///
/// # Frame
///
/// `"KH"`, version `1`, status (`u16`), header count (`u16`), then per
/// header its name length (`u16`), name, value length (`u32`), value; then
/// the body to the end. Integers are big-endian.
///
/// ```
/// use bytes::Bytes;
/// use keel_cache::{Codec, HttpCodec};
///
/// let response = http::Response::builder()
///     .status(200)
///     .header("content-type", "application/json")
///     .header("set-cookie", "session=secret")
///     .body(Bytes::from_static(b"{\"answer\":42}"))
///     .unwrap();
/// assert!(HttpCodec.cacheable(&response));
/// let back: http::Response<Bytes> = HttpCodec.decode(HttpCodec.encode(&response).unwrap()).unwrap();
/// assert_eq!(back.status(), 200);
/// assert_eq!(back.headers()["content-type"], "application/json");
/// assert!(back.headers().get("set-cookie").is_none());
/// assert_eq!(back.body(), response.body());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HttpCodec;

const HTTP_MAGIC: [u8; 2] = *b"KH";
const HTTP_VERSION: u8 = 1;

/// Headers that describe one connection, not the response.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The headers [`HttpCodec`] keeps.
fn kept(headers: &HeaderMap) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
    let named_by_connection: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .collect();
    headers.iter().filter(move |(name, _)| {
        !HOP_BY_HOP.contains(name)
            && *name != header::SET_COOKIE
            && !named_by_connection.iter().any(|n| n == name.as_str())
    })
}

fn truncated() -> CacheError {
    CacheError::codec(
        "not an HTTP response frame",
        "truncated, foreign or of another version",
    )
}

impl<B> Codec<http::Response<B>> for HttpCodec
where
    B: AsRef<[u8]> + From<Bytes> + Send + 'static,
{
    fn cacheable(&self, response: &http::Response<B>) -> bool {
        let private = response
            .headers()
            .get_all(header::CACHE_CONTROL)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|directive| {
                let directive = directive.trim();
                directive.eq_ignore_ascii_case("no-store")
                    || directive.eq_ignore_ascii_case("private")
            });
        response.status().is_success() && !private
    }

    fn encode(&self, response: &http::Response<B>) -> Result<Bytes> {
        let headers: Vec<_> = kept(response.headers()).collect();
        let count = u16::try_from(headers.len())
            .map_err(|_| CacheError::codec("too many headers to cache", "more than 65,535"))?;
        let body = response.body().as_ref();
        let header_bytes: usize = headers
            .iter()
            .map(|(name, value)| 2 + name.as_str().len() + 4 + value.len())
            .sum();
        let mut out = BytesMut::with_capacity(7 + header_bytes + body.len());
        out.put_slice(&HTTP_MAGIC);
        out.put_u8(HTTP_VERSION);
        out.put_u16(response.status().as_u16());
        out.put_u16(count);
        for (name, value) in headers {
            // A header name is at most 64 KiB by `http`'s own limit.
            let name = name.as_str().as_bytes();
            let name_len = u16::try_from(name.len()).map_err(|_| {
                CacheError::codec("a header name is too long to cache", "over 64 KiB")
            })?;
            let value_len = u32::try_from(value.len()).map_err(|_| {
                CacheError::codec("a header value is too long to cache", "over 4 GiB")
            })?;
            out.put_u16(name_len);
            out.put_slice(name);
            out.put_u32(value_len);
            out.put_slice(value.as_bytes());
        }
        out.put_slice(body);
        Ok(out.freeze())
    }

    fn decode(&self, bytes: Bytes) -> Result<http::Response<B>> {
        let mut buf = bytes;
        if buf.remaining() < 7 || buf[..2] != HTTP_MAGIC || buf[2] != HTTP_VERSION {
            return Err(truncated());
        }
        buf.advance(3);
        let status = http::StatusCode::from_u16(buf.get_u16())
            .map_err(|err| CacheError::codec("the cached status is not a status code", err))?;
        let count = buf.get_u16();
        // The count comes from the bytes: never trust it for an allocation
        // (`HeaderMap` panics past 32,768).
        let mut headers = HeaderMap::with_capacity(usize::from(count).min(64));
        for _ in 0..count {
            if buf.remaining() < 2 {
                return Err(truncated());
            }
            let name_len = usize::from(buf.get_u16());
            if buf.remaining() < name_len + 4 {
                return Err(truncated());
            }
            let name = HeaderName::from_bytes(&buf[..name_len])
                .map_err(|err| CacheError::codec("a cached header name is invalid", err))?;
            buf.advance(name_len);
            let value_len = buf.get_u32() as usize;
            if buf.remaining() < value_len {
                return Err(truncated());
            }
            let value = HeaderValue::from_bytes(&buf[..value_len])
                .map_err(|err| CacheError::codec("a cached header value is invalid", err))?;
            buf.advance(value_len);
            headers.append(name, value);
        }
        let mut response = http::Response::new(B::from(buf));
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn response() -> http::Response<Bytes> {
        http::Response::builder()
            .status(201)
            .header("content-type", "text/event-stream")
            .header("x-request-id", "abc")
            .header("x-multi", "one")
            .header("x-multi", "two")
            .header("connection", "keep-alive, x-conn-only")
            .header("x-conn-only", "dropped")
            .header("transfer-encoding", "chunked")
            .header("set-cookie", "session=secret")
            .body(Bytes::from_static(b"\x00\xff body bytes"))
            .unwrap()
    }

    #[test]
    fn http_responses_keep_status_headers_and_body() {
        let original = response();
        let back: http::Response<Bytes> = HttpCodec
            .decode(HttpCodec.encode(&original).unwrap())
            .unwrap();
        assert_eq!(back.status(), 201);
        assert_eq!(back.body(), original.body());
        assert_eq!(back.headers()["content-type"], "text/event-stream");
        let multi: Vec<_> = back.headers().get_all("x-multi").iter().collect();
        assert_eq!(multi, ["one", "two"]);
        for dropped in [
            "connection",
            "x-conn-only",
            "transfer-encoding",
            "set-cookie",
        ] {
            assert!(back.headers().get(dropped).is_none(), "{dropped} kept");
        }
        assert_eq!(back.headers().len(), 4);
    }

    #[test]
    fn http_bodies_of_other_types_convert() {
        let original = http::Response::new(b"vec body".to_vec());
        let back: http::Response<Vec<u8>> = HttpCodec
            .decode(HttpCodec.encode(&original).unwrap())
            .unwrap();
        assert_eq!(back.body(), b"vec body");
        assert_eq!(back.status(), 200);
    }

    #[test]
    fn only_successful_shareable_responses_are_cacheable() {
        let with = |status: u16, cache_control: Option<&str>| {
            let mut builder = http::Response::builder().status(status);
            if let Some(value) = cache_control {
                builder = builder.header("cache-control", value);
            }
            builder.body(Bytes::new()).unwrap()
        };
        assert!(HttpCodec.cacheable(&with(200, None)));
        assert!(HttpCodec.cacheable(&with(200, Some("max-age=60"))));
        assert!(!HttpCodec.cacheable(&with(503, None)));
        assert!(!HttpCodec.cacheable(&with(404, None)));
        assert!(!HttpCodec.cacheable(&with(200, Some("max-age=0, No-Store"))));
        assert!(!HttpCodec.cacheable(&with(200, Some("private"))));
    }

    #[test]
    fn foreign_bytes_are_codec_errors() {
        let good = HttpCodec.encode(&response()).unwrap();
        for bad in [
            Bytes::new(),
            Bytes::from_static(b"KH"),
            Bytes::from_static(b"KH\x02\x00\xc8\x00\x00"),
            Bytes::from_static(b"{\"json\": true}"),
            good.slice(..12),
        ] {
            let result: Result<http::Response<Bytes>> = HttpCodec.decode(bad.clone());
            assert!(matches!(result, Err(CacheError::Codec { .. })), "{bad:?}");
        }
    }

    #[test]
    fn json_mismatches_are_codec_errors() {
        let result: Result<Vec<u32>> = JsonCodec.decode(Bytes::from_static(b"not json"));
        assert!(matches!(result, Err(CacheError::Codec { .. })));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut framed = b"KH\x01".to_vec();
            framed.extend(bytes);
            let _: Result<http::Response<Bytes>> = HttpCodec.decode(framed.into());
        }

        #[test]
        fn bodies_round_trip(body in proptest::collection::vec(any::<u8>(), 0..512), status in 200u16..300) {
            let original = http::Response::builder().status(status).body(Bytes::from(body)).unwrap();
            let back: http::Response<Bytes> = HttpCodec.decode(HttpCodec.encode(&original).unwrap()).unwrap();
            prop_assert_eq!(back.status(), original.status());
            prop_assert_eq!(back.body(), original.body());
        }
    }
}
