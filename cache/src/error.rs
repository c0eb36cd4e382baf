//! The one error type of `keel-cache`.

use std::sync::Arc;
use std::time::Duration;

/// A boxed error from a backend library, kept as the [`std::error::Error::source`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong in a cache operation.
///
/// Every variant says whether trying again can help: see [`Error::is_retryable`].
/// Backend errors are classified into these variants in exactly one place per
/// backend; no backend library type appears here.
///
/// Callers of [`Tiered::get_or_load`](crate::Tiered::get_or_load) only ever
/// see [`Error::Load`], [`Error::LoadTimeout`] and [`Error::InvalidArgument`]:
/// a failing cache tier costs latency, never a failed request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The backend could not be reached or dropped the connection.
    #[error("cache backend unavailable: {message}")]
    Unavailable {
        /// What was being attempted, and what failed.
        message: String,
        /// The underlying cause.
        #[source]
        source: Option<BoxError>,
    },
    /// The backend did not answer within the configured operation timeout.
    #[error("cache operation timed out after {0:?}; the backend is slow or unreachable")]
    Timeout(Duration),
    /// A value could not be encoded or decoded.
    #[error("codec error: {message}")]
    Codec {
        /// What could not be encoded or decoded, and why.
        message: String,
        /// The underlying cause.
        #[source]
        source: Option<BoxError>,
    },
    /// An argument is out of range (for example a zero TTL).
    #[error("invalid argument `{name}`: {reason}")]
    InvalidArgument {
        /// The argument's name.
        name: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// A configuration field is invalid; the component was not built.
    #[error("invalid cache config `{field}`: {reason}")]
    InvalidConfig {
        /// The field's name.
        field: &'static str,
        /// Why it was refused and what is accepted.
        reason: String,
    },
    /// The backend does not support this operation; see
    /// [`Capabilities`](crate::Capabilities).
    #[error("unsupported by the {backend} backend: {what}")]
    Unsupported {
        /// The backend's name.
        backend: &'static str,
        /// The operation.
        what: String,
    },
    /// The backend answered with an error we did not expect.
    #[error("cache backend error: {message}")]
    Backend {
        /// What was being attempted.
        message: String,
        /// The underlying cause.
        #[source]
        source: Option<BoxError>,
    },
    /// The loader of a [`get_or_load`](crate::Tiered::get_or_load) failed.
    ///
    /// Every caller coalesced onto the same load sees the same error (the
    /// cause is shared). When negative caching is configured for the error's
    /// `kind`, later callers get this error from the cache (`cached`) until
    /// the negative TTL lapses, without calling the loader.
    #[error("loading the value failed{}: {message}", kind.as_ref().map(|k| format!(" ({k})")).unwrap_or_default())]
    Load {
        /// The error kind the loader gave, if any (see [`LoadError::kind`]).
        kind: Option<String>,
        /// The loader's message.
        message: String,
        /// Whether this answer came from the negative cache rather than from
        /// a loader call.
        cached: bool,
        /// The loader's error, when this process ran the loader.
        #[source]
        source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
    },
    /// The loader did not finish within the hard load timeout, and there was
    /// no stale value to serve instead.
    #[error("loading the value took longer than the hard timeout of {0:?}")]
    LoadTimeout(Duration),
}

impl Error {
    /// Whether trying the same operation again may succeed.
    ///
    /// An exhaustive match with no `_` arm: a new variant forces a decision.
    /// A [`Load`](Error::Load) error is retryable unless it came from the
    /// negative cache (a retry gets the same cached answer until its TTL
    /// lapses).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Unavailable { .. } => true,
            Error::Timeout(_) => true,
            Error::Codec { .. } => false,
            Error::InvalidArgument { .. } => false,
            Error::InvalidConfig { .. } => false,
            Error::Unsupported { .. } => false,
            Error::Backend { .. } => false,
            Error::Load { cached, .. } => !cached,
            Error::LoadTimeout(_) => true,
        }
    }

    #[allow(dead_code)] // used by the network backends
    pub(crate) fn unavailable(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Unavailable {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    pub(crate) fn codec(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Codec {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    pub(crate) fn argument(name: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name,
            reason: reason.into(),
        }
    }

    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }
}

/// `Result` with the cache's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a loader passed to [`get_or_load`](crate::Tiered::get_or_load)
/// fails with.
///
/// Any `std::error::Error` converts into it with `?`; give it a
/// [`kind`](Self::kind) to make it eligible for negative caching (see
/// [`TieredConfig::negative_ttl`](crate::TieredConfig::negative_ttl)).
/// Errors without a kind, or with a kind that is not configured, are never
/// cached.
///
/// Like `anyhow::Error`, it does not implement `std::error::Error` itself,
/// so that the blanket conversion can exist.
///
/// ```
/// use keel_cache::LoadError;
///
/// let err = LoadError::msg("model `gpt-x` does not exist").kind("not_found");
/// assert_eq!(err.kind_name(), Some("not_found"));
/// ```
#[derive(Debug)]
pub struct LoadError {
    kind: Option<String>,
    source: Arc<dyn std::error::Error + Send + Sync + 'static>,
}

impl LoadError {
    /// A load error with only a message.
    pub fn msg(message: impl Into<String>) -> Self {
        LoadError {
            kind: None,
            source: Arc::new(Message(message.into())),
        }
    }

    /// A load error wrapping a boxed error.
    pub fn boxed(source: BoxError) -> Self {
        LoadError {
            kind: None,
            source: Arc::from(source),
        }
    }

    /// Sets the error's kind (a short stable name such as `"not_found"`),
    /// which negative caching is configured by.
    #[must_use]
    pub fn kind(mut self, kind: impl Into<String>) -> Self {
        self.kind = Some(kind.into());
        self
    }

    /// The kind, if one was set.
    pub fn kind_name(&self) -> Option<&str> {
        self.kind.as_deref()
    }

    pub(crate) fn into_parts(
        self,
    ) -> (
        Option<String>,
        Arc<dyn std::error::Error + Send + Sync + 'static>,
    ) {
        (self.kind, self.source)
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for LoadError {
    fn from(err: E) -> Self {
        LoadError {
            kind: None,
            source: Arc::new(err),
        }
    }
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Some(kind) => write!(f, "{} ({kind})", self.source),
            None => self.source.fmt(f),
        }
    }
}

/// A plain message as an error.
#[derive(Debug)]
struct Message(String);

impl std::fmt::Display for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Message {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryability() {
        assert!(Error::Timeout(Duration::from_millis(50)).is_retryable());
        assert!(!Error::config("ttl", "must be > 0").is_retryable());
        let fresh = Error::Load {
            kind: None,
            message: "boom".into(),
            cached: false,
            source: None,
        };
        assert!(fresh.is_retryable());
        let cached = Error::Load {
            kind: Some("not_found".into()),
            message: "boom".into(),
            cached: true,
            source: None,
        };
        assert!(!cached.is_retryable());
        assert_eq!(
            cached.to_string(),
            "loading the value failed (not_found): boom"
        );
    }

    #[test]
    fn config_error_names_the_field() {
        let msg = Error::config("l1_ttl", "must not exceed `ttl`").to_string();
        assert!(msg.contains("`l1_ttl`"), "{msg}");
    }

    #[test]
    fn any_error_converts_into_a_load_error() {
        fn load() -> std::result::Result<u32, LoadError> {
            let n: u32 = "x".parse()?;
            Ok(n)
        }
        let err = load().unwrap_err();
        assert!(err.kind_name().is_none());
        assert!(err.to_string().contains("invalid digit"), "{err}");
    }
}
