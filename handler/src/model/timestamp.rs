//! Timestamps that the stores compare as strings.
//!
//! Cosmos DB and SQLite both compare ISO 8601 strings character by character, which orders
//! `…00.5Z` before `…00Z`. Fields used in range queries (`nextSyncAt`, `credentialsExpireAt`)
//! are therefore always written with exactly three fractional digits, and query bounds are
//! formatted by [`query_value`] the same way.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serializer};

/// The fixed form: `2026-01-01T10:00:00.000Z`.
pub fn format(dt: &DateTime<Utc>) -> String {
    dt.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A query bound comparable with stored fixed-form timestamps.
pub fn query_value(dt: &DateTime<Utc>) -> serde_json::Value {
    serde_json::Value::String(format(dt))
}

/// `#[serde(with = "timestamp::fixed")]` for `DateTime<Utc>` fields.
pub mod fixed {
    use super::*;

    pub fn serialize<S: Serializer>(value: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        DateTime::<Utc>::deserialize(d)
    }
}

/// `#[serde(with = "timestamp::fixed_opt")]` for `Option<DateTime<Utc>>` fields.
pub mod fixed_opt {
    use super::*;

    pub fn serialize<S: Serializer>(
        value: &Option<DateTime<Utc>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(dt) => s.serialize_str(&format(dt)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        Option::<DateTime<Utc>>::deserialize(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn fixed_form_orders_like_time() {
        let a = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let b = a + chrono::Duration::milliseconds(500);
        assert_eq!(format(&a), "2026-01-01T00:00:00.000Z");
        assert!(format(&a) < format(&b));
    }
}
