//! [`Quotas`]: limits per group of tenants, over any backend.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::Mutex;

use anyhow::Result;
use berth_core::{
    AllocatorStats, DefinedMemoryIndex, DefinedTableIndex, HostPtr, InstanceAllocationRequest,
    InstanceAllocatorImpl, Memory, MemoryAllocationIndex, MemoryType, Module, ModuleId, Released, Table,
    TableAllocationIndex, TableType, VMOffsets, human_bytes,
};

use crate::ledger::Ledger;

/// Limits on what one group holds at once; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaLimits {
    /// Live instances that hold a memory or a table (an instance of a module with neither
    /// holds nothing of the backend and is not counted), standalone memories included: each is
    /// an instance of a module of one memory.
    pub instances: Option<u64>,
    /// Live memories (standalone memories included).
    pub memories: Option<u64>,
    /// Live tables.
    pub tables: Option<u64>,
    /// Bytes the group's live memories may reach: each memory counts at its maximum (the
    /// smaller of its declared maximum and the backend's cap), so that no growth can pass the
    /// quota. A memory with no maximum at all cannot be admitted under this limit.
    pub memory_bytes: Option<u64>,
}

/// What one group holds now, in the units of [`QuotaLimits`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaUsage {
    /// Live instances that hold a memory or a table.
    pub instances: u64,
    /// Live memories.
    pub memories: u64,
    /// Live tables.
    pub tables: u64,
    /// Bytes the live memories may reach.
    pub memory_bytes: u64,
}

/// A group's quota refused a memory or table: test for it with
/// `err.downcast_ref::<QuotaExceeded>()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaExceeded {
    /// The group, as its `Debug` form.
    pub group: String,
    /// The quota: `instances`, `memories`, `tables` or `memory_bytes`.
    pub quota: &'static str,
    /// Its limit.
    pub limit: u64,
    /// What the group would hold with this resource.
    pub requested: u64,
}

impl fmt::Display for QuotaExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.quota == "memory_bytes" {
            write!(
                f,
                "group {} over its `memory_bytes` quota of {}: its memories could reach {}",
                self.group,
                human_bytes(self.limit),
                if self.requested == u64::MAX {
                    "any size (a memory with no maximum)".to_owned()
                } else {
                    human_bytes(self.requested)
                }
            )
        } else {
            write!(
                f,
                "group {} over its `{}` quota of {}: {} requested",
                self.group, self.quota, self.limit, self.requested
            )
        }
    }
}

impl std::error::Error for QuotaExceeded {}

/// How a request names its group: by its module, its host state, anything it carries.
type Classify<G> = dyn Fn(&InstanceAllocationRequest<'_>) -> Option<G> + Send + Sync;

#[derive(Debug, Default)]
struct Group {
    limits: Option<QuotaLimits>,
    usage: QuotaUsage,
}

/// What one handed-out memory or table was charged to.
#[derive(Debug)]
struct Charge<G, I> {
    group: Option<G>,
    inner: I,
    /// Whether it began its instance (and so counts the instance).
    instance: bool,
    memory_bytes: u64,
}

/// Limits per group of tenants over `inner`: the embedder names a request's group with a
/// function of the request (the module's name, a tenant id in the host state, ...), sets each
/// group's [`QuotaLimits`] (or lets the default apply), and a memory or table that would take a
/// group past one fails with a [`QuotaExceeded`] naming the group and the quota, with nothing
/// allocated. Requests the function puts in no group are not limited.
///
/// An instance counts from its first resource (memory 0, or table 0 when it has no memory: the
/// order the provided methods allocate in) to that resource's deallocation; a standalone memory
/// is an instance of a module of one memory (named `standalone memory`) and counts as one.
/// Everything else (validation, the instance count, statistics, purges, releases) is `inner`'s.
///
/// A group is remembered while it holds something or has limits of its own
/// ([`set_limits`](Self::set_limits), until [`clear_limits`](Self::clear_limits)), so groups
/// named per tenant or per request cost nothing once their instances are gone.
pub struct Quotas<A, G> {
    inner: A,
    classify: Box<Classify<G>>,
    default_limits: QuotaLimits,
    groups: Mutex<HashMap<G, Group>>,
    memories: Ledger<Charge<G, MemoryAllocationIndex>>,
    tables: Ledger<Charge<G, TableAllocationIndex>>,
}

impl<A: fmt::Debug, G: fmt::Debug> fmt::Debug for Quotas<A, G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Quotas")
            .field("inner", &self.inner)
            .field("default_limits", &self.default_limits)
            .finish_non_exhaustive()
    }
}

/// Which quota a charge passes, if any.
fn over(limits: &QuotaLimits, usage: &QuotaUsage) -> Option<(&'static str, u64, u64)> {
    [
        ("instances", limits.instances, usage.instances),
        ("memories", limits.memories, usage.memories),
        ("tables", limits.tables, usage.tables),
        ("memory_bytes", limits.memory_bytes, usage.memory_bytes),
    ]
    .into_iter()
    .find_map(|(quota, limit, used)| limit.filter(|&l| used > l).map(|l| (quota, l, used)))
}

impl<A: InstanceAllocatorImpl, G: Eq + Hash + Clone + fmt::Debug + Send + Sync> Quotas<A, G> {
    /// Quotas over `inner`: `classify` names each request's group (or none), and
    /// `default_limits` apply to every group without limits of its own.
    pub fn new(
        inner: A,
        default_limits: QuotaLimits,
        classify: impl Fn(&InstanceAllocationRequest<'_>) -> Option<G> + Send + Sync + 'static,
    ) -> Self {
        Quotas {
            inner,
            classify: Box::new(classify),
            default_limits,
            groups: Mutex::new(HashMap::new()),
            memories: Ledger::default(),
            tables: Ledger::default(),
        }
    }

    /// The backend the quotas guard.
    pub fn inner(&self) -> &A {
        &self.inner
    }

    /// Sets `group`'s limits, for what it allocates from now on (what it holds stays).
    pub fn set_limits(&self, group: G, limits: QuotaLimits) {
        self.lock().entry(group).or_default().limits = Some(limits);
    }

    /// What `group` holds now.
    pub fn usage(&self, group: &G) -> QuotaUsage {
        self.lock().get(group).map(|g| g.usage).unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<G, Group>> {
        // Every update is a few additions: carry on after a panic elsewhere.
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives `group` the default limits again; it is forgotten once it holds nothing.
    pub fn clear_limits(&self, group: &G) {
        let mut groups = self.lock();
        if let Some(entry) = groups.get_mut(group) {
            entry.limits = None;
            if entry.usage == QuotaUsage::default() {
                groups.remove(group);
            }
        }
    }

    /// Groups remembered now: those holding something, and those with limits of their own.
    pub fn groups(&self) -> usize {
        self.lock().len()
    }

    /// Adds `add` to `group`'s usage if that stays within its limits (with `dry`, only checks).
    fn charge(&self, group: &G, add: QuotaUsage, dry: bool) -> Result<()> {
        let mut groups = self.lock();
        let (limits, held) = groups
            .get(group)
            .map_or((self.default_limits, QuotaUsage::default()), |g| {
                (g.limits.unwrap_or(self.default_limits), g.usage)
            });
        let usage = QuotaUsage {
            instances: held.instances + add.instances,
            memories: held.memories + add.memories,
            tables: held.tables + add.tables,
            memory_bytes: held.memory_bytes.saturating_add(add.memory_bytes),
        };
        if let Some((quota, limit, requested)) = over(&limits, &usage) {
            return Err(anyhow::Error::new(QuotaExceeded {
                group: format!("{group:?}"),
                quota,
                limit,
                requested,
            }));
        }
        if !dry {
            groups.entry(group.clone()).or_default().usage = usage;
        }
        Ok(())
    }

    fn uncharge<I>(&self, charge: &Charge<G, I>, memories: u64, tables: u64) {
        let Some(group) = &charge.group else {
            return;
        };
        let mut groups = self.lock();
        if let Some(entry) = groups.get_mut(group) {
            let usage = &mut entry.usage;
            usage.instances -= u64::from(charge.instance);
            usage.memories -= memories;
            usage.tables -= tables;
            usage.memory_bytes -= charge.memory_bytes;
            // A group named per tenant or per request costs nothing once it holds nothing.
            if entry.limits.is_none() && entry.usage == QuotaUsage::default() {
                groups.remove(group);
            }
        }
    }

    /// Charges `add` to `group` for a resource `inner` has just made (`made`: its index there
    /// and the resource) and records the charge in `ledger`, returning the key it is handed
    /// out under. If the quota refuses it (another request took the room meanwhile) or the
    /// ledger is full, `give_back` returns it to `inner` and the error is the allocation's.
    fn settle<I, R>(
        &self,
        group: Option<G>,
        add: QuotaUsage,
        made: (I, R),
        ledger: &Ledger<Charge<G, I>>,
        give_back: impl FnOnce(I, R),
    ) -> Result<(u32, R)> {
        let (inner, resource) = made;
        let charged = match &group {
            Some(group) => self.charge(group, add, false),
            None => Ok(()),
        };
        let charge = Charge {
            group,
            inner,
            instance: add.instances > 0,
            memory_bytes: add.memory_bytes,
        };
        if let Err(error) = charged {
            give_back(charge.inner, resource);
            return Err(error);
        }
        match ledger.insert(charge) {
            Ok(key) => Ok((key, resource)),
            Err((error, charge)) => {
                self.uncharge(&charge, add.memories, add.tables);
                give_back(charge.inner, resource);
                Err(error)
            }
        }
    }
}

// SAFETY: every memory and table comes from `inner`, which keeps the contract, and goes back to
// it with the index it handed out (kept in the ledgers under the index this backend hands
// out); a resource a quota refuses after `inner` made it goes straight back to `inner`.
unsafe impl<A: InstanceAllocatorImpl, G: Eq + Hash + Clone + fmt::Debug + Send + Sync> InstanceAllocatorImpl
    for Quotas<A, G>
{
    fn validate_module_impl(&self, module: &Module, offsets: &VMOffsets<HostPtr>) -> Result<()> {
        self.inner.validate_module_impl(module, offsets)
    }

    fn increment_core_instance_count(&self) -> Result<()> {
        self.inner.increment_core_instance_count()
    }

    fn decrement_core_instance_count(&self) {
        self.inner.decrement_core_instance_count();
    }

    unsafe fn allocate_memory(
        &self,
        request: &mut InstanceAllocationRequest<'_>,
        ty: &MemoryType,
        memory_index: DefinedMemoryIndex,
    ) -> Result<(MemoryAllocationIndex, Memory)> {
        let group = (self.classify)(request);
        let instance = memory_index.as_u32() == 0;
        let mut add = QuotaUsage {
            instances: u64::from(instance),
            memories: 1,
            ..QuotaUsage::default()
        };
        if let Some(group) = &group {
            // Counts first, so that a refused memory costs no allocation.
            self.charge(group, add, true)?;
        }
        // SAFETY: the caller's obligations are `inner`'s.
        let (inner, memory) = unsafe { self.inner.allocate_memory(request, ty, memory_index) }?;
        // Its maximum is known once it exists (the backend's cap included).
        add.memory_bytes = memory.maximum_byte_size().map_or(u64::MAX, |b| b as u64);
        let give_back = |inner, memory| {
            // SAFETY: `inner` made this memory for `memory_index` just now, with this index; it
            // was handed to no one.
            unsafe { self.inner.deallocate_memory(memory_index, inner, memory) }
        };
        let (key, memory) = self.settle(group, add, (inner, memory), &self.memories, give_back)?;
        Ok((MemoryAllocationIndex::from_u32(key), memory))
    }

    unsafe fn deallocate_memory(
        &self,
        index: DefinedMemoryIndex,
        slot: MemoryAllocationIndex,
        memory: Memory,
    ) {
        let charge = self.memories.remove(slot.as_u32());
        self.uncharge(&charge, 1, 0);
        // SAFETY: `inner` made this memory and handed it out with `charge.inner`.
        unsafe { self.inner.deallocate_memory(index, charge.inner, memory) }
    }

    unsafe fn allocate_table(
        &self,
        request: &mut InstanceAllocationRequest<'_>,
        ty: &TableType,
        table_index: DefinedTableIndex,
    ) -> Result<(TableAllocationIndex, Table)> {
        let group = (self.classify)(request);
        let instance = table_index.as_u32() == 0 && request.module.num_defined_memories() == 0;
        let add = QuotaUsage {
            instances: u64::from(instance),
            tables: 1,
            ..QuotaUsage::default()
        };
        if let Some(group) = &group {
            // Counts first, so that a refused table costs no allocation; charged once it exists,
            // so that an allocation that fails or unwinds part-way charges nothing.
            self.charge(group, add, true)?;
        }
        // SAFETY: the caller's obligations are `inner`'s.
        let (inner, table) = unsafe { self.inner.allocate_table(request, ty, table_index) }?;
        let give_back = |inner, table| {
            // SAFETY: `inner` made this table for `table_index` just now, with this index; it was
            // handed to no one.
            unsafe { self.inner.deallocate_table(table_index, inner, table) }
        };
        let (key, table) = self.settle(group, add, (inner, table), &self.tables, give_back)?;
        Ok((TableAllocationIndex::from_u32(key), table))
    }

    unsafe fn deallocate_table(&self, index: DefinedTableIndex, slot: TableAllocationIndex, table: Table) {
        let charge = self.tables.remove(slot.as_u32());
        self.uncharge(&charge, 0, 1);
        // SAFETY: `inner` made this table and handed it out with `charge.inner`.
        unsafe { self.inner.deallocate_table(index, charge.inner, table) }
    }

    fn purge_module(&self, module: ModuleId) {
        self.inner.purge_module(module);
    }

    fn stats(&self) -> AllocatorStats {
        self.inner.stats()
    }

    fn release_idle_memory(&self) -> Released {
        self.inner.release_idle_memory()
    }
}
