//! Tenants and the API keys that map to them.

use std::collections::HashSet;

use keel_core::ConfigError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A tenant's priority class in admission.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum PriorityClass {
    /// Interactive traffic, served first.
    High,
    /// The default.
    #[default]
    Normal,
    /// Batch traffic, served when nothing else waits.
    Low,
}

/// A tenant: who pays, with its limits, fairness weight and models.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Tenant {
    /// Its name (in metrics and logs).
    pub name: String,
    /// Its priority class. Default normal.
    #[serde(default)]
    pub priority: PriorityClass,
    /// Its share against other tenants of the same class, in tokens.
    /// Default 1.
    #[serde(default = "one")]
    pub weight: f64,
    /// Requests per minute, all its keys together. Unset: no limit.
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Tokens (prompt + completion) per minute, all its keys together.
    /// Unset: no limit.
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    /// Models it may use; empty: every model.
    #[serde(default)]
    pub models: Vec<String>,
}

fn one() -> f64 {
    1.0
}

impl Tenant {
    /// A tenant with no limits, weight 1, normal priority.
    pub fn new(name: impl Into<String>) -> Self {
        Tenant {
            name: name.into(),
            priority: PriorityClass::Normal,
            weight: 1.0,
            requests_per_minute: None,
            tokens_per_minute: None,
            models: Vec::new(),
        }
    }

    pub(crate) fn validate(&self, index: usize, models: &HashSet<&str>) -> Result<(), ConfigError> {
        if self.name.trim().is_empty() {
            return Err(ConfigError::new(
                "tenants[].name",
                format!("tenants[{index}] has no name"),
            ));
        }
        if !(self.weight.is_finite() && self.weight > 0.0) {
            return Err(ConfigError::new(
                "tenants[].weight",
                format!("tenant `{}`: weight must be above 0", self.name),
            ));
        }
        if let Some(field) = zero_limit(
            self.requests_per_minute,
            self.tokens_per_minute,
            "tenants[].requests_per_minute",
            "tenants[].tokens_per_minute",
        ) {
            return Err(ConfigError::new(
                field,
                format!(
                    "tenant `{}`: a limit of 0 admits nothing; leave it unset for no limit",
                    self.name
                ),
            ));
        }
        if let Some(unknown) = self.models.iter().find(|m| !models.contains(m.as_str())) {
            return Err(ConfigError::new(
                "tenants[].models",
                format!("tenant `{}` names unknown model `{unknown}`", self.name),
            ));
        }
        Ok(())
    }

    /// Whether the tenant may use `model`.
    pub fn allows(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }
}

/// One API key, stored as the hex SHA-256 of the key (never the key).
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct KeyConfig {
    /// Hex SHA-256 of the key ([`hash_key`]).
    pub sha256: String,
    /// The tenant it belongs to.
    pub tenant: String,
    /// Requests per minute for this key alone. Unset: the tenant's only.
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Tokens per minute for this key alone. Unset: the tenant's only.
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
}

impl std::fmt::Debug for KeyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyConfig")
            .field(
                "sha256",
                &format_args!("{}…", &self.sha256[..self.sha256.len().min(8)]),
            )
            .field("tenant", &self.tenant)
            .field("requests_per_minute", &self.requests_per_minute)
            .field("tokens_per_minute", &self.tokens_per_minute)
            .finish()
    }
}

impl KeyConfig {
    /// The key `key` (hashed here) for `tenant`.
    pub fn new(key: &str, tenant: impl Into<String>) -> Self {
        KeyConfig {
            sha256: hash_key(key),
            tenant: tenant.into(),
            requests_per_minute: None,
            tokens_per_minute: None,
        }
    }

    pub(crate) fn validate(
        &self,
        index: usize,
        tenants: &HashSet<&str>,
    ) -> Result<(), ConfigError> {
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ConfigError::new(
                "keys[].sha256",
                format!(
                    "keys[{index}]: expected 64 hex digits (the SHA-256 of the key; `keel-gateway hash-key <key>` prints it)"
                ),
            ));
        }
        if !tenants.contains(self.tenant.as_str()) {
            return Err(ConfigError::new(
                "keys[].tenant",
                format!("keys[{index}] names unknown tenant `{}`", self.tenant),
            ));
        }
        if let Some(field) = zero_limit(
            self.requests_per_minute,
            self.tokens_per_minute,
            "keys[].requests_per_minute",
            "keys[].tokens_per_minute",
        ) {
            return Err(ConfigError::new(
                field,
                format!("keys[{index}]: a limit of 0 admits nothing; leave it unset for no limit"),
            ));
        }
        Ok(())
    }
}

/// The hex SHA-256 of an API key, as stored in [`KeyConfig::sha256`].
///
/// ```
/// assert_eq!(
///     keel_gateway::config::hash_key("test"),
///     "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
/// );
/// ```
pub fn hash_key(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// The field of a limit set to 0 (which would admit nothing), if any.
fn zero_limit(
    requests: Option<u32>,
    tokens: Option<u64>,
    requests_field: &'static str,
    tokens_field: &'static str,
) -> Option<&'static str> {
    if requests == Some(0) {
        Some(requests_field)
    } else if tokens == Some(0) {
        Some(tokens_field)
    } else {
        None
    }
}
