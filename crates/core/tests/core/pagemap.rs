//! `PAGEMAP_SCAN`: the written pages of a range, and nothing else.

use berth_core::{Mmap, sys};

fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (a, b) >= (major, minor)
}

#[test]
fn written_pages_are_reported_and_read_or_untouched_ones_are_not() {
    let Some(map) = sys::page_map() else {
        assert!(
            !kernel_at_least(6, 7),
            "PAGEMAP_SCAN exists since Linux 6.7 but was not found"
        );
        return;
    };
    let page = sys::page_size();
    let mut mmap = Mmap::with_accessible(8 * page, 8 * page).unwrap();
    let base = std::ptr::NonNull::new(mmap.as_mut_ptr()).unwrap();
    // SAFETY: all eight pages are ours and accessible.
    unsafe {
        base.add(page).write(1);
        base.add(3 * page + 17).write(2);
        base.add(4 * page).write(3);
        std::ptr::read_volatile(base.add(6 * page).as_ptr());
    }
    let mut written = Vec::new();
    map.written(base, 8 * page, &mut written).unwrap();
    assert_eq!(
        written,
        vec![page..2 * page, 3 * page..5 * page],
        "pages 1, 3 and 4 were written; 6 was only read"
    );

    mmap.decommit(0, 8 * page).unwrap();
    written.clear();
    map.written(base, 8 * page, &mut written).unwrap();
    assert!(
        written.is_empty(),
        "decommitted pages are not written: {written:?}"
    );
}

#[test]
fn many_written_runs_are_all_reported() {
    let Some(map) = sys::page_map() else {
        // Skipping is allowed only off CI, and says so.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "many_written_runs_are_all_reported needs PAGEMAP_SCAN (CI=true: CI must provide it)"
        );
        eprintln!("skipped many_written_runs_are_all_reported: this kernel has no PAGEMAP_SCAN");
        return;
    };
    let page = sys::page_size();
    let pages = 200;
    let mut mmap = Mmap::with_accessible(pages * page, pages * page).unwrap();
    let base = std::ptr::NonNull::new(mmap.as_mut_ptr()).unwrap();
    for i in (0..pages).step_by(2) {
        // SAFETY: inside our accessible mapping.
        unsafe { base.add(i * page).write(1) };
    }
    let mut written = Vec::new();
    map.written(base, pages * page, &mut written).unwrap();
    assert_eq!(
        written.len(),
        pages / 2,
        "every other page, more runs than one scan returns"
    );
    assert!(
        written
            .iter()
            .enumerate()
            .all(|(i, r)| *r == (2 * i * page..(2 * i + 1) * page))
    );
}
