//! Devices as torch and accelerate spell them: [`DeviceType`], [`Device`] (`"cpu"`,
//! `"cuda:1"`, `"disk"`), [`DeviceMap`] (ordered module prefix → device) and
//! [`ComponentDevice`] (one device or a map), with exact JSON round-trips.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::PlanError;

const ACCEPTED: &str = "\"cpu\", \"cuda\", \"cuda:N\", \"disk\"";

/// Kinds of device. `Metal` exists so plans can name it; this build refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceType {
    Cuda,
    Metal,
    Cpu,
    Disk,
}

/// One device: a type and, for GPUs, an ordinal. Ordered as a placement chain is:
/// GPUs by ordinal, then the CPU, then disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Device {
    pub kind: DeviceType,
    pub ordinal: usize,
}

impl Device {
    pub const CPU: Device = Device {
        kind: DeviceType::Cpu,
        ordinal: 0,
    };
    pub const DISK: Device = Device {
        kind: DeviceType::Disk,
        ordinal: 0,
    };

    pub const fn cuda(ordinal: usize) -> Device {
        Device {
            kind: DeviceType::Cuda,
            ordinal,
        }
    }

    pub fn is_gpu(&self) -> bool {
        matches!(self.kind, DeviceType::Cuda | DeviceType::Metal)
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            DeviceType::Cpu => f.write_str("cpu"),
            DeviceType::Disk => f.write_str("disk"),
            DeviceType::Cuda => write!(f, "cuda:{}", self.ordinal),
            DeviceType::Metal => write!(f, "mps:{}", self.ordinal),
        }
    }
}

impl FromStr for Device {
    type Err = PlanError;

    fn from_str(s: &str) -> Result<Self, PlanError> {
        let bad = |reason: &str| PlanError::bad_device(s, reason, ACCEPTED);
        let text = s.trim().to_ascii_lowercase();
        let (kind, ordinal) = match text.split_once(':') {
            Some((kind, n)) => (
                kind,
                Some(
                    n.parse::<usize>()
                        .map_err(|_| bad("the ordinal is not a number"))?,
                ),
            ),
            None => (text.as_str(), None),
        };
        match kind {
            "cpu" if ordinal.is_none_or(|n| n == 0) => Ok(Device::CPU),
            "disk" if ordinal.is_none() => Ok(Device::DISK),
            "cuda" | "gpu" => Ok(Device::cuda(ordinal.unwrap_or(0))),
            "mps" | "metal" => Err(bad("Apple Metal (mps) is not supported by this build")),
            // accelerate writes GPU ordinals as bare integers in device maps.
            n if ordinal.is_none() && n.parse::<usize>().is_ok() => {
                Ok(Device::cuda(n.parse().unwrap_or(0)))
            }
            _ => Err(bad("unknown device")),
        }
    }
}

impl Serialize for Device {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        let text = match value {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            other => {
                return Err(serde::de::Error::custom(format!(
                    "a device must be a string, found {other}"
                )));
            }
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// An ordered module-prefix → device map (accelerate's explicit `device_map`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceMap {
    pub entries: Vec<(String, Device)>,
}

impl DeviceMap {
    /// The device of `module`: the deepest prefix that matches at a component boundary
    /// ("" matches everything; of two as deep, the one with fewer `*`, then the one whose
    /// first `*` comes later).
    pub fn device_of(&self, module: &str) -> Option<Device> {
        self.entries
            .iter()
            .filter(|(prefix, _)| prefix_matches(prefix, module))
            .max_by_key(|(prefix, _)| {
                // Deeper first; at one depth, fewer wildcards; then the later first
                // wildcard (the longer literal start), so no two matching entries tie.
                let parts: Vec<&str> = prefix.split('.').filter(|p| !p.is_empty()).collect();
                let literal = parts.iter().filter(|p| **p != "*").count();
                let first_wildcard = parts.iter().position(|p| *p == "*").unwrap_or(usize::MAX);
                (parts.len(), literal, first_wildcard)
            })
            .map(|(_, device)| *device)
    }
}

/// Whether `prefix` names `module` or one of its ancestors, at component boundaries:
/// "model.layers.1" matches "model.layers.1" and "model.layers.1.mlp" but not
/// "model.layers.10". A component `*` matches any one component, so
/// "model.layers.*.mlp.experts" names every block's experts (what llama.cpp's
/// `-ot exps=CPU` says).
pub fn prefix_matches(prefix: &str, module: &str) -> bool {
    if prefix.is_empty() {
        return true;
    }
    let module: Vec<&str> = module.split('.').collect();
    let prefix: Vec<&str> = prefix.split('.').collect();
    prefix.len() <= module.len() && prefix.iter().zip(&module).all(|(p, m)| *p == "*" || p == m)
}

impl Serialize for DeviceMap {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.entries.len()))?;
        for (prefix, device) in &self.entries {
            map.serialize_entry(prefix, device)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for DeviceMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// Reads entries in the order written (a JSON object read into a map would sort them).
        struct Entries;

        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = DeviceMap;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of module prefix to device")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut access: A,
            ) -> Result<DeviceMap, A::Error> {
                let mut entries = Vec::new();
                while let Some((prefix, device)) = access.next_entry::<String, Device>()? {
                    entries.push((prefix, device));
                }
                Ok(DeviceMap { entries })
            }
        }

        deserializer.deserialize_map(Entries)
    }
}

/// One device for a whole component, or a device map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ComponentDevice {
    Single { device: Device },
    Multiple { device_map: DeviceMap },
}

impl ComponentDevice {
    pub fn from_single(device: Device) -> Self {
        ComponentDevice::Single { device }
    }

    pub fn from_multiple(device_map: DeviceMap) -> Self {
        ComponentDevice::Multiple { device_map }
    }

    /// The device given, or the best available: `cuda:0` when a CUDA device exists,
    /// else the CPU.
    pub fn resolve(given: Option<ComponentDevice>, gpus: usize) -> ComponentDevice {
        given.unwrap_or_else(|| {
            ComponentDevice::from_single(if gpus > 0 {
                Device::cuda(0)
            } else {
                Device::CPU
            })
        })
    }

    /// Parses `"cpu"`, `"cuda:1"`, ... into a single device.
    pub fn parse(s: &str) -> Result<Self, PlanError> {
        s.parse().map(ComponentDevice::from_single)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_torch_spellings() {
        for (text, device) in [
            ("cpu", Device::CPU),
            ("cuda", Device::cuda(0)),
            ("cuda:1", Device::cuda(1)),
            ("CUDA:3", Device::cuda(3)),
            ("disk", Device::DISK),
            ("2", Device::cuda(2)),
        ] {
            assert_eq!(text.parse::<Device>(), Ok(device), "{text}");
        }
        assert_eq!(Device::cuda(1).to_string(), "cuda:1");
        let err = "mps".parse::<Device>().expect_err("mps");
        assert!(
            err.to_string().contains("not supported by this build"),
            "{err}"
        );
        let err = "tpu".parse::<Device>().expect_err("tpu");
        assert!(err.to_string().contains("\"cuda:N\""), "{err}");
        assert!("cuda:x".parse::<Device>().is_err());
    }

    #[test]
    fn component_devices_round_trip_through_json_exactly() {
        let single = ComponentDevice::from_single(Device::cuda(1));
        let json = serde_json::to_value(&single).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"type": "single", "device": "cuda:1"})
        );
        assert_eq!(
            serde_json::from_value::<ComponentDevice>(json).ok(),
            Some(single)
        );

        let map = ComponentDevice::from_multiple(DeviceMap {
            entries: vec![
                ("model.layers.1".into(), Device::CPU),
                ("model.embed_tokens".into(), Device::cuda(0)),
                ("lm_head".into(), Device::DISK),
            ],
        });
        let text = serde_json::to_string(&map).expect("json");
        assert_eq!(
            text,
            r#"{"type":"multiple","device_map":{"model.layers.1":"cpu","model.embed_tokens":"cuda:0","lm_head":"disk"}}"#
        );
        assert_eq!(
            serde_json::from_str::<ComponentDevice>(&text).ok(),
            Some(map)
        );
    }

    #[test]
    fn resolve_prefers_the_first_gpu() {
        assert_eq!(
            ComponentDevice::resolve(None, 2),
            ComponentDevice::from_single(Device::cuda(0))
        );
        assert_eq!(
            ComponentDevice::resolve(None, 0),
            ComponentDevice::from_single(Device::CPU)
        );
        let given = ComponentDevice::from_single(Device::DISK);
        assert_eq!(ComponentDevice::resolve(Some(given.clone()), 2), given);
    }

    #[test]
    fn device_maps_match_whole_components_and_prefer_the_longest_prefix() {
        let map = DeviceMap {
            entries: vec![
                ("model".into(), Device::CPU),
                ("model.layers.1".into(), Device::cuda(0)),
            ],
        };
        assert_eq!(map.device_of("model.layers.1"), Some(Device::cuda(0)));
        assert_eq!(map.device_of("model.layers.10"), Some(Device::CPU));
        assert_eq!(map.device_of("lm_head"), None);
    }

    /// `*` stands for one component: every block's experts in one entry, a block's own
    /// entry still winning at the same depth.
    #[test]
    fn a_wildcard_component_names_every_block() {
        let map = DeviceMap {
            entries: vec![
                ("model.layers".into(), Device::CPU),
                ("model.layers.*.mlp.experts".into(), Device::DISK),
                ("model.layers.3.mlp.experts".into(), Device::cuda(0)),
            ],
        };
        assert_eq!(map.device_of("model.layers.1"), Some(Device::CPU));
        assert_eq!(
            map.device_of("model.layers.1.mlp.experts"),
            Some(Device::DISK)
        );
        assert_eq!(
            map.device_of("model.layers.3.mlp.experts"),
            Some(Device::cuda(0))
        );
        assert_eq!(map.device_of("model.layers.1.mlp.gate"), Some(Device::CPU));
        assert!(!prefix_matches("model.*", "model"));
        // Same depth, one `*` each: the one with the longer literal start wins, in
        // whichever order the map lists them.
        for entries in [
            [
                ("model.*.1", Device::cuda(0)),
                ("model.layers.*", Device::CPU),
            ],
            [
                ("model.layers.*", Device::CPU),
                ("model.*.1", Device::cuda(0)),
            ],
        ] {
            let map = DeviceMap {
                entries: entries.iter().map(|(p, d)| (p.to_string(), *d)).collect(),
            };
            assert_eq!(map.device_of("model.layers.1"), Some(Device::CPU));
        }
        assert!(prefix_matches("*", "lm_head"));
    }
}
