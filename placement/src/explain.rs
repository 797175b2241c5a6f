//! A [`Plan`] as text: each unit with its bytes and device (runs of consecutive blocks on
//! one device folded into one line, and so their experts), then each device's budget, reserve, weights and what
//! is left, then the bytes streamed from disk per forward pass.

use std::fmt::Write;

use crate::{ByteSize, DeviceType, PlacedUnit, Plan, UnitKind};

/// The block a unit belongs to (a block, or a block's experts).
fn block_index(kind: UnitKind) -> Option<usize> {
    match kind {
        UnitKind::Block(i) | UnitKind::Experts(i) => Some(i),
        UnitKind::Pre | UnitKind::Post => None,
    }
}

fn row(out: &mut String, name: &str, bytes: u64, device: crate::Device) {
    let _ = writeln!(
        out,
        "{name:<40} {:>12}  {device}",
        ByteSize(bytes).to_string()
    );
}

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
        if block_index(unit.kind).is_none() {
            let name = match unit.tied.is_empty() {
                true => unit.name.clone(),
                false => format!("{} (+ {}, tied)", unit.name, unit.tied.join(", ")),
            };
            row(&mut out, &name, unit.bytes, unit.device);
            i += 1;
            continue;
        }
        // A run of blocks (and their experts): consecutive blocks on one device fold
        // into one line, and so do their experts, each line at its first block.
        let end = (i..plan.units.len())
            .find(|&j| block_index(plan.units[j].kind).is_none())
            .unwrap_or(plan.units.len());
        let mut lines: Vec<(usize, bool, String, u64, crate::Device)> = Vec::new();
        for experts in [false, true] {
            let run: Vec<&PlacedUnit> = plan.units[i..end]
                .iter()
                .filter(|u| matches!(u.kind, UnitKind::Experts(_)) == experts)
                .collect();
            // A gap in the blocks (a dense block between blocks with experts) ends a line.
            let next = |a: &&PlacedUnit, b: &&PlacedUnit| {
                a.device == b.device && block_index(a.kind).map(|i| i + 1) == block_index(b.kind)
            };
            for group in run.chunk_by(next) {
                let (first, last) = (group[0], group[group.len() - 1]);
                let (a, b) = (block_index(first.kind), block_index(last.kind));
                let (Some(a), Some(b)) = (a, b) else {
                    unreachable!("a run holds blocks and experts only")
                };
                let bytes = group.iter().map(|u| u.bytes).sum();
                let n = group.len();
                // Experts are named after their block: `<block>.<module>`.
                let block = (plan.units.iter())
                    .find(|u| u.kind == UnitKind::Block(a))
                    .map(|u| u.name.as_str());
                let name = match experts {
                    _ if n == 1 => None,
                    true => block.and_then(|block| {
                        let module = first.name.strip_prefix(block)?.strip_prefix('.')?;
                        let (container, _) = block.rsplit_once('.')?;
                        Some(format!(
                            "{container}.{a}..{b}.{module} ({n} blocks' experts)"
                        ))
                    }),
                    false => (first.name.rsplit_once('.'))
                        .map(|(c, _)| format!("{c}.{a}..{b} ({n} blocks)")),
                }
                .unwrap_or_else(|| first.name.clone());
                lines.push((a, experts, name, bytes, first.device));
            }
        }
        lines.sort_by_key(|(a, experts, ..)| (*a, *experts));
        for (_, _, name, bytes, device) in lines {
            row(&mut out, &name, bytes, device);
        }
        i = end;
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
