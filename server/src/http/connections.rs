//! Accepting connections on one listener, so that slow or greedy clients cannot exhaust
//! the server: at most `max_connections` open at once (past that, new ones wait in the
//! kernel's backlog until one closes), a request's headers within
//! `request_read_timeout` (hyper closes a connection that sends them slower: a
//! slowloris holds a slot for that long at most; the body gets its own deadline in
//! `super::error::read_body_within`), and a graceful stop: no new connection once
//! `stop` is set, every request in flight answered before [`serve`] returns.
//!
//! `axum::serve` does the same minus the limits (it gives hyper no timer, so hyper's
//! header timeout never fires, and it has no connection cap).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// What each listener allows its clients.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub read_timeout: Duration,
}

/// How long to wait before accepting again after the process ran out of file
/// descriptors (or another resource `accept` needs).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Resolves once `stop` turns true (its borrow of the value ends inside, so the future
/// stays `Send`).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// Serves `app` on `listener` until `stop` turns true, then waits for the requests in
/// flight.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let service = tower::ServiceExt::map_request(
        app,
        |request: axum::http::Request<hyper::body::Incoming>| {
            super::trim_trailing_slash(request.map(axum::body::Body::new))
        },
    );
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break, // never closed
            },
            () = stopped(&mut stop) => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and the like: the connection stays in the backlog.
                    tracing::warn!(error = %e, "cannot accept a connection now");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => break,
        };
        let _ = stream.set_nodelay(true);
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.read_timeout)
            .serve_connection(
                TokioIo::new(stream),
                TowerToHyperService::new(service.clone()),
            );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(slot);
        });
    }
    graceful.shutdown().await;
}
