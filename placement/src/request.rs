//! [`DeviceRequest`]: what a whole model asks of the device manager — `"cpu"`, `"cuda"`
//! (any one GPU), `"cudaxN"` (any N GPUs), or specific GPUs (`"cuda:0"`, `"cuda:0,1"`,
//! `"cuda:0,cuda:1"`).

use std::fmt;
use std::str::FromStr;

use crate::PlanError;

const ACCEPTED: &str =
    "\"cpu\", \"cuda\", \"cudaxN\" (N GPUs), \"cuda:0\", \"cuda:0,1\", \"cuda:0,cuda:1\"";

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DeviceRequest {
    Cpu,
    /// Any `n` GPUs; the manager picks them.
    AnyGpus(usize),
    /// Exactly these GPU ordinals, in this order.
    Gpus(Vec<usize>),
}

impl DeviceRequest {
    /// How many GPUs the request needs.
    pub fn gpu_count(&self) -> usize {
        match self {
            DeviceRequest::Cpu => 0,
            DeviceRequest::AnyGpus(n) => *n,
            DeviceRequest::Gpus(ordinals) => ordinals.len(),
        }
    }

    /// True when the request names its GPUs.
    pub fn is_specific(&self) -> bool {
        matches!(self, DeviceRequest::Gpus(_))
    }
}

impl FromStr for DeviceRequest {
    type Err = PlanError;

    fn from_str(s: &str) -> Result<Self, PlanError> {
        let bad = |reason: &str| PlanError::bad_device(s, reason, ACCEPTED);
        let text = s.trim().to_ascii_lowercase();
        if text == "cpu" {
            return Ok(DeviceRequest::Cpu);
        }
        if text == "cuda" || text == "gpu" {
            return Ok(DeviceRequest::AnyGpus(1));
        }
        if let Some(n) = text.strip_prefix("cudax") {
            let n: usize = n
                .parse()
                .map_err(|_| bad("the GPU count after `cudax` is not a number"))?;
            if n == 0 {
                return Err(bad("a request needs at least one GPU"));
            }
            return Ok(DeviceRequest::AnyGpus(n));
        }
        let Some(list) = text.strip_prefix("cuda:") else {
            return Err(bad("unknown device request"));
        };
        let mut ordinals = Vec::new();
        for part in list.split(',') {
            let part = part.trim();
            let number = part.strip_prefix("cuda:").unwrap_or(part);
            let ordinal: usize = number
                .parse()
                .map_err(|_| bad("a GPU ordinal is not a number"))?;
            if ordinals.contains(&ordinal) {
                return Err(bad("a GPU is named twice"));
            }
            ordinals.push(ordinal);
        }
        Ok(DeviceRequest::Gpus(ordinals))
    }
}

impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceRequest::Cpu => f.write_str("cpu"),
            DeviceRequest::AnyGpus(1) => f.write_str("cuda"),
            DeviceRequest::AnyGpus(n) => write!(f, "cudax{n}"),
            DeviceRequest::Gpus(ordinals) => {
                let list: Vec<String> = ordinals.iter().map(|o| o.to_string()).collect();
                write!(f, "cuda:{}", list.join(","))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_general_and_specific_requests() {
        let cases = [
            ("cpu", DeviceRequest::Cpu),
            ("cuda", DeviceRequest::AnyGpus(1)),
            ("cudax2", DeviceRequest::AnyGpus(2)),
            ("cuda:0", DeviceRequest::Gpus(vec![0])),
            ("cuda:0,1", DeviceRequest::Gpus(vec![0, 1])),
            ("cuda:0,cuda:1", DeviceRequest::Gpus(vec![0, 1])),
        ];
        for (text, request) in cases {
            assert_eq!(
                text.parse::<DeviceRequest>().as_ref(),
                Ok(&request),
                "{text}"
            );
            assert_eq!(
                request.to_string().parse::<DeviceRequest>(),
                Ok(request.clone()),
                "round trip {text}"
            );
        }
        assert!(!DeviceRequest::AnyGpus(2).is_specific());
        assert_eq!(DeviceRequest::Gpus(vec![0, 1]).gpu_count(), 2);
    }

    #[test]
    fn invalid_requests_list_the_accepted_forms() {
        for bad in ["tpu", "cudax", "cudax0", "cuda:a", "cuda:0,0", "cuda:"] {
            let err = bad.parse::<DeviceRequest>().expect_err(bad);
            assert!(err.to_string().contains("\"cudaxN\""), "{bad}: {err}");
        }
    }
}
