//! How function indices become table element words.

use crate::index::FuncIndex;
use crate::segments::ElementItem;

/// Turns a module's functions into table element words (for `ref.func` and element
/// segments). Must not return 0 for a function: 0 is null.
///
/// Any `Fn(FuncIndex) -> usize + Sync` is a resolver. A whole segment is resolved with one
/// call of [`FuncResolver::resolve_items`], so a closure's body is inlined into the loop rather
/// than called once per element through a pointer.
pub trait FuncResolver: Sync {
    /// The word for `func`.
    fn resolve(&self, func: FuncIndex) -> usize;

    /// Writes the word for each of `items` into `out` (null items as 0). `out` has exactly
    /// `items.len()` words.
    fn resolve_items(&self, items: &[ElementItem], out: &mut [usize]) {
        for (item, word) in items.iter().zip(out) {
            *word = match item {
                ElementItem::Func(func) => self.resolve(*func),
                ElementItem::Null => 0,
            };
        }
    }
}

impl<F: Fn(FuncIndex) -> usize + Sync> FuncResolver for F {
    fn resolve(&self, func: FuncIndex) -> usize {
        self(func)
    }
}
