//! Sizes in human units, for error messages and reports.

/// Bytes in a human unit: `512 B`, `64.0 KiB`, `6.0 GiB`.
///
/// ```
/// assert_eq!(berth_core::human_bytes(6 << 30), "6.0 GiB");
/// ```
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    // Up a unit from what would print as 1024.0 (1048575 bytes is about 1.0 MiB).
    while value >= 1023.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Bytes in a human unit, with the exact count when the unit rounds it: `64.0 KiB`,
/// `12.1 KiB (12345 bytes)`. For errors where the exact figure matters (alignment, bounds).
pub fn exact_bytes(bytes: u64) -> String {
    let human = human_bytes(bytes);
    let unit = (1..=5u32).rev().map(|k| 1u64 << (10 * k)).find(|&u| bytes >= u);
    match unit {
        // One decimal states multiples of a tenth of the unit exactly only for whole units.
        Some(unit) if !bytes.is_multiple_of(unit) => format!("{human} ({bytes} bytes)"),
        _ => human,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(65536), "64.0 KiB");
        assert_eq!(exact_bytes(65536), "64.0 KiB");
        assert_eq!(exact_bytes(12345), "12.1 KiB (12345 bytes)");
        assert_eq!(exact_bytes(6 << 30), "6.0 GiB");
        assert_eq!(exact_bytes((6 << 30) + 4096), "6.0 GiB (6442455040 bytes)");
        assert_eq!(exact_bytes(100), "100 B");
        assert_eq!(human_bytes((1 << 20) - 1), "1.0 MiB");
        assert_eq!(human_bytes((1 << 20) - 52 * 1024), "972.0 KiB");
        assert_eq!(exact_bytes((4 << 30) + 65536), "4.0 GiB (4295032832 bytes)");
    }
}
