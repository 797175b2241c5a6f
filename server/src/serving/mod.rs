//! A loaded model's serving machinery ([`Serving`]): its job queue, the [`batcher`] that
//! fills batches from it, the [`worker`] threads that run its handler, and (beside them)
//! its [`recent`] answers. `lifecycle` decides when a model serves; this module is how.
//!
//! A model stops serving by being *retired*: its job queue closes, the queued jobs are
//! still run, its worker threads are joined, and only then are its handler (the
//! weights) and its lease dropped — so a released lease means the memory is free.

pub mod batcher;
pub mod recent;
pub mod worker;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use spillway_handlers::Handler;

use crate::config::model_config::ModelConfig;
use crate::devices::manager::Lease;
use crate::error::Result;
use crate::telemetry::metrics::ModelLabels;
use batcher::{BatchPolicy, IdleWorkers, Job};
use worker::WorkerPool;

/// A loaded model's serving machinery.
pub struct Serving {
    pub handler: Arc<dyn Handler>,
    pub jobs: flume::Sender<Job>,
    pub pool: Mutex<WorkerPool>,
    pub plan: Option<spillway_placement::Plan>,
    lease: Option<Lease>,
    pub loaded_at: SystemTime,
    pub load_time: Duration,
}

/// What a model is served with.
pub struct Setup<'a> {
    pub name: &'a str,
    pub config: &'a ModelConfig,
    pub job_queue_size: usize,
    pub workers: Workers,
    pub labels: &'a ModelLabels,
}

/// How many workers a model runs (its `minWorkers`/`maxWorkers`, or a scale since).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workers {
    pub min: usize,
    pub max: usize,
}

impl Serving {
    /// Starts the batcher and workers around a built `handler`. Must run inside the
    /// tokio runtime (the batcher is a task).
    pub fn start(
        handler: Arc<dyn Handler>,
        plan: Option<spillway_placement::Plan>,
        lease: Option<Lease>,
        setup: &Setup<'_>,
        load_time: Duration,
    ) -> Result<Serving> {
        let Setup {
            name,
            config,
            job_queue_size,
            workers,
            labels,
        } = *setup;
        let (jobs_tx, jobs_rx) = flume::bounded(job_queue_size);
        // A rendezvous channel: a batch is handed over only when a worker takes it, so
        // jobs keep gathering in the queue (and join the next batch) while all are busy.
        let (batch_tx, batch_rx) = flume::bounded(0);
        let idle = Arc::new(IdleWorkers::default());
        let policy = BatchPolicy {
            batch_size: config.batch_size,
            max_batch_delay: config.max_batch_delay,
            max_batch_tokens: config.max_batch_tokens,
        };
        let continuous = config.continuous_batching.then_some(policy.batch_size);
        if continuous.is_some() && handler.step_batch().is_none() {
            tracing::warn!(
                model = %name,
                "continuousBatching is set but this handler runs whole batches; ignored"
            );
        }
        let mut pool = WorkerPool::new(
            handler.clone(),
            batch_rx,
            idle.clone(),
            labels.clone(),
            continuous,
            config.threads_per_worker,
        );
        pool.scale(workers.min, workers.max)?;
        tokio::spawn(batcher::run(
            jobs_rx,
            batch_tx,
            policy,
            idle,
            labels.clone(),
        ));
        labels.loaded(load_time);
        if let Some(plan) = &plan {
            labels.placed(plan);
        }
        if let Some(lease) = &lease {
            lease.settle();
        }
        Ok(Serving {
            handler,
            jobs: jobs_tx,
            pool: Mutex::new(pool),
            plan,
            lease,
            loaded_at: SystemTime::now(),
            load_time,
        })
    }

    /// Its hold on device bytes (models with weights).
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    /// Starts retiring: the job queue closes (when `self` drops, right after), queued
    /// jobs still run, and a thread joins the workers, then drops the handler and the
    /// lease. The returned handle finishes when all that is done.
    pub fn retire(&mut self) -> std::thread::JoinHandle<()> {
        let workers = self
            .pool
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .retire();
        let handler = self.handler.clone();
        let lease = self.lease.take();
        std::thread::spawn(move || {
            for worker in workers {
                let _ = worker.join();
            }
            drop(handler);
            crate::devices::release_freed_memory();
            drop(lease);
        })
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        // Retired in the background where nobody waits for it.
        let _detached = self.retire();
    }
}
