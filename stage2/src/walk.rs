//! The lockless walker: one range walk with leaf / table-pre / table-post visitors, the fault path's
//! descent, and `translate`, the hardware's view of the tables.
//!
//! Every entry is read once into a walk context (`Ctx::old`); every shared update made by a visitor
//! is a compare-and-swap from that value. Loads are `SeqCst`: the invalidation handshake is a
//! store-buffering pattern (a fault publishes an entry then reads the invalidation state; an
//! invalidation publishes its range then reads the entries) that needs a single total order, and on
//! x86-64 and AArch64 a `SeqCst` load is the same instruction as an `Acquire` one (`mov` / `ldar`).
//! `Acquire` (implied) is what makes a newly linked table page's zeroed contents visible.

use crate::format::Format;
use crate::stats::C;
use crate::sync::{self, AtomicU64, Ordering};
use crate::table::{Guard, TablePage};
use crate::tlb::Tlb;
use crate::types::{level_bytes, level_index, Access, PageSize, Perms, ENTRIES, GPA_LIMIT, LEVELS};
use crate::Stage2;

/// Visitor flags: which visits a walk makes.
pub(crate) mod flags {
    /// Visit every non-table entry (leaf, empty, locked).
    pub(crate) const LEAF: u8 = 1;
    /// Visit table entries before descending.
    pub(crate) const TABLE_PRE: u8 = 2;
    /// Visit table entries after their children.
    pub(crate) const TABLE_POST: u8 = 4;
}

/// Which visit this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Visit {
    Leaf,
    TablePre,
    TablePost,
}

/// The walk context handed to visitors.
pub(crate) struct Ctx<'g> {
    /// Base guest-physical address of the entry.
    pub(crate) addr: u64,
    /// Level of the entry.
    pub(crate) level: usize,
    /// The entry.
    pub(crate) slot: &'g AtomicU64,
    /// The value the walker read; a visitor that changes the entry stores the value it published
    /// here (a leaf turned into a table is then descended into).
    pub(crate) old: u64,
    /// The walk's range.
    pub(crate) start: u64,
    pub(crate) end: u64,
}

impl Ctx<'_> {
    /// Bytes the entry covers.
    pub(crate) fn size(&self) -> u64 {
        level_bytes(self.level)
    }

    /// Whether the entry lies entirely inside the walk's range.
    pub(crate) fn covered(&self) -> bool {
        self.addr >= self.start && self.addr + self.size() <= self.end
    }
}

/// What a visitor wants next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Continue,
    /// Stop after this entry; the walk returns where to resume.
    Pause,
}

/// How a walk ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Walked {
    Done,
    /// Paused by the visitor; resume from this address (re-walking from the root).
    Paused(u64),
}

/// An operation over a range of entries.
pub(crate) trait Visitor<F: Format, T: Tlb> {
    /// Which visits to make (see [`flags`]).
    const FLAGS: u8;
    fn visit(&mut self, s2: &Stage2<F, T>, g: &Guard, kind: Visit, ctx: &mut Ctx<'_>) -> Step;
}

/// A visitor that pauses the walk every `budget` leaf visits (never right after a visit that left
/// a table to descend into, so a resumed walk misses nothing).
pub(crate) struct Budgeted<'v, V> {
    pub(crate) inner: &'v mut V,
    visited: usize,
    budget: usize,
}

impl<F: Format, T: Tlb, V: Visitor<F, T>> Visitor<F, T> for Budgeted<'_, V> {
    const FLAGS: u8 = V::FLAGS;

    #[inline]
    fn visit(&mut self, s2: &Stage2<F, T>, g: &Guard, kind: Visit, ctx: &mut Ctx<'_>) -> Step {
        let step = self.inner.visit(s2, g, kind, ctx);
        if kind != Visit::Leaf || step == Step::Pause {
            return step;
        }
        self.visited += 1;
        if self.visited >= self.budget && !s2.fmt.is_table(ctx.old, ctx.level) {
            self.visited = 0;
            Step::Pause
        } else {
            Step::Continue
        }
    }
}

/// The hardware's translation of one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Output address of the translated byte.
    pub pa: u64,
    /// Size of the leaf that translated it.
    pub size: PageSize,
    /// Guest-physical base of that leaf.
    pub base: u64,
    /// Permissions the leaf grants.
    pub perms: Perms,
}

/// Why `translate` failed: what the hardware would raise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// No present leaf (an empty entry or a break-before-make marker) at `level`.
    #[error("gpa {gpa:#x} is not mapped (translation fault at level {level})")]
    NotMapped {
        /// The address.
        gpa: u64,
        /// Level of the invalid entry.
        level: usize,
    },
    /// The leaf does not grant the access.
    #[error("gpa {gpa:#x} is mapped {perms} (permission fault)")]
    Permission {
        /// The address.
        gpa: u64,
        /// What the leaf grants.
        perms: Perms,
    },
    /// Beyond the 48-bit input address space.
    #[error("gpa {gpa:#x} is beyond the 48-bit input address space")]
    OutOfRange {
        /// The address.
        gpa: u64,
    },
}

/// Result of the fault path's descent: the entry that decides the fault.
pub(crate) struct Found<'g> {
    pub(crate) slot: &'g AtomicU64,
    pub(crate) old: u64,
    pub(crate) level: usize,
}

impl<F: Format, T: Tlb> Stage2<F, T> {
    /// The root table page.
    #[inline]
    pub(crate) fn root<'g>(&self, _g: &'g Guard) -> &'g TablePage {
        // SAFETY: the root page is allocated in `new` and freed only in `Drop`, which cannot run
        // while `self` is borrowed; the guard lifetime is shorter than that borrow.
        unsafe { &*self.root }
    }

    /// The table page a table descriptor points to.
    #[inline]
    pub(crate) fn next_table<'g>(&self, d: u64, _g: &'g Guard) -> &'g TablePage {
        // SAFETY: `d` was read from a live entry while `_g` pins the epoch: the page it points to
        // was linked by `install_table`/`split` (a `TablePage` from the pool) and, if unlinked since,
        // is freed only after every guard pinned before the unlink is dropped.
        unsafe { &*(self.fmt.table_addr(d) as *const TablePage) }
    }

    /// Walk `[start, end)` with `v`. Empty or leaf upper-level entries cost one read (no descent).
    pub(crate) fn walk<V: Visitor<F, T>>(
        &self,
        start: u64,
        end: u64,
        v: &mut V,
        g: &Guard,
    ) -> Walked {
        let end = end.min(GPA_LIMIT);
        if start >= end {
            return Walked::Done;
        }
        let mut reads = 0;
        let r = self.walk_table(self.root(g), 0, 0, start, end, v, g, &mut reads);
        // One counter update per walk, not per entry.
        self.stats.add(C::EntriesRead, reads);
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn walk_table<'g, V: Visitor<F, T>>(
        &self,
        table: &'g TablePage,
        level: usize,
        base: u64,
        start: u64,
        end: u64,
        v: &mut V,
        g: &'g Guard,
        reads: &mut u64,
    ) -> Walked {
        let size = level_bytes(level);
        let first = if start > base {
            level_index(start, level)
        } else {
            0
        };
        for idx in first..ENTRIES {
            let addr = base + idx as u64 * size;
            if addr >= end {
                break;
            }
            let slot = &table.entries[idx];
            *reads += 1;
            let mut ctx = Ctx {
                addr,
                level,
                slot,
                old: slot.load(Ordering::SeqCst),
                start,
                end,
            };
            if self.fmt.is_table(ctx.old, level) {
                if V::FLAGS & flags::TABLE_PRE != 0
                    && v.visit(self, g, Visit::TablePre, &mut ctx) == Step::Pause
                {
                    return Walked::Paused(addr.max(start));
                }
            } else if V::FLAGS & flags::LEAF != 0
                && v.visit(self, g, Visit::Leaf, &mut ctx) == Step::Pause
            {
                return Walked::Paused((addr + size).max(start));
            }
            if self.fmt.is_table(ctx.old, level) {
                let child = self.next_table(ctx.old, g);
                if let Walked::Paused(a) =
                    self.walk_table(child, level + 1, addr, start, end, v, g, reads)
                {
                    return Walked::Paused(a);
                }
                if V::FLAGS & flags::TABLE_POST != 0 {
                    *reads += 1;
                    ctx.old = slot.load(Ordering::SeqCst);
                    if self.fmt.is_table(ctx.old, level) {
                        v.visit(self, g, Visit::TablePost, &mut ctx);
                    }
                }
            }
        }
        Walked::Done
    }

    /// Walk `[start, end)` with `v` in budgets of `Config::yield_every` leaf visits. Each budget runs
    /// under the structure lock and one epoch guard; at every boundary both are released,
    /// `between(v)` runs (a batch flush), the boundary is counted in `Stats::yields`, the CPU is
    /// given up if the walk has used its time slice ([`sync::Resched`]), and the walk restarts from
    /// the root at the saved address (the tree may have changed in between). `hook` runs at every
    /// boundary after the locks are dropped (tests change the tree there).
    pub(crate) fn walk_resumable<V: Visitor<F, T>>(
        &self,
        start: u64,
        end: u64,
        v: &mut V,
        mut between: impl FnMut(&Self, &mut V),
        mut hook: impl FnMut(u64),
    ) {
        let budget = self.config.yield_every.max(1);
        let mut b = Budgeted {
            inner: v,
            visited: 0,
            budget,
        };
        let mut resched = sync::Resched::new();
        let mut addr = start;
        loop {
            let r = {
                let _lock = sync::lock(&self.structure);
                self.walk(addr, end, &mut b, &self.reclaim.pin())
            };
            between(self, b.inner);
            match r {
                Walked::Done => break,
                Walked::Paused(next) => {
                    addr = next;
                    self.stats.inc(C::Yield);
                    hook(next);
                    resched.cond_resched();
                }
            }
        }
    }

    /// Descend towards `gpa` until an entry that is not a table at `target` level or above;
    /// below `target` tables that exist are followed (the mapping is then made smaller). With
    /// `install`, empty entries above `target` get a new table (lock-free: allocate, CAS; the loser
    /// frees its never-published page).
    #[inline]
    pub(crate) fn descend<'g>(
        &self,
        gpa: u64,
        target: usize,
        install: bool,
        g: &'g Guard,
    ) -> Found<'g> {
        let mut table = self.root(g);
        let mut level = 0;
        loop {
            let slot = &table.entries[level_index(gpa, level)];
            let mut old = slot.load(Ordering::SeqCst);
            loop {
                if self.fmt.is_table(old, level) {
                    break;
                }
                if !install || level >= target || old != 0 {
                    return Found { slot, old, level };
                }
                match self.install_table(slot) {
                    Ok(new) => old = new,
                    Err(cur) => old = cur,
                }
            }
            table = self.next_table(old, g);
            level += 1;
            debug_assert!(level < LEVELS);
        }
    }

    /// Link a new empty table into the empty entry `slot`. `Err(current)` if another thread changed
    /// the entry first (our page is freed at once: it was never visible to anyone).
    pub(crate) fn install_table(&self, slot: &AtomicU64) -> Result<u64, u64> {
        self.install_table_page(slot, self.reclaim.alloc())
    }

    /// Link `page` (from `Reclaim::alloc`, possibly pre-filled privately) into the empty entry
    /// `slot`; on failure the page is freed and the entry's current value returned.
    pub(crate) fn install_table_page(
        &self,
        slot: &AtomicU64,
        page: *mut TablePage,
    ) -> Result<u64, u64> {
        let new = self.fmt.table(page as u64);
        // SeqCst (includes Release): walkers that read the new descriptor (Acquire) see the page's
        // contents; the total order is needed by the invalidation handshake (see the module docs).
        match slot.compare_exchange(0, new, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => {
                self.stats.inc(C::TablesLive);
                Ok(new)
            }
            Err(cur) => {
                // SAFETY: `page` came from `alloc` and the CAS that would have published it failed.
                unsafe { self.reclaim.free_unpublished(page) };
                self.stats.inc(C::TableRaceLost);
                Err(cur)
            }
        }
    }

    /// The present leaf mapping `gpa`, whatever its permissions (what a TLB would cache).
    pub fn lookup(&self, gpa: u64) -> Option<Translation> {
        if gpa >= GPA_LIMIT {
            return None;
        }
        let g = self.reclaim.pin();
        let f = self.descend(gpa, LEVELS - 1, false, &g);
        if !self.fmt.is_leaf(f.old, f.level) {
            return None;
        }
        let size = PageSize::at_level(f.level)?;
        let base = gpa & !(size.bytes() - 1);
        Some(Translation {
            pa: self.fmt.leaf_oa(f.old, f.level) + (gpa - base),
            size,
            base,
            perms: self.fmt.leaf_perms(f.old),
        })
    }

    /// Translate `gpa` for `access` exactly as the hardware walks: table entries are followed, a
    /// non-present entry (empty or a break-before-make marker) is a translation fault, a leaf that
    /// lacks the permission is a permission fault.
    pub fn translate(&self, gpa: u64, access: Access) -> Result<Translation, TranslateError> {
        if gpa >= GPA_LIMIT {
            return Err(TranslateError::OutOfRange { gpa });
        }
        let g = self.reclaim.pin();
        let f = self.descend(gpa, LEVELS - 1, false, &g);
        if !self.fmt.is_leaf(f.old, f.level) {
            return Err(TranslateError::NotMapped {
                gpa,
                level: f.level,
            });
        }
        let size = PageSize::at_level(f.level).ok_or(TranslateError::NotMapped {
            gpa,
            level: f.level,
        })?;
        let base = gpa & !(size.bytes() - 1);
        let perms = self.fmt.leaf_perms(f.old);
        if !perms.contains(access.perms()) {
            return Err(TranslateError::Permission { gpa, perms });
        }
        Ok(Translation {
            pa: self.fmt.leaf_oa(f.old, f.level) + (gpa - base),
            size,
            base,
            perms,
        })
    }

    /// Count the table pages reachable from the root (the root included): with no concurrent
    /// updates this equals `Stats::tables_live` (the stress tests' orphan check).
    pub fn count_reachable_tables(&self) -> u64 {
        let g = self.reclaim.pin();
        self.count_tables(self.root(&g), 0, &g)
    }

    fn count_tables(&self, t: &TablePage, level: usize, g: &Guard) -> u64 {
        let mut n = 1;
        for e in &t.entries {
            let d = e.load(Ordering::SeqCst);
            if self.fmt.is_table(d, level) {
                n += self.count_tables(self.next_table(d, g), level + 1, g);
            }
        }
        n
    }
}
