//! `Retry-After` (RFC 9110 §10.2.3), read in both of its forms.

use std::time::{Duration, SystemTime};

/// The longest `Retry-After` Keel honours: a node asking for more is taken
/// at this (a skewed clock or a typo must not park a node for a day).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Reads a `Retry-After` value: delta-seconds (`"7"`), or an HTTP-date
/// (`"Wed, 21 Oct 2015 07:28:00 GMT"`) taken as the time left until then by
/// `now` (zero when it is past). Either form is capped at
/// [`MAX_RETRY_AFTER`]. Anything else is `None`.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use keel_core::parse_retry_after;
///
/// let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_470);
/// assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
/// assert_eq!(
///     parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
///     Some(Duration::from_secs(10)),
/// );
/// assert_eq!(parse_retry_after("soon", now), None);
/// ```
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let after = if let Ok(seconds) = value.parse::<u64>() {
        Duration::from_secs(seconds)
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(after.min(MAX_RETRY_AFTER))
}

/// Reads the `Retry-After` header of `headers` with [`parse_retry_after`]
/// against this host's clock.
pub fn retry_after_header(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(value, SystemTime::now())
}

/// A `Retry-After` header value for `after`: whole seconds, rounded up, at
/// least 1 (a client told "0" would retry at once).
pub fn retry_after_value(after: Duration) -> http::HeaderValue {
    let seconds = after.as_secs() + u64::from(after.subsec_nanos() > 0);
    http::HeaderValue::from(seconds.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_and_the_cap() {
        let now = SystemTime::now();
        assert_eq!(parse_retry_after(" 3 ", now), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("100000", now), Some(MAX_RETRY_AFTER));
        let ahead = parse_retry_after(
            &httpdate::fmt_http_date(now + Duration::from_secs(120)),
            now,
        )
        .expect("a date is read");
        assert!(ahead > Duration::from_secs(118) && ahead <= Duration::from_secs(120));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(60));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(parse_retry_after("", now), None);
    }

    #[test]
    fn header_values_round_up() {
        assert_eq!(retry_after_value(Duration::from_millis(1)), "1");
        assert_eq!(retry_after_value(Duration::from_millis(1_500)), "2");
        assert_eq!(retry_after_value(Duration::ZERO), "1");
    }
}
