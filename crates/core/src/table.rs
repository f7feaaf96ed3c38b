//! Tables: pointer-sized opaque words, 0 meaning null.
//!
//! A table either owns a `Vec` ([`Table::new_dynamic`], which may reallocate on grow) or
//! lives in `capacity` words of a backend's slab ([`Table::new_static`], never moves).

use std::ptr::NonNull;

use anyhow::{Result, anyhow};

use crate::error::OutOfBounds;
use crate::limiter::{Resource, ResourceLimiter, admit_initial};
use crate::types::TableType;
use crate::units::exact_bytes;
use crate::vmcontext::VMTableDefinition;

/// A table.
///
/// Invariants: `size` never exceeds `maximum` nor the storage's capacity; `base` points at
/// the storage's first word (for a `Vec`, taken with `as_mut_ptr` after every reallocation, so
/// compiled code may write through it), and the first `size` words there are the elements.
#[derive(Debug)]
pub struct Table {
    ty: TableType,
    base: NonNull<usize>,
    storage: Storage,
    size: usize,
    maximum: Option<usize>,
}

#[derive(Debug)]
enum Storage {
    /// `elements.len() == size`; only reached through `base` once created.
    Vec(Vec<usize>),
    /// `capacity` words at `base`, inside a slab a backend owns.
    Static { capacity: usize },
}

// SAFETY: a table owns its words (`Vec`) or has exclusive use of them by `new_static`'s
// contract; nothing in it is tied to a thread.
unsafe impl Send for Table {}
// SAFETY: `&Table` only reads; every mutation takes `&mut self`.
unsafe impl Sync for Table {}

/// `len` zero words from the global allocator, which zeroes them itself (for a large table by
/// mapping fresh pages, which the kernel fills only when touched), or `None` if it refuses.
fn zeroed_words(len: usize) -> Option<Vec<usize>> {
    if len == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<usize>(len).ok()?;
    // SAFETY: `layout` is not zero-sized (`len > 0` words of a non-zero-sized type).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<usize>();
    if ptr.is_null() {
        return None;
    }
    // SAFETY: `ptr` comes from the global allocator with the layout of `len` words (so the
    // `Vec`, with capacity `len`, frees it with that layout), and all `len` words are
    // initialized: all-zero bytes are a valid `usize`.
    Some(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

fn initial_size(
    ty: &TableType,
    backend_max: Option<usize>,
    limiter: Option<&mut (dyn ResourceLimiter + '_)>,
) -> Result<(usize, Option<usize>)> {
    ty.validate()?;
    let minimum = usize::try_from(ty.minimum)
        .map_err(|_| anyhow!("table minimum of {} elements does not fit the host", ty.minimum))?;
    let type_max = ty.maximum.and_then(|m| usize::try_from(m).ok());
    let maximum = admit_initial(Resource::Table, minimum, type_max, backend_max, limiter)?;
    Ok((minimum, maximum))
}

impl Table {
    /// A table in its own `Vec`, all null; `backend_max` caps its size in elements.
    ///
    /// ```
    /// use berth_core::{Table, TableType};
    ///
    /// let mut table = Table::new_dynamic(&TableType::new(2, Some(3)), None, None)?;
    /// assert_eq!(table.size(), 2);
    /// assert_eq!(table.grow(1, 7, None)?, Some(2));
    /// assert_eq!(table.get(2), Some(7));
    /// assert_eq!(table.grow(1, 0, None)?, None);
    /// # anyhow::Ok(())
    /// ```
    pub fn new_dynamic(
        ty: &TableType,
        backend_max: Option<usize>,
        limiter: Option<&mut (dyn ResourceLimiter + '_)>,
    ) -> Result<Table> {
        let (size, maximum) = initial_size(ty, backend_max, limiter)?;
        let bytes = size
            .checked_mul(size_of::<usize>())
            .ok_or_else(|| anyhow!("a table of {size} elements overflows the address space"))?;
        let mut elements = zeroed_words(size).ok_or_else(|| {
            anyhow!(
                "the allocator refused {} for its elements",
                exact_bytes(bytes as u64)
            )
        })?;
        let base = NonNull::new(elements.as_mut_ptr()).unwrap_or(NonNull::dangling());
        Ok(Table {
            ty: *ty,
            base,
            storage: Storage::Vec(elements),
            size,
            maximum,
        })
    }

    /// A table in `capacity` words at `base`, which is also its maximum size.
    ///
    /// # Safety
    ///
    /// `base..base + capacity` is valid for reads and writes, aligned for `usize`, every word
    /// in it is 0, and nothing else uses it until this `Table` is handed back to the caller (who resets it
    /// before any other use). The caller keeps it alive as long as the `Table` lives.
    pub unsafe fn new_static(
        ty: &TableType,
        base: NonNull<usize>,
        capacity: usize,
        limiter: Option<&mut (dyn ResourceLimiter + '_)>,
    ) -> Result<Table> {
        if !base.as_ptr().addr().is_multiple_of(align_of::<usize>()) {
            return Err(anyhow!("static table at {base:p} is not aligned for a word"));
        }
        let (size, maximum) = initial_size(ty, Some(capacity), limiter)?;
        Ok(Table {
            ty: *ty,
            base,
            storage: Storage::Static { capacity },
            size,
            maximum,
        })
    }

    /// The table's type.
    pub fn ty(&self) -> &TableType {
        &self.ty
    }

    /// Current number of elements.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The largest number of elements this table may reach, if bounded.
    pub fn maximum(&self) -> Option<usize> {
        self.maximum
    }

    /// Whether the table lives in a backend's slab (and so never moves).
    pub fn is_static(&self) -> bool {
        matches!(self.storage, Storage::Static { .. })
    }

    /// The elements.
    pub fn elements(&self) -> &[usize] {
        // SAFETY: the first `size` words at `base` are this table's elements (type invariant),
        // used by no one else; `&self` means no `&mut` slice is live.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.size) }
    }

    /// The elements, for writing.
    pub fn elements_mut(&mut self) -> &mut [usize] {
        // SAFETY: as in `elements`, and `&mut self` makes the slice exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr(), self.size) }
    }

    /// The definition compiled code reads (and may write elements through).
    pub fn vmtable(&self) -> VMTableDefinition {
        VMTableDefinition {
            base: self.base.as_ptr(),
            current_elements: self.size,
        }
    }

    fn out_of_bounds(&self, index: u64, len: u64) -> anyhow::Error {
        anyhow::Error::new(OutOfBounds {
            resource: "table".into(),
            offset: index,
            len,
            size: self.size as u64,
        })
    }

    /// Element `index`, or `None` past the end.
    pub fn get(&self, index: u64) -> Option<usize> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.elements().get(i).copied())
    }

    /// Sets element `index`; an [`OutOfBounds`] error past the end.
    pub fn set(&mut self, index: u64, value: usize) -> Result<()> {
        let slot = usize::try_from(index)
            .ok()
            .and_then(|i| self.elements_mut().get_mut(i));
        match slot {
            Some(slot) => {
                *slot = value;
                Ok(())
            }
            None => Err(self.out_of_bounds(index, 1)),
        }
    }

    /// Sets `len` elements from `index` to `value`; an [`OutOfBounds`] error (and nothing
    /// written) if they are not all inside.
    pub fn fill(&mut self, index: u64, value: usize, len: u64) -> Result<()> {
        let range = usize::try_from(index)
            .ok()
            .zip(usize::try_from(len).ok())
            .and_then(|(start, len)| Some(start..start.checked_add(len)?))
            .filter(|range| range.end <= self.size);
        match range {
            Some(range) => {
                self.elements_mut()[range].fill(value);
                Ok(())
            }
            None => Err(self.out_of_bounds(index, len)),
        }
    }

    /// Grows by `delta` elements set to `init`: `Ok(Some(old_size))`, or `Ok(None)` (the
    /// spec's -1) if the maximum, the storage or the limiter says no, with the table
    /// unchanged. A `Vec` table may move: re-read [`Table::vmtable`] afterwards.
    pub fn grow(
        &mut self,
        delta: u64,
        init: usize,
        limiter: Option<&mut (dyn ResourceLimiter + '_)>,
    ) -> Result<Option<u64>> {
        let old = self.size;
        let new = usize::try_from(delta)
            .ok()
            .and_then(|d| old.checked_add(d))
            .filter(|&n| n as u64 <= self.ty.maximum.unwrap_or_else(|| self.ty.absolute_max_elements()))
            .filter(|&n| self.maximum.is_none_or(|max| n <= max));
        let Some(new) = new else {
            return Ok(None);
        };
        if delta == 0 {
            return Ok(Some(old as u64));
        }
        if let Some(limiter) = limiter
            && !limiter.table_growing(old, new, self.maximum)?
        {
            return Ok(None);
        }
        match &mut self.storage {
            Storage::Vec(v) => {
                if v.try_reserve(new - old).is_err() {
                    return Ok(None);
                }
                v.resize(new, init);
                self.base = NonNull::new(v.as_mut_ptr()).unwrap_or(NonNull::dangling());
                self.size = new;
            }
            Storage::Static { capacity } => {
                if new > *capacity {
                    return Ok(None);
                }
                self.size = new;
                self.elements_mut()[old..].fill(init);
            }
        }
        Ok(Some(old as u64))
    }
}
