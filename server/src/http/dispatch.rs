//! One request's way to its model, whatever protocol it came by: find the model, count
//! it in flight and as used (the device manager's LRU), bring the model back if it was
//! evicted, queue the request, and await its answer within the model's response
//! timeout. Each protocol module turns its body into a handler `Request` before and
//! the `Output` into its JSON after.

use std::sync::Arc;
use std::time::Instant;

use spillway_handlers::{EventSender, Output, Request};

use crate::app::AppState;
use crate::error::{Error, Result};
use crate::lifecycle::model::{InFlight, ModelHandle};

/// A request on its way to `model`, in flight until dropped.
pub struct Dispatch {
    pub model: Arc<ModelHandle>,
    started: Instant,
    _in_flight: InFlight,
}

/// An answer and how many tokens the request's input held.
pub struct Answered {
    pub output: Output,
    pub input_tokens: usize,
}

impl Dispatch {
    /// Finds the model (its default version unless `version`), and marks it used.
    pub fn to(state: &AppState, name: &str, version: Option<&str>) -> Result<Dispatch> {
        let model = state.registry().get(name, version)?;
        let in_flight = model.begin_request();
        state.devices().touch(&model.spec.name, &model.spec.version);
        Ok(Dispatch {
            model,
            started: Instant::now(),
            _in_flight: in_flight,
        })
    }

    /// Queues `request` (after bringing an evicted model back); with `events`, a
    /// generation streams its tokens there. Returns where the answer will arrive.
    pub async fn queue(
        &self,
        state: &AppState,
        request: Request,
        events: Option<EventSender>,
    ) -> Result<crate::lifecycle::model::Submitted> {
        let timeout = self.model.spec.config.response_timeout;
        state
            .lifecycle()
            .ensure_serving(&self.model, timeout)
            .await?;
        self.model.submit(request, events).await
    }

    /// Awaits a queued request's answer within the model's response timeout.
    pub async fn answer(&self, submitted: crate::lifecycle::model::Submitted) -> Result<Answered> {
        let timeout = self.model.spec.config.response_timeout;
        let input_tokens = submitted.input_tokens;
        match tokio::time::timeout(timeout, submitted.answer).await {
            Ok(Ok(output)) => output.map(|output| Answered {
                output,
                input_tokens,
            }),
            // The job was dropped unanswered: its model was unloaded under it.
            Ok(Err(_)) => Err(Error::NotReady {
                model: self.model.spec.name.clone(),
                state: "it was unloaded before answering".into(),
            }),
            Err(_) => {
                self.model.labels().timed_out();
                Err(Error::Timeout {
                    model: self.model.spec.name.clone(),
                    timeout,
                })
            }
        }
    }

    /// Queues `request` and awaits its answer.
    pub async fn run(&self, state: &AppState, request: Request) -> Result<Answered> {
        let submitted = self.queue(state, request, None).await?;
        self.answer(submitted).await
    }

    /// Counts the request in the model's metrics with the status it was answered.
    pub fn record(&self, status: u16) {
        let took = self.started.elapsed();
        self.model.labels().prediction(status, took);
        self.model
            .recent()
            .record(std::time::Instant::now(), took, status);
    }
}

/// A response stream of what `produce` sends (server-sent events, JSON chunks). It runs
/// as a task of its own, aborted when the client goes away (the response stream is dropped): what it holds —
/// the request's event receiver — is dropped with it, so the worker drops the request
/// at its next step.
pub fn event_stream<T, F, Fut>(
    produce: F,
) -> impl futures_util::Stream<Item = std::result::Result<T, std::convert::Infallible>>
where
    T: Send + 'static,
    F: FnOnce(flume::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = flume::bounded::<T>(16);
    let task = AbortOnDrop(tokio::spawn(produce(tx)));
    futures_util::stream::unfold((rx, task), |(rx, task)| async move {
        let event = rx.recv_async().await.ok()?;
        Some((Ok(event), (rx, task)))
    })
}

/// Stops the producing task when the response stream is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
