//! What this machine can do to a tenant's pages, for the cases that change the kernel's view of
//! them (swap, the inactive list, huge pages, a fork) before the next tenant checks its bytes.

use std::ptr::NonNull;
use std::sync::OnceLock;

use berth_core::sys::{self, PageEvent, PageState};
use berth_core::{Mmap, Table};

/// Whether the kernel pushes written pages to swap here: a page written and paged out is
/// reported swapped by the page map. False without swap, or without `PAGEMAP_SCAN` to tell.
pub fn swap_works() -> bool {
    static WORKS: OnceLock<bool> = OnceLock::new();
    *WORKS.get_or_init(|| {
        let Some(map) = sys::page_map() else {
            return false;
        };
        let page = sys::page_size();
        let Ok(mut mmap) = Mmap::with_accessible(page, page) else {
            return false;
        };
        let Some(base) = NonNull::new(mmap.as_mut_ptr()) else {
            return false;
        };
        // SAFETY: the page is ours, accessible, and no reference into it is live.
        unsafe { base.as_ptr().write_volatile(1) };
        sys::provoke(base.as_ptr(), page, PageEvent::SwapOut).is_ok()
            && map.count(base, page, PageState::Swapped).unwrap_or(0) > 0
    })
}

/// Whether a case that needs `what` may run: true if `available`. Otherwise it says that it
/// skipped and why, and returns false; under `CI=true` it fails instead, since CI is set up to
/// have what these cases need.
pub fn require(case: &str, what: &str, available: bool) -> bool {
    if available {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{case} needs {what}, which this machine lacks (CI=true: CI must provide it)");
    }
    eprintln!("skipped {case}: this machine lacks {what}");
    false
}

/// The page map, for a test that needs `PAGEMAP_SCAN`: `None`, after saying that `case` skipped,
/// where the kernel lacks it (and a panic under `CI=true`, as [`require`] does).
pub fn page_map_for(case: &str) -> Option<&'static sys::PageMap> {
    let map = sys::page_map();
    require(case, "PAGEMAP_SCAN", map.is_some())
        .then_some(map)
        .flatten()
}

/// The page-aligned span of `len` bytes at `ptr`, for telling the kernel about them.
fn span(ptr: *const u8, len: usize) -> Option<(NonNull<u8>, usize)> {
    let page = sys::page_size();
    let start = ptr.addr() / page * page;
    let end = (ptr.addr() + len).next_multiple_of(page);
    let at = NonNull::new(ptr.with_addr(start).cast_mut())?;
    (end > start).then_some((at, end - start))
}

/// Asks the kernel for `event` on `len` bytes at `ptr` and returns how many of their pages it
/// then holds in the state the event aims for (swapped, or huge; for `Deactivate`, present).
/// An event the kernel refuses (no huge page to be had) changes nothing and counts 0.
pub fn disturb(ptr: *const u8, len: usize, event: PageEvent) -> usize {
    let Some((at, len)) = span(ptr, len) else {
        return 0;
    };
    if sys::provoke(at.as_ptr(), len, event).is_err() {
        return 0;
    }
    let state = match event {
        PageEvent::SwapOut => PageState::Swapped,
        PageEvent::HugePage => PageState::Huge,
        PageEvent::Deactivate => PageState::Present,
    };
    sys::page_map().map_or(0, |map| map.count(at, len, state).unwrap_or(0))
}

/// [`disturb`] on the elements of `table`.
pub fn disturb_table(table: &Table, event: PageEvent) -> usize {
    let elements = table.elements();
    disturb(elements.as_ptr().cast(), size_of_val(elements), event)
}
