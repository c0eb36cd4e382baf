//! Secrets kept out of logs.

/// `url` with any password replaced by `***` (an unparseable URL is shown
/// as `<unparseable url>` rather than risk printing a secret).
///
/// ```
/// use keel_core::redacted_url;
///
/// assert_eq!(redacted_url("redis://user:pw@host:6379/0"), "redis://user:***@host:6379/0");
/// assert_eq!(redacted_url("redis://host:6379"), "redis://host:6379");
/// ```
pub fn redacted_url(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => "<unparseable url>".to_owned(),
    }
}
