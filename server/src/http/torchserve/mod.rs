//! TorchServe's APIs, with its paths, shapes, status codes and messages.
//!
//! - [`inference`]: `GET /ping`, `POST /predictions/{model}[/{version}]`.
//! - [`management`]: register, describe, scale, unregister, set-default.
//! - [`predictions`]: prediction bodies as handler requests, and answers as TorchServe's JSON.

pub mod inference;
pub mod management;
pub mod predictions;
