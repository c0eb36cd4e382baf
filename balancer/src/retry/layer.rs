//! The retry layer.

use tower_layer::Layer;

use super::policy::{RetryConfig, RetryPolicy};
use crate::error::Result;
use keel_core::RetryBudget;

/// Wraps a service (usually a [`Balancer`](crate::Balancer)) in
/// [`tower::retry::Retry`] with a Keel [`RetryPolicy`].
///
/// Every service this layer wraps shares the layer's one budget: build one
/// layer per client.
#[derive(Clone, Debug)]
pub struct RetryLayer {
    policy: RetryPolicy,
}

impl RetryLayer {
    /// A layer with this configuration and a fresh budget.
    ///
    /// # Errors
    ///
    /// [`BalancerError::InvalidConfig`](crate::BalancerError::InvalidConfig)
    /// naming the bad field.
    pub fn new(config: RetryConfig) -> Result<Self> {
        Ok(RetryLayer {
            policy: RetryPolicy::new(config)?,
        })
    }

    /// A layer with seeded backoff jitter, for reproducible simulations.
    ///
    /// # Errors
    ///
    /// [`BalancerError::InvalidConfig`](crate::BalancerError::InvalidConfig)
    /// naming the bad field.
    pub fn with_seed(config: RetryConfig, seed: u64) -> Result<Self> {
        Ok(RetryLayer {
            policy: RetryPolicy::with_seed(config, seed)?,
        })
    }

    /// The layer's policy.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// The layer's budget.
    pub fn budget(&self) -> &RetryBudget {
        self.policy.budget()
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = tower::retry::Retry<RetryPolicy, S>;

    fn layer(&self, inner: S) -> Self::Service {
        tower::retry::Retry::new(self.policy.clone(), inner)
    }
}
