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

/// Up to `N` ranges, in order, without a heap allocation: what a reset takes from [`Kept`]
/// before it changes it.
#[derive(Debug)]
pub(crate) struct Ranges<const N: usize> {
    items: [Range<usize>; N],
    len: usize,
}

impl<const N: usize> Ranges<N> {
    /// The first `N` of `ranges`.
    pub fn first(ranges: impl Iterator<Item = Range<usize>>) -> Ranges<N> {
        let mut out = Ranges {
            items: std::array::from_fn(|_| 0..0),
            len: 0,
        };
        for range in ranges.take(N) {
            out.items[out.len] = range;
            out.len += 1;
        }
        out
    }

    pub fn as_slice(&self) -> &[Range<usize>] {
        &self.items[..self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [Range<usize>] {
        &mut self.items[..self.len]
    }

    /// Keeps the first `len` ranges.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

/// What the resets of a slot have seen of one kept page: how many in a row found it as a fresh
/// memory holds it (saturating at 127), how many in a row found it changed (saturating at 3),
/// and whether a tenant changed it since it was kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PageUse(u16);

impl PageUse {
    const IDLE: u16 = 0x7F;
    const CHANGED: u16 = 0x80;
    const STREAK: u16 = 0x300;
    const STREAK_ONE: u16 = 0x100;

    /// A reset found the page changed by its tenant; returns whether that is the first time
    /// since the page was kept.
    pub fn changed(&mut self) -> bool {
        let first = self.0 & Self::CHANGED == 0;
        let streak = (self.0 & Self::STREAK)
            .saturating_add(Self::STREAK_ONE)
            .min(Self::STREAK);
        self.0 = Self::CHANGED | streak;
        first
    }

    /// A reset found the page as a fresh memory holds it.
    pub fn unchanged(&mut self) {
        let idle = (self.0 & Self::IDLE).saturating_add(1).min(Self::IDLE);
        self.0 = (self.0 & Self::CHANGED) | idle;
    }

    /// Resets in a row that found it unchanged.
    pub fn idle(self) -> u8 {
        // At most 127: fits.
        (self.0 & Self::IDLE) as u8
    }

    /// Whether the last two resets found it changed: a tenant changes it at every reset.
    pub fn hot(self) -> bool {
        self.0 & Self::STREAK >= 2 * Self::STREAK_ONE
    }

    /// Whether a tenant changed it since it was kept (it was worth keeping once).
    pub fn reused(self) -> bool {
        self.0 & Self::CHANGED != 0
    }
}

/// Kept pages: sorted, disjoint, non-adjacent page-aligned runs of offsets from the slot's
/// start, at most [`MAX_RUNS`] of them. Each kept page has its [`PageUse`] (`uses`, in address
/// order, one per page), by which pages no tenant writes any more are given back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Kept {
    runs: Vec<Range<usize>>,
    uses: Vec<PageUse>,
    /// The page size the runs are counted in (0 until a page is kept).
    page: usize,
}

impl Kept {
    /// Bytes kept.
    pub fn bytes(&self) -> usize {
        self.uses.len() * self.page
    }

    /// The runs, in order.
    pub fn runs(&self) -> &[Range<usize>] {
        &self.runs
    }

    /// How many kept pages lie below `offset`.
    fn pages_below(&self, offset: usize) -> usize {
        self.runs
            .iter()
            .take_while(|r| r.start < offset)
            .map(|r| (r.end.min(offset) - r.start) / self.page)
            .sum()
    }

    /// Keeps as much of `range` (page-aligned, disjoint from every kept run) as `budget` total
    /// bytes allow, from its start; returns the part kept (empty if none fits, or if keeping
    /// it would take a run more than [`MAX_RUNS`]). Its pages start unchanged and not idle.
    pub fn add(&mut self, range: Range<usize>, budget: usize, page: usize) -> Range<usize> {
        debug_assert!(self.page == 0 || self.page == page, "one page size per slot");
        let room = budget.saturating_sub(self.bytes()) / page * page;
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
                if self.runs.len() >= MAX_RUNS {
                    return range.start..range.start;
                }
                self.runs.insert(at, range.start..end);
            }
        }
        self.page = page;
        let index = self.pages_below(range.start);
        let pages = (end - range.start) / page;
        self.uses
            .splice(index..index, std::iter::repeat_n(PageUse::default(), pages));
        range.start..end
    }

    /// Forgets the kept pages inside `range` (page-aligned; they are given back). Where that
    /// would split a run while [`MAX_RUNS`] are kept, it forgets the rest of that run as well,
    /// so that the runs never number more. Returns the range forgotten (`range`, or longer: all
    /// of it to be given back), and how many of its pages no tenant changed since they were
    /// kept. The pages on either side keep their uses.
    pub fn remove(&mut self, range: Range<usize>) -> (Range<usize>, usize) {
        if self.uses.is_empty() || range.is_empty() {
            return (range, 0);
        }
        let at = self.runs.partition_point(|r| r.end <= range.start);
        let mut range = range;
        if let Some(run) = self.runs.get(at)
            && run.start < range.start
            && range.end < run.end
            && self.runs.len() >= MAX_RUNS
        {
            range.end = run.end;
        }
        let (first, last) = (self.pages_below(range.start), self.pages_below(range.end));
        let unused = self.uses.drain(first..last).filter(|u| !u.reused()).count();
        let mut i = at;
        while i < self.runs.len() && self.runs[i].start < range.end {
            let run = self.runs[i].clone();
            let (left, right) = (
                run.start..range.start.max(run.start),
                range.end.min(run.end)..run.end,
            );
            match (left.is_empty(), right.is_empty()) {
                (true, true) => {
                    self.runs.remove(i);
                    continue;
                }
                (false, true) => self.runs[i] = left,
                (true, false) => self.runs[i] = right,
                (false, false) => {
                    self.runs[i] = left;
                    self.runs.insert(i + 1, right);
                    i += 1;
                }
            }
            i += 1;
        }
        (range, unused)
    }

    /// Forgets every kept page (they were given back, or replaced by a fresh mapping).
    pub fn clear(&mut self) {
        self.runs.clear();
        self.uses.clear();
    }

    /// Every kept run, in order, with the uses of its pages.
    pub fn runs_mut(&mut self) -> impl Iterator<Item = (Range<usize>, &mut [PageUse])> + '_ {
        let page = self.page.max(1);
        let mut uses = self.uses.as_mut_slice();
        self.runs.iter().map(move |run| {
            let (these, rest) = std::mem::take(&mut uses).split_at_mut(run.len() / page);
            uses = rest;
            (run.clone(), these)
        })
    }

    /// The longest stretches of kept pages, each inside one run, that are all `stale` (given
    /// each page's offset and use); with `whole`, only the runs that are stale through.
    pub fn stale<'a>(
        &'a self,
        stale: impl Fn(usize, PageUse) -> bool + 'a,
        whole: bool,
    ) -> impl Iterator<Item = Range<usize>> + 'a {
        let page = self.page.max(1);
        let (mut run, mut index) = (0, 0);
        let mut at = self.runs.first().map_or(0, |r| r.start);
        std::iter::from_fn(move || {
            while let Some(current) = self.runs.get(run) {
                if whole {
                    let pages = current.len() / page;
                    let through = (0..pages).all(|i| stale(current.start + i * page, self.uses[index + i]));
                    index += pages;
                    run += 1;
                    if through {
                        return Some(current.clone());
                    }
                    continue;
                }
                while at < current.end && !stale(at, self.uses[index]) {
                    at += page;
                    index += 1;
                }
                let from = at;
                while at < current.end && stale(at, self.uses[index]) {
                    at += page;
                    index += 1;
                }
                let stretch = from..at;
                if at == current.end {
                    run += 1;
                    at = self.runs.get(run).map_or(at, |next| next.start);
                }
                if !stretch.is_empty() {
                    return Some(stretch);
                }
            }
            None
        })
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
            let _ = cut.remove(40 * PAGE..usize::MAX);
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
            let within = kept
                .runs()
                .iter()
                .map(|run| run.start.max(range.start)..run.end.min(range.end))
                .filter(|part| !part.is_empty());
            for part in within {
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

    /// One step of a program run against [`Kept`] and a model of one `Option<(u8, bool)>` (kept,
    /// with its idle count and whether it was changed since kept) per page.
    #[derive(Debug, Clone)]
    enum Op {
        Add(usize, usize, usize),
        Remove(usize, usize),
        /// A reset: the pages whose bit is set were changed by the tenant (idle count back to
        /// 0, changed), every other kept page is one reset idler.
        Reset(u64),
        Truncate(usize),
    }

    /// Pages the program runs over: enough for more than [`MAX_RUNS`] runs.
    const PAGES: usize = 200;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0usize..PAGES - 8, 1usize..3, 0usize..PAGES).prop_map(|(s, l, b)| Op::Add(s, l, b)),
            2 => (0usize..PAGES - 12, 1usize..12).prop_map(|(s, l)| Op::Remove(s, l)),
            3 => any::<u64>().prop_map(Op::Reset),
            1 => (0usize..PAGES).prop_map(Op::Truncate),
        ]
    }

    /// The maximal stretches of model pages, inside one run of kept pages, idle `limit` or
    /// more (or the whole runs idle through).
    fn model_idle(model: &[Option<(u8, bool)>], limit: u8, whole: bool) -> Vec<Range<usize>> {
        let stale = |p: usize| model[p].is_some_and(|(idle, _)| idle >= limit) && !p.is_multiple_of(3);
        let mut out = Vec::new();
        let mut p = 0;
        while p < model.len() {
            if model[p].is_none() {
                p += 1;
                continue;
            }
            let run_start = p;
            while p < model.len() && model[p].is_some() {
                p += 1;
            }
            let run = run_start..p;
            if whole {
                if run.clone().all(stale) {
                    out.push(run.start * PAGE..run.end * PAGE);
                }
                continue;
            }
            let mut q = run.start;
            while q < run.end {
                if !stale(q) {
                    q += 1;
                    continue;
                }
                let from = q;
                while q < run.end && stale(q) {
                    q += 1;
                }
                out.push(from * PAGE..q * PAGE);
            }
        }
        out
    }

    proptest! {
        #[test]
        fn page_uses_follow_their_pages_and_runs_stay_bounded_through_programs(
            ops in proptest::collection::vec(op(), 0..400),
            limit in 1u8..4,
        ) {
            let mut kept = Kept::default();
            let mut model: Vec<Option<(u8, bool)>> = vec![None; PAGES];
            for op in ops {
                match op {
                    Op::Add(start, len, budget_pages) => {
                        let gaps: Vec<_> = kept.gaps(start * PAGE..(start + len) * PAGE).collect();
                        for gap in gaps {
                            let added = kept.add(gap, budget_pages * PAGE, PAGE);
                            for page in &mut model[added.start / PAGE..added.end / PAGE] {
                                *page = Some((0, false));
                            }
                        }
                    }
                    Op::Remove(start, len) => {
                        let (removed, unused) = kept.remove(start * PAGE..(start + len) * PAGE);
                        prop_assert_eq!(removed.start, start * PAGE);
                        prop_assert!(removed.end >= (start + len) * PAGE);
                        // Longer only to keep the runs within bound: to the end of a run.
                        if removed.end > (start + len) * PAGE {
                            prop_assert_eq!(model[start + len - 1..removed.end / PAGE].iter().filter(|p| p.is_none()).count(), 0);
                        }
                        let gone = start..removed.end / PAGE;
                        let expected = model[gone.clone()].iter().filter(|p| matches!(p, Some((_, false)))).count();
                        prop_assert_eq!(unused, expected, "pages removed that were never changed");
                        for page in &mut model[gone] {
                            *page = None;
                        }
                    }
                    Op::Reset(changed) => {
                        let pages = kept
                            .runs_mut()
                            .flat_map(|(run, uses)| (run.start / PAGE..run.end / PAGE).zip(uses.iter_mut()));
                        for (p, page_use) in pages {
                            if changed >> (p % 64) & 1 == 1 {
                                let first = page_use.changed();
                                prop_assert_eq!(first, matches!(model[p], Some((_, false))), "first change of page {}", p);
                            } else {
                                page_use.unchanged();
                            }
                        }
                        for (p, page) in model.iter_mut().enumerate() {
                            if let Some((idle, reused)) = page {
                                if changed >> (p % 64) & 1 == 1 {
                                    (*idle, *reused) = (0, true);
                                } else {
                                    *idle = (*idle + 1).min(127);
                                }
                            }
                        }
                    }
                    Op::Truncate(from) => {
                        let _ = kept.remove(from * PAGE..usize::MAX);
                        for page in &mut model[from..] {
                            *page = None;
                        }
                    }
                }
                let kept_pages = model.iter().filter(|p| p.is_some()).count();
                prop_assert_eq!(kept.bytes(), kept_pages * PAGE);
                prop_assert!(kept.runs().len() <= MAX_RUNS);
                for pair in kept.runs().windows(2) {
                    prop_assert!(pair[0].end < pair[1].start, "runs sorted, disjoint, not adjacent");
                }
                prop_assert!(kept.runs().iter().all(|r| !r.is_empty()));
                let pages: Vec<(usize, (u8, bool))> = kept
                    .runs_mut()
                    .flat_map(|(run, uses)| (run.start / PAGE..run.end / PAGE).zip(uses.iter().map(|u| (u.idle(), u.reused()))))
                    .collect();
                let expected: Vec<(usize, (u8, bool))> = model
                    .iter()
                    .enumerate()
                    .filter_map(|(p, n)| n.map(|n| (p, n)))
                    .collect();
                prop_assert_eq!(pages, expected);
                for whole in [false, true] {
                    let idle: Vec<_> = kept.stale(|at, u| u.idle() >= limit && !at.is_multiple_of(3 * PAGE), whole).collect();
                    prop_assert_eq!(idle, model_idle(&model, limit, whole), "whole {}", whole);
                }
            }
        }
    }

    #[test]
    fn a_page_is_hot_once_two_resets_in_a_row_found_it_changed() {
        let mut page = PageUse::default();
        assert!(page.changed(), "the first change since it was kept");
        assert!(
            !page.hot(),
            "changed once: tenants may change it one time in several"
        );
        assert!(!page.changed());
        assert!(page.hot() && page.idle() == 0);
        page.changed();
        assert!(page.hot(), "the streak saturates, and stays hot");
        page.unchanged();
        assert!(!page.hot() && page.idle() == 1 && page.reused());
        page.changed();
        assert!(
            !page.hot(),
            "a change after an unchanged reset starts a new streak"
        );
        for _ in 0..200 {
            page.unchanged();
        }
        assert_eq!(page.idle(), 127, "idle resets saturate");
    }

    #[test]
    fn a_removal_that_would_split_a_run_at_the_bound_takes_the_rest_of_it() {
        let mut kept = Kept::default();
        // MAX_RUNS runs of one page, every other page, then one of three pages.
        for run in 0..MAX_RUNS - 1 {
            kept.add(2 * run * PAGE..(2 * run + 1) * PAGE, usize::MAX, PAGE);
        }
        let last = 2 * (MAX_RUNS - 1) * PAGE;
        kept.add(last..last + 3 * PAGE, usize::MAX, PAGE);
        assert_eq!(kept.runs().len(), MAX_RUNS);
        assert!(
            kept.add(last + 10 * PAGE..last + 11 * PAGE, usize::MAX, PAGE)
                .is_empty()
        );
        // The middle page of the last run: splitting would make one run too many.
        let (removed, unused) = kept.remove(last + PAGE..last + 2 * PAGE);
        assert_eq!(removed, last + PAGE..last + 3 * PAGE);
        assert_eq!(unused, 2);
        assert_eq!(kept.runs().len(), MAX_RUNS);
        assert_eq!(kept.bytes(), MAX_RUNS * PAGE);
        // Below the bound, a removal splits.
        let (removed, _) = kept.remove(0..PAGE);
        assert_eq!(removed, 0..PAGE);
        kept.add(last + PAGE..last + 3 * PAGE, usize::MAX, PAGE);
        let (removed, _) = kept.remove(last + PAGE..last + 2 * PAGE);
        assert_eq!(removed, last + PAGE..last + 2 * PAGE);
        assert_eq!(kept.runs().len(), MAX_RUNS);
    }
}
