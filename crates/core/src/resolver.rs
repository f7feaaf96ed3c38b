//! How function indices become table element words.

use cranelift_entity::packed_option::PackedOption;

use crate::index::FuncIndex;

/// Turns a module's functions into table element words (for `ref.func` and element
/// segments). Must not return 0 for a function: 0 is null.
///
/// Any `Fn(FuncIndex) -> usize + Sync` is a resolver. A whole segment is resolved with one
/// call of [`FuncResolver::resolve_funcs`], so a closure's body is inlined into the loop rather
/// than called once per element through a pointer.
pub trait FuncResolver: Sync {
    /// The word for `func`.
    fn resolve(&self, func: FuncIndex) -> usize;

    /// Writes the word for each of `funcs` into `out` (null entries as 0). `out` has exactly
    /// `funcs.len()` words. Override it when the words can be computed faster in bulk.
    fn resolve_funcs(&self, funcs: &[PackedOption<FuncIndex>], out: &mut [usize]) {
        for (func, word) in funcs.iter().zip(out) {
            *word = func.expand().map_or(0, |func| self.resolve(func));
        }
    }
}

impl<F: Fn(FuncIndex) -> usize + Sync> FuncResolver for F {
    fn resolve(&self, func: FuncIndex) -> usize {
        self(func)
    }
}
