//! [`ByteSize`]: byte counts, read the way accelerate reads `max_memory` values.
//!
//! Integers are bytes. Strings take a unit: `GiB`/`MiB`/`KiB` (binary) and `GB`/`MB`/`KB`
//! (decimal), case-insensitive — except that a trailing lowercase `b` (`"10Gb"`) means
//! bits, as accelerate reads it; [`ByteSize::parse`] reports that so callers can warn.

use std::fmt;

use serde::{Serialize, Serializer};

use crate::PlanError;

/// A number of bytes. Prints in binary units (`1.50 GiB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

/// How a size string was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedSize {
    pub bytes: ByteSize,
    /// The value ended in a lowercase `b` and was read as bits.
    pub read_as_bits: bool,
}

impl ByteSize {
    pub const MIB: u64 = 1 << 20;
    pub const GIB: u64 = 1 << 30;

    /// Parses `"10GiB"`, `"500MB"`, `"10Gb"` (bits), `"1234"`.
    pub fn parse(text: &str) -> Result<ParsedSize, PlanError> {
        let bad = || PlanError::BadByteSize {
            given: text.to_string(),
        };
        let trimmed = text.trim();
        let upper = trimmed.to_ascii_uppercase();
        let units: [(&str, u64); 7] = [
            ("GIB", 1 << 30),
            ("MIB", 1 << 20),
            ("KIB", 1 << 10),
            ("GB", 1_000_000_000),
            ("MB", 1_000_000),
            ("KB", 1_000),
            ("B", 1),
        ];
        let (number, scale, unit_len) = units
            .iter()
            .find(|(unit, _)| upper.ends_with(unit))
            .map(|(unit, scale)| (&trimmed[..trimmed.len() - unit.len()], *scale, unit.len()))
            .unwrap_or((trimmed, 1, 0));
        let value: f64 = number.trim().parse().map_err(|_| bad())?;
        if !value.is_finite() || value < 0.0 {
            return Err(bad());
        }
        let is_binary = unit_len == 3;
        let read_as_bits = unit_len > 0 && !is_binary && trimmed.ends_with('b');
        let mut bytes = (value * scale as f64).floor();
        if read_as_bits {
            bytes = (bytes / 8.0).floor();
        }
        if bytes > u64::MAX as f64 {
            return Err(bad());
        }
        Ok(ParsedSize {
            bytes: ByteSize(bytes as u64),
            read_as_bits,
        })
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0 as f64;
        if self.0 == u64::MAX {
            f.write_str("unlimited")
        } else if self.0 >= Self::GIB {
            write!(f, "{:.2} GiB", b / Self::GIB as f64)
        } else if self.0 >= Self::MIB {
            write!(f, "{:.1} MiB", b / Self::MIB as f64)
        } else if self.0 >= 1024 {
            write!(f, "{:.1} KiB", b / 1024.0)
        } else {
            write!(f, "{} B", self.0)
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(text: &str) -> u64 {
        ByteSize::parse(text).expect(text).bytes.0
    }

    #[test]
    fn reads_units_as_accelerate_does() {
        assert_eq!(bytes("10GiB"), 10 << 30);
        assert_eq!(bytes("500MiB"), 500 << 20);
        assert_eq!(bytes("10GB"), 10_000_000_000);
        assert_eq!(bytes("500MB"), 500_000_000);
        assert_eq!(bytes("2KB"), 2_000);
        assert_eq!(bytes("1.5GiB"), 3 << 29);
        assert_eq!(bytes("1234"), 1234);
        assert_eq!(bytes(" 7 gib "), 7 << 30);
    }

    #[test]
    fn a_lowercase_b_means_bits_and_is_reported() {
        let parsed = ByteSize::parse("10Gb").expect("bits");
        assert_eq!(parsed.bytes.0, 10_000_000_000 / 8);
        assert!(parsed.read_as_bits);
        assert!(!ByteSize::parse("10GB").expect("bytes").read_as_bits);
        assert!(
            !ByteSize::parse("10Gib").expect("binary").read_as_bits,
            "binary units are never bits"
        );
    }

    #[test]
    fn garbage_is_refused() {
        for bad in ["", "GiB", "ten GiB", "-1GiB", "1e400GB"] {
            assert!(ByteSize::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn prints_binary_units() {
        assert_eq!(ByteSize(3 << 29).to_string(), "1.50 GiB");
        assert_eq!(ByteSize(90 << 20).to_string(), "90.0 MiB");
        assert_eq!(ByteSize(12).to_string(), "12 B");
    }
}
