//! The error monitor of a sync job, as Elastic's connectors have it: the
//! job fails when its document errors pass a total, a run in a row, or a
//! rate over the last documents.

use std::collections::VecDeque;

use crate::config::source::ErrorMonitorConfig;

/// Counts a job's documents and errors.
pub struct ErrorMonitor {
    config: ErrorMonitorConfig,
    total: u64,
    in_a_row: u64,
    /// The last `window` documents: true for an error.
    window: VecDeque<bool>,
    errors_in_window: u32,
    last: Option<String>,
}

impl ErrorMonitor {
    /// A monitor with `config`'s thresholds.
    pub fn new(config: &ErrorMonitorConfig) -> Self {
        Self {
            config: config.clone(),
            total: 0,
            in_a_row: 0,
            window: VecDeque::with_capacity(config.window as usize),
            errors_in_window: 0,
            last: None,
        }
    }

    fn push(&mut self, error: bool) {
        if self.window.len() == self.config.window as usize && self.window.pop_front() == Some(true)
        {
            self.errors_in_window -= 1;
        }
        self.window.push_back(error);
        if error {
            self.errors_in_window += 1;
        }
    }

    /// A document went through.
    pub fn ok(&mut self) {
        self.in_a_row = 0;
        self.push(false);
    }

    /// A document failed with `why`: `Err` with the reason the job fails,
    /// when this error passes a threshold.
    pub fn error(&mut self, why: String) -> Result<(), String> {
        self.total += 1;
        self.in_a_row += 1;
        self.push(true);
        let c = &self.config;
        let full = self.window.len() == c.window as usize;
        let rate = f64::from(self.errors_in_window) / f64::from(c.window.max(1));
        let verdict = if self.total > c.max_total {
            Some(format!(
                "{} document errors, more than errors.max_total ({})",
                self.total, c.max_total
            ))
        } else if self.in_a_row > c.max_consecutive {
            Some(format!(
                "{} document errors in a row, more than errors.max_consecutive ({})",
                self.in_a_row, c.max_consecutive
            ))
        } else if full && rate > c.max_rate {
            Some(format!(
                "{} of the last {} documents failed, a rate over errors.max_rate ({})",
                self.errors_in_window, c.window, c.max_rate
            ))
        } else {
            None
        };
        let result = match verdict {
            Some(verdict) => Err(format!("{verdict}; the last: {why}")),
            None => Ok(()),
        };
        self.last = Some(why);
        result
    }

    /// Errors so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The last error, if any.
    pub fn last(&self) -> Option<&str> {
        self.last.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ErrorMonitorConfig {
        ErrorMonitorConfig::default()
    }

    #[test]
    fn ten_errors_in_a_row_pass_the_eleventh_fails() {
        let mut m = ErrorMonitor::new(&config());
        for i in 0..10 {
            m.error(format!("e{i}")).unwrap();
        }
        let why = m.error("e10".into()).unwrap_err();
        assert!(why.contains("11 document errors in a row"), "{why}");
        assert!(why.ends_with("the last: e10"), "{why}");
    }

    #[test]
    fn a_success_resets_the_run_but_not_the_rate() {
        let mut m = ErrorMonitor::new(&config());
        // 100 documents with 15 errors (the 2nd, 9th, ... 100th): a rate
        // of 0.15, not over it.
        for i in 0..100 {
            if i % 7 == 1 {
                m.error("x".into()).unwrap();
            } else {
                m.ok();
            }
        }
        assert_eq!(m.total(), 15);
        // One more error in the window, the first (a success) out of it:
        // 16 of 100.
        let why = m.error("y".into()).unwrap_err();
        assert!(why.contains("16 of the last 100"), "{why}");
    }

    #[test]
    fn the_rate_waits_for_a_full_window() {
        let mut m = ErrorMonitor::new(&config());
        for _ in 0..5 {
            m.ok();
        }
        // 5 errors among 10 documents: over 0.15, but the window is not full.
        for _ in 0..5 {
            m.error("z".into()).unwrap();
        }
    }

    #[test]
    fn the_total_counts_across_successes() {
        let mut m = ErrorMonitor::new(&ErrorMonitorConfig {
            max_total: 3,
            ..config()
        });
        for _ in 0..3 {
            m.error("a".into()).unwrap();
            for _ in 0..50 {
                m.ok();
            }
        }
        let why = m.error("b".into()).unwrap_err();
        assert!(
            why.contains("4 document errors, more than errors.max_total (3)"),
            "{why}"
        );
        assert_eq!(m.last(), Some("b"));
    }
}
