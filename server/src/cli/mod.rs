//! The commands besides `serve`: [`archiver`] (`spillway archive`, TorchServe's
//! `torch-model-archiver`) and [`pull`] (`spillway pull`, from the Hugging Face Hub).

pub mod archiver;
pub mod pull;
