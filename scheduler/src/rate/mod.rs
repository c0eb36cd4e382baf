//! Per-tenant rate limits (GCRA) on requests and on cost units: in this
//! process ([`LocalRateLimiter`], on the `governor` crate) or shared by
//! every process through Redis (`RedisRateLimiter`, feature `redis`).

mod config;
mod local;
#[cfg(feature = "redis")]
mod redis;

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use self::config::{Rate, RateLimitConfig, TenantRates};
pub use self::local::LocalRateLimiter;
#[cfg(feature = "redis")]
pub use self::redis::{RedisRateLimitConfig, RedisRateLimiter};
use crate::error::Result;
use crate::ticket::TenantId;

/// The answer of a rate limiter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateDecision {
    /// The request fits the tenant's limits and was charged to them.
    Allow,
    /// The request does not fit; nothing was charged.
    Limited {
        /// When the request would fit.
        retry_after: Duration,
    },
}

/// A per-tenant rate limit that admission consults before queueing.
///
/// Implemented by [`LocalRateLimiter`] and, with feature `redis`,
/// `RedisRateLimiter`; implement it to put another store behind the same
/// scheduler.
#[async_trait]
pub trait RateLimit: Debug + Send + Sync + 'static {
    /// Charges one request of `cost` units to `tenant`, if it fits.
    ///
    /// # Behavior
    ///
    /// `Allow` charges one request and `cost` units; `Limited` charges
    /// nothing (best effort for limiters that check the two limits
    /// separately, see each implementation) and says when the request
    /// would fit.
    ///
    /// # Errors
    ///
    /// [`SchedulerError::RateLimiter`](crate::SchedulerError::RateLimiter)
    /// when a shared store cannot be reached and the limiter fails closed.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future may or may not charge the request.
    async fn acquire(&self, tenant: &TenantId, cost: u64) -> Result<RateDecision>;

    /// Corrects a charge once the real cost is known: the request admitted
    /// with `reserved` cost units (an estimate, e.g. prompt tokens plus
    /// `max_tokens`) turned out to cost `actual` (e.g. the answer's
    /// `usage`).
    ///
    /// # Behavior
    ///
    /// The difference is applied to the tenant's cost limit; its request
    /// limit is untouched. A refund (`actual < reserved`) gives the units
    /// back, never beyond a full bucket. An overdraft (`actual > reserved`)
    /// is charged even past the limit, so the tenant's next requests wait
    /// until it is paid off. Costs are clamped to the burst as in
    /// [`acquire`](Self::acquire). The default does nothing (a limiter
    /// that only reserves).
    ///
    /// # Errors
    ///
    /// [`SchedulerError::RateLimiter`](crate::SchedulerError::RateLimiter)
    /// when a shared store cannot be reached.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future may or may not apply the correction.
    async fn settle(&self, tenant: &TenantId, reserved: u64, actual: u64) -> Result<()> {
        let _ = (tenant, reserved, actual);
        Ok(())
    }
}

#[async_trait]
impl<T: RateLimit + ?Sized> RateLimit for Arc<T> {
    async fn acquire(&self, tenant: &TenantId, cost: u64) -> Result<RateDecision> {
        (**self).acquire(tenant, cost).await
    }

    async fn settle(&self, tenant: &TenantId, reserved: u64, actual: u64) -> Result<()> {
        (**self).settle(tenant, reserved, actual).await
    }
}

/// The signed correction `settle` applies: `actual − reserved`, each
/// clamped to `[1, burst]` as `acquire` charges.
pub(crate) fn settlement(reserved: u64, actual: u64, burst: u32) -> i64 {
    let clamp = |units: u64| units.clamp(1, u64::from(burst)) as i64;
    clamp(actual) - clamp(reserved)
}
