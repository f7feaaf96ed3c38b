//! How a memory slot is reset when its tenant gives it back.
//!
//! The rule (see docs/pooling.md): **every page the tenant could have written is reset,
//! whatever state the kernel holds it in; a page is skipped only where the kernel proves it
//! clean.** What the tenant could write is its accessible bytes at deallocation. Within them:
//!
//! - the slot's kept pages ([`Kept`]: pages tenants wrote before, up to `keep_resident` bytes,
//!   wherever they lie) are reset in place where their bytes differ from what a fresh memory
//!   holds there: zeroed, or, inside the image, the image's bytes copied back. A page the last
//!   two resets found changed is reset without being read (but at one reset in 8, which reads
//!   every kept page); the others are read first. They stay resident, so the next tenant
//!   writes them without a page fault; kept pages no tenant changes any more are given back;
//! - every other page is reset where the kernel does not prove it clean ([`PageMap::written`]:
//!   present or swapped or migrating, not the zero page, not the image file's own page): pages
//!   written for the first time are kept and reset in place while the budget lasts, the rest are
//!   decommitted (the image's come back from its file). Once scans keep finding nothing new,
//!   all of them are decommitted without asking, but for the page next to each end of a kept
//!   run, which is read like a kept page and left alone where it holds zeros. A periodic
//!   rescan notices tenants that start writing elsewhere; such a page found written, or a
//!   probe past a kept run, notices one that reaches further than the last;
//! - without a page map, pages near the start are read (and kept where a tenant wrote them),
//!   the rest decommitted;
//! - access above the memory's initial size is removed again, so the slot is left exactly as
//!   the same module will want it (kept pages above it stay resident, inaccessible, reset).
//!
//! What the policy learns (a [`History`]) chooses between resetting in place and
//! decommitting, and whether to ask the kernel; never whether a page is reset.
//!
//! Reading a kept page rather than rewriting it is sound in any state the kernel holds it in:
//! the read goes through the slot's own mapping, so it sees exactly what the next tenant
//! would (a swapped page is read back, a page the kernel reclaimed reads as it will then).

use std::io;
use std::ops::Range;
use std::sync::Arc;

use berth_core::MemoryImage;
use berth_core::sys::PageMap;

use crate::decommit::{Decommits, Kind};
use crate::history::{Edge, History, Seen, is_cold};
use crate::kept::{BLIND_RUNS, Kept, MAX_RUNS, Ranges};
use crate::slot_bytes::SlotBytes;

/// Without a page map, the bytes from a slot's start that a reset reads to find written pages
/// (at most the keep budget); the rest is decommitted.
const READ_WINDOW: usize = 64 << 10;
/// Bytes beyond a kept run's end, or below its start, that a reset asks the kernel about when
/// its tenant reached further than the one before (see [`reached_past`]): a heap or a stack
/// grows page by page, and an allocator may leave a few pages untouched between blocks.
const PROBE: usize = 64 << 10;
/// Stale stretches one reset gives back at most (each is a range to decommit; the rest wait).
const IDLE_DROPS: usize = BLIND_RUNS;
/// Kept bytes from which a slot's blind decommits run at once rather than wait for a batch
/// ([`Kind::AtOnce`]): a module's tenants would otherwise turn over three slots or more
/// (a batch holds three deallocations or more), whose kept pages together, at this size,
/// outgrow a core's L2 cache (512 KiB to 2 MiB on current x86 cores), and each reset would read
/// its kept pages from L3 or memory. Measured here (`heap-4m`, 784 KiB kept, four slots in
/// turn): the reset read them at about 35 GB/s, against 75 to 100 GB/s from L2, and the median
/// cycle fell from 25 to 13 µs with its decommit run at once; a slot keeping 64 KiB
/// (`image-4m`) lost more to the unshared decommit call than it gained.
pub(crate) const CACHED: usize = 128 << 10;
/// New parts a scanning reset does not keep (past the budget, or past the runs a churning slot
/// keeps) that it decommits one range each; from the next one on, everything above goes back
/// in one range.
const LEFT_OUT: usize = 4;

thread_local! {
    /// The runs a scan reports, kept between resets on a thread so that a reset (of a memory
    /// slot, or of a table slot: see `table_pool.rs`) allocates nothing.
    pub(crate) static WRITTEN: std::cell::Cell<Vec<Range<usize>>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A memory slot given back by its tenant.
#[derive(Debug, Clone)]
pub(crate) struct MemoryReset {
    /// The slot's global number.
    pub slot: u32,
    /// The image mapped in the slot, whose bytes the reset brings back.
    pub image: Option<Arc<MemoryImage>>,
    /// Bytes the tenant could write (its size at deallocation, page-rounded).
    pub accessible: usize,
    /// The module's initial size for this memory, page-rounded: what stays accessible.
    pub initial: usize,
}

/// What a reset needs besides the slot.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy<'a> {
    /// `linear_memory_keep_resident`, page-aligned: the most bytes a slot keeps.
    pub keep: usize,
    /// The page map, if the kernel has one and the pool may use it.
    pub map: Option<&'a PageMap>,
    pub page: usize,
}

/// The image mapped in a slot, as a reset sees it.
struct Image<'a> {
    /// Where it lies in the slot, clipped to the tenant's accessible bytes.
    range: Range<usize>,
    /// Where it starts (unclipped), and its bytes.
    offset: usize,
    bytes: &'a [u8],
    /// Its pages that hold data (offsets from its start); the rest of it is zeros.
    data: &'a [Range<usize>],
}

impl Image<'_> {
    /// Resets `part` (inside the accessible bytes) in place: the image's bytes where it has
    /// data, zeros elsewhere (a `memset` costs less than copying zeros).
    fn restore(&self, bytes: &mut SlotBytes, part: Range<usize>) {
        let mut at = part.start;
        for data in self.data {
            let data = data.start + self.offset..data.end + self.offset;
            let copy = at.max(data.start).max(self.range.start)..part.end.min(data.end).min(self.range.end);
            if copy.start >= copy.end {
                continue;
            }
            bytes.zero(at..copy.start);
            bytes.copy_in(
                copy.clone(),
                &self.bytes[copy.start - self.offset..copy.end - self.offset],
            );
            at = copy.end;
        }
        bytes.zero(at..part.end);
    }

    /// Whether the page at `page` differs from what a fresh memory holds there.
    fn dirty(&self, bytes: &SlotBytes, page: Range<usize>) -> bool {
        let inside = page.start.max(self.range.start)..page.end.min(self.range.end);
        if inside.is_empty() {
            return !bytes.is_zero(page);
        }
        !bytes.is_zero(page.start..inside.start)
            || !bytes.is_zero(inside.end..page.end)
            || bytes.read(inside.clone()) != &self.bytes[inside.start - self.offset..inside.end - self.offset]
    }
}

/// The parts of `range` below `limit` that `kept` does not hold, without borrowing it.
fn gaps(kept: &Kept, range: Range<usize>, limit: usize) -> Ranges<{ MAX_RUNS + 1 }> {
    Ranges::first(kept.gaps(range.start..range.end.min(limit)))
}

/// Whether the kernel does not prove clean the [`PROBE`] bytes past `edge` (up to the next
/// kept run, within `accessible`): then a slot that stopped scanning scans, and keeps what a
/// tenant reaching further than the usual ones wrote, where its blind reset would give those
/// pages back and the next such tenant fault them in again (and, having found something, it
/// scans its next four resets too, as after any scan that finds new pages). A probe costs one
/// system call over at most 16 page-table entries of 4 KiB pages (about 1 µs here), a scan of
/// the whole memory up to 14 µs for 16 MiB. The caller probes only for a slot that is not
/// churning and has room in its budget for one more page: otherwise the scan would keep
/// nothing, and the blind reset gives the pages back all the same.
fn reached_past(bytes: &SlotBytes, map: &PageMap, kept: &Kept, edge: Edge, accessible: usize) -> bool {
    let part = match edge {
        Edge::Above(end) => kept.gaps(end..(end + PROBE).min(accessible)).next(),
        Edge::Below(start) => kept.gaps(start.saturating_sub(PROBE)..start).last(),
    };
    let Some(part) = part else {
        return false;
    };
    let mut written = WRITTEN.take();
    written.clear();
    // A probe that fails finds nothing: the blind reset gives the pages back anyway.
    let found = bytes.written(map, part, &mut written).is_ok() && !written.is_empty();
    WRITTEN.set(written);
    found
}

/// Watch pages: the unkept pages in reach next to the kept runs (the first page of each gap
/// after a run, the last before one), outside the image, up to two for each of [`BLIND_RUNS`]
/// runs. A blind reset reads them rather than decommit them: a clean one (zeros) stays out of
/// the decommit, usually mapped to the zero page by that read, which makes the next read of it
/// cheaper than a kept page's (a page a tenant filled with zeros stays resident, and a later
/// scan reports it); a changed one means the tenant wrote past the kept pages. Tenants of one usual
/// size change the end page of a run at every reset, so a rare larger one shows here where it
/// does not show in [`Seen::beyond`]. (A page inside the image would cost a comparison with
/// the image's bytes at every reset; a tenant's stack and heap lie outside its data.)
fn watch_pages(
    kept: &Kept,
    image: &Range<usize>,
    accessible: usize,
    page: usize,
) -> Ranges<{ 2 * BLIND_RUNS }> {
    let outside = move |at: &Range<usize>| at.end <= image.start || image.end <= at.start;
    Ranges::first(
        kept.gaps(0..accessible)
            .flat_map(move |gap| {
                let first = (gap.start > 0).then(|| gap.start..gap.start + page);
                let last = gap.end - page;
                let last =
                    (gap.end < accessible && (first.is_none() || gap.len() != page)).then_some(last..gap.end);
                first.into_iter().chain(last)
            })
            .filter(outside),
    )
}

/// What a warm slot's resets may have left resident, for giving it all back when the slot
/// goes cold: its kept runs, with the page either side of each (a blind reset leaves a watch
/// page it read as zeros where it is, though a tenant may have written those zeros), and the
/// first `window` bytes (see [`read_window`]). In order, merged, within `len` bytes; nothing
/// for a slot that kept nothing and has a page map.
pub(crate) fn left_resident(kept: &Kept, len: usize, page: usize, window: usize) -> Vec<Range<usize>> {
    let window = 0..window.min(len);
    let widened = kept
        .runs()
        .iter()
        .map(|run| run.start.saturating_sub(page)..run.end.saturating_add(page).min(len));
    let mut out: Vec<Range<usize>> = Vec::with_capacity(kept.runs().len() + 1);
    for range in std::iter::once(window).chain(widened) {
        match out.last_mut() {
            _ if range.is_empty() => {}
            Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
            _ => out.push(range),
        }
    }
    out
}

/// The bytes from a slot's start that its resets read when they run without a page map, and
/// leave resident where they read as zeros: none with a page map.
pub(crate) fn read_window(keep: usize, without_map: bool) -> usize {
    if without_map { keep.min(READ_WINDOW) } else { 0 }
}

/// `gap` without its first and last pages where they are clean watch pages.
fn trim(gap: Range<usize>, clean: &[Range<usize>], page: usize) -> Range<usize> {
    let start = if clean.iter().any(|w| w.start == gap.start) {
        gap.start + page
    } else {
        gap.start
    };
    let end = if clean.iter().any(|w| w.end == gap.end) {
        gap.end - page
    } else {
        gap.end
    };
    start..end.max(start)
}

/// Gives back `from..accessible`: the pages kept there are no longer kept (one range to
/// decommit, rather than one per gap between them). Kept pages above what this tenant could
/// reach stay kept (they were reset when they were last reachable, and are still resident),
/// but for the rest of a run that spans both ends when the slot keeps all the runs it may.
fn give_back(
    bytes: &SlotBytes,
    history: &mut History,
    from: usize,
    accessible: usize,
    decommits: &mut Decommits,
) {
    if from >= accessible {
        return;
    }
    let (removed, _) = history.kept.remove(from..accessible);
    decommits.push(bytes.address_range(removed));
}

/// Resets the kept pages within the tenant's reach that it changed, in place (zeros, or the
/// image's bytes), and counts one more idle reset for every other kept page in reach: one
/// whose bytes are already what a fresh memory holds there needs nothing. Kept pages out of
/// reach keep their counts: they were reset when they were last reachable, and wait for a
/// tenant that grows. Reading a page costs a half to three quarters of what rewriting it does,
/// and only delays the rewrite of a page tenants change at every reset: unless `verify`, a page
/// the last two resets found changed is counted changed again and rewritten unread (a page
/// tenants stopped changing is rewritten needlessly until the next reset that verifies). A page
/// changed once is read, so that the next tenant's leaving it unchanged shows, and with it a
/// later tenant that reaches further (see [`Seen::beyond`]).
fn refresh(
    bytes: &mut SlotBytes,
    image: &Image<'_>,
    kept: &mut Kept,
    accessible: usize,
    page: usize,
    verify: bool,
) -> Seen {
    // Changed pages next to each other are reset in one go.
    let mut changed: Option<Range<usize>> = None;
    let mut seen = Seen::default();
    let mut reach = 0;
    for (run, uses) in kept.runs_mut() {
        for (at, page_use) in (run.start..run.end).step_by(page).zip(uses) {
            let this = at..at + page;
            if this.end > accessible {
                continue;
            }
            let idle = page_use.idle();
            let cold = is_cold(*page_use);
            seen.cold += u32::from(cold);
            if (verify || !page_use.hot()) && !image.dirty(bytes, this.clone()) {
                page_use.unchanged();
                seen.idle += u32::from(is_cold(*page_use));
                continue;
            }
            seen.cold_changed += u32::from(cold);
            seen.first_changes += u32::from(page_use.changed());
            // A run's end page with unkept pages in reach beyond it, which the tenant before
            // left unchanged: this one reached further.
            if idle > reach {
                if this.end == run.end && run.end < accessible {
                    reach = idle;
                    seen.beyond = Some(Edge::Above(run.end));
                } else if at == run.start && at > 0 {
                    reach = idle;
                    seen.beyond = Some(Edge::Below(at));
                }
            }
            changed = match changed {
                Some(pending) if pending.end == at => Some(pending.start..this.end),
                Some(pending) => {
                    image.restore(bytes, pending);
                    Some(this)
                }
                None => Some(this),
            };
        }
    }
    if let Some(pending) = changed {
        image.restore(bytes, pending);
    }
    seen
}

/// Resets `bytes` (a slot whose tenant could write `job.accessible` bytes) all but its
/// decommits, which it leaves in `decommits` (whatever they held before) for the caller to run
/// before the slot is used again, and updates `history`. Afterwards `job.initial` bytes are accessible. An error (a protection
/// change refused) leaves the slot in no known state.
pub(crate) fn reset(
    bytes: &mut SlotBytes,
    job: &MemoryReset,
    history: &mut History,
    policy: Policy<'_>,
    decommits: &mut Decommits,
) -> io::Result<()> {
    let accessible = job.accessible.min(bytes.accessible());
    let page = policy.page;
    let no_image: &[u8] = &[];
    let image = match job.image.as_deref() {
        None => Image {
            range: 0..0,
            offset: 0,
            bytes: no_image,
            data: &[],
        },
        Some(image) => match image.bytes() {
            Some(view) => Image {
                range: image.offset().min(accessible)..(image.offset() + image.len()).min(accessible),
                offset: image.offset(),
                bytes: view,
                data: image.data_pages(),
            },
            // The image cannot be read, so its pages cannot be restored in place: give back
            // everything the tenant could reach (the image's pages come from its file); kept
            // pages above it stay kept.
            None => {
                decommits.restart(Kind::Blind);
                give_back(bytes, history, 0, accessible, decommits);
                return bytes.protect_from(job.initial.min(accessible));
            }
        },
    };
    let verify = history.verifies();
    let seen = refresh(bytes, &image, &mut history.kept, accessible, page, verify);
    history.saw(seen);
    // Whether the slot's habits have it scan; else, whether it may learn more pages.
    let habit = history.scans(accessible);
    let learns = !history.churning() && history.kept.bytes() + page <= policy.keep;
    // A slot that may learn, about to reset blind, reads its watch pages; where all are
    // clean, they stay.
    let watch = if learns && policy.map.is_some() && !habit {
        watch_pages(&history.kept, &image.range, accessible, page)
    } else {
        Ranges::first(std::iter::empty())
    };
    let wrote_past = watch
        .as_slice()
        .iter()
        .any(|watched| image.dirty(bytes, watched.clone()));
    let clean: &[Range<usize>] = if wrote_past { &[] } else { watch.as_slice() };
    let scans = |map: &PageMap| {
        habit
            || (learns
                && (wrote_past
                    || seen
                        .beyond
                        .is_some_and(|edge| reached_past(bytes, map, &history.kept, edge, accessible))))
    };
    if let Some(map) = policy.map.filter(|map| scans(map)) {
        // Ask the kernel which pages may hold what the tenant wrote; keep the new ones while
        // the budget lasts, decommit what is left from the first one that did not fit.
        let mut written = WRITTEN.take();
        written.clear();
        if bytes.written(map, 0..accessible, &mut written).is_err() {
            written.clear();
            written.push(0..accessible);
        }
        decommits.restart(Kind::AtOnce);
        let mut found = false;
        let mut over = accessible;
        let mut left_out = 0;
        for run in &written {
            // Usually every page the scan reports is kept already (tenants write the same
            // pages), and there is nothing to learn.
            if run.start >= over || history.kept.covers(run) {
                continue;
            }
            let new = gaps(&history.kept, run.clone(), over);
            for part in new.as_slice().iter().cloned() {
                if part.start >= over {
                    break;
                }
                found = true;
                let kept = if !history.admits_run() {
                    part.start..part.start
                } else {
                    history.kept.add(part.clone(), policy.keep, page)
                };
                image.restore(bytes, kept.clone());
                if kept.end < part.end {
                    // Not kept: decommitted alone while there is room, and from the first
                    // that is not on (with every page kept above it).
                    if left_out < LEFT_OUT {
                        left_out += 1;
                        decommits.push(bytes.address_range(kept.end..part.end));
                    } else {
                        over = kept.end;
                    }
                }
            }
        }
        // A scan of scattered writes in a large memory may report many runs: keep what the
        // usual reset needs, not the largest ever seen.
        written.shrink_to(MAX_RUNS);
        WRITTEN.set(written);
        history.scanned(found);
        give_back(bytes, history, over, accessible, decommits);
        // Kept pages no tenant writes any more go back with them, in the room left.
        if seen.idle > 0 {
            let stale = history.drop_stale::<IDLE_DROPS>(false, usize::MAX, decommits.room(), page);
            for stretch in stale.as_slice() {
                decommits.push(bytes.address_range(stretch.clone()));
            }
        }
    } else if policy.map.is_some() {
        // Blind: everything not kept (the gaps around at most `BLIND_RUNS` runs) goes back,
        // with the stale kept runs in reach (they become gaps). That is usually nothing (the
        // scans before found nothing new), and waits for a batch; the module's next tenant
        // that finds the slot waiting runs the batch early. A churning slot's gaps hold what
        // its tenant wrote, and go back at once, as do those of a slot that keeps `CACHED`
        // bytes or more.
        history.went_blind();
        if seen.idle > 0 {
            history.drop_stale::<BLIND_RUNS>(true, accessible, BLIND_RUNS, page);
        }
        decommits.restart(if history.churning() || history.kept.bytes() >= CACHED {
            Kind::AtOnce
        } else if history.kept.bytes() == 0 {
            Kind::Idle
        } else {
            Kind::Blind
        });
        for gap in history.kept.gaps(0..accessible) {
            let gap = trim(gap, clean, page);
            if !gap.is_empty() {
                decommits.push(bytes.address_range(gap));
            }
        }
    } else {
        // No page map: read the pages near the start that are not kept, keep (and reset) the
        // ones a tenant wrote while the budget lasts; decommit everything else.
        let window = read_window(policy.keep, true).min(accessible);
        let mut over = window;
        let unread = gaps(&history.kept, 0..window, window);
        for gap in unread.as_slice().iter().cloned() {
            for start in gap.step_by(page) {
                let one = start..start + page;
                if image.dirty(bytes, one.clone()) {
                    let kept = history.kept.add(one.clone(), policy.keep, page);
                    image.restore(bytes, kept.clone());
                    if kept.end < one.end {
                        over = over.min(one.start);
                    }
                }
            }
        }
        decommits.restart(Kind::Blind);
        give_back(bytes, history, over, accessible, decommits);
        if seen.idle > 0 {
            let stale = history.drop_stale::<IDLE_DROPS>(true, usize::MAX, decommits.room(), page);
            for run in stale.as_slice() {
                decommits.push(bytes.address_range(run.clone()));
            }
        }
    }
    bytes.protect_from(job.initial.min(accessible))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    /// Kept runs, as (first page, page past the end).
    fn kept(runs: &[(usize, usize)]) -> Kept {
        let mut kept = Kept::default();
        for &(start, end) in runs {
            kept.add(start * PAGE..end * PAGE, usize::MAX, PAGE);
        }
        kept
    }

    fn pages(ranges: &[Range<usize>]) -> Vec<usize> {
        ranges
            .iter()
            .map(|r| {
                assert_eq!(r.len(), PAGE);
                r.start / PAGE
            })
            .collect()
    }

    #[test]
    fn a_cold_slot_gives_back_the_watch_pages_and_the_read_window_with_its_runs() {
        let runs = kept(&[(4, 6), (9, 10), (30, 32)]);
        let pages = |without_map| -> Vec<(usize, usize)> {
            left_resident(&runs, 32 * PAGE, PAGE, read_window(1 << 20, without_map))
                .iter()
                .map(|r| (r.start / PAGE, r.end / PAGE))
                .collect()
        };
        // 64 KiB is pages 0..16 here: the first two runs' neighbourhoods fall inside it.
        assert_eq!(pages(true), [(0, 16), (29, 32)]);
        assert_eq!(pages(false), [(3, 7), (8, 11), (29, 32)]);
        assert!(left_resident(&Kept::default(), 32 * PAGE, PAGE, read_window(1 << 20, false)).is_empty());
        assert!(left_resident(&Kept::default(), 32 * PAGE, PAGE, read_window(0, true)).is_empty());
    }

    #[test]
    fn watch_pages_border_the_kept_runs_in_reach_outside_the_image() {
        let none = 0..0;
        // Runs at pages 4..6 and 9..10 in 16 pages: the pages either side of each.
        let runs = kept(&[(4, 6), (9, 10)]);
        assert_eq!(
            pages(watch_pages(&runs, &none, 16 * PAGE, PAGE).as_slice()),
            [3, 6, 8, 10]
        );
        // A gap of one page between two runs is watched once; a run at the start or at the
        // end of what the tenant could reach has nothing to watch on that side.
        let runs = kept(&[(0, 2), (3, 5), (7, 8)]);
        assert_eq!(
            pages(watch_pages(&runs, &none, 8 * PAGE, PAGE).as_slice()),
            [2, 5, 6]
        );
        // Pages inside the image are not watched.
        let runs = kept(&[(4, 6)]);
        let image = 6 * PAGE..12 * PAGE;
        assert_eq!(pages(watch_pages(&runs, &image, 16 * PAGE, PAGE).as_slice()), [3]);
        // Nothing kept: nothing to watch.
        assert!(
            watch_pages(&Kept::default(), &none, 16 * PAGE, PAGE)
                .as_slice()
                .is_empty()
        );
    }

    #[test]
    fn a_trimmed_gap_loses_only_its_clean_watch_pages() {
        let clean = [3 * PAGE..4 * PAGE, 6 * PAGE..7 * PAGE];
        assert_eq!(trim(0..4 * PAGE, &clean, PAGE), 0..3 * PAGE);
        assert_eq!(trim(6 * PAGE..9 * PAGE, &clean, PAGE), 7 * PAGE..9 * PAGE);
        assert_eq!(trim(6 * PAGE..7 * PAGE, &clean, PAGE).len(), 0);
        assert_eq!(trim(10 * PAGE..12 * PAGE, &clean, PAGE), 10 * PAGE..12 * PAGE);
        // Runs at pages 2, 5 and 8 were watched on both sides; the one at 5 went back (stale)
        // before the gaps were taken: the merged gap keeps the pages that watched it.
        let clean: Vec<_> = [1, 3, 4, 6, 7, 9].map(|p| p * PAGE..(p + 1) * PAGE).into();
        assert_eq!(trim(3 * PAGE..8 * PAGE, &clean, PAGE), 4 * PAGE..7 * PAGE);
    }
}
