//! The pages of a memory slot kept resident across tenants.
//!
//! A reset resets a kept page in place (zeros, or the image's bytes copied back) instead of
//! giving it back to the kernel, so the next tenant that writes it takes no page fault. Which
//! pages are kept is learned from what tenants write (the scan at reset), up to the pool's
//! `linear_memory_keep_resident` bytes, wherever they lie in the memory. The set is a hint for
//! speed only: every kept page is reset like any other page a tenant could have written.

use std::ops::Range;

/// Runs a slot keeps at most; a tenant that writes more scattered runs than this has the
/// rest given back to the kernel at each reset.
pub(crate) const MAX_RUNS: usize = 64;
/// Kept runs a slot may have for its resets to go blind (their gaps, one more, are what a blind
/// reset decommits).
pub(crate) const BLIND_RUNS: usize = 8;

/// Kept pages: sorted, disjoint, non-adjacent page-aligned runs of offsets from the slot's
/// start, at most [`MAX_RUNS`] of them; `bytes` is their total.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Kept {
    runs: Vec<Range<usize>>,
    bytes: usize,
}

impl Kept {
    /// Bytes kept.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The runs, in order.
    pub fn runs(&self) -> &[Range<usize>] {
        &self.runs
    }

    /// Keeps as much of `range` (page-aligned, disjoint from every kept run) as `budget` total
    /// bytes allow, from its start; returns the part kept (empty if none fits, or if keeping
    /// it would take a run more than [`MAX_RUNS`]).
    pub fn add(&mut self, range: Range<usize>, budget: usize, page: usize) -> Range<usize> {
        let room = budget.saturating_sub(self.bytes) / page * page;
        let end = range.end.min(range.start.saturating_add(room));
        if end <= range.start {
            return range.start..range.start;
        }
        let at = self.runs.partition_point(|r| r.end <= range.start);
        let joins_before = at > 0 && self.runs[at - 1].end == range.start;
        let joins_after = at < self.runs.len() && self.runs[at].start == end;
        match (joins_before, joins_after) {
            (true, true) => {
                self.runs[at - 1].end = self.runs[at].end;
                self.runs.remove(at);
            }
            (true, false) => self.runs[at - 1].end = end,
            (false, true) => self.runs[at].start = range.start,
            (false, false) => {
                if self.runs.len() == MAX_RUNS {
                    return range.start..range.start;
                }
                self.runs.insert(at, range.start..end);
            }
        }
        self.bytes += end - range.start;
        range.start..end
    }

    /// Forgets the kept pages from `from` on (they are given back).
    pub fn truncate(&mut self, from: usize) {
        let at = self.runs.partition_point(|r| r.end <= from);
        for run in &mut self.runs[at..] {
            let cut = run.start.max(from)..run.end;
            self.bytes -= cut.len();
            run.end = cut.start;
        }
        self.runs.retain(|r| !r.is_empty());
    }

    /// Forgets every kept page (they were given back, or replaced by a fresh mapping).
    pub fn clear(&mut self) {
        self.runs.clear();
        self.bytes = 0;
    }

    /// The parts of `range` that are not kept, in order.
    pub fn gaps(&self, range: Range<usize>) -> impl Iterator<Item = Range<usize>> + '_ {
        let mut from = range.start;
        let mut runs = self.runs.iter();
        std::iter::from_fn(move || {
            for run in runs.by_ref() {
                if run.end <= from {
                    continue;
                }
                if run.start >= range.end {
                    break;
                }
                let gap = from..run.start.min(range.end);
                from = run.end;
                if !gap.is_empty() {
                    return Some(gap);
                }
                if from >= range.end {
                    return None;
                }
            }
            let last = from..range.end;
            from = range.end;
            (!last.is_empty()).then_some(last)
        })
    }

    /// Whether every page of `range` (not empty) is kept: since runs are never adjacent, that
    /// is one run holding all of it.
    pub fn covers(&self, range: &Range<usize>) -> bool {
        let at = self.runs.partition_point(|r| r.end <= range.start);
        self.runs
            .get(at)
            .is_some_and(|run| run.start <= range.start && range.end <= run.end)
    }

    /// The kept parts of `range`, in order.
    pub fn within(&self, range: Range<usize>) -> impl Iterator<Item = Range<usize>> + '_ {
        self.runs
            .iter()
            .map(move |run| run.start.max(range.start)..run.end.min(range.end))
            .filter(|part| !part.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const PAGE: usize = 4096;

    proptest! {
        #[test]
        fn kept_runs_stay_sorted_disjoint_within_budget_and_gaps_complement_them(
            adds in proptest::collection::vec((0usize..64, 1usize..8), 0..40),
            budget_pages in 0usize..48,
            window in (0usize..64, 0usize..64),
        ) {
            let budget = budget_pages * PAGE;
            let mut kept = Kept::default();
            let mut model = [false; 80];
            for (start, len) in adds {
                // Only the part not kept yet may be added (the reset's contract).
                let range = start * PAGE..(start + len) * PAGE;
                let gaps: Vec<_> = kept.gaps(range).collect();
                for gap in gaps {
                    let added = kept.add(gap.clone(), budget, PAGE);
                    prop_assert_eq!(added.start, gap.start);
                    prop_assert!(added.end <= gap.end);
                    for kept_page in &mut model[added.start / PAGE..added.end / PAGE] {
                        prop_assert!(!*kept_page);
                        *kept_page = true;
                    }
                }
            }
            prop_assert!(kept.bytes() <= budget);
            prop_assert!(kept.runs().len() <= MAX_RUNS);
            prop_assert_eq!(kept.bytes(), model.iter().filter(|&&k| k).count() * PAGE);
            for pair in kept.runs().windows(2) {
                prop_assert!(pair[0].end < pair[1].start, "runs sorted, disjoint, not adjacent");
            }
            let mut cut = kept.clone();
            cut.truncate(40 * PAGE);
            prop_assert!(cut.runs().iter().all(|r| r.end <= 40 * PAGE && !r.is_empty()));
            prop_assert_eq!(cut.bytes(), model[..40].iter().filter(|&&k| k).count() * PAGE);
            let (a, b) = window;
            let range = a.min(b) * PAGE..a.max(b) * PAGE;
            if !range.is_empty() {
                let all_kept = model[range.start / PAGE..range.end / PAGE].iter().all(|&k| k);
                prop_assert_eq!(kept.covers(&range), all_kept, "covers {:?}", range);
            }
            let mut covered = [0u8; 80];
            for gap in kept.gaps(range.clone()) {
                for p in gap.start / PAGE..gap.end / PAGE {
                    prop_assert!(!model[p]);
                    covered[p] += 1;
                }
            }
            for part in kept.within(range.clone()) {
                for p in part.start / PAGE..part.end / PAGE {
                    prop_assert!(model[p]);
                    covered[p] += 1;
                }
            }
            for (p, &times) in covered.iter().enumerate() {
                let inside = (range.start / PAGE..range.end / PAGE).contains(&p);
                prop_assert_eq!(times, u8::from(inside), "page {} covered once iff inside", p);
            }
        }
    }
}
