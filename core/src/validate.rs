//! The field checks every Keel config's `validate()` is made of, written
//! once so that the same rule reads the same (and says the same) in every
//! crate.
//!
//! Each check returns `Ok(())` or a [`ConfigError`] naming `field` and what
//! is accepted; every crate's error converts from [`ConfigError`], so a
//! `validate()` is a list of `?`-terminated checks:
//!
//! ```
//! use std::time::Duration;
//! use keel_core::{ConfigError, validate};
//!
//! fn check(name: &str, workers: usize, tick: Duration, share: f64) -> Result<(), ConfigError> {
//!     validate::non_empty("name", name)?;
//!     validate::at_least("workers", workers, 1)?;
//!     validate::positive_duration("tick", tick)?;
//!     validate::ratio("share", share)
//! }
//!
//! assert!(check("pool", 4, Duration::from_millis(500), 0.5).is_ok());
//! let err = check("pool", 0, Duration::from_millis(500), 0.5).unwrap_err();
//! assert_eq!(err.field, "workers");
//! assert_eq!(err.to_string(), "invalid config `workers`: must be at least 1");
//! ```

use std::fmt::Display;
use std::time::Duration;

use crate::error::ConfigError;

/// `value` must not be empty: "must not be empty".
///
/// # Errors
///
/// [`ConfigError`] naming `field` when `value` is empty.
pub fn non_empty(field: &'static str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() {
        return Err(ConfigError::new(field, "must not be empty"));
    }
    Ok(())
}

/// A name that becomes part of Redis keys (and RabbitMQ queue names): not
/// empty ("must not be empty"), with no control characters and no braces
/// (Redis reads `{…}` as a hash tag, which would move the keys to another
/// cluster slot).
///
/// # Errors
///
/// [`ConfigError`] naming `field` when `value` is empty or holds a control
/// character or a brace.
pub fn key_name(field: &'static str, value: &str) -> Result<(), ConfigError> {
    non_empty(field, value)?;
    if value
        .chars()
        .any(|c| c.is_control() || c == '{' || c == '}')
    {
        return Err(ConfigError::new(
            field,
            "must not contain control characters or braces (braces are Redis hash tags)",
        ));
    }
    Ok(())
}

/// `value` must be at least `min`: "must be at least {min}".
///
/// # Errors
///
/// [`ConfigError`] naming `field` when `value < min` (or the two do not
/// compare, as a NaN does not).
pub fn at_least<T: PartialOrd + Display>(
    field: &'static str,
    value: T,
    min: T,
) -> Result<(), ConfigError> {
    if value >= min {
        return Ok(());
    }
    Err(ConfigError::new(field, format!("must be at least {min}")))
}

/// A duration that must not be zero: "must be greater than zero".
///
/// # Errors
///
/// [`ConfigError`] naming `field` when `value` is zero.
pub fn positive_duration(field: &'static str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(ConfigError::new(field, "must be greater than zero"));
    }
    Ok(())
}

/// A duration that network timeouts and intervals need: at least one
/// millisecond, the finest step the clients honour: "must be at least 1 ms".
///
/// # Errors
///
/// [`ConfigError`] naming `field` when `value` is below 1 ms.
pub fn at_least_1ms(field: &'static str, value: Duration) -> Result<(), ConfigError> {
    if value < Duration::from_millis(1) {
        return Err(ConfigError::new(field, "must be at least 1 ms"));
    }
    Ok(())
}

/// A share or probability: between 0.0 and 1.0, both included: "must be
/// between 0.0 and 1.0".
///
/// # Errors
///
/// [`ConfigError`] naming `field` when `value` is outside `[0, 1]` or NaN.
pub fn ratio(field: &'static str, value: f64) -> Result<(), ConfigError> {
    if !(0.0..=1.0).contains(&value) {
        return Err(ConfigError::new(field, "must be between 0.0 and 1.0"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_check_names_its_field_and_rule() {
        let cases = [
            (non_empty("name", ""), "name", "must not be empty"),
            (key_name("name", ""), "name", "must not be empty"),
            (
                key_name("name", "a{b}"),
                "name",
                "must not contain control characters or braces (braces are Redis hash tags)",
            ),
            (
                key_name("name", "a\nb"),
                "name",
                "must not contain control characters or braces (braces are Redis hash tags)",
            ),
            (at_least("slots", 0u32, 1), "slots", "must be at least 1"),
            (at_least("rel", 0.5, 1.0), "rel", "must be at least 1"),
            (at_least("rel", f64::NAN, 1.0), "rel", "must be at least 1"),
            (
                positive_duration("tick", Duration::ZERO),
                "tick",
                "must be greater than zero",
            ),
            (
                at_least_1ms("timeout", Duration::from_micros(999)),
                "timeout",
                "must be at least 1 ms",
            ),
            (ratio("share", 1.01), "share", "must be between 0.0 and 1.0"),
            (ratio("share", -0.1), "share", "must be between 0.0 and 1.0"),
            (
                ratio("share", f64::NAN),
                "share",
                "must be between 0.0 and 1.0",
            ),
        ];
        for (result, field, reason) in cases {
            assert_eq!(result, Err(ConfigError::new(field, reason)));
        }
    }

    #[test]
    fn accepts_the_bounds() {
        assert!(non_empty("name", "a").is_ok());
        assert!(key_name("name", "jobs:high-1").is_ok());
        assert!(at_least("slots", 1u32, 1).is_ok());
        assert!(positive_duration("tick", Duration::from_nanos(1)).is_ok());
        assert!(at_least_1ms("timeout", Duration::from_millis(1)).is_ok());
        assert!(ratio("share", 0.0).is_ok());
        assert!(ratio("share", 1.0).is_ok());
    }
}
