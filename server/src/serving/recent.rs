//! A model's recent answers: the last minute of prediction latencies, for the status page
//! and describe (`recent`): requests per second and latency percentiles. Prometheus has
//! the whole history; this is what a person glancing at the server wants to see now.
//!
//! [`RecentAnswers::summary`] is pure over what was recorded and the time it is asked at.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// How far back the summary looks.
pub const WINDOW: Duration = Duration::from_secs(60);

/// The most answers kept (the oldest go first past it): bounds memory at any rate; past
/// ~70 answers a second the percentiles cover less than the whole minute, and the rate
/// is computed over the span the kept answers cover.
pub const CAPACITY: usize = 4096;

/// The last minute of one model's answers.
#[derive(Debug, Default)]
pub struct RecentAnswers {
    answers: Mutex<VecDeque<Answer>>,
}

#[derive(Debug, Clone, Copy)]
struct Answer {
    at: Instant,
    latency: Duration,
    error: bool,
}

/// What the last minute looked like.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RecentSummary {
    /// Answers in the window.
    pub answers: usize,
    /// Answers a second over the window (or the span the kept answers cover).
    pub per_second: f64,
    /// Answers with a 5xx status.
    pub server_errors: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

impl RecentAnswers {
    /// Records an answer given at `at` after `latency`, with HTTP `status`.
    pub fn record(&self, at: Instant, latency: Duration, status: u16) {
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        if answers.len() == CAPACITY {
            answers.pop_front();
        }
        answers.push_back(Answer {
            at,
            latency,
            error: status >= 500,
        });
        // Answers come roughly in order; what is older than the window goes now.
        while answers
            .front()
            .is_some_and(|a| at.saturating_duration_since(a.at) > WINDOW)
        {
            answers.pop_front();
        }
    }

    /// The window ending at `now`; `None` when nothing was answered in it.
    pub fn summary(&self, now: Instant) -> Option<RecentSummary> {
        let answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        let within: Vec<&Answer> = answers
            .iter()
            .filter(|a| now.saturating_duration_since(a.at) <= WINDOW)
            .collect();
        if within.is_empty() {
            return None;
        }
        let mut latencies: Vec<f64> = within
            .iter()
            .map(|a| a.latency.as_secs_f64() * 1e3)
            .collect();
        latencies.sort_by(f64::total_cmp);
        // Over the whole window, unless the kept answers (capacity reached) span less.
        let span = if answers.len() == CAPACITY {
            within
                .first()
                .map_or(WINDOW, |first| now.saturating_duration_since(first.at))
                .max(Duration::from_secs(1))
        } else {
            WINDOW
        };
        Some(RecentSummary {
            answers: within.len(),
            per_second: within.len() as f64 / span.as_secs_f64(),
            server_errors: within.iter().filter(|a| a.error).count(),
            p50_ms: percentile(&latencies, 0.50),
            p95_ms: percentile(&latencies, 0.95),
            p99_ms: percentile(&latencies, 0.99),
        })
    }
}

/// The `q` quantile of sorted, non-empty `values` (nearest rank).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_summary_covers_the_last_minute_only() {
        let recent = RecentAnswers::default();
        let start = Instant::now();
        assert_eq!(recent.summary(start), None);
        for i in 1..=100u64 {
            let status = if i % 10 == 0 { 503 } else { 200 };
            recent.record(start, Duration::from_millis(i), status);
        }
        let now = start + Duration::from_secs(30);
        let summary = recent.summary(now).expect("answers");
        assert_eq!(summary.answers, 100);
        assert_eq!(summary.server_errors, 10);
        assert_eq!(summary.p50_ms, 50.0);
        assert_eq!(summary.p95_ms, 95.0);
        assert_eq!(summary.p99_ms, 99.0);
        assert!((summary.per_second - 100.0 / 60.0).abs() < 1e-9);
        // A minute and a bit later, they have all left the window.
        assert_eq!(recent.summary(start + Duration::from_secs(61)), None);
        // A new answer drops the old ones for good.
        recent.record(
            start + Duration::from_secs(90),
            Duration::from_millis(7),
            200,
        );
        let summary = recent
            .summary(start + Duration::from_secs(90))
            .expect("one");
        assert_eq!((summary.answers, summary.p99_ms), (1, 7.0));
    }

    #[test]
    fn past_capacity_the_rate_is_over_the_span_kept() {
        let recent = RecentAnswers::default();
        let start = Instant::now();
        // 10,000 answers in 10 s: only the last 4,096 (about 4.1 s of them) are kept.
        for i in 0..10_000u64 {
            recent.record(
                start + Duration::from_millis(i),
                Duration::from_millis(1),
                200,
            );
        }
        let now = start + Duration::from_millis(10_000);
        let summary = recent.summary(now).expect("answers");
        assert_eq!(summary.answers, CAPACITY);
        assert!(
            (summary.per_second - 1000.0).abs() < 5.0,
            "{}",
            summary.per_second
        );
    }

    proptest! {
        #[test]
        fn percentiles_are_ordered_and_among_the_latencies(
            millis in proptest::collection::vec(0u64..100_000, 1..300),
        ) {
            let recent = RecentAnswers::default();
            let now = Instant::now();
            for m in &millis {
                recent.record(now, Duration::from_millis(*m), 200);
            }
            let s = recent.summary(now).expect("answers");
            prop_assert_eq!(s.answers, millis.len());
            prop_assert!(s.p50_ms <= s.p95_ms && s.p95_ms <= s.p99_ms);
            let max = *millis.iter().max().expect("some") as f64;
            let min = *millis.iter().min().expect("some") as f64;
            prop_assert!(s.p99_ms <= max + 1e-6 && s.p50_ms >= min - 1e-6);
            for p in [s.p50_ms, s.p95_ms, s.p99_ms] {
                prop_assert!(millis.iter().any(|m| (*m as f64 - p).abs() < 1e-6));
            }
        }
    }
}
