//! How a memory slot is reset when its tenant gives it back, and what its resets learn.
//!
//! The rule (see docs/pooling.md): **every page the tenant could have written is reset,
//! whatever state the kernel holds it in; a page is skipped only where the kernel proves it
//! clean.** What the tenant could write is its accessible bytes at deallocation. Within them:
//!
//! - the slot's resident prefix (pages tenants wrote before, up to `keep_resident`) is zeroed
//!   with `memset`, which reaches a page in any state, so the next tenant does not fault it in;
//! - the rest is reset where the kernel does not prove it clean ([`PageMap::written`]: present
//!   or swapped or migrating, not the zero page, not the image file's own page): kept pages are
//!   zeroed and join the prefix, the others decommitted. Once scans keep finding nothing, it
//!   is all decommitted without asking (a periodic rescan notices tenants that start writing);
//! - without a page map, kept pages are read and zeroed where not zero, the rest decommitted;
//! - image pages are decommitted, which brings the image's bytes back from its file;
//! - access above the memory's initial size is removed again, so the slot is left exactly as
//!   the same module will want it.
//!
//! What the policy learns (a [`History`]) can choose between zeroing and decommitting, and
//! whether to ask the kernel, never whether a page is reset.

use std::io;
use std::ops::Range;
use std::sync::Arc;

use berth_core::MemoryImage;
use berth_core::sys::PageMap;

use crate::decommit::Decommits;
use crate::slot_bytes::SlotBytes;

/// Clean scans after which a slot's resets stop scanning (and decommit blindly instead).
const CLEAN_SCANS_BEFORE_BLIND: u8 = 4;
/// While blind, one reset in this many scans again, to notice tenants that start writing;
/// each clean rescan doubles the interval, up to [`RESCAN_EVERY_MAX`].
const RESCAN_EVERY: u8 = 16;
/// The longest interval between rescans of a slot whose rescans keep finding nothing.
const RESCAN_EVERY_MAX: u8 = 128;

/// What the resets of one slot have learned about its tenants, kept across tenants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct History {
    /// Bytes `0..resident` may be resident and are reset by zeroing (some tenant wrote them).
    pub resident: usize,
    /// Consecutive scans that found nothing written above `resident`.
    clean_scans: u8,
    /// Resets since the last scan while scans are skipped.
    blind_resets: u8,
}

impl History {
    /// Whether this reset asks the kernel what was written, rather than decommit blindly.
    fn scans(&self) -> bool {
        let rescans = self.clean_scans.saturating_sub(CLEAN_SCANS_BEFORE_BLIND).min(3);
        let every = (RESCAN_EVERY << rescans).min(RESCAN_EVERY_MAX);
        self.clean_scans < CLEAN_SCANS_BEFORE_BLIND || self.blind_resets >= every
    }

    /// The clean-scan streak, which a slot new to the same module memory starts from.
    pub fn streak(&self) -> u8 {
        self.clean_scans
    }

    /// This history for a slot that changes module memory: its resident prefix stays (those
    /// pages are still there), what it learned about its tenants gives way to `streak`, what
    /// the new module memory's other slots learned.
    pub fn for_new_key(self, streak: u8) -> History {
        History {
            resident: self.resident,
            clean_scans: streak,
            blind_resets: 0,
        }
    }

    #[cfg(test)]
    pub fn with_resident(self, resident: usize) -> History {
        History { resident, ..self }
    }
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
    /// `linear_memory_keep_resident`, page-aligned.
    pub keep: usize,
    /// The page map, if the kernel has one and the pool may use it.
    pub map: Option<&'a PageMap>,
    pub page: usize,
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
    let keep = policy.keep.min(accessible);
    let image = job.image.as_ref().map_or(0..0, |i| {
        i.offset().min(accessible)..(i.offset() + i.len()).min(accessible)
    });
    let mut known = history.resident.min(keep);
    let mut decommit = Covers::default();
    // The resident prefix: zeroed in place, except image pages, which go back to the file.
    for part in split(&(0..known), &image) {
        zero_or_cover(bytes, part, &image, &mut decommit);
    }
    let unknown = known..accessible;
    let scan = policy.map.filter(|_| history.scans());
    let mut written = Vec::new();
    let scanned = !unknown.is_empty()
        && scan.is_some_and(|map| bytes.written(map, unknown.clone(), &mut written).is_ok());
    if scanned {
        history.blind_resets = 0;
        history.clean_scans = if written.is_empty() {
            history.clean_scans.saturating_add(1)
        } else {
            0
        };
        let prefix = known;
        for range in &written {
            let range = range.start + prefix..range.end + prefix;
            for part in split(&range, &image) {
                if part.is_empty() {
                    continue;
                }
                if image.contains(&part.start) {
                    decommit.widen_image(part);
                    continue;
                }
                if part.start < keep {
                    let kept = part.start..part.end.min(keep);
                    known = known.max(kept.end);
                    zero_or_cover(bytes, kept, &image, &mut decommit);
                }
                Covers::widen(&mut decommit.above, part.start.max(keep)..part.end);
            }
        }
    } else if !unknown.is_empty() && policy.map.is_some() {
        // Blind (or the scan failed): everything not known to be resident goes back.
        history.blind_resets = history.blind_resets.saturating_add(1);
        decommit.above = Some(unknown);
    } else if !unknown.is_empty() {
        // No page map: look at each kept page that is not known to be resident, and zero
        // the ones a tenant wrote (they join the prefix); decommit the image and the rest.
        for start in (known..keep).step_by(policy.page) {
            if image.contains(&start) {
                continue;
            }
            let page = start..start + policy.page;
            if !bytes.is_zero(page.clone()) {
                bytes.zero(page);
                known = start + policy.page;
            }
        }
        decommit.widen_image(image.clone());
        if keep < accessible {
            decommit.above = Some(keep..accessible);
        }
    }
    // Pages kept resident above what this tenant could reach stay so (zeroed by the reset
    // that last reached them), for a later tenant or the slot's cooling to find.
    history.resident = known.max(history.resident);
    let mut decommits = Decommits::default();
    for range in decommit.ranges() {
        decommits.push(bytes.address_range(range));
    }
    bytes.protect_from(job.initial.min(accessible))?;
    Ok(decommits)
}

/// Zeroes `part` if it lies below the image, or adds it to the image's decommit.
fn zero_or_cover(bytes: &mut SlotBytes, part: Range<usize>, image: &Range<usize>, decommit: &mut Covers) {
    if part.is_empty() {
        return;
    }
    if image.contains(&part.start) {
        decommit.widen_image(part);
    } else {
        bytes.zero(part);
    }
}

/// At most two ranges to decommit: one over the image's pages, one over the rest (clean pages
/// inside either lose nothing).
#[derive(Default)]
struct Covers {
    image: Option<Range<usize>>,
    above: Option<Range<usize>>,
}

impl Covers {
    fn widen(cover: &mut Option<Range<usize>>, range: Range<usize>) {
        if range.is_empty() {
            return;
        }
        *cover = Some(match cover.take() {
            Some(c) => c.start.min(range.start)..c.end.max(range.end),
            None => range,
        });
    }

    fn widen_image(&mut self, range: Range<usize>) {
        Self::widen(&mut self.image, range);
    }

    /// The ranges, merged if they overlap or touch.
    fn ranges(self) -> impl Iterator<Item = Range<usize>> {
        let merged = match (&self.image, &self.above) {
            (Some(a), Some(b)) if a.start <= b.end && b.start <= a.end => {
                [Some(a.start.min(b.start)..a.end.max(b.end)), None]
            }
            _ => [self.image, self.above],
        };
        merged.into_iter().flatten()
    }
}

/// `range` cut at the edges of `image`: the parts before, inside and after it.
fn split(range: &Range<usize>, image: &Range<usize>) -> [Range<usize>; 3] {
    let before = range.start..range.end.min(image.start).max(range.start);
    let inside = range.start.max(image.start)..range.end.min(image.end);
    let after = range.start.max(image.end).min(range.end)..range.end;
    // No overlap gives an inverted `inside`: make it empty.
    let inside = if inside.start < inside.end { inside } else { 0..0 };
    [before, inside, after]
}
