//! What the resets of one memory slot learn about its tenants, and what they decide from it:
//! whether a reset asks the kernel which pages were written (a scan) or decommits blindly, and
//! which kept pages it gives back. Never whether a page is reset: see `reset.rs`.
//!
//! The costs behind the numbers, measured on the machine of docs/performance.md: a scan costs
//! about 1 µs plus 3 ns per page-table entry walked; a decommit about 0.5 µs a range; a page
//! fault 1.3 to 3.4 µs; a kept page costs a read of its 4 KiB at every reset (40 to 75 ns),
//! and a `memset` or copy when its tenant changed it.

use crate::kept::{BLIND_RUNS, Kept, PageUse, Ranges};

/// Clean scans after which a slot's resets stop scanning (and decommit blindly instead).
const CLEAN_SCANS_BEFORE_BLIND: u8 = 4;
/// While blind, one reset in this many scans again, to notice tenants that start writing;
/// each clean rescan doubles the interval, up to [`RESCAN_EVERY_MAX`].
const RESCAN_EVERY: u8 = 16;
/// The longest interval between rescans of a slot whose rescans keep finding nothing.
const RESCAN_EVERY_MAX: u8 = 128;
/// Bytes from which a memory's scan costs more than decommitting the gaps around up to
/// [`BLIND_RUNS`] kept runs; below it, a slot goes blind only with at most one kept run (two
/// gaps). Scans take the process's memory map for reading and flush no TLB, where every
/// decommit may interrupt the other threads of the process.
const SCAN_BELOW: usize = 4 << 20;
/// Resets after which a kept page no tenant changed is given back whatever the slot's tenants
/// do: keeping it that long costs about what giving it back and faulting it in again does.
const IDLE_MAX: u8 = 64;
/// Resets without a change after which a kept page is *cold*.
const COLD: u8 = 4;
/// A kept page pays its keep while tenants change it in more than one reset in this many: a
/// reset of a kept page (reading its 4 KiB, 40 to 75 ns) costs about a fortieth of a page
/// fault and its share of a decommit (2 to 3 µs).
const BREAK_EVEN: u64 = 40;
/// Checks of cold pages before their rate decides anything.
const MIN_SAMPLE: u32 = 512;
/// Resets the rate must cover before it decides anything: tenants that use much of their
/// memory now and then change all those pages in one reset of many, and a few resets of
/// checks right after one would count none of them.
const MIN_SPAN: u8 = 64;
/// Checks of cold pages after which both counts are halved, as they are every 256 resets: the
/// rate covers the last few hundred resets (long enough for tenants that use much of their
/// memory only now and then), and a slot whose cold pages all go back, so that none is checked
/// any more, comes to measure again.
const HALVE_AT: u32 = 1 << 16;
/// A kept page whose offset is a multiple of this many pages is a sentinel: kept while cold
/// even when cold pages do not pay, so that the rate goes on being measured and notices
/// tenants that change (where no kept page is one, the halving of the counts does).
const SENTINEL_EVERY: usize = 16;
/// Pages the scans kept that went back unused (less four for each written again) from which a
/// slot is churning.
const CHURN: u8 = 16;
/// Runs a churning slot's scans keep at most: each is one more range for its resets to
/// decommit around.
const CHURN_RUNS: usize = 3;
/// A churning slot scans one reset in this many (a scan of the 16 MiB a tenant wrote eight
/// pages of, all over, took 13 µs here).
const CHURN_RESCAN_EVERY: u8 = 32;

/// What one reset saw of the kept pages within its tenant's reach.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Seen {
    /// Kept pages changed for the first time since they were kept.
    pub first_changes: u32,
    /// Cold kept pages checked.
    pub cold: u32,
    /// Cold kept pages found changed.
    pub cold_changed: u32,
    /// Kept pages cold after the reset (which may go back).
    pub idle: u32,
    /// Where the tenant may have written past the kept pages: an end of a kept run (its last
    /// page, or its first), beside unkept pages in reach, whose page there this tenant changed
    /// and the tenant before left unchanged (of several, the page unchanged longest). Such a
    /// tenant reached further than the last one. (Where every tenant changes a run's end pages,
    /// a larger one does not show here; the periodic rescans find its pages.)
    pub beyond: Option<Edge>,
}

/// The end of a kept run, with unkept pages beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Edge {
    /// The run's end offset; the pages from there up are not kept.
    Above(usize),
    /// The run's start offset; the pages below it are not kept.
    Below(usize),
}

/// How often tenants change the slot's cold kept pages, over its last few hundred resets (both
/// counts halved every 256 resets, or sooner at [`HALVE_AT`] checks).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ColdRate {
    checked: u32,
    changed: u32,
    /// Resets since both counts were last halved.
    resets: u8,
    /// Resets the counts cover (up to 255).
    span: u8,
}

impl ColdRate {
    fn add(&mut self, seen: Seen) {
        self.checked = self.checked.saturating_add(seen.cold);
        self.changed = self.changed.saturating_add(seen.cold_changed);
        self.span = self.span.saturating_add(1);
        self.resets = self.resets.wrapping_add(1);
        if self.resets == 0 || self.checked >= HALVE_AT {
            (self.checked, self.changed) = (self.checked / 2, self.changed / 2);
        }
    }

    /// Whether keeping cold pages pays (or too few were checked, or over too few resets, to
    /// tell).
    fn pays(&self) -> bool {
        self.span < MIN_SPAN
            || self.checked < MIN_SAMPLE
            || u64::from(self.changed) * BREAK_EVEN >= u64::from(self.checked)
    }
}

/// What the resets of one slot have learned about its tenants, kept across tenants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct History {
    /// Pages kept resident and reset in place (some tenant wrote them).
    pub kept: Kept,
    /// Consecutive scans that found nothing written outside the kept pages.
    clean_scans: u8,
    /// Resets since the last scan while scans are skipped.
    blind_resets: u8,
    /// Pages the scans kept that went back idle before any tenant changed them again, less
    /// four for each kept page a tenant changed for the first time (saturating). At [`CHURN`]
    /// or more, tenants write where the next ones do not: learning their pages does not pay.
    futile: u8,
    cold: ColdRate,
}

impl History {
    /// Whether this reset of `accessible` bytes asks the kernel what was written, rather than
    /// decommit blindly. A blind reset decommits the gaps between the kept runs: it is for
    /// slots that keep at most one run, or at most [`BLIND_RUNS`] in a memory of
    /// [`SCAN_BELOW`] or more, where one scan costs more than their gaps' decommits. A churning
    /// slot resets blind with up to [`BLIND_RUNS`] kept runs whatever its size (its gaps hold
    /// what its tenants wrote, which a scanning reset decommits as well), and scans one reset
    /// in [`CHURN_RESCAN_EVERY`] to notice tenants that settle. (A reset also scans where a
    /// probe past a kept run finds its tenant wrote there: see `reset.rs`.)
    pub fn scans(&self, accessible: usize) -> bool {
        let runs = self.kept.runs().len();
        if self.churning() {
            return self.blind_resets >= CHURN_RESCAN_EVERY || runs > BLIND_RUNS;
        }
        let rescans = self.clean_scans.saturating_sub(CLEAN_SCANS_BEFORE_BLIND).min(3);
        let every = (RESCAN_EVERY << rescans).min(RESCAN_EVERY_MAX);
        let blind_runs = if accessible >= SCAN_BELOW { BLIND_RUNS } else { 1 };
        self.clean_scans < CLEAN_SCANS_BEFORE_BLIND || self.blind_resets >= every || runs > blind_runs
    }

    /// Whether this reset reads every kept page, also those the last two resets found changed
    /// (which the others reset without reading): one reset in 8.
    pub fn verifies(&self) -> bool {
        self.cold.resets.is_multiple_of(8)
    }

    /// Whether the slot's tenants keep writing pages the next ones do not (see `futile`).
    pub fn churning(&self) -> bool {
        self.futile >= CHURN
    }

    /// Whether a scan may keep one more run: a churning slot keeps few enough to reset blind.
    pub fn admits_run(&self) -> bool {
        !self.churning() || self.kept.runs().len() < CHURN_RUNS
    }

    /// Records what a reset saw of the kept pages.
    pub fn saw(&mut self, seen: Seen) {
        self.cold.add(seen);
        let first = u8::try_from(seen.first_changes.saturating_mul(4)).unwrap_or(u8::MAX);
        self.futile = self.futile.saturating_sub(first);
    }

    /// Records a scanning reset: whether it found pages written outside the kept ones.
    pub fn scanned(&mut self, found: bool) {
        self.blind_resets = 0;
        self.clean_scans = if found {
            0
        } else {
            self.clean_scans.saturating_add(1)
        };
    }

    /// Records a blind reset.
    pub fn went_blind(&mut self) {
        self.blind_resets = self.blind_resets.saturating_add(1);
    }

    /// Whether a kept page (at an offset, with a use) goes back now: after [`IDLE_MAX`] resets
    /// without a change; once cold, if tenants rarely change the slot's cold pages (unless it
    /// is a sentinel); and in a churning slot once cold if no tenant changed it since it was
    /// kept.
    fn stale(&self, page_size: usize) -> impl Fn(usize, PageUse) -> bool + use<> {
        let drop_cold = !self.cold.pays();
        let churning = self.churning();
        let sentinel = page_size * SENTINEL_EVERY;
        move |at: usize, page: PageUse| {
            page.idle() >= IDLE_MAX
                || (page.idle() >= COLD
                    && ((drop_cold && !at.is_multiple_of(sentinel)) || (churning && !page.reused())))
        }
    }

    /// Stops keeping the stale pages below `below` (at most `most` stretches of them, or with
    /// `whole` only runs stale through, up to `N`), and returns what it stopped keeping, to be
    /// given back (a stretch may have taken the rest of its run along: see [`Kept::remove`]).
    pub fn drop_stale<const N: usize>(
        &mut self,
        whole: bool,
        below: usize,
        most: usize,
        page: usize,
    ) -> Ranges<N> {
        let stretches = self
            .kept
            .stale(self.stale(page), whole)
            .filter(|stretch| stretch.end <= below)
            .take(most);
        let mut stale = Ranges::<N>::first(stretches);
        // Each stretch is replaced by what `remove` forgot; one inside the run an earlier one
        // took along is gone already.
        let (mut n, mut unused) = (0, 0);
        let items = stale.as_mut_slice();
        for i in 0..items.len() {
            if n > 0 && items[i].end <= items[n - 1].end {
                continue;
            }
            let (removed, count) = self.kept.remove(items[i].clone());
            unused += count;
            items[n] = removed;
            n += 1;
        }
        stale.truncate(n);
        self.futile = self
            .futile
            .saturating_add(u8::try_from(unused).unwrap_or(u8::MAX));
        stale
    }

    /// What a slot new to the same module memory starts from.
    pub fn learned(&self) -> Learned {
        Learned {
            streak: self.clean_scans,
            kept: self.kept.bytes(),
        }
    }

    /// This history for a slot that changes module memory: its kept pages stay (they are
    /// still there, and reset like any page; the new module's tenants keep them or they go
    /// back idle), what it learned about its tenants gives way to what the new module memory's
    /// other slots learned. A slot that keeps less than they do scans until it has learned the
    /// module's pages, whatever their streak: going blind at once would give those pages back
    /// at every reset.
    pub fn for_new_key(self, learned: Learned) -> History {
        let streak = if self.kept.bytes() < learned.kept {
            0
        } else {
            learned.streak
        };
        History {
            kept: self.kept,
            clean_scans: streak,
            ..History::default()
        }
    }
}

/// What the slots of one module memory learned about its tenants, for a slot new to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Learned {
    /// Scans in a row that found nothing new.
    pub streak: u8,
    /// Bytes a slot keeps for it.
    pub kept: usize,
}

/// Whether a kept page is cold: unchanged in the last [`COLD`] resets or more.
pub(crate) fn is_cold(page: PageUse) -> bool {
    page.idle() >= COLD
}
