//! A loaded model's serving machinery: the job queue's [`batcher`], the [`worker`]
//! threads that run its handler, and its [`recent`] answers.

pub mod batcher;
pub mod recent;
pub mod worker;
