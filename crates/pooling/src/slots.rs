//! Slot choice in O(1): the same module's last slot, else a cold slot while the warm ones are
//! under their cap, else the least recently used warm slot.
//!
//! A slot is *used* (handed out), *warm* (idle, keeping what its last tenant left after the
//! reset: its accessible size, resident pages, its image) or *cold* (idle, kept for no key:
//! the pool gave its resident pages back). Warm slots sit in two structures at once: an LRU
//! list of all warm slots, and a list per affinity key (module and memory index), so both "a
//! slot this module used" and "the least recently used slot" are found without a search, and a
//! slot is unlinked from either in O(1) (each slot knows its position in its key's list).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};

/// A fast hasher for small keys of integers (module ids and indices), which need no
/// protection against flooding: they are made by this process, not by tenants.
#[derive(Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_u32(&mut self, value: u32) {
        self.write_u64(u64::from(value));
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0.rotate_left(5) ^ value).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<KeyHasher>>;

/// A slot number.
pub type SlotId = u32;

/// How a slot was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice<K> {
    /// It was last used by the same key: nothing of its state needs to change.
    Affine,
    /// It was never used, or was pushed out of the warm set (its pages given back).
    Cold,
    /// It was the least recently used warm slot, last used by this other key.
    Stolen(K),
}

#[derive(Debug, Clone, Copy)]
enum State<K> {
    Cold,
    Used,
    Warm {
        key: K,
        prev: Option<SlotId>,
        next: Option<SlotId>,
        key_pos: usize,
    },
}

/// The slot allocator. Not thread-safe by itself: the pools keep it behind a lock.
#[derive(Debug)]
pub struct SlotAllocator<K> {
    states: Vec<State<K>>,
    /// Cold slots; popped from the end, so slot 0 goes first.
    cold: Vec<SlotId>,
    /// Least recently freed warm slot.
    lru_head: Option<SlotId>,
    /// Most recently freed warm slot.
    lru_tail: Option<SlotId>,
    per_key: FastMap<K, Vec<SlotId>>,
    warm: usize,
    max_warm: usize,
}

impl<K: Copy + Eq + Hash> SlotAllocator<K> {
    /// `slots` cold slots; at most `max_warm` kept warm.
    pub fn new(slots: u32, max_warm: usize) -> Self {
        SlotAllocator {
            states: vec![State::Cold; slots as usize],
            cold: (0..slots).rev().collect(),
            lru_head: None,
            lru_tail: None,
            per_key: FastMap::default(),
            warm: 0,
            max_warm,
        }
    }

    /// Warm slots now.
    pub fn warm(&self) -> usize {
        self.warm
    }

    /// Slots handed out now.
    #[cfg(test)]
    pub fn used(&self) -> usize {
        self.states.len() - self.warm - self.cold.len()
    }

    /// Hands out a slot for `key`, or `None` if every slot is used.
    pub fn alloc(&mut self, key: Option<K>) -> Option<(SlotId, Choice<K>)> {
        if let Some(key) = key
            && let Some(slot) = self.per_key.get(&key).and_then(|list| list.last().copied())
        {
            self.unlink(slot);
            self.states[slot as usize] = State::Used;
            return Some((slot, Choice::Affine));
        }
        if (self.warm < self.max_warm || self.lru_head.is_none())
            && let Some(slot) = self.cold.pop()
        {
            self.states[slot as usize] = State::Used;
            return Some((slot, Choice::Cold));
        }
        let slot = self.lru_head?;
        let State::Warm { key: previous, .. } = self.states[slot as usize] else {
            unreachable!("the LRU list holds only warm slots")
        };
        self.unlink(slot);
        self.states[slot as usize] = State::Used;
        Some((slot, Choice::Stolen(previous)))
    }

    /// Whether [`alloc`](Self::alloc) for `key` would take another key's warm slot (or find
    /// nothing): no slot of `key` is warm and no cold slot may be taken.
    pub fn would_steal(&self, key: Option<K>) -> bool {
        let affine = key.is_some_and(|key| self.per_key.get(&key).is_some_and(|list| !list.is_empty()));
        let cold = !self.cold.is_empty() && (self.warm < self.max_warm || self.lru_head.is_none());
        !affine && !cold
    }

    /// Takes back `slot`, last used for `key`, as the most recently used warm slot. If that
    /// puts the warm slots over their cap, the least recently used one turns cold and is
    /// returned with its key, so the caller can give its pages back.
    ///
    /// # Panics
    ///
    /// If `slot` is not handed out: a pool bug (double free), never bad input.
    pub fn free(&mut self, slot: SlotId, key: K) -> Option<(SlotId, K)> {
        assert!(
            matches!(self.states[slot as usize], State::Used),
            "slot {slot} freed twice"
        );
        let list = self.per_key.entry(key).or_default();
        let key_pos = list.len();
        list.push(slot);
        self.states[slot as usize] = State::Warm {
            key,
            prev: self.lru_tail,
            next: None,
            key_pos,
        };
        match self.lru_tail {
            Some(tail) => self.set_next(tail, Some(slot)),
            None => self.lru_head = Some(slot),
        }
        self.lru_tail = Some(slot);
        self.warm += 1;
        if self.warm <= self.max_warm {
            return None;
        }
        self.evict()
    }

    /// Changes the cap on warm slots, for the next [`alloc`](Self::alloc) and
    /// [`free`](Self::free) (warm slots over a lowered cap stay until freed or evicted).
    pub fn set_max_warm(&mut self, max_warm: usize) {
        self.max_warm = max_warm;
    }

    /// Turns the least recently used warm slot cold and returns it with its key, if any.
    pub fn evict(&mut self) -> Option<(SlotId, K)> {
        let evicted = self.lru_head?;
        let State::Warm { key: evicted_key, .. } = self.states[evicted as usize] else {
            unreachable!("the LRU list holds only warm slots")
        };
        self.unlink(evicted);
        self.states[evicted as usize] = State::Cold;
        self.cold.push(evicted);
        Some((evicted, evicted_key))
    }

    /// Whether `slot` is handed out (or being reset: not yet given back).
    pub fn is_used(&self, slot: SlotId) -> bool {
        matches!(self.states.get(slot as usize), Some(State::Used))
    }

    /// Takes back `slot` as cold (its state is gone, for example after a failed reset).
    pub fn free_cold(&mut self, slot: SlotId) {
        assert!(
            matches!(self.states[slot as usize], State::Used),
            "slot {slot} freed twice"
        );
        self.states[slot as usize] = State::Cold;
        self.cold.push(slot);
    }

    /// Removes a warm slot from the LRU list and its key's list.
    fn unlink(&mut self, slot: SlotId) {
        let State::Warm {
            key,
            prev,
            next,
            key_pos,
        } = self.states[slot as usize]
        else {
            unreachable!("only warm slots are unlinked")
        };
        match prev {
            Some(prev) => self.set_next(prev, next),
            None => self.lru_head = next,
        }
        match next {
            Some(next) => self.set_prev(next, prev),
            None => self.lru_tail = prev,
        }
        let list = self.per_key.get_mut(&key).expect("a warm slot's key has a list");
        list.swap_remove(key_pos);
        if let Some(&moved) = list.get(key_pos)
            && let State::Warm { key_pos: pos, .. } = &mut self.states[moved as usize]
        {
            *pos = key_pos;
        }
        if list.is_empty() {
            self.per_key.remove(&key);
        }
        self.warm -= 1;
    }

    fn set_next(&mut self, slot: SlotId, value: Option<SlotId>) {
        if let State::Warm { next, .. } = &mut self.states[slot as usize] {
            *next = value;
        }
    }

    fn set_prev(&mut self, slot: SlotId, value: Option<SlotId>) {
        if let State::Warm { prev, .. } = &mut self.states[slot as usize] {
            *prev = value;
        }
    }

    /// Forgets `key`: its warm slots turn cold and are returned, so the caller can give their
    /// pages back.
    pub fn purge(&mut self, key: K) -> Vec<SlotId> {
        let slots = self.per_key.get(&key).cloned().unwrap_or_default();
        for &slot in &slots {
            self.unlink(slot);
            self.states[slot as usize] = State::Cold;
            self.cold.push(slot);
        }
        slots
    }

    /// The keys that have warm slots (for purging every memory index of a module).
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.per_key.keys()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(Option<u8>),
        Free(usize, u8),
        Purge(u8),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        let op = prop_oneof![
            3 => proptest::option::weighted(0.9, 0u8..5).prop_map(Op::Alloc),
            3 => (any::<usize>(), 0u8..5).prop_map(|(i, k)| Op::Free(i, k)),
            1 => (0u8..5).prop_map(Op::Purge),
        ];
        proptest::collection::vec(op, 1..200)
    }

    proptest! {
        #[test]
        fn allocation_is_exhaustive_unique_affine_and_capped(slots in 1u32..12, max_warm in 0usize..6, ops in ops()) {
            let mut allocator = SlotAllocator::<u8>::new(slots, max_warm);
            let mut live: HashSet<SlotId> = HashSet::new();
            // The model of which key last used each idle slot still warm.
            let mut warm: HashMap<SlotId, u8> = HashMap::new();
            for op in ops {
                match op {
                    Op::Alloc(key) => match (allocator.would_steal(key), allocator.alloc(key)) {
                        (would_steal, Some((slot, choice))) => {
                            let stolen = matches!(choice, Choice::Stolen(_));
                            prop_assert_eq!(would_steal, stolen, "would_steal disagrees with alloc");
                            prop_assert!(slot < slots);
                            prop_assert!(live.insert(slot), "slot {} handed out twice", slot);
                            let had_affine = key.is_some_and(|k| warm.values().any(|&w| w == k));
                            match choice {
                                Choice::Affine => prop_assert_eq!(warm.get(&slot).copied(), key),
                                Choice::Cold => prop_assert!(!warm.contains_key(&slot)),
                                Choice::Stolen(previous) => prop_assert_eq!(warm.get(&slot).copied(), Some(previous)),
                            }
                            prop_assert_eq!(had_affine, choice == Choice::Affine, "affinity not honoured");
                            warm.remove(&slot);
                        }
                        (would_steal, None) => {
                            prop_assert!(would_steal, "would_steal disagrees with alloc");
                            prop_assert_eq!(live.len(), slots as usize, "refused with free slots");
                        }
                    },
                    Op::Free(i, key) => {
                        if live.is_empty() { continue; }
                        let mut sorted: Vec<_> = live.iter().copied().collect();
                        sorted.sort_unstable();
                        let slot = sorted[i % sorted.len()];
                        live.remove(&slot);
                        warm.insert(slot, key);
                        if let Some((evicted, evicted_key)) = allocator.free(slot, key) {
                            prop_assert_eq!(warm.remove(&evicted), Some(evicted_key));
                        }
                    }
                    Op::Purge(key) => {
                        for slot in allocator.purge(key) {
                            prop_assert_eq!(warm.remove(&slot), Some(key));
                        }
                        prop_assert!(!warm.values().any(|&k| k == key));
                    }
                }
                prop_assert!(allocator.warm() <= max_warm, "warm cap exceeded");
                prop_assert_eq!(allocator.warm(), warm.len());
                prop_assert_eq!(allocator.used(), live.len());
            }
        }
    }

    #[test]
    fn the_least_recently_used_warm_slot_is_stolen_at_the_cap() {
        let mut allocator = SlotAllocator::<u8>::new(3, 2);
        let (a, _) = allocator.alloc(Some(1)).unwrap();
        let (b, _) = allocator.alloc(Some(2)).unwrap();
        assert_eq!(allocator.free(a, 1), None);
        assert_eq!(allocator.free(b, 2), None);
        // Two warm slots: at the cap, so key 3 takes the LRU one (a) rather than the cold one.
        assert_eq!(allocator.alloc(Some(3)), Some((a, Choice::Stolen(1))));
        // Under the cap again: key 4 takes the cold slot.
        assert_eq!(allocator.alloc(Some(4)).map(|(_, c)| c), Some(Choice::Cold));
        assert_eq!(allocator.alloc(Some(2)), Some((b, Choice::Affine)));
        assert_eq!(allocator.alloc(Some(2)), None);
    }

    #[test]
    fn freeing_over_the_cap_evicts_the_least_recently_used() {
        let mut allocator = SlotAllocator::<u8>::new(3, 1);
        let (a, _) = allocator.alloc(Some(1)).unwrap();
        let (b, _) = allocator.alloc(Some(2)).unwrap();
        assert_eq!(allocator.free(a, 1), None);
        assert_eq!(allocator.free(b, 2), Some((a, 1)));
        assert_eq!(allocator.warm(), 1);
    }
}
