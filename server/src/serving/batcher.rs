//! The batcher: one task per loaded model that turns queued [`Job`]s into batches.
//!
//! A batch closes when it holds `batch_size` jobs or `max_batch_delay` after its first
//! job arrived, whichever comes first — except that while a worker sits idle, a batch
//! is dispatched at once with whatever is queued, so light load pays no batching delay
//! (TorchServe always waits out the delay). With `maxBatchTokens` a batch also closes
//! before its padded size (texts × longest text, in tokens) would pass the budget; the
//! job that did not fit starts the next batch. Jobs whose client has gone (its reply
//! receiver is closed: disconnect or timeout) are dropped before the batch runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use spillway_handlers::{Input, InputSize, Output};
use tokio::sync::{Notify, oneshot};

use crate::error::Result;
use crate::telemetry::metrics::ModelLabels;

/// One accepted request waiting for its answer.
pub struct Job {
    pub input: Input,
    /// The input's size in tokens, when the model's batches have a token budget.
    pub size: Option<InputSize>,
    pub reply: oneshot::Sender<Result<Output>>,
    pub enqueued_at: Instant,
    /// The request's id, for the worker's log lines about it.
    pub request_id: Option<crate::telemetry::request_id::RequestId>,
}

/// When a batch closes.
#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    pub batch_size: usize,
    pub max_batch_delay: Duration,
    /// `maxBatchTokens`: the most a batch may take padded (texts × longest, in tokens).
    pub max_batch_tokens: Option<usize>,
}

impl BatchPolicy {
    /// Whether `job` may join `batch`: within `batchSize`, and within the token budget
    /// once padded to the longest input. A batch's first job always fits, however large.
    pub fn fits(&self, batch: &[Job], job: &Job) -> bool {
        if batch.is_empty() {
            return true;
        }
        if batch.len() >= self.batch_size {
            return false;
        }
        let (Some(budget), Some(size)) = (self.max_batch_tokens, job.size) else {
            return true;
        };
        let sizes = batch.iter().filter_map(|j| j.size).chain([size]);
        let (rows, longest) = sizes.fold((0, 0), |(rows, longest), s| {
            (rows + s.rows, longest.max(s.tokens))
        });
        rows * longest <= budget
    }
}

/// How many workers are waiting for a batch. Workers (OS threads) bump it around their
/// blocking receive; the batcher reads it and is woken through `notify` when a worker
/// becomes idle, so it can stop waiting for a fuller batch.
#[derive(Debug, Default)]
pub struct IdleWorkers {
    count: AtomicUsize,
    notify: Notify,
}

impl IdleWorkers {
    pub fn enter(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_one();
    }

    pub fn leave(&self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
    }

    fn any(&self) -> bool {
        self.count.load(Ordering::SeqCst) > 0
    }
}

/// Runs until every job sender is gone and the queue is drained, or the workers are gone.
pub async fn run(
    jobs: flume::Receiver<Job>,
    batches: flume::Sender<Vec<Job>>,
    policy: BatchPolicy,
    idle: Arc<IdleWorkers>,
    labels: ModelLabels,
) {
    // A job that did not fit the last batch starts the next one.
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match jobs.recv_async().await {
                Ok(job) => job,
                Err(_) => break,
            },
        };
        let deadline = tokio::time::Instant::from_std(first.enqueued_at + policy.max_batch_delay);
        let mut batch = vec![first];
        let mut full = false;
        while !full && batch.len() < policy.batch_size {
            match jobs.try_recv() {
                Ok(job) if policy.fits(&batch, &job) => batch.push(job),
                Ok(job) => {
                    carried = Some(job);
                    full = true;
                }
                Err(_) => break,
            }
        }
        while !full && batch.len() < policy.batch_size && !idle.any() {
            tokio::select! {
                job = jobs.recv_async() => match job {
                    Ok(job) if policy.fits(&batch, &job) => batch.push(job),
                    Ok(job) => {
                        carried = Some(job);
                        full = true;
                    }
                    Err(_) => break,
                },
                () = tokio::time::sleep_until(deadline) => break,
                () = idle.notify.notified() => {}
            }
        }
        let before = batch.len();
        batch.retain(|job| !job.reply.is_closed());
        if batch.len() < before {
            labels.dropped(before - batch.len());
        }
        if batch.is_empty() {
            continue;
        }
        if batches.send_async(batch).await.is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spillway_handlers::RawBody;

    fn job() -> (Job, oneshot::Receiver<Result<Output>>) {
        let (tx, rx) = oneshot::channel();
        let job = Job {
            input: Input::Raw(RawBody {
                content_type: None,
                bytes: vec![],
            }),
            size: None,
            reply: tx,
            enqueued_at: Instant::now(),
            request_id: None,
        };
        (job, rx)
    }

    fn sized(rows: usize, tokens: usize) -> (Job, oneshot::Receiver<Result<Output>>) {
        let (mut job, rx) = job();
        job.size = Some(InputSize { rows, tokens });
        (job, rx)
    }

    #[test]
    fn a_token_budget_counts_the_batch_padded_to_its_longest_input() {
        let policy = BatchPolicy {
            batch_size: 8,
            max_batch_delay: Duration::from_millis(5),
            max_batch_tokens: Some(100),
        };
        let batch: Vec<Job> = [(1, 30), (1, 30)]
            .iter()
            .map(|&(r, t)| sized(r, t).0)
            .collect();
        assert!(policy.fits(&batch, &sized(1, 30).0), "3 × 30 = 90");
        assert!(
            !policy.fits(&batch, &sized(1, 40).0),
            "3 × 40 = 120: pads the others"
        );
        assert!(!policy.fits(&batch, &sized(2, 30).0), "4 rows × 30 = 120");
        assert!(
            policy.fits(&[], &sized(4, 500).0),
            "a first job always runs"
        );
        let unlimited = BatchPolicy {
            max_batch_tokens: None,
            ..policy
        };
        assert!(unlimited.fits(&batch, &sized(1, 4000).0));
        let small = BatchPolicy {
            batch_size: 2,
            ..unlimited
        };
        assert!(!small.fits(&batch, &sized(1, 1).0), "batchSize still holds");
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_past_the_token_budget_starts_the_next_batch() {
        let (jobs_tx, jobs_rx) = flume::bounded(100);
        let (batch_tx, batch_rx) = flume::bounded(0);
        let policy = BatchPolicy {
            batch_size: 8,
            max_batch_delay: Duration::from_millis(5),
            max_batch_tokens: Some(100),
        };
        tokio::spawn(run(
            jobs_rx,
            batch_tx,
            policy,
            Arc::new(IdleWorkers::default()),
            ModelLabels::new("m", "1"),
        ));
        let mut keep = vec![];
        for tokens in [30, 30, 30, 30, 60] {
            let (j, r) = sized(1, tokens);
            keep.push(r);
            jobs_tx.send(j).expect("send");
        }
        let sizes = |batch: Vec<Job>| -> Vec<usize> {
            batch
                .iter()
                .map(|j| j.size.expect("sized").tokens)
                .collect()
        };
        assert_eq!(
            sizes(batch_rx.recv_async().await.expect("batch")),
            [30, 30, 30]
        );
        assert_eq!(sizes(batch_rx.recv_async().await.expect("batch")), [30]);
        assert_eq!(sizes(batch_rx.recv_async().await.expect("batch")), [60]);
    }

    struct Harness {
        jobs: flume::Sender<Job>,
        batches: flume::Receiver<Vec<Job>>,
        idle: Arc<IdleWorkers>,
    }

    fn start(batch_size: usize, delay_ms: u64) -> Harness {
        let (jobs_tx, jobs_rx) = flume::bounded(100);
        let (batch_tx, batch_rx) = flume::bounded(0);
        let idle = Arc::new(IdleWorkers::default());
        let policy = BatchPolicy {
            batch_size,
            max_batch_delay: Duration::from_millis(delay_ms),
            max_batch_tokens: None,
        };
        tokio::spawn(run(
            jobs_rx,
            batch_tx,
            policy,
            idle.clone(),
            ModelLabels::new("m", "1"),
        ));
        Harness {
            jobs: jobs_tx,
            batches: batch_rx,
            idle,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_model_waits_out_the_delay_then_sends_a_partial_batch() {
        let h = start(4, 50);
        let (a, _ra) = job();
        let (b, _rb) = job();
        h.jobs.send(a).expect("send");
        h.jobs.send(b).expect("send");
        let started = tokio::time::Instant::now();
        let batch = h.batches.recv_async().await.expect("batch");
        assert_eq!(batch.len(), 2);
        assert!(
            started.elapsed() >= Duration::from_millis(50),
            "waited {:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_leaves_at_once() {
        let h = start(2, 10_000);
        let mut keep = vec![];
        for _ in 0..3 {
            let (j, r) = job();
            keep.push(r);
            h.jobs.send(j).expect("send");
        }
        let started = tokio::time::Instant::now();
        assert_eq!(h.batches.recv_async().await.expect("batch").len(), 2);
        assert!(started.elapsed() < Duration::from_millis(1));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_worker_gets_the_first_job_without_delay() {
        let h = start(8, 10_000);
        h.idle.enter();
        let (j, _r) = job();
        h.jobs.send(j).expect("send");
        let started = tokio::time::Instant::now();
        assert_eq!(h.batches.recv_async().await.expect("batch").len(), 1);
        assert!(started.elapsed() < Duration::from_millis(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_becoming_idle_ends_the_wait() {
        let h = start(8, 10_000);
        let (j, _r) = job();
        h.jobs.send(j).expect("send");
        tokio::time::sleep(Duration::from_millis(20)).await;
        h.idle.enter();
        let batch = tokio::time::timeout(Duration::from_millis(100), h.batches.recv_async()).await;
        assert_eq!(
            batch.expect("no wait for the delay").expect("batch").len(),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn jobs_whose_client_left_are_dropped() {
        let h = start(4, 5);
        let (gone, rx) = job();
        drop(rx);
        let (kept, _r) = job();
        h.jobs.send(gone).expect("send");
        h.jobs.send(kept).expect("send");
        assert_eq!(h.batches.recv_async().await.expect("batch").len(), 1);
    }
}
