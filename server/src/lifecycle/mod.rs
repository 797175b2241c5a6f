//! A model version's life: registered, loading (by stages), serving (resident, or its
//! units evicted to disk), unloaded (evicted to make room), failed, retired.
//!
//! - [`loader`]: registration and loading, step by step (open, plan and lease, build).
//! - [`model`]: [`model::ModelHandle`], one registered version and its state.
//! - [`effects`]: carrying out the device manager's decisions — evicting models, and
//!   bringing an evicted one back on its next request.
//! - [`registry`]: registered versions by name, and each name's default.

pub mod effects;
pub mod loader;
pub mod model;
pub mod registry;
