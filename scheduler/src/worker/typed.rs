//! Typed jobs: a handler that takes a decoded job instead of raw bytes.

use std::fmt;
use std::marker::PhantomData;
use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use serde::de::DeserializeOwned;
use tower::Service;

use super::item::{JobOutcome, WorkItem};

/// A job whose JSON payload decoded as `T`, with the rest of its delivery.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct TypedItem<T> {
    /// The decoded payload.
    pub job: T,
    /// The work item: id, headers, attempt, deadline and the raw payload.
    pub item: WorkItem,
}

/// A handler service over [`TypedItem<T>`], served to a
/// [`Worker`](crate::Worker) as a service over [`WorkItem`]: each payload is
/// decoded from JSON as `T` before the handler sees it.
///
/// # Poison payloads
///
/// A payload that does not decode never reaches the handler and is never
/// retried: the job is dead-lettered at once with the decode error as its
/// reason (`undecodable payload: expected JSON for <T>: <error>`), and the
/// worker counts it in `dead_lettered`. Retrying could not help: the bytes
/// will not change.
///
/// ```
/// use keel_scheduler::{JobOutcome, TypedItem, json_jobs};
///
/// #[derive(serde::Deserialize)]
/// struct Embed {
///     text: String,
/// }
///
/// let handler = json_jobs(tower::service_fn(|item: TypedItem<Embed>| async move {
///     assert!(!item.job.text.is_empty());
///     Ok::<_, std::convert::Infallible>(JobOutcome::Ack)
/// }));
/// # let _ = handler;
/// ```
pub struct JsonJobs<S, T> {
    inner: S,
    _job: PhantomData<fn() -> T>,
}

/// Wraps a handler over [`TypedItem<T>`] so a worker can run it; see
/// [`JsonJobs`].
pub fn json_jobs<T, S>(inner: S) -> JsonJobs<S, T>
where
    T: DeserializeOwned,
    S: Service<TypedItem<T>, Response = JobOutcome>,
{
    JsonJobs {
        inner,
        _job: PhantomData,
    }
}

impl<S: Clone, T> Clone for JsonJobs<S, T> {
    fn clone(&self) -> Self {
        JsonJobs {
            inner: self.inner.clone(),
            _job: PhantomData,
        }
    }
}

impl<S: fmt::Debug, T> fmt::Debug for JsonJobs<S, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonJobs")
            .field("inner", &self.inner)
            .field("job", &std::any::type_name::<T>())
            .finish()
    }
}

impl<S, T> Service<WorkItem> for JsonJobs<S, T>
where
    T: DeserializeOwned,
    S: Service<TypedItem<T>, Response = JobOutcome>,
{
    type Response = JobOutcome;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<JobOutcome, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, item: WorkItem) -> Self::Future {
        match serde_json::from_slice::<T>(&item.payload) {
            Ok(job) => Either::Left(self.inner.call(TypedItem { job, item })),
            Err(err) => {
                let reason = format!(
                    "undecodable payload: expected JSON for {}: {err}",
                    std::any::type_name::<T>()
                );
                tracing::warn!(job = %item.id, %reason, "dead-lettering a poison message");
                Either::Right(ready(Ok(JobOutcome::Abort { reason })))
            }
        }
    }
}
