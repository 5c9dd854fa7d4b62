//! Part planning for multipart uploads: the byte ranges of the parts of an object.
//!
//! The part size grows for huge files so an upload never needs more than S3's 10,000 parts.
//! The uploads themselves are `crate::writeback`'s.

use std::ops::Range;

use crate::store::MAX_PARTS;

/// The byte ranges of the parts of a `size`-byte object: `part_size` each (the last one shorter),
/// with the part size doubled until at most `MAX_PARTS` parts are needed.
pub fn plan_parts(size: u64, part_size: u64) -> Vec<Range<u64>> {
    let part = effective_part_size(size, part_size);
    (0..size.div_ceil(part))
        .map(|i| i * part..((i + 1) * part).min(size))
        .collect()
}

/// The part size actually used for an object of `size` bytes.
pub fn effective_part_size(size: u64, part_size: u64) -> u64 {
    let mut part = part_size.max(1);
    while size.div_ceil(part) > MAX_PARTS as u64 {
        part *= 2;
    }
    part
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn part_plans() {
        assert_eq!(plan_parts(0, 8 * MIB), Vec::<Range<u64>>::new());
        assert_eq!(plan_parts(8 * MIB, 8 * MIB), vec![0..8 * MIB]);
        assert_eq!(
            plan_parts(8 * MIB + 1, 8 * MIB),
            vec![0..8 * MIB, 8 * MIB..8 * MIB + 1]
        );
        // 80,000 MiB at 8 MiB would be exactly 10,000 parts: allowed.
        assert_eq!(effective_part_size(80_000 * MIB, 8 * MIB), 8 * MIB);
        // One byte more needs 10,001 parts: the part size doubles.
        assert_eq!(effective_part_size(80_000 * MIB + 1, 8 * MIB), 16 * MIB);
        let plan = plan_parts(5 << 40, 8 * MIB); // 5 TiB, S3's largest object
        assert!(plan.len() <= MAX_PARTS as usize);
        assert_eq!(plan.last().unwrap().end, 5 << 40);
    }
}
