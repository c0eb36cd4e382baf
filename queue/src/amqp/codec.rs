//! How a job is written into and read back from an AMQP message: Keel's
//! headers, properties and timestamps.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::types::{Headers, JobId};

/// Header keys Keel reserves on messages.
pub(super) const H_ATTEMPTS: &str = "x-keel-attempts";
pub(super) const H_ENQUEUED: &str = "x-keel-enqueued-ms";
pub(super) const H_DEADLINE: &str = "x-keel-deadline-ms";
pub(super) const H_PRIORITY: &str = "x-keel-priority";
pub(super) const H_REASON: &str = "x-keel-reason";
pub(super) const H_FAILED: &str = "x-keel-failed-ms";
/// Header names the broker or Keel puts on messages: a job may not carry
/// them (they would be read back as the broker's or dropped).
pub(super) fn reserved_header(name: &str) -> bool {
    name.starts_with("x-keel-")
        || name == "x-death"
        || name == "x-delivery-count"
        || name.starts_with("x-first-death-")
        || name.starts_with("x-last-death-")
        || name == "CC"
        || name == "BCC"
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(super) fn ms(d: Duration) -> u64 {
    d.as_micros().div_ceil(1000).min(u128::from(u64::MAX)) as u64
}

pub(super) fn as_u64(value: &AMQPValue) -> Option<u64> {
    match value {
        AMQPValue::ShortShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::Timestamp(v) => Some(*v),
        _ => None,
    }
}

pub(super) fn as_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(v) => Some(String::from_utf8_lossy(v.as_bytes()).into_owned()),
        AMQPValue::ShortString(v) => Some(v.as_str().to_owned()),
        _ => None,
    }
}

pub(super) fn int(v: u64) -> AMQPValue {
    AMQPValue::LongLongInt(i64::try_from(v).unwrap_or(i64::MAX))
}

pub(super) fn text(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v.as_bytes().to_vec()))
}

/// What a message carries besides its payload.
pub(super) struct Meta {
    pub(super) id: JobId,
    pub(super) headers: Headers,
    pub(super) previous_attempts: u64,
    pub(super) enqueued_ms: u64,
    pub(super) deadline_ms: Option<u64>,
    pub(super) priority: u8,
    pub(super) reason: Option<String>,
    pub(super) failed_ms: Option<u64>,
    pub(super) delivery_count: Option<u64>,
}

pub(super) fn read_meta(properties: &BasicProperties) -> Meta {
    let mut meta = Meta {
        id: JobId::from_string(
            properties
                .message_id()
                .as_ref()
                .map_or_else(String::new, |id| id.as_str().to_owned()),
        ),
        headers: Headers::new(),
        previous_attempts: 0,
        enqueued_ms: 0,
        deadline_ms: None,
        priority: 0,
        reason: None,
        failed_ms: None,
        delivery_count: None,
    };
    if let Some(table) = properties.headers() {
        for (key, value) in table.inner() {
            match key.as_str() {
                H_ATTEMPTS => meta.previous_attempts = as_u64(value).unwrap_or(0),
                H_ENQUEUED => meta.enqueued_ms = as_u64(value).unwrap_or(0),
                H_DEADLINE => meta.deadline_ms = as_u64(value),
                H_PRIORITY => meta.priority = as_u64(value).unwrap_or(0).min(255) as u8,
                H_REASON => meta.reason = as_text(value),
                H_FAILED => meta.failed_ms = as_u64(value),
                "x-delivery-count" => meta.delivery_count = as_u64(value),
                "x-death" => {
                    if meta.reason.is_none()
                        && let AMQPValue::FieldArray(deaths) = value
                        && let Some(AMQPValue::FieldTable(first)) = deaths.as_slice().first()
                    {
                        let why = first
                            .inner()
                            .get("reason")
                            .and_then(as_text)
                            .unwrap_or_else(|| "unknown".into());
                        meta.reason = Some(format!(
                            "dead-lettered by the broker ({why}): the delivery limit was reached, probably by consumers crashing on this job"
                        ));
                    }
                }
                k if reserved_header(k) => {}
                k => {
                    if let Some(v) = as_text(value) {
                        meta.headers.insert(k.to_owned(), v);
                    }
                }
            }
        }
    }
    meta
}

pub(super) fn properties(
    id: &JobId,
    headers: &Headers,
    previous_attempts: u64,
    enqueued_ms: u64,
    deadline_ms: Option<u64>,
    priority: u8,
) -> BasicProperties {
    let mut table = FieldTable::default();
    for (k, v) in headers {
        table.insert(ShortString::from(k.as_str()), text(v));
    }
    table.insert(H_ATTEMPTS.into(), int(previous_attempts));
    table.insert(H_ENQUEUED.into(), int(enqueued_ms));
    table.insert(H_PRIORITY.into(), int(u64::from(priority)));
    if let Some(deadline) = deadline_ms {
        table.insert(H_DEADLINE.into(), int(deadline));
    }
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(ShortString::from(id.as_str()))
        .with_headers(table)
}

/// A received message's properties without the headers the broker added
/// (`x-delivery-count`, `x-death`), for publishing it again as new.
pub(super) fn without_broker_headers(properties: &BasicProperties) -> BasicProperties {
    let mut table = FieldTable::default();
    if let Some(headers) = properties.headers() {
        for (key, value) in headers.inner() {
            if key.as_str() != "x-delivery-count" && key.as_str() != "x-death" {
                table.insert(key.clone(), value.clone());
            }
        }
    }
    properties.clone().with_headers(table)
}

pub(super) fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
