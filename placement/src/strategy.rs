//! [`Strategy`]: a user's `device_map`, unresolved — a strategy name, a plain device, an
//! explicit map or mistral.rs-style layer counts. [`crate::plan`] turns it into a
//! [`crate::Plan`]; the two are different types, so nothing can run an unresolved
//! "auto".

use std::fmt;

use crate::{Device, DeviceMap, PlanError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Strategy {
    /// accelerate's "auto": the same as balanced.
    Auto,
    /// Spread blocks over the GPUs in proportion to their budgets, then CPU, then disk.
    Balanced,
    /// Balanced, keeping GPU 0 as light as possible (it holds only what precedes the blocks).
    BalancedLow0,
    /// Fill GPU 0, then GPU 1, ..., then the CPU, then disk.
    Sequential,
    /// Module prefix → device; must cover every unit.
    Explicit(DeviceMap),
    /// mistral.rs's "0:16;1:16": blocks per GPU ordinal in order, the rest on the CPU.
    LayerCounts(Vec<(usize, usize)>),
    /// Everything on one device.
    Single(Device),
}

impl Strategy {
    /// Reads setup_config.json's `device_map`. Absent: the best single device (`cuda:0`
    /// when there is a GPU, else the CPU).
    pub fn from_json(value: Option<&serde_json::Value>, gpus: usize) -> Result<Self, PlanError> {
        match value {
            None | Some(serde_json::Value::Null) => Ok(Strategy::Single(if gpus > 0 {
                Device::cuda(0)
            } else {
                Device::CPU
            })),
            Some(serde_json::Value::String(s)) => s.parse(),
            Some(object @ serde_json::Value::Object(_)) => {
                serde_json::from_value::<DeviceMap>(object.clone())
                    .map(Strategy::Explicit)
                    .map_err(|e| PlanError::BadDeviceMap(e.to_string()))
            }
            Some(other) => Err(PlanError::BadDeviceMap(format!(
                "expected a strategy name, a device or an object, found {other}"
            ))),
        }
    }
}

impl std::str::FromStr for Strategy {
    type Err = PlanError;

    fn from_str(s: &str) -> Result<Self, PlanError> {
        let text = s.trim();
        match text {
            "auto" => return Ok(Strategy::Auto),
            "balanced" => return Ok(Strategy::Balanced),
            "balanced_low_0" => return Ok(Strategy::BalancedLow0),
            "sequential" => return Ok(Strategy::Sequential),
            _ => {}
        }
        if text.starts_with(|c: char| c.is_ascii_digit()) && text.contains(':') {
            let counts = text
                .split(';')
                .filter(|p| !p.trim().is_empty())
                .map(|pair| {
                    let (ordinal, count) = pair.split_once(':').unwrap_or((pair, ""));
                    match (ordinal.trim().parse(), count.trim().parse()) {
                        (Ok(o), Ok(c)) => Ok((o, c)),
                        _ => Err(PlanError::BadDeviceMap(format!(
                            "`{pair}` in `{text}`: layer counts are ORDINAL:BLOCKS pairs such as \"0:16;1:16\""
                        ))),
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(Strategy::LayerCounts(counts));
        }
        text.parse::<Device>().map(Strategy::Single).map_err(|e| {
            PlanError::BadDeviceMap(format!(
                "`{text}` is not a strategy (auto, balanced, balanced_low_0, sequential), layer counts (\"0:16;1:16\") or a device ({e})"
            ))
        })
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Strategy::Auto => f.write_str("auto"),
            Strategy::Balanced => f.write_str("balanced"),
            Strategy::BalancedLow0 => f.write_str("balanced_low_0"),
            Strategy::Sequential => f.write_str("sequential"),
            Strategy::Explicit(_) => f.write_str("explicit map"),
            Strategy::LayerCounts(counts) => {
                let parts: Vec<String> = counts.iter().map(|(o, c)| format!("{o}:{c}")).collect();
                f.write_str(&parts.join(";"))
            }
            Strategy::Single(device) => write!(f, "{device}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_form_of_device_map() {
        let cases = [
            ("\"auto\"", Strategy::Auto),
            ("\"balanced_low_0\"", Strategy::BalancedLow0),
            ("\"sequential\"", Strategy::Sequential),
            ("\"cuda:1\"", Strategy::Single(Device::cuda(1))),
            ("\"disk\"", Strategy::Single(Device::DISK)),
            (
                "\"0:16;1:14\"",
                Strategy::LayerCounts(vec![(0, 16), (1, 14)]),
            ),
        ];
        for (json, strategy) in cases {
            let value: serde_json::Value = serde_json::from_str(json).expect("json");
            assert_eq!(Strategy::from_json(Some(&value), 2), Ok(strategy), "{json}");
        }
        let map =
            serde_json::json!({"model.embed_tokens": 0, "model.layers": "cpu", "lm_head": "disk"});
        match Strategy::from_json(Some(&map), 1) {
            Ok(Strategy::Explicit(m)) => assert_eq!(m.entries.len(), 3),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            Strategy::from_json(None, 0),
            Ok(Strategy::Single(Device::CPU))
        );
        assert_eq!(
            Strategy::from_json(None, 1),
            Ok(Strategy::Single(Device::cuda(0)))
        );
    }

    #[test]
    fn nonsense_names_the_accepted_forms() {
        for bad in ["\"fastest\"", "\"0:x\"", "42"] {
            let value: serde_json::Value = serde_json::from_str(bad).expect("json");
            let err = Strategy::from_json(Some(&value), 0).expect_err(bad);
            assert!(matches!(err, PlanError::BadDeviceMap(_)), "{bad}: {err}");
        }
    }
}
