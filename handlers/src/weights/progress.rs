//! Progress of long weight work (unpacking an archive, converting a GGUF, writing offload
//! copies): bytes done of a total, and the rate. Whoever starts the work (the server's
//! loader, the CLI) runs it inside [`with`] a [`Progress`]; the code doing it calls
//! [`begin`] and [`advance`] on the calling thread, which do nothing outside `with`. A
//! `Progress` logs a line every few seconds while work goes on, and can be read at any
//! time ([`Progress::snapshot`]: describe, the status page); one made
//! [`Progress::for_terminal`] draws a bar on stderr instead, for work over a second.

use std::cell::RefCell;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Time between log lines about one piece of work: 3 s, or `SPILLWAY_PROGRESS_SECONDS`.
pub fn log_every() -> Duration {
    static EVERY: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *EVERY.get_or_init(|| {
        std::env::var("SPILLWAY_PROGRESS_SECONDS")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
            .map_or(Duration::from_secs(3), Duration::from_secs_f64)
    })
}

/// A terminal bar appears once work has run this long.
pub const BAR_AFTER: Duration = Duration::from_secs(1);

/// Where one piece of work stands.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub stage: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub bytes_per_second: f64,
}

#[derive(Debug)]
struct Work {
    stage: String,
    done: u64,
    total: u64,
    started: Instant,
    reported: Instant,
}

/// One model's (or one command's) progress.
#[derive(Debug)]
pub struct Progress {
    /// What the log lines name (a model, an archive).
    label: String,
    terminal: bool,
    work: Mutex<Option<Work>>,
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<Progress>>> = const { RefCell::new(None) };
}

/// Runs `f` with `progress` receiving what [`begin`] and [`advance`] report on this thread.
pub fn with<R>(progress: &Arc<Progress>, f: impl FnOnce() -> R) -> R {
    let previous = CURRENT.with(|c| c.replace(Some(progress.clone())));
    struct Restore(Option<Arc<Progress>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            CURRENT.with(|c| *c.borrow_mut() = previous);
        }
    }
    let _restore = Restore(previous);
    let result = f();
    progress.finish();
    result
}

/// Starts a piece of work of `total` bytes on the current progress, if any.
pub fn begin(stage: impl Into<String>, total: u64) {
    CURRENT.with(|c| {
        if let Some(progress) = &*c.borrow() {
            progress.begin(stage.into(), total);
        }
    });
}

/// `bytes` more of the current work are done.
pub fn advance(bytes: u64) {
    CURRENT.with(|c| {
        if let Some(progress) = &*c.borrow() {
            progress.advance(bytes, Instant::now());
        }
    });
}

impl Progress {
    /// A progress that logs (and is read by describe).
    pub fn logged(label: impl Into<String>) -> Arc<Self> {
        Arc::new(Self {
            label: label.into(),
            terminal: false,
            work: Mutex::new(None),
        })
    }

    /// A progress drawn as a bar on stderr (when stderr is a terminal; else logged).
    pub fn for_terminal(label: impl Into<String>) -> Arc<Self> {
        Arc::new(Self {
            label: label.into(),
            terminal: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            work: Mutex::new(None),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Work>> {
        self.work.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn begin(&self, stage: String, total: u64) {
        self.finish();
        let now = Instant::now();
        *self.lock() = Some(Work {
            stage,
            done: 0,
            total,
            started: now,
            reported: now,
        });
    }

    /// Adds `bytes` at `now`; reports when it is time.
    fn advance(&self, bytes: u64, now: Instant) {
        let mut work = self.lock();
        let Some(work) = work.as_mut() else {
            return;
        };
        work.done = work.done.saturating_add(bytes);
        let since = now.saturating_duration_since(work.reported);
        if self.terminal {
            if now.saturating_duration_since(work.started) >= BAR_AFTER
                && since >= Duration::from_millis(100)
            {
                work.reported = now;
                let line = bar(&snapshot_of(work, now), 30);
                let _ = write!(std::io::stderr(), "\r{line}");
            }
        } else if since >= log_every() {
            work.reported = now;
            let s = snapshot_of(work, now);
            tracing::info!(
                "{}: {}: {} of {} ({:.0} %), {:.1} MB/s",
                self.label,
                s.stage,
                mib(s.done_bytes),
                mib(s.total_bytes),
                percent(&s),
                s.bytes_per_second / 1e6
            );
        }
    }

    /// Ends the current work (a terminal bar is closed with a newline).
    fn finish(&self) {
        let work = self.lock().take();
        if let Some(work) = work
            && self.terminal
            && work.reported > work.started
        {
            let line = bar(&snapshot_of(&work, Instant::now()), 30);
            let _ = writeln!(std::io::stderr(), "\r{line}");
        }
    }

    /// The work going on now, if any.
    pub fn snapshot(&self) -> Option<Snapshot> {
        self.lock().as_ref().map(|w| snapshot_of(w, Instant::now()))
    }
}

fn snapshot_of(work: &Work, now: Instant) -> Snapshot {
    let seconds = now.saturating_duration_since(work.started).as_secs_f64();
    Snapshot {
        stage: work.stage.clone(),
        done_bytes: work.done,
        total_bytes: work.total,
        bytes_per_second: if seconds > 0.0 {
            work.done as f64 / seconds
        } else {
            0.0
        },
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn percent(s: &Snapshot) -> f64 {
    if s.total_bytes == 0 {
        100.0
    } else {
        (100.0 * s.done_bytes as f64 / s.total_bytes as f64).min(100.0)
    }
}

/// A reader that reports the bytes read through it as done ([`advance`]).
pub struct Counted<R>(pub R);

impl<R: std::io::Read> std::io::Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        advance(n as u64);
        Ok(n)
    }
}

/// A one-line bar `width` cells wide: `stage [#####.....] 50 % 12.0 of 24.0 MiB, 3.1 MB/s`.
pub fn bar(s: &Snapshot, width: usize) -> String {
    let filled = ((percent(s) / 100.0) * width as f64).round() as usize;
    format!(
        "{} [{}{}] {:>3.0} % {} of {}, {:.1} MB/s",
        s.stage,
        "#".repeat(filled.min(width)),
        ".".repeat(width - filled.min(width)),
        percent(s),
        mib(s.done_bytes),
        mib(s.total_bytes),
        s.bytes_per_second / 1e6
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_reports_only_inside_with_and_ends_with_it() {
        begin("outside", 10);
        advance(5); // no progress: nothing happens, nothing panics
        let progress = Progress::logged("m");
        let seen = with(&progress, || {
            begin("writing x", 1000);
            advance(250);
            advance(250);
            progress.snapshot()
        })
        .expect("work going on");
        assert_eq!(
            (seen.stage.as_str(), seen.done_bytes, seen.total_bytes),
            ("writing x", 500, 1000)
        );
        assert_eq!(progress.snapshot(), None, "finished with `with`");
        // A nested `with` restores the outer progress after it.
        let outer = Progress::logged("outer");
        let inner = Progress::logged("inner");
        with(&outer, || {
            with(&inner, || begin("inner work", 1));
            begin("outer work", 2);
            advance(1);
            assert_eq!(outer.snapshot().expect("outer").done_bytes, 1);
        });
    }

    #[test]
    fn the_rate_is_bytes_over_time_since_the_start() {
        let progress = Progress::logged("m");
        progress.begin("w".into(), 100);
        let start = progress.lock().as_ref().expect("work").started;
        progress.advance(50, start + Duration::from_secs(1));
        let s = snapshot_of(
            progress.lock().as_ref().expect("work"),
            start + Duration::from_secs(2),
        );
        assert_eq!(s.bytes_per_second, 25.0);
    }

    #[test]
    fn the_bar_fills_with_the_share_done() {
        let s = Snapshot {
            stage: "unpacking".into(),
            done_bytes: 3 << 20,
            total_bytes: 12 << 20,
            bytes_per_second: 2.5e6,
        };
        assert_eq!(
            bar(&s, 8),
            "unpacking [##......]  25 % 3.0 MiB of 12.0 MiB, 2.5 MB/s"
        );
        let done = Snapshot {
            done_bytes: 20,
            total_bytes: 10,
            ..s
        };
        assert!(bar(&done, 4).contains("[####] 100 %"), "never past full");
    }
}
