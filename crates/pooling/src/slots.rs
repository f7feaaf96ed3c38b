//! The memory slots of one shard: each slot's state, its transitions, and slot choice in O(1).
//!
//! ```text
//!            take                         release                 finish (reset done)
//!   Cold ─────────────┐          Held ─────────────> Resetting ──────────────> Warm
//!   Stale ── take ────┼───────>  │                       │                       │
//!   Warm ─── take ────┘          │ abandon               │ finish (reset failed) │ evict, purge
//!     ^                          v                       v                       v
//!     │                        Stale <───────────────────┘     Stale, then cooled: Cold
//!     └── (reset done, kept warm)
//! ```
//!
//! Choice: a warm slot of the same key (nothing about it needs to change),
//! else a cold or stale slot while the warm ones are under their cap, else the least recently
//! used warm slot. Warm slots sit in two lists at once, an LRU list of all of them and a list
//! per key, and each knows its place in both, so every transition is O(1).
//!
//! Bookkeeping is reserved when the shard is built (so a pool too large for it fails then, with
//! an error, rather than aborting later) and filled as slots are first used: a slot never used
//! is cold with nothing accessible, and costs nothing until then.

use std::collections::TryReserveError;
use std::hash::Hash;

use berth_core::cranelift_entity::EntityRef;
use berth_core::cranelift_entity::packed_option::PackedOption;
use std::sync::Arc;

use berth_core::MemoryImage;

use crate::history::{History, Learned};

/// A map with a fast hash for small keys of integers (module ids and indices), which need no
/// protection against flooding: they are made by this process, not by tenants.
pub(crate) type FastMap<K, V> = rustc_hash::FxHashMap<K, V>;

/// A slot's number in its shard (the pool's own numbers are `u32`s: a shard's first slot plus
/// this).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct SlotId(u32);
berth_core::cranelift_entity::entity_impl!(SlotId, "slot");

/// A memory slot reset for `key` and idle: exactly as the next tenant of `key` wants it.
#[derive(Debug)]
pub(crate) struct Warm<K> {
    /// The module memory it was reset for.
    pub key: K,
    /// Bytes from the slot's start that are readable and writable (the module's initial size):
    /// they read as zeros, or as `image` where it is mapped. The rest is `PROT_NONE` and zero.
    pub accessible: usize,
    /// The copy-on-write image mapped in the slot, its bytes as the image has them.
    pub image: Option<Arc<MemoryImage>>,
    /// What its resets learned, its kept pages among it.
    pub history: History,
    /// When it turned warm (for the pool-wide LRU order, see [`crate::warm`]).
    pub stamp: u64,
    links: Links,
}

impl<K> Warm<K> {
    /// A slot reset for `key`.
    pub fn new(key: K, accessible: usize, image: Option<Arc<MemoryImage>>, history: History) -> Self {
        Warm {
            key,
            accessible,
            image,
            history,
            stamp: 0,
            links: Links::default(),
        }
    }
}

/// A slot out of the pool's idle set: handed to a tenant of `key`, or given back and being
/// reset.
#[derive(Debug)]
pub(crate) struct Taken<K> {
    pub key: K,
    /// What the slot's resets learned, carried to its next reset.
    pub history: History,
    /// `key`'s module was dropped meanwhile: the slot turns cold, not warm, when reset.
    purged: bool,
}

/// What an idle slot holds, as [`MemorySlots::take`] hands it over.
#[derive(Debug)]
pub(crate) enum Idle<K> {
    /// Its first `accessible` bytes are readable and writable and read as zeros, no page of
    /// a tenant is resident, no image is mapped, the rest is `PROT_NONE`.
    Cold { accessible: usize },
    /// Nothing is known about its mapping (a set-up, reset or decommit failed part-way, or it
    /// still maps an image it was reset for): it is re-mapped before its next use.
    Stale,
    /// Reset for a module memory.
    Warm(Warm<K>),
}

/// One memory slot's state.
///
/// Invariants: a used slot is in the cold list iff it is `Cold` or `Stale`, in the LRU list
/// and its key's list iff it is `Warm`, and in the resetting list iff it is `Resetting`; the
/// held count is the number of `Held` slots; only
/// `Held` slots are a tenant's, and only `Resetting` ones are being reset (or wait for their
/// decommits); every other state is idle, its bytes as its [`Idle`] variant says.
///
/// What a reset must cover before a slot leaves `Resetting` for `Warm`: every page its tenant
/// could have written (its accessible bytes at deallocation, growth included), whatever state
/// the kernel holds the page in: present, swapped out, under migration, in a transparent huge
/// page, a private copy of an image page. A page may be skipped only where the kernel proves it
/// clean (never touched since the last decommit, the shared zero page, the image file's own
/// page); anything it cannot classify is reset. [`crate::reset`] does this; a reset or
/// decommit that fails makes the slot `Stale` instead, and a stale slot is re-mapped before
/// its next use.
#[derive(Debug)]
enum SlotState<K> {
    Idle(Idle<K>),
    Held(Taken<K>),
    Resetting(Taken<K>),
}

/// A warm slot's places in the LRU list and in its key's list (packed: a slot's state is
/// moved whole at every transition, and under 128 bytes it moves without a call to `memcpy`).
#[derive(Debug, Clone, Copy, Default)]
struct Links {
    prev: PackedOption<SlotId>,
    next: PackedOption<SlotId>,
    key_pos: u32,
}

/// How a reset ended, for [`MemorySlots::finish`]'s caller.
#[derive(Debug)]
pub(crate) struct Finished<K> {
    /// The slot's module was purged while it was taken: it went out, not warm.
    pub purged: bool,
    /// A slot pushed out (this one if purged, or the least recently used warm one), `Stale`
    /// until its pages are given back and it is [`cooled`](MemorySlots::cooled).
    pub out: Option<(SlotId, Warm<K>)>,
}

/// How a slot was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice<K> {
    /// It was last used by the same key: nothing of its state needs to change.
    Affine,
    /// It was cold or stale (never used, pushed out of the warm set, or failed).
    Cold,
    /// It was the least recently used warm slot, last used by this other key.
    Stolen(K),
}

/// A shard's memory slots. Not thread-safe by itself: the pool keeps it behind a lock.
#[derive(Debug)]
pub(crate) struct MemorySlots<K> {
    /// Slots `states.len()..len` have never been used: cold with nothing accessible.
    states: Vec<SlotState<K>>,
    len: u32,
    /// Used slots that are cold or stale; the last one goes first.
    cold: Vec<SlotId>,
    /// Least recently freed warm slot.
    lru_head: Option<SlotId>,
    /// Most recently freed warm slot.
    lru_tail: Option<SlotId>,
    /// Each key's warm slots. A key whose slots are all taken keeps its empty list (and its
    /// room) until its module is purged: slots that pass through the decommit queue together
    /// would otherwise free the list and allocate it again at every batch.
    per_key: FastMap<K, Vec<SlotId>>,
    /// Slots being reset (a few: each thread resets one at a time, and a queue holds a few
    /// batches).
    resetting: Vec<SlotId>,
    /// Slots handed to tenants.
    held: usize,
    warm: usize,
    /// The resident bytes of the warm slots, summed.
    warm_resident: usize,
    max_warm: usize,
}

impl<K: Copy + Eq + Hash + std::fmt::Debug> MemorySlots<K> {
    /// `len` slots, all cold; at most `max_warm` kept warm. Fails if the bookkeeping for `len`
    /// slots cannot be reserved.
    pub fn new(len: u32, max_warm: usize) -> Result<Self, TryReserveError> {
        let mut states = Vec::new();
        states.try_reserve_exact(len as usize)?;
        let mut cold = Vec::new();
        cold.try_reserve_exact(len as usize)?;
        Ok(MemorySlots {
            states,
            len,
            cold,
            lru_head: None,
            lru_tail: None,
            per_key: FastMap::default(),
            resetting: Vec::new(),
            held: 0,
            warm: 0,
            warm_resident: 0,
            max_warm,
        })
    }

    /// Bytes of bookkeeping one slot costs.
    pub const SLOT_BYTES: usize = size_of::<SlotState<K>>() + size_of::<SlotId>();

    /// Warm slots now.
    pub fn warm(&self) -> usize {
        self.warm
    }

    /// When the least recently used warm slot turned warm, if any slot is warm.
    pub fn oldest_stamp(&self) -> Option<u64> {
        self.lru_head.map(|slot| self.warm_at(slot).stamp)
    }

    /// The resident bytes the warm slots keep.
    pub fn warm_resident(&self) -> usize {
        self.warm_resident
    }

    /// Slots handed out or being reset.
    #[cfg(test)]
    pub fn taken(&self) -> usize {
        self.states
            .iter()
            .filter(|s| matches!(s, SlotState::Held(_) | SlotState::Resetting(_)))
            .count()
    }

    /// Changes the cap on warm slots, for the next [`take`](Self::take) and
    /// [`finish`](Self::finish) (warm slots over a lowered cap stay until then).
    pub fn set_max_warm(&mut self, max_warm: usize) {
        self.max_warm = max_warm;
    }

    fn may_take_cold(&self) -> bool {
        let any_cold = !self.cold.is_empty() || self.states.len() < self.len as usize;
        any_cold && (self.warm < self.max_warm || self.lru_head.is_none())
    }

    /// Whether a slot of `key` is warm.
    pub fn has_warm(&self, key: K) -> bool {
        self.per_key.get(&key).is_some_and(|list| !list.is_empty())
    }

    /// Warm slots and slots being reset (which turn warm soon): what counts against the
    /// pool's warm cap.
    pub fn warm_or_resetting(&self) -> usize {
        self.warm + self.resetting.len()
    }

    /// Those and the slots handed to tenants: what would be warm once every tenant left.
    pub fn returning(&self) -> usize {
        self.warm_or_resetting() + self.held
    }

    /// Whether a slot of `key` is being reset: it turns warm soon.
    pub fn resetting(&self, key: K) -> bool {
        self.resetting
            .iter()
            .any(|&slot| matches!(&self.states[slot.index()], SlotState::Resetting(t) if t.key == key))
    }

    /// Whether [`take`](Self::take) for `key` would take another key's warm slot (or find
    /// nothing): no slot of `key` is warm and no cold one may be taken.
    pub fn would_steal(&self, key: K) -> bool {
        !self.has_warm(key) && !self.may_take_cold()
    }

    /// Hands a slot to a tenant of `key` (it becomes `Held`), or `None` if every slot is
    /// taken, and puts what it held in `held` (left as it was if none). A slot that was not
    /// `key`'s starts its history from `learned()` (what `key`'s other slots learned); the
    /// pages it kept for another key are in what it held, for the caller to give back. (It
    /// comes out through `held` because, returned beside the slot's number, its 128 bytes and
    /// the number would be copied by a call to `memcpy`.)
    pub fn take(
        &mut self,
        key: K,
        learned: impl FnOnce() -> Learned,
        held: &mut Idle<K>,
    ) -> Option<(SlotId, Choice<K>)> {
        let affine = self.per_key.get(&key).and_then(|list| list.last().copied());
        let (slot, choice) = if let Some(slot) = affine {
            self.unlink(slot);
            (slot, Choice::Affine)
        } else if self.may_take_cold() {
            let slot = match self.cold.pop() {
                Some(slot) => slot,
                None => {
                    let fresh = SlotId::from_u32(u32::try_from(self.states.len()).ok()?);
                    // Within the capacity reserved in `new`: no allocation.
                    self.states.push(SlotState::Idle(Idle::Cold { accessible: 0 }));
                    fresh
                }
            };
            (slot, Choice::Cold)
        } else {
            let slot = self.lru_head?;
            let previous = self.warm_at(slot).key;
            self.unlink(slot);
            (slot, Choice::Stolen(previous))
        };
        let taken = Taken {
            key,
            history: History::default(),
            purged: false,
        };
        self.held += 1;
        *held = match std::mem::replace(&mut self.states[slot.index()], SlotState::Held(taken)) {
            SlotState::Idle(idle) => idle,
            other => unreachable!("slot {slot} chosen while {other:?}"),
        };
        // The history moves to the held slot if the slot stays with its key; a slot taken from
        // another key starts afresh, and the caller gives back the pages it kept for that key
        // (they are still in `idle`), which would only take the new key's budget.
        let history = match (&mut *held, choice) {
            (Idle::Warm(warm), Choice::Affine) => std::mem::take(&mut warm.history),
            _ => History::default().for_new_key(learned()),
        };
        if let SlotState::Held(taken) = &mut self.states[slot.index()] {
            taken.history = history;
        }
        Some((slot, choice))
    }

    fn warm_at(&self, slot: SlotId) -> &Warm<K> {
        match &self.states[slot.index()] {
            SlotState::Idle(Idle::Warm(warm)) => warm,
            other => unreachable!("slot {slot} in a warm list while {other:?}"),
        }
    }

    fn links(&mut self, slot: SlotId) -> &mut Links {
        match &mut self.states[slot.index()] {
            SlotState::Idle(Idle::Warm(warm)) => &mut warm.links,
            other => unreachable!("slot {slot} in a warm list while {other:?}"),
        }
    }

    /// The tenant gave `slot` back: it is being reset (`Held` to `Resetting`). Returns its
    /// key and history for the reset.
    ///
    /// # Panics
    ///
    /// If `slot` is not held: a pool bug (a double free), never bad input.
    pub fn release(&mut self, slot: SlotId) -> (K, History) {
        let state = &mut self.states[slot.index()];
        let SlotState::Held(taken) = state else {
            panic!("slot {slot} given back while {state:?}");
        };
        let history = std::mem::take(&mut taken.history);
        let (key, purged) = (taken.key, taken.purged);
        *state = SlotState::Resetting(Taken {
            key,
            history: History::default(),
            purged,
        });
        self.resetting.push(slot);
        self.held -= 1;
        (key, history)
    }

    /// `slot`, held, was re-mapped before its tenant got it: nothing it kept resident is left.
    ///
    /// # Panics
    ///
    /// If `slot` is not held.
    pub fn remapped(&mut self, slot: SlotId) {
        match &mut self.states[slot.index()] {
            SlotState::Held(taken) => taken.history.kept.clear(),
            other => panic!("slot {slot} re-mapped while {other:?}"),
        }
    }

    /// Setting up `slot` for its tenant failed part-way: it is `Stale` (re-mapped before its
    /// next use).
    ///
    /// # Panics
    ///
    /// If `slot` is not held.
    pub fn abandon(&mut self, slot: SlotId) {
        let state = &mut self.states[slot.index()];
        assert!(
            matches!(state, SlotState::Held(_)),
            "slot {slot} abandoned while {state:?}"
        );
        *state = SlotState::Idle(Idle::Stale);
        self.cold.push(slot);
        self.held -= 1;
    }

    /// Ends `slot`'s reset: `Warm` for its key with what `reset` says, or `Stale` if the reset
    /// failed (`None`). A warm slot that puts the warm set over its cap pushes the least
    /// recently used one out, and a slot whose module was purged meanwhile goes straight out:
    /// what is pushed out is returned, `Stale` until [`cooled`](Self::cooled) (the caller
    /// gives its pages back first).
    ///
    /// # Panics
    ///
    /// If `slot` is not being reset.
    pub fn finish(&mut self, slot: SlotId, reset: Option<Warm<K>>) -> Finished<K> {
        let state = &mut self.states[slot.index()];
        let SlotState::Resetting(taken) = state else {
            panic!("slot {slot} finished while {state:?}");
        };
        let (key, purged) = (taken.key, taken.purged);
        if let Some(at) = self.resetting.iter().position(|&s| s == slot) {
            self.resetting.swap_remove(at);
        }
        let Some(warm) = reset else {
            *state = SlotState::Idle(Idle::Stale);
            self.cold.push(slot);
            return Finished { purged, out: None };
        };
        debug_assert!(warm.key == key, "slot {slot} reset for another key");
        if purged {
            *state = SlotState::Idle(Idle::Stale);
            self.cold.push(slot);
            return Finished {
                purged,
                out: Some((slot, warm)),
            };
        }
        *state = SlotState::Idle(Idle::Warm(warm));
        self.link(slot);
        let out = if self.warm > self.max_warm {
            self.evict()
        } else {
            None
        };
        Finished { purged, out }
    }

    /// Pushes the least recently used warm slot out, if any: it is `Stale` until
    /// [`cooled`](Self::cooled), and returned with what it held.
    pub fn evict(&mut self) -> Option<(SlotId, Warm<K>)> {
        let slot = self.lru_head?;
        self.unlink(slot);
        Some((slot, self.make_stale(slot)))
    }

    /// Pushes the least recently used warm slot that keeps resident pages out, if any, as
    /// [`evict`](Self::evict) does: for a cap on the bytes warm slots keep, which pushing out a
    /// slot that keeps none would not bring down. Walks past the older slots that keep none.
    pub fn evict_keeping(&mut self) -> Option<(SlotId, Warm<K>)> {
        let mut at = self.lru_head;
        while let Some(slot) = at {
            if self.warm_at(slot).history.kept.bytes() > 0 {
                self.unlink(slot);
                return Some((slot, self.make_stale(slot)));
            }
            at = self.links(slot).next.expand();
        }
        None
    }

    /// `slot`, pushed out, holds nothing any more (its pages were given back, no image is
    /// mapped): it is `Cold` with `accessible` bytes readable and writable.
    ///
    /// # Panics
    ///
    /// If `slot` is not stale.
    pub fn cooled(&mut self, slot: SlotId, accessible: usize) {
        let state = &mut self.states[slot.index()];
        assert!(
            matches!(state, SlotState::Idle(Idle::Stale)),
            "slot {slot} cooled while {state:?}"
        );
        *state = SlotState::Idle(Idle::Cold { accessible });
    }

    /// Forgets the module whose keys `matches`: its warm slots are pushed out (returned, as by
    /// [`evict`](Self::evict)), its held ones turn cold rather than warm when reset.
    pub fn purge(&mut self, matches: impl Fn(&K) -> bool) -> Vec<(SlotId, Warm<K>)> {
        let keys: Vec<K> = self.per_key.keys().filter(|k| matches(k)).copied().collect();
        let mut out = Vec::new();
        for key in keys {
            while let Some(slot) = self.per_key.get(&key).and_then(|list| list.last().copied()) {
                self.unlink(slot);
                out.push((slot, self.make_stale(slot)));
            }
            self.per_key.remove(&key);
        }
        for state in &mut self.states {
            if let SlotState::Held(taken) | SlotState::Resetting(taken) = state
                && matches(&taken.key)
            {
                taken.purged = true;
            }
        }
        out
    }

    /// Turns an unlinked warm slot stale, returning what it held.
    fn make_stale(&mut self, slot: SlotId) -> Warm<K> {
        self.cold.push(slot);
        match std::mem::replace(&mut self.states[slot.index()], SlotState::Idle(Idle::Stale)) {
            SlotState::Idle(Idle::Warm(warm)) => warm,
            other => unreachable!("slot {slot} pushed out while {other:?}"),
        }
    }

    /// Adds a slot that just turned warm to the tail of the LRU list and to its key's list.
    fn link(&mut self, slot: SlotId) {
        let key = self.warm_at(slot).key;
        let list = self.per_key.entry(key).or_default();
        let key_pos =
            u32::try_from(list.len()).expect("a key's list holds distinct slots, fewer than u32::MAX");
        list.push(slot);
        let prev = self.lru_tail;
        *self.links(slot) = Links {
            prev: prev.into(),
            next: None.into(),
            key_pos,
        };
        match prev {
            Some(tail) => self.links(tail).next = slot.into(),
            None => self.lru_head = Some(slot),
        }
        self.lru_tail = Some(slot);
        self.warm += 1;
        self.warm_resident += self.warm_at(slot).history.kept.bytes();
    }

    /// Removes a warm slot from the LRU list and its key's list (its state stays `Warm` until
    /// the caller changes it).
    fn unlink(&mut self, slot: SlotId) {
        let key = self.warm_at(slot).key;
        self.warm_resident -= self.warm_at(slot).history.kept.bytes();
        let Links { prev, next, key_pos } = *self.links(slot);
        match prev.expand() {
            Some(prev) => self.links(prev).next = next,
            None => self.lru_head = next.expand(),
        }
        match next.expand() {
            Some(next) => self.links(next).prev = prev,
            None => self.lru_tail = prev.expand(),
        }
        let list = self.per_key.get_mut(&key).expect("a warm slot's key has a list");
        list.swap_remove(key_pos as usize);
        let moved = list.get(key_pos as usize).copied();
        if let Some(moved) = moved {
            self.links(moved).key_pos = key_pos;
        }
        self.warm -= 1;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use proptest::prelude::*;

    use super::*;

    /// [`MemorySlots::take`], with what the slot held returned beside it.
    fn take<K: Copy + Eq + Hash + std::fmt::Debug>(
        slots: &mut MemorySlots<K>,
        key: K,
        learned: impl FnOnce() -> Learned,
    ) -> Option<(SlotId, Choice<K>, Idle<K>)> {
        let mut held = Idle::Stale;
        slots
            .take(key, learned, &mut held)
            .map(|(slot, choice)| (slot, choice, held))
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Take a slot for a key; abandon it at once (its set-up failed) if the flag says so.
        Take(u8, bool),
        /// Give back the `n`th taken slot (modulo), its reset succeeding or not, and cool what
        /// is pushed out (give its pages back) successfully or not.
        Give(usize, bool, bool),
        /// Purge a key, cooling what is pushed out successfully or not.
        Purge(u8, bool),
        /// Push out warm slots that keep pages, least recently used first, until the warm
        /// slots keep at most this many pages (a cap on kept bytes), cooling them.
        Squeeze(usize),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        let ok = || proptest::bool::weighted(0.9);
        let op = prop_oneof![
            3 => (0u8..5, proptest::bool::weighted(0.1)).prop_map(|(k, abandon)| Op::Take(k, abandon)),
            3 => (any::<usize>(), ok(), ok()).prop_map(|(i, reset, cool)| Op::Give(i, reset, cool)),
            1 => (0u8..5, ok()).prop_map(|(k, cool)| Op::Purge(k, cool)),
            1 => (0usize..6).prop_map(Op::Squeeze),
        ];
        proptest::collection::vec(op, 1..200)
    }

    /// Pages a slot warm for `key` keeps: none for some keys, so that pushing out by bytes
    /// has slots to walk past.
    fn kept_pages(key: u8) -> usize {
        usize::from(key % 3)
    }

    fn warm(key: u8) -> Warm<u8> {
        let mut history = History::default();
        history.kept.add(0..kept_pages(key) * 4096, usize::MAX, 4096);
        Warm::new(key, 4096, None, history)
    }

    proptest! {
        #[test]
        fn slots_are_exhaustive_unique_affine_and_capped(len in 1u32..12, max_warm in 0usize..6, ops in ops()) {
            let mut slots = MemorySlots::<u8>::new(len, max_warm).unwrap();
            // The model: who holds each taken slot, which key each warm slot is warm for.
            let mut taken: HashMap<SlotId, u8> = HashMap::new();
            let mut warm_for: HashMap<SlotId, u8> = HashMap::new();
            // Taken slots whose key was purged meanwhile.
            let mut purged: HashSet<SlotId> = HashSet::new();
            // Idle slots in no known state: they must come back stale, never cold.
            let mut stale: HashSet<SlotId> = HashSet::new();
            for op in ops {
                match op {
                    Op::Take(key, abandon) => {
                        let would_steal = slots.would_steal(key);
                        match take(&mut slots, key, Learned::default) {
                            Some((slot, choice, idle)) => {
                                prop_assert_eq!(would_steal, matches!(choice, Choice::Stolen(_)), "would_steal disagrees with take");
                                prop_assert!(slot.as_u32() < len);
                                prop_assert!(taken.insert(slot, key).is_none(), "slot {} handed out twice", slot);
                                let had_affine = warm_for.values().any(|&k| k == key);
                                prop_assert_eq!(had_affine, choice == Choice::Affine, "affinity not honoured");
                                match (choice, &idle) {
                                    (Choice::Affine, Idle::Warm(w)) => prop_assert_eq!(w.key, key),
                                    (Choice::Stolen(previous), Idle::Warm(w)) => prop_assert_eq!(w.key, previous),
                                    (Choice::Cold, Idle::Stale) => prop_assert!(stale.remove(&slot), "a slot came back stale for nothing"),
                                    (Choice::Cold, Idle::Cold { .. }) => prop_assert!(!stale.contains(&slot), "a stale slot came back cold"),
                                    other => prop_assert!(false, "{:?} handed over {:?}", other.0, other.1),
                                }
                                if let Idle::Warm(w) = idle {
                                    prop_assert_eq!(warm_for.remove(&slot), Some(w.key));
                                } else {
                                    prop_assert!(!warm_for.contains_key(&slot));
                                }
                                if abandon {
                                    slots.abandon(slot);
                                    taken.remove(&slot);
                                    stale.insert(slot);
                                }
                            }
                            None => {
                                prop_assert!(would_steal, "would_steal disagrees with take");
                                prop_assert_eq!(taken.len(), len as usize, "refused with free slots");
                            }
                        }
                    }
                    Op::Give(i, ok, cool) => {
                        if taken.is_empty() { continue; }
                        let mut sorted: Vec<_> = taken.keys().copied().collect();
                        sorted.sort_unstable();
                        let slot = sorted[i % sorted.len()];
                        let key = taken.remove(&slot).unwrap();
                        let before = slots.returning();
                        let (released, _) = slots.release(slot);
                        prop_assert_eq!(released, key);
                        prop_assert!(slots.resetting(key), "a slot being reset is not listed");
                        prop_assert_eq!(slots.returning(), before, "a release changed what returns");
                        let out = slots.finish(slot, ok.then(|| warm(key))).out;
                        let was_purged = purged.remove(&slot);
                        if ok && !was_purged {
                            warm_for.insert(slot, key);
                        }
                        if !ok {
                            stale.insert(slot);
                        }
                        if let Some((evicted, w)) = out {
                            // A purged slot goes out without ever being warm; any other was
                            // warm (if only for a moment, at a cap of 0).
                            if !(evicted == slot && was_purged) {
                                prop_assert_eq!(warm_for.remove(&evicted), Some(w.key));
                            }
                            if cool {
                                slots.cooled(evicted, w.accessible);
                            } else {
                                stale.insert(evicted);
                            }
                        }
                    }
                    Op::Purge(key, cool) => {
                        for (slot, w) in slots.purge(|k| *k == key) {
                            prop_assert_eq!(warm_for.remove(&slot), Some(key));
                            if cool {
                                slots.cooled(slot, w.accessible);
                            } else {
                                stale.insert(slot);
                            }
                        }
                        prop_assert!(!warm_for.values().any(|&k| k == key));
                        purged.extend(taken.iter().filter(|&(_, &k)| k == key).map(|(&slot, _)| slot));
                    }
                    Op::Squeeze(pages) => {
                        let keeping_before = warm_for.values().filter(|&&k| kept_pages(k) > 0).count();
                        let mut out = 0;
                        while slots.warm_resident() > pages * 4096 {
                            let Some((slot, w)) = slots.evict_keeping() else { break };
                            prop_assert!(w.history.kept.bytes() > 0, "a slot that keeps nothing was pushed out for bytes");
                            prop_assert_eq!(warm_for.remove(&slot), Some(w.key));
                            slots.cooled(slot, w.accessible);
                            out += 1;
                        }
                        prop_assert!(slots.warm_resident() <= pages * 4096, "pushing out by bytes stopped over the cap");
                        prop_assert!(out <= keeping_before);
                    }
                }
                let kept: usize = warm_for.values().map(|&k| kept_pages(k) * 4096).sum();
                prop_assert_eq!(slots.warm_resident(), kept, "kept bytes miscounted");
                prop_assert!(slots.warm() <= max_warm, "warm cap exceeded");
                prop_assert_eq!(slots.warm(), warm_for.len());
                prop_assert_eq!(slots.taken(), taken.len());
                // Nothing is left being reset between operations: what returns is the warm
                // slots and the held ones.
                prop_assert_eq!(slots.warm_or_resetting(), slots.warm());
                prop_assert_eq!(slots.returning(), slots.warm() + taken.len());
            }
        }
    }

    fn give(slots: &mut MemorySlots<u8>, slot: SlotId, key: u8) -> Option<(SlotId, Warm<u8>)> {
        slots.release(slot);
        slots.finish(slot, Some(warm(key))).out
    }

    #[test]
    fn the_least_recently_used_warm_slot_is_stolen_at_the_cap() {
        let mut slots = MemorySlots::<u8>::new(3, 2).unwrap();
        let (a, ..) = take(&mut slots, 1, Learned::default).unwrap();
        let (b, ..) = take(&mut slots, 2, Learned::default).unwrap();
        assert!(give(&mut slots, a, 1).is_none());
        assert!(give(&mut slots, b, 2).is_none());
        // Two warm slots: at the cap, so key 3 takes the LRU one (a) rather than the cold one.
        let (slot, choice, _) = take(&mut slots, 3, Learned::default).unwrap();
        assert_eq!((slot, choice), (a, Choice::Stolen(1)));
        // Under the cap again: key 4 takes the cold slot.
        assert_eq!(
            take(&mut slots, 4, Learned::default).map(|t| t.1),
            Some(Choice::Cold)
        );
        assert_eq!(
            take(&mut slots, 2, Learned::default).map(|t| (t.0, t.1)),
            Some((b, Choice::Affine))
        );
        assert!(take(&mut slots, 2, Learned::default).is_none());
    }

    #[test]
    fn finishing_over_the_cap_pushes_the_least_recently_used_out_stale() {
        let mut slots = MemorySlots::<u8>::new(3, 1).unwrap();
        let (a, ..) = take(&mut slots, 1, Learned::default).unwrap();
        let (b, ..) = take(&mut slots, 2, Learned::default).unwrap();
        assert!(give(&mut slots, a, 1).is_none());
        let (evicted, warm) = give(&mut slots, b, 2).unwrap();
        assert_eq!((evicted, warm.key), (a, 1));
        assert_eq!(slots.warm(), 1);
        // Stale until cooled: taken cold (under a higher cap), holding nothing known.
        slots.set_max_warm(2);
        let (c, choice, idle) = take(&mut slots, 3, Learned::default).unwrap();
        assert_eq!((c, choice), (a, Choice::Cold));
        assert!(matches!(idle, Idle::Stale));
    }

    #[test]
    fn a_slot_new_to_a_key_starts_from_the_keys_streak_and_hands_its_kept_pages_back() {
        let mut slots = MemorySlots::<u8>::new(2, 1).unwrap();
        let (a, ..) = take(&mut slots, 1, Learned::default).unwrap();
        slots.release(a);
        let mut learned = History::default();
        learned.kept.add(8192..16384, 1 << 20, 4096);
        assert!(
            slots
                .finish(a, Some(Warm::new(1, 4096, None, learned.clone())))
                .out
                .is_none()
        );
        assert_eq!(slots.warm_resident(), 8192);
        // At a cap of 0, key 2 takes key 1's warm slot rather than the one never used.
        slots.set_max_warm(0);
        let key_learned = Learned { streak: 7, kept: 0 };
        let (stolen, choice, idle) = take(&mut slots, 2, || key_learned).unwrap();
        assert_eq!((stolen, choice), (a, Choice::Stolen(1)));
        assert_eq!(slots.warm_resident(), 0);
        let Idle::Warm(previous) = idle else {
            panic!("a warm slot was stolen")
        };
        assert_eq!(
            previous.history.kept.bytes(),
            8192,
            "key 1's kept pages, to give back"
        );
        let (_, history) = slots.release(stolen);
        assert_eq!(history.kept.bytes(), 0);
        assert_eq!(history.learned().streak, 7);
        // A slot that keeps less than the key's slots do learns first.
        let fresh = History::default().for_new_key(Learned {
            streak: 7,
            kept: 4096,
        });
        assert_eq!(fresh.learned().streak, 0);
    }
}
