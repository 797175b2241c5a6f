//! A [`Plan`] as text: each unit with its bytes and device (runs of consecutive blocks on
//! one device folded into one line), then each device's budget, reserve, weights and what
//! is left, then the bytes streamed from disk per forward pass.

use std::fmt::Write;

use crate::{ByteSize, DeviceType, Plan, UnitKind};

fn size(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "unlimited".to_string(), |b| ByteSize(b).to_string())
}

/// The table `spillway plan` prints.
pub fn table(plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "strategy: {}    disk units run on: {}",
        plan.strategy, plan.stream_device
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "{:<40} {:>12}  device", "unit", "bytes");
    let mut i = 0;
    while i < plan.units.len() {
        let unit = &plan.units[i];
        // Fold a run of blocks on one device.
        let mut j = i;
        while let (UnitKind::Block(_), Some(next)) = (unit.kind, plan.units.get(j + 1)) {
            if matches!(next.kind, UnitKind::Block(_)) && next.device == unit.device {
                j += 1;
            } else {
                break;
            }
        }
        let (name, bytes) = if j > i {
            let (UnitKind::Block(a), UnitKind::Block(b)) = (unit.kind, plan.units[j].kind) else {
                unreachable!("only blocks are folded")
            };
            let container = unit
                .name
                .rsplit_once('.')
                .map_or(unit.name.as_str(), |(c, _)| c);
            let total: u64 = plan.units[i..=j].iter().map(|u| u.bytes).sum();
            (
                format!("{container}.{a}..{b} ({} blocks)", j - i + 1),
                total,
            )
        } else if unit.tied.is_empty() {
            (unit.name.clone(), unit.bytes)
        } else {
            (
                format!("{} (+ {}, tied)", unit.name, unit.tied.join(", ")),
                unit.bytes,
            )
        };
        let _ = writeln!(
            out,
            "{name:<40} {:>12}  {}",
            ByteSize(bytes).to_string(),
            unit.device
        );
        i = j + 1;
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<8} {:>12} {:>12} {:>12} {:>12}",
        "device", "budget", "reserve", "weights", "left"
    );
    for d in &plan.devices {
        if d.device.kind == DeviceType::Disk && d.weights == 0 {
            continue;
        }
        let _ = writeln!(
            out,
            "{:<8} {:>12} {:>12} {:>12} {:>12}",
            d.device.to_string(),
            size(d.budget),
            ByteSize(d.reserve).to_string(),
            ByteSize(d.weights).to_string(),
            size(d.left())
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "streamed from disk per forward pass: {}",
        ByteSize(plan.streamed_bytes_per_forward)
    );
    for note in &plan.notes {
        let _ = writeln!(out, "note: {note}");
    }
    out
}
