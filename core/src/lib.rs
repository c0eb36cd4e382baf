#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backoff;
mod budget;
#[cfg(feature = "chaos")]
#[cfg_attr(docsrs, doc(cfg(feature = "chaos")))]
pub mod chaos;
mod deadline;
mod endpoint;
mod error;
mod hash;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
mod http;
mod outcome;
mod redact;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
mod retry_after;
pub mod validate;

pub use backoff::{Backoff, Jitter};
pub use budget::{BudgetConfig, BudgetStats, RetryBudget};
pub use deadline::{Deadline, RequestExtensions};
pub use endpoint::{EndpointId, EndpointKey, Reporter};
pub use error::{
    ArgumentError, BoxError, ConfigError, ErrorKind, KeelError, KindProbe, find_kind, kind_of,
};
pub use hash::{stable_hash, stable_hash_seeded};
#[cfg(feature = "http")]
pub use http::{HttpError, http_error, status_of};
pub use outcome::{
    Classify, ClassifyError, DefaultClassifier, FailureKind, Outcome, ResponseStatus,
    ResultClassifier,
};
pub use redact::redacted_url;
pub use retry_after::{MAX_RETRY_AFTER, parse_retry_after, retry_after_header, retry_after_value};

#[doc(hidden)]
pub mod __private {
    pub use inventory;
}
