//! The check every config's "refuses bad fields by name" test makes.

use std::fmt::Display;

/// Asserts that `validate` refuses each config of `cases` with an error that
/// names the case's field as `` `field` ``, the way Keel's config errors
/// (`keel_core::ConfigError`, and each crate's `InvalidConfig` variant, as
/// in `QueueError::InvalidConfig`) spell it.
///
/// ```
/// # #[derive(Debug)] struct Config { workers: usize }
/// # impl Config { fn validate(&self) -> Result<(), String> {
/// #     if self.workers == 0 { return Err("invalid config `workers`: must be at least 1".into()) }
/// #     Ok(())
/// # } }
/// keel_testkit::assert_refused(Config::validate, [(Config { workers: 0 }, "workers")]);
/// ```
///
/// # Panics
///
/// When a config is accepted, or refused with an error that names another
/// field.
#[track_caller]
pub fn assert_refused<C, T, E: Display>(
    validate: impl Fn(&C) -> Result<T, E>,
    cases: impl IntoIterator<Item = (C, &'static str)>,
) {
    for (config, field) in cases {
        let Err(err) = validate(&config) else {
            panic!("a config with a bad `{field}` was accepted");
        };
        let err = err.to_string();
        assert!(
            err.contains(&format!("`{field}`")),
            "{err} should name `{field}`"
        );
    }
}
