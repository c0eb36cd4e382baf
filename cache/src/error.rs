//! The errors of `keel-cache`: the cache's own [`CacheError`], and
//! [`LoadFailed`], what a loading read answers (the caller's own error,
//! typed, or the cache's).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use keel_core::{ArgumentError, ConfigError, ErrorKind, KeelError};

/// A boxed, thread-safe error, as tower passes them around (the same type
/// as [`keel_core::BoxError`]).
pub use keel_core::BoxError;

/// What went wrong in a cache operation.
///
/// Every variant says whether trying again can help
/// ([`CacheError::is_retryable`]) and what kind of failure it is in the terms
/// every Keel crate shares ([`KeelError::kind`]). Backend errors are
/// classified into these variants in exactly one place per backend; no
/// backend library type appears here (a Redis failure is the `#[source]`,
/// as a [`keel_core::redis::RedisError`]).
///
/// A loading read ([`Tiered::get_or_load`](crate::Tiered::get_or_load))
/// answers [`LoadFailed`] instead: the loader's own error, typed, or one of
/// these when the cache itself could not produce a value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The backend could not be reached, dropped the connection, or is
    /// coming back (Redis `LOADING`, a failover). Kind
    /// [`ErrorKind::Unavailable`]; retryable.
    #[error("cache backend unavailable: {message}")]
    Unavailable {
        /// What was being attempted, and what failed.
        message: String,
        /// The underlying cause.
        #[source]
        source: Option<BoxError>,
    },
    /// The backend did not answer within the configured operation timeout.
    /// Kind [`ErrorKind::DeadlineExceeded`]; retryable (the tier was slow
    /// this time).
    #[error("cache operation timed out after {0:?}; the backend is slow or unreachable")]
    Timeout(Duration),
    /// A value could not be encoded, or stored bytes could not be decoded
    /// (see [`Codec`](crate::Codec)). Kind [`ErrorKind::Internal`].
    #[error("codec error: {message}")]
    Codec {
        /// What could not be encoded or decoded.
        message: String,
        /// The underlying cause.
        #[source]
        source: Option<BoxError>,
    },
    /// An argument is out of range (for example a zero TTL); the
    /// [`ArgumentError`] names it. Kind [`ErrorKind::InvalidInput`].
    #[error(transparent)]
    InvalidArgument(#[from] ArgumentError),
    /// A configuration field is invalid; the component was not built. The
    /// message names the field and what is accepted. Kind
    /// [`ErrorKind::Internal`].
    #[error(transparent)]
    InvalidConfig(#[from] ConfigError),
    /// The backend answered with an error that waiting does not fix (a
    /// wrong type, a script error). Kind [`ErrorKind::Internal`].
    #[error("cache backend error: {message}")]
    Backend {
        /// What was being attempted.
        message: String,
        /// The underlying cause.
        #[source]
        source: Option<BoxError>,
    },
    /// A loader did not finish within the hard load timeout
    /// ([`TieredConfig::load_timeout`](crate::TieredConfig::load_timeout)),
    /// and there was no stale value to serve instead. Kind
    /// [`ErrorKind::DeadlineExceeded`]; retryable.
    #[error("loading the value took longer than the hard timeout of {0:?}")]
    LoadTimeout(Duration),
    /// A loader panicked. Every caller waiting on that load gets this; the
    /// next call for the key loads again. Kind [`ErrorKind::Internal`].
    #[error("the loader panicked")]
    LoaderPanicked,
}

impl CacheError {
    /// Whether trying the same operation again may succeed.
    ///
    /// An exhaustive match with no `_` arm: a new variant forces a decision.
    /// Timeouts are retryable although their [kind](KeelError::kind) is
    /// [`ErrorKind::DeadlineExceeded`]: the cache tier (or the origin) was
    /// slow this time, and the caller's deadline is the caller's to check.
    pub fn is_retryable(&self) -> bool {
        match self {
            CacheError::Unavailable { .. } => true,
            CacheError::Timeout(_) => true,
            CacheError::Codec { .. } => false,
            CacheError::InvalidArgument(_) => false,
            CacheError::InvalidConfig(_) => false,
            CacheError::Backend { .. } => false,
            CacheError::LoadTimeout(_) => true,
            CacheError::LoaderPanicked => false,
        }
    }

    #[allow(dead_code)] // used by the network backends and the chaos decorator
    pub(crate) fn unavailable(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        CacheError::Unavailable {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    pub(crate) fn codec(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        CacheError::Codec {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    pub(crate) fn argument(name: &'static str, reason: impl Into<String>) -> Self {
        CacheError::InvalidArgument(ArgumentError::new(name, reason))
    }

    #[cfg_attr(not(feature = "moka"), allow(dead_code))] // used by `Tiered`
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        CacheError::InvalidConfig(ConfigError::new(field, reason))
    }
}

impl KeelError for CacheError {
    /// An exhaustive match with no `_` arm: a new variant forces a decision.
    fn kind(&self) -> ErrorKind {
        match self {
            CacheError::Unavailable { .. } => ErrorKind::Unavailable { retry_after: None },
            CacheError::Timeout(_) | CacheError::LoadTimeout(_) => ErrorKind::DeadlineExceeded,
            CacheError::InvalidArgument(_) => ErrorKind::InvalidInput,
            CacheError::Codec { .. }
            | CacheError::InvalidConfig(_)
            | CacheError::Backend { .. }
            | CacheError::LoaderPanicked => ErrorKind::Internal,
        }
    }

    fn is_retryable(&self) -> bool {
        CacheError::is_retryable(self)
    }
}

keel_core::register_error_kind!(CacheError);

/// `Result` with the cache's [`CacheError`].
pub(crate) type Result<T, E = CacheError> = std::result::Result<T, E>;

/// Why a loading read ([`Tiered::get_or_load`](crate::Tiered::get_or_load)
/// and its variants) produced no value: the loader's own error `E`, typed, a
/// failure remembered by negative caching, or the cache's own [`CacheError`].
/// Never a string standing in for your error.
///
/// `E` is shared: every caller coalesced onto one load gets the same
/// `Arc<E>` (as moka's `try_get_with` does).
///
/// It implements [`KeelError`]: the kind of a [`Loader`](Self::Loader)
/// error is whatever [`keel_core::kind_of`] finds in it (a registered Keel
/// error in its chain, else [`ErrorKind::Upstream`]).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), keel_cache::CacheError> {
/// use keel_cache::{LoadFailed, Tiered, TieredConfig};
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("model `{0}` is not deployed")]
/// struct NoSuchModel(String);
///
/// let cache = Tiered::builder(TieredConfig::new("completions")).build()?;
/// let err = cache
///     .get_or_load("k", || async { Err::<bytes::Bytes, _>(NoSuchModel("m@1".into())) })
///     .await
///     .unwrap_err();
/// match &err {
///     LoadFailed::Loader(own) => assert_eq!(own.0, "m@1"), // our type, not a string
///     other => panic!("{other:?}"),
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum LoadFailed<E> {
    /// The loader failed with this error: this caller's loader or, when the
    /// caller was coalesced onto another caller's load of the same key,
    /// that loader's (shared, hence the `Arc`).
    Loader(Arc<E>),
    /// A loader error remembered by negative caching (see
    /// [`TieredConfig::negative_ttl`](crate::TieredConfig::negative_ttl)),
    /// answered without calling the loader. It may have been stored by
    /// another process through L2, so only its kind and message remain.
    Cached(CachedFailure),
    /// The cache could not produce a value: the loader exceeded the hard
    /// timeout ([`CacheError::LoadTimeout`]) or panicked
    /// ([`CacheError::LoaderPanicked`]), an argument was invalid
    /// ([`CacheError::InvalidArgument`]), or a value did not encode or decode
    /// ([`CacheError::Codec`]). Never an L2 failure: those are misses.
    Cache(CacheError),
}

impl<E> LoadFailed<E> {
    /// The loader's error, if that is what this is.
    pub fn loader_error(&self) -> Option<&E> {
        match self {
            LoadFailed::Loader(err) => Some(err),
            LoadFailed::Cached(_) | LoadFailed::Cache(_) => None,
        }
    }

    /// The loader's error (shared with the other coalesced callers), if
    /// that is what this is.
    pub fn into_loader_error(self) -> Option<Arc<E>> {
        match self {
            LoadFailed::Loader(err) => Some(err),
            LoadFailed::Cached(_) | LoadFailed::Cache(_) => None,
        }
    }

    /// The cache's own error, if that is what this is.
    pub fn cache_error(&self) -> Option<&CacheError> {
        match self {
            LoadFailed::Cache(err) => Some(err),
            LoadFailed::Loader(_) | LoadFailed::Cached(_) => None,
        }
    }

    /// Whether this answer came from the negative cache.
    pub fn is_cached(&self) -> bool {
        matches!(self, LoadFailed::Cached(_))
    }
}

impl<E: std::error::Error + Send + Sync + 'static> LoadFailed<E> {
    /// Whether trying again can help: the loader error's kind says (see
    /// [`KeelError::is_retryable`]); a cached failure is not retryable (the
    /// same answer comes back until its negative TTL lapses); the cache's
    /// own error says for itself ([`CacheError::is_retryable`]).
    pub fn is_retryable(&self) -> bool {
        match self {
            LoadFailed::Loader(err) => loader_retryable(err.as_ref()),
            LoadFailed::Cached(_) => false,
            LoadFailed::Cache(err) => err.is_retryable(),
        }
    }
}

/// A loader error's retryability: its own when it is a registered Keel
/// error's chain, else by kind.
fn loader_retryable(err: &(dyn std::error::Error + 'static)) -> bool {
    keel_core::kind_of(err).is_retryable()
}

/// The message says what failed below: a client shown this error (through
/// `keel_core::http_error`) learns the loader's own message, not only that a
/// load failed.
impl<E: fmt::Display> fmt::Display for LoadFailed<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadFailed::Loader(err) => write!(f, "loading the value failed: {err}"),
            LoadFailed::Cached(cached) => {
                write!(f, "loading the value failed recently: {}", cached.message())
            }
            LoadFailed::Cache(err) => write!(f, "the cache could not load the value: {err}"),
        }
    }
}

impl<E: std::error::Error + Send + Sync + 'static> std::error::Error for LoadFailed<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LoadFailed::Loader(err) => Some(err.as_ref()),
            LoadFailed::Cached(cached) => Some(cached),
            LoadFailed::Cache(err) => Some(err),
        }
    }
}

impl<E: std::error::Error + Send + Sync + 'static> KeelError for LoadFailed<E> {
    fn kind(&self) -> ErrorKind {
        match self {
            LoadFailed::Loader(err) => keel_core::kind_of(err.as_ref()),
            LoadFailed::Cached(cached) => cached.kind,
            LoadFailed::Cache(err) => err.kind(),
        }
    }

    fn is_retryable(&self) -> bool {
        LoadFailed::is_retryable(self)
    }
}

/// A loader error remembered by negative caching: its kind and its message
/// (the error's `Display` and those of its sources, joined by `": "`).
///
/// Kind: the remembered one. Never retryable: the same answer comes back
/// until the negative TTL lapses.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message} (remembered as `{kind}` by negative caching)")]
pub struct CachedFailure {
    kind: ErrorKind,
    message: String,
}

impl CachedFailure {
    #[cfg_attr(not(feature = "moka"), allow(dead_code))] // used by `Tiered`
    pub(crate) fn new(kind: ErrorKind, message: String) -> Self {
        CachedFailure { kind, message }
    }

    /// The kind the original error had.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The original error's message, with those of its sources.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl KeelError for CachedFailure {
    fn kind(&self) -> ErrorKind {
        self.kind
    }

    fn is_retryable(&self) -> bool {
        false
    }
}

keel_core::register_error_kind!(CachedFailure);

/// `err`'s message followed by its sources', joined by `": "`.
#[cfg_attr(not(feature = "moka"), allow(dead_code))] // used by `Tiered`
pub(crate) fn chain_message(err: &(dyn std::error::Error + 'static)) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // Some errors repeat their source in their own message.
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// Every [`ErrorKind`] by its [`as_str`](ErrorKind::as_str) name, for
/// negative caching by kind name in configs and in the L2 envelope. A
/// kind's `retry_after`, if any, is not kept.
#[cfg_attr(not(feature = "moka"), allow(dead_code))] // used by `Tiered`
pub(crate) const KINDS: [ErrorKind; 10] = [
    ErrorKind::RateLimited { retry_after: None },
    ErrorKind::Overloaded { retry_after: None },
    ErrorKind::QueueFull,
    ErrorKind::DeadlineExceeded,
    ErrorKind::Unavailable { retry_after: None },
    ErrorKind::Upstream,
    ErrorKind::InvalidInput,
    ErrorKind::NotFound,
    ErrorKind::Cancelled,
    ErrorKind::Internal,
];

/// The kind named `name` (an [`ErrorKind::as_str`]).
#[cfg_attr(not(feature = "moka"), allow(dead_code))] // used by `Tiered`
pub(crate) fn kind_named(name: &str) -> Option<ErrorKind> {
    KINDS.into_iter().find(|kind| kind.as_str() == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryability_and_kinds() {
        assert!(CacheError::Timeout(Duration::from_millis(50)).is_retryable());
        assert_eq!(
            CacheError::Timeout(Duration::from_millis(50)).kind(),
            ErrorKind::DeadlineExceeded
        );
        let config = CacheError::config("ttl", "must be > 0");
        assert!(!config.is_retryable());
        assert_eq!(config.kind(), ErrorKind::Internal);
        let boxed: BoxError = Box::new(CacheError::unavailable("down", "refused"));
        assert_eq!(
            keel_core::kind_of(boxed.as_ref()),
            ErrorKind::Unavailable { retry_after: None }
        );
        assert_eq!(
            CacheError::argument("ttl", "zero").kind(),
            ErrorKind::InvalidInput
        );
        assert!(CacheError::LoadTimeout(Duration::from_secs(1)).is_retryable());
        assert!(!CacheError::LoaderPanicked.is_retryable());
    }

    #[test]
    fn config_error_names_the_field() {
        let msg = CacheError::config("l1_ttl", "must not exceed `ttl`").to_string();
        assert!(msg.contains("`l1_ttl`"), "{msg}");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("no such model")]
    struct NoSuchModel;

    impl KeelError for NoSuchModel {
        fn kind(&self) -> ErrorKind {
            ErrorKind::NotFound
        }
    }
    keel_core::register_error_kind!(NoSuchModel);

    #[test]
    fn load_failures_keep_the_loaders_type_and_kind() {
        let failed: LoadFailed<NoSuchModel> = LoadFailed::Loader(Arc::new(NoSuchModel));
        assert!(failed.loader_error().is_some());
        assert_eq!(failed.kind(), ErrorKind::NotFound);
        assert!(!failed.is_retryable());
        let boxed: BoxError = Box::new(failed);
        assert_eq!(keel_core::kind_of(boxed.as_ref()), ErrorKind::NotFound);

        let io: LoadFailed<std::io::Error> =
            LoadFailed::Loader(Arc::new(std::io::Error::other("reset")));
        assert_eq!(io.kind(), ErrorKind::Upstream);
        assert!(io.is_retryable());

        let cached: LoadFailed<NoSuchModel> = LoadFailed::Cached(CachedFailure::new(
            ErrorKind::NotFound,
            "no such model".into(),
        ));
        assert!(cached.is_cached() && !cached.is_retryable());
        let boxed: BoxError = Box::new(cached);
        assert_eq!(keel_core::kind_of(boxed.as_ref()), ErrorKind::NotFound);

        let timeout: LoadFailed<NoSuchModel> =
            LoadFailed::Cache(CacheError::LoadTimeout(Duration::from_secs(1)));
        assert_eq!(timeout.kind(), ErrorKind::DeadlineExceeded);
        assert!(timeout.is_retryable());
        assert!(matches!(
            timeout.cache_error(),
            Some(CacheError::LoadTimeout(_))
        ));
    }

    #[test]
    fn kind_names_round_trip() {
        for kind in KINDS {
            assert_eq!(kind_named(kind.as_str()), Some(kind));
        }
        assert_eq!(kind_named("nope"), None);
    }

    #[test]
    fn chain_messages_join_sources() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let err = Outer(std::io::Error::other("inner"));
        assert_eq!(chain_message(&err), "outer: inner");
    }
}
