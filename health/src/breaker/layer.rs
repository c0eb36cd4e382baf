use std::sync::Arc;

use tower_layer::Layer;

use super::{Breaker, CircuitBreaker};
use crate::config::BreakerConfig;
use crate::error::Result;
use keel_core::DefaultClassifier;

/// Wraps a service in a [`CircuitBreaker`] with its own state.
#[derive(Clone, Debug)]
pub struct CircuitBreakerLayer<C = DefaultClassifier> {
    config: BreakerConfig,
    classifier: C,
}

impl CircuitBreakerLayer {
    /// A layer with the [`DefaultClassifier`].
    ///
    /// # Errors
    ///
    /// [`HealthError::InvalidConfig`](crate::HealthError::InvalidConfig)
    /// naming the bad field.
    pub fn new(config: BreakerConfig) -> Result<Self> {
        CircuitBreakerLayer::with_classifier(config, DefaultClassifier)
    }
}

impl<C> CircuitBreakerLayer<C> {
    /// A layer classifying outcomes with `classifier`.
    ///
    /// # Errors
    ///
    /// [`HealthError::InvalidConfig`](crate::HealthError::InvalidConfig)
    /// naming the bad field.
    pub fn with_classifier(config: BreakerConfig, classifier: C) -> Result<Self> {
        config.validate()?;
        Ok(CircuitBreakerLayer { config, classifier })
    }
}

impl<S, C: Clone> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreaker<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::new(
            inner,
            Arc::new(Breaker::new(self.config.clone())),
            self.classifier.clone(),
        )
    }
}
