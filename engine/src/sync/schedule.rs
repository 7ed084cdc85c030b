//! When a source's jobs run on their own: per job kind, an interval
//! (`30m`) or a cron expression with seconds, Quartz style as Elastic's
//! connectors take it (`0 0/5 * * * ?`: seconds, minutes, hours, day of
//! month, month, day of week with 1 = Sunday; `?` for "any"). Times are
//! UTC.

use std::str::FromStr as _;
use std::time::Duration;

use chrono::{DateTime, Utc};

/// One schedule.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// Every so often, counted from the last job's start.
    Every(Duration),
    /// At the times a cron expression names.
    Cron(Box<croner::Cron>),
}

impl Schedule {
    /// `text` as a duration (`90s`, `1h 30m`), else as a cron expression
    /// with seconds; or why it is neither.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Ok(every) = humantime::Duration::from_str(text.trim()) {
            let every: Duration = every.into();
            if every < Duration::from_secs(1) {
                return Err(format!("`{text}`: an interval of at least 1s"));
            }
            return Ok(Self::Every(every));
        }
        croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Required)
            .year(croner::parser::Year::Optional)
            .alternative_weekdays(true)
            .sloppy_ranges(true)
            .build()
            .parse(text.trim())
            .map(|cron| Self::Cron(Box::new(cron)))
            .map_err(|e| {
                format!(
                    "`{text}` is neither an interval (`30m`) nor a cron expression with seconds (`0 0/5 * * * ?`): {e}"
                )
            })
    }

    /// When the next job is due, after `now`, the last job of its kind
    /// having started at `last` (if one did): an interval after it (now,
    /// if that is past), or the cron expression's first time after it
    /// (now, if one passed while no job ran; else its next after now).
    pub fn due(&self, now: DateTime<Utc>, last: Option<DateTime<Utc>>) -> DateTime<Utc> {
        match self {
            Self::Every(every) => match last {
                Some(last) => {
                    let next = last + chrono::Duration::from_std(*every).unwrap_or_default();
                    next.max(now)
                }
                None => now,
            },
            Self::Cron(cron) => {
                let from = last.unwrap_or(now);
                match cron.find_next_occurrence(&from, false) {
                    Ok(next) if next <= now => now,
                    Ok(next) => next,
                    // An expression that never matches again.
                    Err(_) => DateTime::<Utc>::MAX_UTC,
                }
            }
        }
    }
}

/// Milliseconds since 1970 as a time.
pub fn from_ms(ms: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    #[test]
    fn intervals_count_from_the_last_start() {
        let every = Schedule::parse("30m").unwrap();
        let now = at("2026-12-01T10:00:00Z");
        assert_eq!(every.due(now, None), now);
        assert_eq!(
            every.due(now, Some(at("2026-12-01T09:50:00Z"))),
            at("2026-12-01T10:20:00Z")
        );
        assert_eq!(every.due(now, Some(at("2026-12-01T08:00:00Z"))), now);
        assert!(Schedule::parse("10ms").is_err());
    }

    #[test]
    fn cron_has_seconds_and_quartz_question_marks() {
        let cron = Schedule::parse("0 0/5 * * * ?").unwrap();
        let now = at("2026-12-01T10:02:30Z");
        // Last run at 10:00: the next is 10:05.
        assert_eq!(
            cron.due(now, Some(at("2026-12-01T10:00:00Z"))),
            at("2026-12-01T10:05:00Z")
        );
        // No run since 09:40: 09:45 passed, so now.
        assert_eq!(cron.due(now, Some(at("2026-12-01T09:40:00Z"))), now);
        // Never run: the next after now.
        assert_eq!(cron.due(now, None), at("2026-12-01T10:05:00Z"));
        // Quartz weekdays: 2 is Monday (2026-12-07 is one).
        let monday = Schedule::parse("0 0 3 ? * 2").unwrap();
        assert_eq!(
            monday.due(at("2026-12-01T10:00:00Z"), None),
            at("2026-12-07T03:00:00Z")
        );
        let err = Schedule::parse("every tuesday").unwrap_err();
        assert!(err.contains("neither an interval"), "{err}");
        // Five fields (no seconds) are refused.
        assert!(Schedule::parse("*/5 * * * *").is_err());
    }
}
