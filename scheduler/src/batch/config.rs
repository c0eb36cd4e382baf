//! Settings of a [`Batcher`](crate::Batcher).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use keel_core::validate;

/// Settings of a [`Batcher`](crate::Batcher).
///
/// ```
/// use std::time::Duration;
/// use keel_scheduler::BatchConfig;
///
/// let config = BatchConfig::new("embed").max_batch_size(64).max_wait(Duration::from_millis(10));
/// assert!(config.validate().is_ok());
/// assert!(BatchConfig::new("embed").max_batch_size(0).validate().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct BatchConfig {
    /// The batcher's name, the `batcher` label of its metrics. Default
    /// `"default"`.
    pub name: String,
    /// A batch is sent as soon as it holds this many items. Default 32.
    pub max_batch_size: usize,
    /// A batch is sent once its first item has waited this long, full or
    /// not (if the batch service is ready). Default 5 ms.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// How many submitted items may wait to be grouped; submitters wait
    /// (and `poll_ready` is pending) beyond it. Default 1,024.
    pub capacity: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            name: "default".to_owned(),
            max_batch_size: 32,
            max_wait: Duration::from_millis(5),
            capacity: 1_024,
        }
    }
}

impl BatchConfig {
    /// Defaults with this name.
    pub fn new(name: impl Into<String>) -> Self {
        BatchConfig {
            name: name.into(),
            ..BatchConfig::default()
        }
    }

    /// Sets [`max_batch_size`](Self::max_batch_size).
    pub fn max_batch_size(mut self, size: usize) -> Self {
        self.max_batch_size = size;
        self
    }

    /// Sets [`max_wait`](Self::max_wait).
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }

    /// Sets [`capacity`](Self::capacity).
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// Checks every field, naming the first bad one.
    ///
    /// # Errors
    ///
    /// [`SchedulerError::InvalidConfig`](crate::SchedulerError::InvalidConfig)
    /// naming the field.
    pub fn validate(&self) -> Result<()> {
        validate::non_empty("name", &self.name)?;
        validate::at_least("max_batch_size", self.max_batch_size, 1)?;
        Ok(validate::at_least("capacity", self.capacity, 1)?)
    }
}
