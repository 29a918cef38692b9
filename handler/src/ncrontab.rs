//! NCRONTAB schedules, as Azure Functions timers and integration `syncFrequency` spell them.
//!
//! NCRONTAB has six fields, `{second} {minute} {hour} {day} {month} {day-of-week}`, and numbers
//! days of the week 0–6 from Sunday (7 is Sunday too). The `cron` crate reads the same six fields
//! but numbers days 1–7 from Sunday, so numeric days are shifted before parsing; names (`Mon`)
//! mean the same in both.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};

/// A parsed six-field NCRONTAB expression.
#[derive(Clone)]
pub struct Ncrontab {
    source: String,
    schedule: cron::Schedule,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid NCRONTAB expression `{expression}`: {reason}")]
pub struct NcrontabError {
    pub expression: String,
    pub reason: String,
}

impl Ncrontab {
    /// The first occurrence strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.schedule.after(&after).next()
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl fmt::Debug for Ncrontab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ncrontab({:?})", self.source)
    }
}

impl fmt::Display for Ncrontab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl FromStr for Ncrontab {
    type Err = NcrontabError;

    fn from_str(expression: &str) -> Result<Self, Self::Err> {
        let error = |reason: String| NcrontabError {
            expression: expression.to_string(),
            reason,
        };
        let fields: Vec<&str> = expression.split_whitespace().collect();
        if fields.len() != 6 {
            return Err(error(format!(
                "expected 6 fields (second minute hour day month day-of-week), found {}",
                fields.len()
            )));
        }
        let day_of_week = shift_days_of_week(fields[5]).map_err(error)?;
        let translated = format!("{} {}", fields[..5].join(" "), day_of_week);
        let schedule = cron::Schedule::from_str(&translated).map_err(|e| error(e.to_string()))?;
        Ok(Self {
            source: fields.join(" "),
            schedule,
        })
    }
}

/// Rewrites NCRONTAB day-of-week numbers (0–7, Sunday = 0 or 7) to the `cron` crate's (1–7,
/// Sunday = 1), leaving `*`, `?`, names and step sizes alone.
fn shift_days_of_week(field: &str) -> Result<String, String> {
    let shift = |token: &str| -> Result<String, String> {
        if token.chars().all(|c| c.is_ascii_digit()) {
            let day: u32 = token
                .parse()
                .map_err(|_| format!("`{token}` is not a day of the week"))?;
            if day > 7 {
                return Err(format!("day of week {day} is out of range 0-7"));
            }
            Ok(((day % 7) + 1).to_string())
        } else {
            Ok(token.to_string())
        }
    };
    field
        .split(',')
        .map(|item| {
            let (range, step) = match item.split_once('/') {
                Some((range, step)) => (range, Some(step)),
                None => (item, None),
            };
            let (range, sunday) = match range.split_once('-') {
                // Sunday as 7 ends a range after Saturday, the `cron` crate's last day (7): the
                // range runs to Saturday, and takes Sunday (1) too where its steps reach it.
                // Sunday alone.
                Some(("7", "7")) => ("1".to_string(), false),
                Some((from, "7")) => {
                    let start: u32 = from
                        .parse()
                        .map_err(|_| format!("`{item}` is not a range of days of the week"))?;
                    let every: u32 = match step {
                        Some(step) => step
                            .parse()
                            .ok()
                            .filter(|n| *n > 0)
                            .ok_or_else(|| format!("`{step}` is not a step"))?,
                        None => 1,
                    };
                    (
                        format!("{}-7", shift(from)?),
                        start < 7 && (7 - start).is_multiple_of(every),
                    )
                }
                Some((from, to)) => (format!("{}-{}", shift(from)?, shift(to)?), false),
                None => (shift(range)?, false),
            };
            let range = match step {
                Some(step) => format!("{range}/{step}"),
                None => range,
            };
            Ok(if sunday { format!("{range},1") } else { range })
        })
        .collect::<Result<Vec<_>, String>>()
        .map(|items| items.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    #[test]
    fn every_minute_fires_on_the_minute() {
        let every_minute: Ncrontab = "0 */1 * * * *".parse().unwrap();
        assert_eq!(
            every_minute.next_after(at(2026, 1, 1, 10, 0, 0)),
            Some(at(2026, 1, 1, 10, 1, 0))
        );
        assert_eq!(
            every_minute.next_after(at(2026, 1, 1, 10, 0, 59)),
            Some(at(2026, 1, 1, 10, 1, 0))
        );
    }

    #[test]
    fn hourly_fires_on_the_hour() {
        let hourly: Ncrontab = "0 0 * * * *".parse().unwrap();
        assert_eq!(
            hourly.next_after(at(2026, 1, 1, 10, 0, 0)),
            Some(at(2026, 1, 1, 11, 0, 0))
        );
    }

    #[test]
    fn days_of_week_count_from_sunday_zero() {
        // 2026-01-04 is a Sunday.
        let sundays: Ncrontab = "0 0 9 * * 0".parse().unwrap();
        assert_eq!(
            sundays.next_after(at(2026, 1, 1, 0, 0, 0)),
            Some(at(2026, 1, 4, 9, 0, 0))
        );
        let also_sundays: Ncrontab = "0 0 9 * * 7".parse().unwrap();
        assert_eq!(
            also_sundays.next_after(at(2026, 1, 1, 0, 0, 0)),
            Some(at(2026, 1, 4, 9, 0, 0))
        );
        // Monday to Friday: the first after Saturday 2026-01-03 is Monday 2026-01-05.
        let weekdays: Ncrontab = "0 30 8 * * 1-5".parse().unwrap();
        assert_eq!(
            weekdays.next_after(at(2026, 1, 3, 12, 0, 0)),
            Some(at(2026, 1, 5, 8, 30, 0))
        );
        let named: Ncrontab = "0 30 8 * * Mon-Fri".parse().unwrap();
        assert_eq!(
            named.next_after(at(2026, 1, 3, 12, 0, 0)),
            Some(at(2026, 1, 5, 8, 30, 0))
        );
    }

    #[test]
    fn a_range_of_days_may_end_with_sunday_as_7() {
        // Monday 2026-01-05 to Sunday 2026-01-11.
        let days = |expression: &str| -> Vec<u32> {
            let schedule: Ncrontab = expression.parse().unwrap();
            let mut fired = Vec::new();
            let mut after = at(2026, 1, 4, 23, 0, 0);
            while let Some(next) = schedule
                .next_after(after)
                .filter(|t| *t < at(2026, 1, 12, 0, 0, 0))
            {
                fired.push(next.format("%d").to_string().parse().unwrap());
                after = next;
            }
            fired
        };
        assert_eq!(days("0 0 9 * * 0-7"), [5, 6, 7, 8, 9, 10, 11]);
        assert_eq!(days("0 0 9 * * 5-7"), [9, 10, 11], "Friday to Sunday");
        assert_eq!(
            days("0 0 9 * * 1-7/2"),
            [5, 7, 9, 11],
            "Monday, every other day"
        );
        assert_eq!(days("0 0 9 * * 2-7/2"), [6, 8, 10], "the steps miss Sunday");
        assert_eq!(days("0 0 9 * * 6,7"), [10, 11]);
        assert_eq!(days("0 0 9 * * 7-7"), [11]);
    }

    #[test]
    fn malformed_expressions_say_why() {
        let err = "*/5 * * * *".parse::<Ncrontab>().unwrap_err();
        assert!(err.reason.contains("expected 6 fields"), "{err}");
        let err = "0 0 0 * * 9".parse::<Ncrontab>().unwrap_err();
        assert!(err.reason.contains("out of range"), "{err}");
        assert!("0 61 * * * *".parse::<Ncrontab>().is_err());
    }
}
