//! Stable cache keys for inference requests.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{CacheError, Result};

/// The format version baked into every key; a change of canonical form
/// bumps it, so old and new keys never collide.
const VERSION: &str = "v1";

/// Builds a cache key for an inference request from its model, its input
/// and its parameters, hashed with SHA-256 over a canonical form.
///
/// The key is `inf:v1:<model>:<64 hex digits>`. It is stable across
/// processes, machines, releases of this crate within `v1`, and the order in
/// which parameters are given: parameters are sorted by name, JSON objects
/// inside them by key, `-0.0` is `0`, and a float with an integral value is
/// the integer (`1.0` and `1` are one key). Each field is length-prefixed,
/// so no two different requests share a canonical form. SHA-256 keeps
/// deliberate collisions out of reach, so one tenant cannot craft an input
/// that reads another's cached answer.
///
/// Exactly: the hex SHA-256 of these fields, each preceded by its length as
/// a big-endian `u64`: `keel-inference-key`, `v1`, the model, the input,
/// the number of parameters as a big-endian `u64`, then each parameter's
/// name and canonical JSON value, in name order.
///
/// # Only cache deterministic requests
///
/// A cached answer is replayed for every equal request. That is right only
/// when the model would give the same answer again: greedy decoding
/// (`temperature` 0) or embeddings, and the same model weights (put the
/// model *version* in `model`). Do not build keys for sampled requests
/// (`temperature > 0` without a fixed seed) unless serving one sample to
/// everyone is what you want. Every parameter that changes the output must
/// be given (`max_tokens`, `stop`, the system prompt, tool definitions…);
/// leave out only those that do not (a request id, a user id when answers
/// do not depend on it).
///
/// ```
/// use keel_cache::InferenceKey;
///
/// let a = InferenceKey::new("llama-3.1-8b@2024-07")
///     .input("What is Rust?")
///     .param("temperature", 0.0)?
///     .param("max_tokens", 256)?
///     .build();
/// let b = InferenceKey::new("llama-3.1-8b@2024-07")
///     .param("max_tokens", 256)?
///     .param("temperature", 0)?
///     .input("What is Rust?")
///     .build();
/// assert_eq!(a, b);
/// assert!(a.starts_with("inf:v1:llama-3.1-8b@2024-07:"));
/// # Ok::<(), keel_cache::CacheError>(())
/// ```
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct InferenceKey {
    model: String,
    input: Vec<u8>,
    params: BTreeMap<String, String>,
}

impl InferenceKey {
    /// A key for requests to `model` (include its version).
    pub fn new(model: impl Into<String>) -> Self {
        InferenceKey {
            model: model.into(),
            ..InferenceKey::default()
        }
    }

    /// Sets the input: the prompt, the text to embed, or the serialized
    /// messages. Calling it again replaces the input.
    pub fn input(mut self, input: impl AsRef<[u8]>) -> Self {
        self.input = input.as_ref().to_vec();
        self
    }

    /// Adds a parameter (replacing one of the same name), canonicalised.
    ///
    /// # Errors
    ///
    /// [`CacheError::Codec`] when `value` cannot be serialized. Non-finite
    /// floats become `null`, as in JSON.
    pub fn param(mut self, name: impl Into<String>, value: impl Serialize) -> Result<Self> {
        let value = serde_json::to_value(value)
            .map_err(|err| CacheError::codec("could not encode the parameter", err))?;
        let mut canonical = String::new();
        write_canonical(&value, &mut canonical);
        self.params.insert(name.into(), canonical);
        Ok(self)
    }

    /// The key.
    pub fn build(&self) -> String {
        let mut hasher = Sha256::new();
        let mut field = |bytes: &[u8]| {
            hasher.update((bytes.len() as u64).to_be_bytes());
            hasher.update(bytes);
        };
        field(b"keel-inference-key");
        field(VERSION.as_bytes());
        field(self.model.as_bytes());
        field(&self.input);
        field(&(self.params.len() as u64).to_be_bytes());
        for (name, value) in &self.params {
            field(name.as_bytes());
            field(value.as_bytes());
        }
        let digest = hasher.finalize();
        let mut key = String::with_capacity(8 + self.model.len() + 65);
        key.push_str("inf:");
        key.push_str(VERSION);
        key.push(':');
        key.push_str(&self.model);
        key.push(':');
        for byte in digest {
            let _ = write!(key, "{byte:02x}");
        }
        key
    }
}

/// JSON with object keys sorted, whatever map type serde_json was built
/// with, and numbers normalised.
fn write_canonical(value: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                let _ = write!(out, "{i}");
            } else if let Some(u) = n.as_u64() {
                let _ = write!(out, "{u}");
            } else {
                let f = n.as_f64().unwrap_or(0.0);
                if f == 0.0 {
                    out.push('0');
                } else if f.fract() == 0.0 && f.abs() < 9.0e15 {
                    let _ = write!(out, "{}", f as i64);
                } else {
                    let _ = write!(out, "{f:?}");
                }
            }
        }
        Value::String(s) => out.push_str(&Value::String(s.clone()).to_string()),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let sorted: BTreeMap<&String, &Value> = map.iter().collect();
            out.push('{');
            for (i, (k, v)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_v1_key_never_changes() {
        // Computed independently (Python hashlib) from the documented form.
        let key = InferenceKey::new("m")
            .input("hi")
            .param("temperature", 0)
            .unwrap()
            .build();
        assert_eq!(
            key,
            "inf:v1:m:5f6c0af1e5cc4711892f86477671fb59de04d2c92958affc69fa88ab7294f784",
        );
    }

    #[test]
    fn canonical_numbers_and_objects() {
        let canon = |v: serde_json::Value| {
            let mut s = String::new();
            write_canonical(&v, &mut s);
            s
        };
        assert_eq!(canon(serde_json::json!(1.0)), "1");
        assert_eq!(canon(serde_json::json!(-0.0)), "0");
        assert_eq!(canon(serde_json::json!(0.25)), "0.25");
        assert_eq!(
            canon(serde_json::json!({"b": [1, {"d": 1, "c": 2}], "a": "x\"y"})),
            r#"{"a":"x\"y","b":[1,{"c":2,"d":1}]}"#
        );
        // Non-finite floats are JSON null.
        let nan = InferenceKey::new("m").param("t", f64::NAN).unwrap().build();
        let null = InferenceKey::new("m").param("t", ()).unwrap().build();
        assert_eq!(nan, null);
    }

    #[test]
    fn every_field_counts() {
        let base = || InferenceKey::new("m").input("x").param("t", 0).unwrap();
        let keys = [
            base().build(),
            base().input("y").build(),
            InferenceKey::new("n")
                .input("x")
                .param("t", 0)
                .unwrap()
                .build(),
            base().param("t", 0.5).unwrap().build(),
            base().param("max_tokens", 1).unwrap().build(),
            // Field boundaries: moving bytes between fields changes the key.
            InferenceKey::new("mx").param("t", 0).unwrap().build(),
        ];
        let unique: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(unique.len(), keys.len(), "{keys:#?}");
    }

    proptest! {
        #[test]
        fn parameter_order_does_not_matter(
            params in proptest::collection::btree_map("[a-z]{1,6}", any::<i32>(), 0..6),
            input in ".{0,20}",
        ) {
            let forward = params
                .iter()
                .fold(InferenceKey::new("m").input(&input), |k, (n, v)| k.param(n.clone(), v).unwrap())
                .build();
            let backward = params
                .iter()
                .rev()
                .fold(InferenceKey::new("m").input(&input), |k, (n, v)| k.param(n.clone(), v).unwrap())
                .build();
            prop_assert_eq!(forward, backward);
        }
    }
}
