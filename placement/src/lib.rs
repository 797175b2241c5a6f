//! Spillway's placement planner: decides where every layer of a model lives — GPUs, CPU
//! or disk — before a single weight is read, and explains the decision. Pure logic (no
//! I/O, no clock, no GPU): callers gather tensor headers and free memory, this crate
//! decides. Shared by the handlers (which execute a plan), the device manager and
//! `spillway plan`.
//!
//! # Layout
//! - [`device`]: [`Device`], [`DeviceType`], [`DeviceMap`], [`ComponentDevice`].
//! - [`request`]: [`DeviceRequest`], a whole model's ask ("cuda", "cudax2", "cuda:0,1").
//! - [`bytesize`]: [`ByteSize`], sizes read as accelerate reads `max_memory`.
//! - [`budget`]: [`Budgets`] from `max_memory` and a [`Machine`]'s free memory.
//! - [`inventory`]: [`TensorInfo`] → [`PlacementUnit`]s (embeddings, blocks, norm, head).
//! - [`shape`]: [`ModelShape`] from config.json: activation and KV-cache reserves, and
//!   tensor lists for planning from config.json alone.
//! - [`strategy`]: [`Strategy`], the user's unresolved `device_map`.
//! - [`plan`](mod@plan): [`plan()`] → [`Plan`].
//! - [`explain`]: a [`Plan`] as the table `spillway plan` prints.
//! - [`ledger`]: who must leave a device pool for a model to fit (least recently used
//!   first), and which GPUs a model gets.
//! - [`error`]: [`PlanError`], the crate's one error type.

pub mod budget;
pub mod bytesize;
pub mod device;
pub mod error;
pub mod explain;
pub mod inventory;
pub mod ledger;
pub mod plan;
pub mod request;
pub mod shape;
pub mod strategy;

pub use budget::{Budgets, DeviceBudget, GpuMemory, Machine, MaxMemory};
pub use bytesize::ByteSize;
pub use device::{ComponentDevice, Device, DeviceMap, DeviceType, prefix_matches};
pub use error::PlanError;
pub use inventory::{PlacementUnit, TensorDType, TensorInfo, UnitKind};
pub use plan::{DeviceUsage, DiskAccess, PlacedUnit, Plan, PlanRequest, plan};
pub use request::DeviceRequest;
pub use shape::{Family, ModelShape, Reserve};
pub use strategy::Strategy;
