//! A set of byte ranges: which parts of a sparse cache file are not yet local.
//!
//! Kept as sorted, disjoint, non-empty, non-adjacent ranges, so every operation is a walk over
//! a short list (a file opened for an append or a few random writes has one or a handful).

use std::ops::Range;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: Vec<Range<u64>>,
}

impl RangeSet {
    pub fn new() -> RangeSet {
        RangeSet::default()
    }

    /// The set holding exactly `range` (empty if the range is).
    pub fn of(range: Range<u64>) -> RangeSet {
        let mut set = RangeSet::new();
        set.insert(range);
        set
    }

    /// From `(start, end)` pairs as stored in the journal (any order, overlaps allowed).
    pub fn from_pairs(pairs: &[(u64, u64)]) -> RangeSet {
        let mut set = RangeSet::new();
        for &(start, end) in pairs {
            set.insert(start..end);
        }
        set
    }

    pub fn to_pairs(&self) -> Vec<(u64, u64)> {
        self.ranges.iter().map(|r| (r.start, r.end)).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Bytes in the set.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    pub fn insert(&mut self, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        let (mut start, mut end) = (range.start, range.end);
        // Merge every range that overlaps or touches the new one.
        self.ranges.retain(|r| {
            if r.end < start || r.start > end {
                return true;
            }
            start = start.min(r.start);
            end = end.max(r.end);
            false
        });
        let at = self.ranges.partition_point(|r| r.start < start);
        self.ranges.insert(at, start..end);
    }

    pub fn remove(&mut self, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        let mut out = Vec::with_capacity(self.ranges.len() + 1);
        for r in self.ranges.drain(..) {
            if r.end <= range.start || r.start >= range.end {
                out.push(r);
                continue;
            }
            if r.start < range.start {
                out.push(r.start..range.start);
            }
            if r.end > range.end {
                out.push(range.end..r.end);
            }
        }
        self.ranges = out;
    }

    /// Drop everything at or past `end` (a file shrinking to `end` bytes).
    pub fn truncate(&mut self, end: u64) {
        self.remove(end..u64::MAX);
    }

    /// The parts of `range` in the set, in order.
    pub fn intersect(&self, range: Range<u64>) -> Vec<Range<u64>> {
        self.ranges
            .iter()
            .filter(|r| r.start < range.end && r.end > range.start)
            .map(|r| r.start.max(range.start)..r.end.min(range.end))
            .collect()
    }

    /// Whether every byte of `range` is in the set.
    pub fn covers(&self, range: Range<u64>) -> bool {
        range.is_empty()
            || self
                .ranges
                .iter()
                .any(|r| r.start <= range.start && r.end >= range.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn inserts_merge_and_removes_split() {
        let mut s = RangeSet::of(0..10);
        s.insert(20..30);
        s.insert(10..12); // touches: merges
        assert_eq!(s.to_pairs(), [(0, 12), (20, 30)]);
        s.remove(5..25);
        assert_eq!(s.to_pairs(), [(0, 5), (25, 30)]);
        assert_eq!(s.len(), 10);
        assert_eq!(s.intersect(3..27), [3..5, 25..27]);
        assert!(s.covers(25..30) && !s.covers(4..6) && s.covers(7..7));
        s.truncate(26);
        assert_eq!(s.to_pairs(), [(0, 5), (25, 26)]);
        assert_eq!(RangeSet::from_pairs(&s.to_pairs()), s);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u64),
        Remove(u64, u64),
        Truncate(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..64u64, 0..64u64).prop_map(|(a, b)| Op::Insert(a.min(b), a.max(b))),
            (0..64u64, 0..64u64).prop_map(|(a, b)| Op::Remove(a.min(b), a.max(b))),
            (0..64u64).prop_map(Op::Truncate),
        ]
    }

    proptest! {
        /// Against a bitmap of 64 bytes: membership, length, intersections and the invariant
        /// (sorted, disjoint, non-adjacent, non-empty).
        #[test]
        fn behaves_like_a_bitmap(ops in proptest::collection::vec(op(), 0..40)) {
            let mut set = RangeSet::new();
            let mut bits = [false; 64];
            for op in ops {
                match op {
                    Op::Insert(a, b) => { set.insert(a..b); bits[a as usize..b as usize].fill(true); }
                    Op::Remove(a, b) => { set.remove(a..b); bits[a as usize..b as usize].fill(false); }
                    Op::Truncate(e) => { set.truncate(e); bits[e as usize..].fill(false); }
                }
                for w in set.ranges.windows(2) {
                    prop_assert!(w[0].end < w[1].start);
                }
                prop_assert!(set.ranges.iter().all(|r| !r.is_empty()));
                prop_assert_eq!(set.len(), bits.iter().filter(|b| **b).count() as u64);
                let inside: Vec<u64> = set.intersect(10..50).into_iter().flatten().collect();
                let expected: Vec<u64> = (10..50).filter(|i| bits[*i as usize]).collect();
                prop_assert_eq!(inside, expected);
                prop_assert_eq!(set.covers(20..30), bits[20..30].iter().all(|b| *b));
            }
        }
    }
}
