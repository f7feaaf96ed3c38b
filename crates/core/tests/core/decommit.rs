//! `sys::decommit_all`: many ranges given back at once read as zeros; the rest is untouched.

use berth_core::{Mmap, sys};

#[test]
fn decommitted_ranges_read_as_zeros_and_others_keep_their_bytes() {
    let page = sys::page_size();
    let pages = 80; // more ranges than one system call takes
    let mut mmap = Mmap::with_accessible(pages * page, pages * page).unwrap();
    let base = mmap.as_mut_ptr();
    // SAFETY: all pages are ours and accessible; no reference into them is held.
    unsafe { base.write_bytes(0xA5, pages * page) };
    // Every even page, one range each: 40 ranges, plus one two-page range at the end.
    let start = base.addr();
    let mut ranges: Vec<_> = (0..pages - 4)
        .step_by(2)
        .map(|i| start + i * page..start + (i + 1) * page)
        .collect();
    ranges.push(start + (pages - 2) * page..start + pages * page);
    // SAFETY: the ranges are page-aligned, inside `mmap` (a private anonymous mapping made by
    // `reserve`), and no reference into them is live.
    unsafe { sys::decommit_all(&ranges) }.unwrap();
    // SAFETY: all pages are readable.
    let bytes = unsafe { std::slice::from_raw_parts(base, pages * page) };
    for i in 0..pages {
        let expect = if i >= pages - 2 || (i < pages - 4 && i % 2 == 0) {
            0
        } else {
            0xA5
        };
        let page_bytes = &bytes[i * page..(i + 1) * page];
        assert!(
            page_bytes.iter().all(|&b| b == expect),
            "page {i} should read {expect:#x}"
        );
    }
}

#[test]
fn a_range_the_kernel_refuses_is_an_error() {
    let page = sys::page_size();
    let mut mmap = Mmap::with_accessible(4 * page, 4 * page).unwrap();
    let start = mmap.as_mut_ptr().addr();
    // Not page-aligned: neither `process_madvise` nor `madvise` takes it.
    let ranges = [start..start + page, start + 1..start + page + 1];
    // SAFETY: both ranges are inside `mmap`, ours, with no reference into them; the second
    // is refused before anything is discarded.
    assert!(unsafe { sys::decommit_all(&ranges) }.is_err());
}
