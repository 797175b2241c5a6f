//! [`PlanError`]: why a device string, budget or placement cannot be accepted. Every
//! message says what was wrong and what would be accepted instead.

use crate::{ByteSize, Device};

/// One device's shortfall in a [`PlanError::DoesNotFit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    pub device: Device,
    pub available: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("invalid device `{given}`: {reason}; accepted: {accepted}")]
    BadDevice {
        given: String,
        reason: String,
        accepted: &'static str,
    },

    #[error(
        "invalid size `{given}`: expected bytes as an integer or a string such as \"10GiB\", \"500MiB\", \"10GB\", \"500MB\""
    )]
    BadByteSize { given: String },

    #[error(
        "invalid max_memory key `{given}`: expected a GPU ordinal (\"0\"), \"cuda:N\", \"cpu\" or \"disk\""
    )]
    BadMemoryKey { given: String },

    #[error("invalid device_map: {0}")]
    BadDeviceMap(String),

    #[error("device_map names modules the model does not have: {}", .prefixes.join(", "))]
    UnknownPrefix { prefixes: Vec<String> },

    #[error("device_map does not place these modules: {}", .units.join(", "))]
    Uncovered { units: Vec<String> },

    #[error("{device} is not available here (available: {})", .available.join(", "))]
    Unavailable {
        device: String,
        available: Vec<String>,
    },

    #[error(
        "the model does not fit: it needs {needed} more than its budgets allow ({}){}",
        .devices.iter().map(|s| format!("{} has {} left", s.device, ByteSize(s.available))).collect::<Vec<_>>().join(", "),
        .hint.as_ref().map(|h| format!("; {h}")).unwrap_or_default()
    )]
    DoesNotFit {
        needed: ByteSize,
        devices: Vec<Shortfall>,
        hint: Option<String>,
    },

    #[error("{0}")]
    NeedsOffloadFolder(String),
}

impl PlanError {
    pub(crate) fn bad_device(given: &str, reason: &str, accepted: &'static str) -> Self {
        PlanError::BadDevice {
            given: given.to_string(),
            reason: reason.to_string(),
            accepted,
        }
    }
}
