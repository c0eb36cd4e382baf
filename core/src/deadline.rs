//! One deadline for every layer: admission, retries, hedging, the balancer
//! and the worker all read the same [`Deadline`] from a request's
//! [`http::Extensions`].

use std::time::Duration;

use tokio::time::Instant;

/// A request that carries [`http::Extensions`], where every Keel layer looks
/// for per-request values ([`Deadline`], and the balancer's routing hints).
///
/// Implemented for [`http::Request`] and [`http::Extensions`], so anything
/// built on hyper, axum, tonic or tower-http works as is. A custom request
/// type implements it with one field:
///
/// ```
/// use keel_core::RequestExtensions;
///
/// #[derive(Clone, Debug)]
/// struct Embed {
///     text: String,
///     extensions: http::Extensions,
/// }
///
/// impl RequestExtensions for Embed {
///     fn extensions(&self) -> &http::Extensions {
///         &self.extensions
///     }
///     fn extensions_mut(&mut self) -> &mut http::Extensions {
///         &mut self.extensions
///     }
/// }
/// ```
pub trait RequestExtensions {
    /// The request's extensions.
    fn extensions(&self) -> &http::Extensions;
    /// The request's extensions, mutably.
    fn extensions_mut(&mut self) -> &mut http::Extensions;
}

impl<B> RequestExtensions for http::Request<B> {
    fn extensions(&self) -> &http::Extensions {
        http::Request::extensions(self)
    }

    fn extensions_mut(&mut self) -> &mut http::Extensions {
        http::Request::extensions_mut(self)
    }
}

impl RequestExtensions for http::Extensions {
    fn extensions(&self) -> &http::Extensions {
        self
    }

    fn extensions_mut(&mut self) -> &mut http::Extensions {
        self
    }
}

/// The instant after which nobody wants the answer to a request.
///
/// Carried in the request's extensions, and the only deadline type in Keel:
/// admission (keel-scheduler) reads it for expiry and earliest-deadline
/// ordering, the balancer never dispatches an expired request and cancels
/// the upstream call when it passes, retries and hedges never start past
/// it, and the worker maps a job's deadline to it. It is a
/// [`tokio::time::Instant`], so paused-time tests control it.
///
/// ```
/// use std::time::Duration;
/// use keel_core::Deadline;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let mut request = http::Request::new("prompt");
/// Deadline::after(Duration::from_secs(2)).apply(&mut request);
/// // A later, looser deadline never extends an earlier one.
/// Deadline::after(Duration::from_secs(30)).apply(&mut request);
/// let deadline = Deadline::of(&request).unwrap();
/// assert!(deadline.remaining() <= Duration::from_secs(2));
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline(Instant);

impl Deadline {
    /// A deadline at `instant`.
    pub fn at(instant: Instant) -> Self {
        Deadline(instant)
    }

    /// A deadline `timeout` from now. A timeout too large to represent is
    /// capped at about thirty years, so `Duration::MAX` means "no deadline
    /// in practice" rather than a panic.
    pub fn after(timeout: Duration) -> Self {
        let now = Instant::now();
        Deadline(
            now.checked_add(timeout)
                .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30)),
        )
    }

    /// The deadline's instant.
    pub fn instant(&self) -> Instant {
        self.0
    }

    /// Time left until the deadline; zero once it passed.
    pub fn remaining(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// Whether the deadline has passed.
    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.0
    }

    /// The earlier of two deadlines.
    pub fn min(self, other: Deadline) -> Deadline {
        std::cmp::min(self, other)
    }

    /// The deadline carried by `request`, if any.
    pub fn of<R: RequestExtensions + ?Sized>(request: &R) -> Option<Deadline> {
        request.extensions().get::<Deadline>().copied()
    }

    /// Sets this deadline on `request`, unless it already carries an earlier
    /// one (a deadline only ever tightens). Returns the deadline in force.
    pub fn apply<R: RequestExtensions + ?Sized>(self, request: &mut R) -> Deadline {
        let effective = match Deadline::of(request) {
            Some(existing) if existing <= self => existing,
            _ => self,
        };
        request.extensions_mut().insert(effective);
        effective
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn tightens_never_loosens() {
        let mut request = http::Request::new(());
        let first = Deadline::after(Duration::from_secs(5)).apply(&mut request);
        assert_eq!(
            Deadline::after(Duration::from_secs(9)).apply(&mut request),
            first
        );
        let tighter = Deadline::after(Duration::from_secs(1));
        assert_eq!(tighter.apply(&mut request), tighter);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(Deadline::of(&request).unwrap().is_expired());
        assert_eq!(Deadline::of(&request).unwrap().remaining(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn huge_timeouts_do_not_panic() {
        let deadline = Deadline::after(Duration::MAX);
        assert!(deadline.remaining() > Duration::from_secs(86_400 * 365));
    }
}
