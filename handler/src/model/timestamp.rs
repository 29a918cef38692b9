//! Timestamps that the stores compare as strings.
//!
//! Cosmos DB and SQLite both compare ISO 8601 strings character by character, which orders
//! `…00.5Z` before `…00Z`. Fields used in range queries (`nextSyncAt`, `credentialsExpireAt`)
//! are therefore always written with exactly three fractional digits, and query bounds are
//! formatted by [`query_value`] the same way.
//!
//! Other timestamps are written as chrono writes them (as many fractional digits as the time
//! needs), by [`auto_opt`] where a sync writes several per shard: chrono's formatter goes
//! through `fmt` a character at a time.
//!
//! Both forms are read by one reader ([`read_opt`], and [`fixed`]'s and [`fixed_opt`]'s), which
//! reads `…Z` times itself and hands anything else to chrono: chrono's parser, general enough
//! for any offset and spelling, takes several times as long, and a sync that finds its records
//! unchanged reads two timestamps a record.

use chrono::{DateTime, Datelike, NaiveDate, NaiveTime, SecondsFormat, Timelike, Utc};
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
        d.deserialize_str(Timestamp)
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
        read_opt(d)
    }
}

/// `#[serde(serialize_with = "timestamp::auto_opt")]` for `Option<DateTime<Utc>>` fields:
/// the text chrono's own `Serialize` writes.
pub fn auto_opt<S: Serializer>(value: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(dt) => match auto(dt) {
            Some((text, len)) => s.serialize_str(
                std::str::from_utf8(&text[..len]).expect("digits and separators are ASCII"),
            ),
            None => serde::Serialize::serialize(dt, s),
        },
        None => s.serialize_none(),
    }
}

/// Appends `dt` to a JSON text as a string, spelled as [`auto_opt`] spells it: for writers of
/// JSON by hand.
pub fn push_json(out: &mut Vec<u8>, dt: &DateTime<Utc>) -> serde_json::Result<()> {
    match auto(dt) {
        Some((text, len)) => {
            out.push(b'"');
            out.extend_from_slice(&text[..len]);
            out.push(b'"');
            Ok(())
        }
        None => serde_json::to_writer(out, dt),
    }
}

/// `2026-01-01T10:00:00Z`, `…:00.500Z`, `…:00.000250Z` or `…:00.000000001Z`, as chrono writes
/// a UTC time with `SecondsFormat::AutoSi`; `None` for what only chrono spells (years outside
/// 0-9999, leap seconds).
fn auto(dt: &DateTime<Utc>) -> Option<Spelled> {
    // A sync stamps every shard of a page with the same time, several times over: the text of
    // the last time written on this thread is kept.
    thread_local! {
        static LAST: std::cell::Cell<Option<(DateTime<Utc>, Spelled)>> =
            const { std::cell::Cell::new(None) };
    }
    if let Some((last, text)) = LAST.get()
        && last == *dt
    {
        return Some(text);
    }
    let text = spell(dt)?;
    LAST.set(Some((*dt, text)));
    Some(text)
}

/// A time's text, in a buffer of the longest, and its length.
type Spelled = ([u8; 30], usize);

/// [`auto`]'s text, spelled out.
fn spell(dt: &DateTime<Utc>) -> Option<Spelled> {
    fn digits(out: &mut [u8], mut value: u32) {
        for digit in out.iter_mut().rev() {
            *digit = b'0' + (value % 10) as u8;
            value /= 10;
        }
    }
    let year = u32::try_from(dt.year()).ok().filter(|y| *y <= 9999)?;
    let nanos = dt.nanosecond();
    if nanos >= 1_000_000_000 {
        return None;
    }
    let mut text = *b"0000-00-00T00:00:00.000000000Z";
    digits(&mut text[0..4], year);
    digits(&mut text[5..7], dt.month());
    digits(&mut text[8..10], dt.day());
    digits(&mut text[11..13], dt.hour());
    digits(&mut text[14..16], dt.minute());
    digits(&mut text[17..19], dt.second());
    let (fraction, places) = match nanos {
        0 => (0, 0),
        n if n % 1_000_000 == 0 => (n / 1_000_000, 3),
        n if n % 1_000 == 0 => (n / 1_000, 6),
        n => (n, 9),
    };
    let mut len = 19;
    if places > 0 {
        digits(&mut text[20..20 + places], fraction);
        len = 20 + places;
    }
    text[len] = b'Z';
    Some((text, len + 1))
}

/// `#[serde(deserialize_with = "timestamp::read_opt")]` for `Option<DateTime<Utc>>` fields:
/// what chrono's own `Deserialize` reads, the form [`auto_opt`] writes read without it.
pub fn read_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    Read::deserialize(d).map(|read| read.0)
}

/// An optional timestamp read as [`read_opt`] reads it, for readers written by hand.
pub struct Read(pub Option<DateTime<Utc>>);

impl<'de> Deserialize<'de> for Read {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_option(OptionalTimestamp)
    }
}

struct OptionalTimestamp;

impl<'de> serde::de::Visitor<'de> for OptionalTimestamp {
    type Value = Read;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an RFC 3339 timestamp or null")
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Read, E> {
        Ok(Read(None))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Read, E> {
        Ok(Read(None))
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Read, D::Error> {
        d.deserialize_str(Timestamp).map(|dt| Read(Some(dt)))
    }
}

struct Timestamp;

impl serde::de::Visitor<'_> for Timestamp {
    type Value = DateTime<Utc>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an RFC 3339 timestamp")
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<DateTime<Utc>, E> {
        match parse_utc(text) {
            Some(dt) => Ok(dt),
            None => text
                .parse::<DateTime<chrono::FixedOffset>>()
                .map(|dt| dt.with_timezone(&Utc))
                .map_err(E::custom),
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.F]Z` with one to nine fractional digits, the form chrono writes a
/// UTC time in; `None` for anything else (which chrono then reads), leap seconds included.
fn parse_utc(text: &str) -> Option<DateTime<Utc>> {
    let b = text.as_bytes();
    let number = |digits: &[u8]| -> Option<u32> {
        digits.iter().try_fold(0u32, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    };
    if b.len() < 20
        || b[b.len() - 1] != b'Z'
        || [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')]
            .iter()
            .any(|&(at, c)| b[at] != c)
    {
        return None;
    }
    let nanos = match &b[19..b.len() - 1] {
        [] => 0,
        [b'.', fraction @ ..] if (1..=9).contains(&fraction.len()) => {
            number(fraction)? * 10u32.pow(9 - fraction.len() as u32)
        }
        _ => return None,
    };
    let date = NaiveDate::from_ymd_opt(
        i32::try_from(number(&b[0..4])?).ok()?,
        number(&b[5..7])?,
        number(&b[8..10])?,
    )?;
    let time = NaiveTime::from_hms_nano_opt(
        number(&b[11..13])?,
        number(&b[14..16])?,
        number(&b[17..19])?,
        nanos,
    )?;
    Some(date.and_time(time).and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn timestamps_read_as_chrono_reads_them() {
        let chrono_reads = |text: &str| {
            serde_json::from_value::<Option<DateTime<Utc>>>(serde_json::json!(text))
                .ok()
                .flatten()
        };
        for text in [
            "2026-01-01T10:00:00Z",
            "2026-01-01T10:00:00.5Z",
            "2026-01-01T10:00:00.500Z",
            "2026-01-01T10:00:00.000250Z",
            "2026-12-31T23:59:59.999999999Z",
            "2024-02-29T00:00:00Z",
            "0001-01-01T00:00:00Z",
            // Chrono's own reading: offsets, a leap second, lower case.
            "2026-01-01T12:00:00+02:00",
            "2026-06-30T23:59:60.5Z",
            "2026-01-01t10:00:00z",
            // Not timestamps at all.
            "2026-02-30T00:00:00Z",
            "2026-01-01T24:00:00Z",
            "2026-01-01T10:00:00.1234567891Z",
            "2026-01-01 10:00",
            "",
        ] {
            let read: Result<Read, _> = serde_json::from_value(serde_json::json!(text));
            assert_eq!(read.ok().and_then(|r| r.0), chrono_reads(text), "{text}");
        }
        let null: Read = serde_json::from_str("null").unwrap();
        assert_eq!(null.0, None);
    }

    #[test]
    fn what_is_written_reads_back() {
        let t = Utc.with_ymd_and_hms(2026, 3, 4, 5, 6, 7).unwrap();
        for dt in [
            t,
            t + chrono::Duration::milliseconds(500),
            t + chrono::Duration::microseconds(250),
            t + chrono::Duration::nanoseconds(1),
        ] {
            let (text, len) = auto(&dt).unwrap();
            let text = std::str::from_utf8(&text[..len]).unwrap();
            assert_eq!(parse_utc(text), Some(dt), "{text}");
        }
    }

    #[test]
    fn fixed_form_orders_like_time() {
        let a = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let b = a + chrono::Duration::milliseconds(500);
        assert_eq!(format(&a), "2026-01-01T00:00:00.000Z");
        assert!(format(&a) < format(&b));
    }

    #[test]
    fn auto_writes_what_chrono_writes() {
        #[derive(serde::Serialize)]
        struct Fast(#[serde(serialize_with = "auto_opt")] Option<DateTime<Utc>>);
        let base = Utc.with_ymd_and_hms(2026, 12, 3, 9, 5, 7).unwrap();
        let mut times = vec![
            base,
            Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(10_000, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(-1, 1, 1, 0, 0, 0).unwrap(),
            // A leap second.
            base.with_nanosecond(1_500_000_000).unwrap(),
        ];
        // Whole seconds, milli-, micro- and nanosecond times across some centuries.
        let mut seed: u64 = 7;
        for _ in 0..2000 {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let secs = (seed >> 20) as i64 % 10_000_000_000 - 5_000_000_000;
            let nanos = match seed % 4 {
                0 => 0,
                1 => (seed >> 8) as u32 % 1000 * 1_000_000,
                2 => (seed >> 8) as u32 % 1_000_000 * 1000,
                _ => (seed >> 8) as u32 % 1_000_000_000,
            };
            times.push(
                base + chrono::Duration::seconds(secs)
                    + chrono::Duration::nanoseconds(nanos.into()),
            );
        }
        // The same time again, between others and after one only chrono spells: the text
        // kept for the last time written is that time's.
        let (far, leap) = (times[3], times[5]);
        times.extend([base, base, far, base, leap, leap, base]);
        for t in times {
            assert_eq!(
                serde_json::to_string(&Fast(Some(t))).unwrap(),
                serde_json::to_string(&t).unwrap()
            );
        }
        assert_eq!(serde_json::to_string(&Fast(None)).unwrap(), "null");
    }
}
