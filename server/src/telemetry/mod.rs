//! What the server tells its operators: [`metrics`] (every metric name, recorded and
//! rendered for Prometheus), [`logging`] (log lines, text or JSON) and each request's id
//! ([`request_id`], in its logs and its answer).

pub mod logging;
pub mod metrics;
pub mod request_id;
