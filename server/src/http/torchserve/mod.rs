//! TorchServe's APIs, with its paths, shapes, status codes and messages.
//!
//! - [`inference`]: `GET /ping`, `POST /predictions/{model}[/{version}]`.
//! - [`management`]: register, describe, scale, unregister, set-default.

pub mod inference;
pub mod management;
