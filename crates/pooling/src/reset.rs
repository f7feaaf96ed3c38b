//! How a memory slot is reset when its tenant gives it back, and what its resets learn.
//!
//! The rule (see docs/pooling.md): **every page the tenant could have written is reset,
//! whatever state the kernel holds it in; a page is skipped only where the kernel proves it
//! clean.** What the tenant could write is its accessible bytes at deallocation. Within them:
//!
//! - the slot's kept pages ([`Kept`]: pages tenants wrote before, up to `keep_resident` bytes,
//!   wherever they lie) are reset in place: zeroed, or, inside the image, the image's bytes
//!   copied back. They stay resident, so the next tenant writes them without a page fault;
//! - every other page is reset where the kernel does not prove it clean ([`PageMap::written`]:
//!   present or swapped or migrating, not the zero page, not the image file's own page): pages
//!   written for the first time are kept and reset in place while the budget lasts, the rest are
//!   decommitted (the image's come back from its file). Once scans keep finding nothing new,
//!   all of them are decommitted without asking (a periodic rescan notices tenants that start
//!   writing elsewhere);
//! - without a page map, pages near the start are read (and kept where a tenant wrote them),
//!   the rest decommitted;
//! - access above the memory's initial size is removed again, so the slot is left exactly as
//!   the same module will want it (kept pages above it stay resident, inaccessible, reset).
//!
//! What the policy learns (a [`History`]) chooses between resetting in place and
//! decommitting, and whether to ask the kernel; never whether a page is reset.

use std::io;
use std::ops::Range;
use std::sync::Arc;

use berth_core::MemoryImage;
use berth_core::sys::PageMap;

use crate::decommit::Decommits;
use crate::kept::{BLIND_RUNS, Kept, MAX_RUNS};
use crate::slot_bytes::SlotBytes;

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
/// decommit may interrupt the other threads of the process: measured here, a scan costs about
/// 2.7 µs plus 0.65 µs a MiB, a decommit about 0.5 µs a range.
const SCAN_BELOW: usize = 4 << 20;
/// Without a page map, the bytes from a slot's start that a reset reads to find written pages
/// (at most the keep budget); the rest is decommitted.
const READ_WINDOW: usize = 64 << 10;

thread_local! {
    /// The runs a scan reports, kept between resets on a thread so that a reset allocates
    /// nothing.
    static WRITTEN: std::cell::Cell<Vec<Range<usize>>> = const { std::cell::Cell::new(Vec::new()) };
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
}

impl History {
    /// Whether this reset of `accessible` bytes asks the kernel what was written, rather than
    /// decommit blindly. A blind reset decommits the gaps between the kept runs: it is for
    /// slots that keep at most one run, or at most [`BLIND_RUNS`] in a memory of
    /// [`SCAN_BELOW`] or more, where one scan costs more than their gaps' decommits.
    fn scans(&self, accessible: usize) -> bool {
        let rescans = self.clean_scans.saturating_sub(CLEAN_SCANS_BEFORE_BLIND).min(3);
        let every = (RESCAN_EVERY << rescans).min(RESCAN_EVERY_MAX);
        let runs = self.kept.runs().len();
        let blind_runs = if accessible >= SCAN_BELOW { BLIND_RUNS } else { 1 };
        self.clean_scans < CLEAN_SCANS_BEFORE_BLIND || self.blind_resets >= every || runs > blind_runs
    }

    /// What a slot new to the same module memory starts from.
    pub fn learned(&self) -> Learned {
        Learned {
            streak: self.clean_scans,
            kept: self.kept.bytes(),
        }
    }

    /// This history for a slot that changes module memory: its kept pages stay (they are
    /// still there, and reset like any page), what it learned about its tenants gives way to
    /// what the new module memory's other slots learned. A slot that keeps less than they do
    /// scans until it has learned the module's pages, whatever their streak: going blind at
    /// once would give those pages back at every reset.
    pub fn for_new_key(self, learned: Learned) -> History {
        let streak = if self.kept.bytes() < learned.kept {
            0
        } else {
            learned.streak
        };
        History {
            kept: self.kept,
            clean_scans: streak,
            blind_resets: 0,
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
fn gaps(kept: &Kept, range: Range<usize>, limit: usize) -> ([Range<usize>; MAX_RUNS + 1], usize) {
    let mut out: [Range<usize>; MAX_RUNS + 1] = std::array::from_fn(|_| 0..0);
    let mut n = 0;
    for gap in kept.gaps(range.start..range.end.min(limit)) {
        out[n] = gap;
        n += 1;
    }
    (out, n)
}

/// Gives back `from..accessible`: the pages kept there are no longer kept (one range to
/// decommit, rather than one per gap between them).
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
    let above: Vec<Range<usize>> = history.kept.within(accessible..usize::MAX).collect();
    history.kept.truncate(from);
    // Kept pages above what this tenant could reach stay kept (they were reset when they were
    // last reachable, and are still resident).
    for run in above {
        history.kept.add(run, usize::MAX, 1);
    }
    decommits.push(bytes.address_range(from..accessible));
}

/// Resets `bytes` (a slot whose tenant could write `job.accessible` bytes) all but its
/// decommits, which it returns for the caller to run before the slot is used again, and
/// updates `history`. Afterwards `job.initial` bytes are accessible. An error (a protection
/// change refused) leaves the slot in no known state.
pub(crate) fn reset(
    bytes: &mut SlotBytes,
    job: &MemoryReset,
    history: &mut History,
    policy: Policy<'_>,
) -> io::Result<Decommits> {
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
                let mut decommits = Decommits::blind();
                give_back(bytes, history, 0, accessible, &mut decommits);
                bytes.protect_from(job.initial.min(accessible))?;
                return Ok(decommits);
            }
        },
    };
    // The kept pages within reach: reset in place.
    for part in history.kept.within(0..accessible) {
        image.restore(bytes, part);
    }
    let mut decommits;
    if let Some(map) = policy.map.filter(|_| history.scans(accessible)) {
        // Ask the kernel which pages may hold what the tenant wrote; keep the new ones while
        // the budget lasts, decommit what is left from the first one that did not fit.
        let mut written = WRITTEN.take();
        written.clear();
        if bytes.written(map, 0..accessible, &mut written).is_err() {
            written.clear();
            written.push(0..accessible);
        }
        let mut found = false;
        let mut over = accessible;
        for run in &written {
            // Usually every page the scan reports is kept already (tenants write the same
            // pages), and there is nothing to learn.
            if run.start >= over || history.kept.covers(run) {
                continue;
            }
            let (new, n) = gaps(&history.kept, run.clone(), over);
            for part in new.into_iter().take(n) {
                found = true;
                let kept = history.kept.add(part.clone(), policy.keep, page);
                image.restore(bytes, kept.clone());
                if kept.end < part.end {
                    over = over.min(kept.end);
                }
            }
        }
        // A scan of scattered writes in a large memory may report many runs: keep what the
        // usual reset needs, not the largest ever seen.
        written.shrink_to(MAX_RUNS);
        WRITTEN.set(written);
        history.blind_resets = 0;
        history.clean_scans = if found {
            0
        } else {
            history.clean_scans.saturating_add(1)
        };
        decommits = Decommits::dirty();
        give_back(bytes, history, over, accessible, &mut decommits);
    } else if policy.map.is_some() {
        // Blind: everything not kept (the gaps around at most `BLIND_RUNS` runs) goes back.
        // That is usually nothing (the scans before found nothing new), and waits for a
        // batch; the module's next tenant that finds the slot waiting runs the batch early.
        history.blind_resets = history.blind_resets.saturating_add(1);
        decommits = Decommits::blind();
        for gap in history.kept.gaps(0..accessible) {
            decommits.push(bytes.address_range(gap));
        }
    } else {
        // No page map: read the pages near the start that are not kept, keep (and reset) the
        // ones a tenant wrote while the budget lasts; decommit everything else.
        let window = policy.keep.min(READ_WINDOW).min(accessible);
        let mut over = window;
        let (unread, n) = gaps(&history.kept, 0..window, window);
        for gap in unread.into_iter().take(n) {
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
        decommits = Decommits::blind();
        give_back(bytes, history, over, accessible, &mut decommits);
    }
    bytes.protect_from(job.initial.min(accessible))?;
    Ok(decommits)
}
