//! Receipts: what a delivery's receipt carries and how it is read back.

use crate::error::{QueueError, Result};
use crate::types::Receipt;

/// A receipt, parsed from `<level>:<entry id>|<attempt>|<lease end ms>`.
#[derive(Clone, Copy)]
pub(super) struct Lease<'a> {
    pub(super) level: &'a str,
    pub(super) entry: &'a str,
    pub(super) attempt: u32,
    /// The lease's end as known at delivery (server clock, epoch ms).
    pub(super) ends_ms: u64,
}

pub(super) fn parse_receipt(receipt: &Receipt) -> Result<Lease<'_>> {
    let bad = || {
        QueueError::InvalidReceipt(format!(
            "`{}` is not a redis-queue receipt",
            receipt.as_str()
        ))
    };
    let (rest, ends_ms) = receipt.as_str().rsplit_once('|').ok_or_else(bad)?;
    let (rest, attempt) = rest.rsplit_once('|').ok_or_else(bad)?;
    let (level, entry) = rest.split_once(':').ok_or_else(bad)?;
    let is_number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let entry_ok = entry
        .split_once('-')
        .is_some_and(|(ms, seq)| is_number(ms) && is_number(seq));
    if !is_number(level) || !entry_ok {
        return Err(bad());
    }
    Ok(Lease {
        level,
        entry,
        attempt: attempt.parse().map_err(|_| bad())?,
        ends_ms: ends_ms.parse().map_err(|_| bad())?,
    })
}

/// The stream id just before `id` (`<ms>-<seq>`), for rewinding a group.
pub(super) fn id_before(id: &str) -> Option<String> {
    let (ms, seq) = id.split_once('-')?;
    let (ms, seq) = (ms.parse::<u64>().ok()?, seq.parse::<u64>().ok()?);
    Some(match seq.checked_sub(1) {
        Some(seq) => format!("{ms}-{seq}"),
        None => format!("{}-{}", ms.checked_sub(1)?, u64::MAX),
    })
}

pub(super) fn invalid_receipt() -> QueueError {
    QueueError::InvalidReceipt("the lease expired or the delivery was already settled".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_round_trip_their_parts() {
        let receipt = Receipt::from_string("2:1700000000000-7|3|1700000060000");
        let lease = parse_receipt(&receipt).unwrap();
        assert_eq!(
            (lease.level, lease.entry, lease.attempt, lease.ends_ms),
            ("2", "1700000000000-7", 3, 1_700_000_060_000)
        );
    }

    #[test]
    fn other_shapes_are_invalid_receipts() {
        for text in [
            "",
            "m:3:4",
            "1:1700000000000-0|1",
            "1:1700000000000-0|x|1",
            "1:1700000000000|1|1",
            "1:-0|1|1",
            ":1700000000000-0|1|1",
            "one:1700000000000-0|1|1",
        ] {
            assert!(
                matches!(
                    parse_receipt(&Receipt::from_string(text)),
                    Err(QueueError::InvalidReceipt(_))
                ),
                "`{text}` was accepted"
            );
        }
    }

    #[test]
    fn id_before_steps_back_one_entry() {
        assert_eq!(
            id_before("1700000000000-5").as_deref(),
            Some("1700000000000-4")
        );
        assert_eq!(
            id_before("1700000000000-0").as_deref(),
            Some("1699999999999-18446744073709551615")
        );
        assert_eq!(id_before("0-0"), None);
        assert_eq!(id_before("garbage"), None);
    }
}
