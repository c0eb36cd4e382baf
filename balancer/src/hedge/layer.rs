//! The hedge layer.

use std::sync::Arc;

use tower_layer::Layer;

use super::config::HedgeConfig;
use super::service::{Hedge, HedgeShared};
use crate::error::Result;
use keel_core::RetryBudget;

/// Wraps a service (usually a [`Balancer`](crate::Balancer)) in [`Hedge`].
///
/// Every service this layer wraps shares one latency record and one budget.
#[derive(Clone, Debug)]
pub struct HedgeLayer {
    shared: Arc<HedgeShared>,
}

impl HedgeLayer {
    /// A layer with this configuration.
    ///
    /// # Errors
    ///
    /// [`BalancerError::InvalidConfig`](crate::BalancerError::InvalidConfig)
    /// naming the bad field.
    pub fn new(config: HedgeConfig) -> Result<Self> {
        Ok(HedgeLayer {
            shared: Arc::new(HedgeShared::new(config)?),
        })
    }

    /// The hedge budget.
    pub fn budget(&self) -> &RetryBudget {
        &self.shared.budget
    }
}

impl<S> Layer<S> for HedgeLayer {
    type Service = Hedge<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Hedge::from_shared(inner, self.shared.clone())
    }
}
