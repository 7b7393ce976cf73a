//! A small bounded cache of decoded L2 tables, shared by reader threads.
//!
//! Least-recently-used eviction over a fixed number of tables; the lock is held only to look up
//! or insert, never during I/O (two threads may load the same table at once; both results are
//! identical and one wins). Lookups go through a map (a hit costs the same at 4 tables or at
//! 256); only a miss that evicts scans the entries for the oldest.

use crate::error::Result;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Debug)]
struct Entry {
    key: u64,
    table: Arc<[u64]>,
    used: u64,
}

#[derive(Debug, Default)]
struct Inner {
    entries: Vec<Entry>,
    /// Position of each key in `entries`.
    index: HashMap<u64, usize>,
    tick: u64,
}

/// Bounded LRU of L2 tables keyed by their host offset.
#[derive(Debug)]
pub(super) struct L2Cache {
    capacity: usize,
    inner: Mutex<Inner>,
}

impl L2Cache {
    pub(super) fn new(capacity: usize) -> Self {
        L2Cache {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    pub(super) fn get_or_load(
        &self,
        key: u64,
        load: impl FnOnce() -> Result<Vec<u64>>,
    ) -> Result<Option<Arc<[u64]>>> {
        {
            let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            g.tick += 1;
            let tick = g.tick;
            if let Some(&i) = g.index.get(&key) {
                let e = &mut g.entries[i];
                e.used = tick;
                return Ok(Some(e.table.clone()));
            }
        }
        let table: Arc<[u64]> = load()?.into();
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.tick += 1;
        let tick = g.tick;
        if !g.index.contains_key(&key) {
            if g.entries.len() >= self.capacity
                && let Some(i) = g
                    .entries
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, e)| e.used)
                    .map(|(i, _)| i)
            {
                let old = g.entries.swap_remove(i);
                g.index.remove(&old.key);
                if let Some(moved) = g.entries.get(i).map(|e| e.key) {
                    g.index.insert(moved, i);
                }
            }
            let at = g.entries.len();
            g.entries.push(Entry {
                key,
                table: table.clone(),
                used: tick,
            });
            g.index.insert(key, at);
        }
        Ok(Some(table))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let c = L2Cache::new(2);
        let mut loads = 0;
        for k in [1, 2, 1, 3, 1, 2] {
            c.get_or_load(k, || {
                loads += 1;
                Ok(vec![k])
            })
            .unwrap();
        }
        // 1 load, 2 load, 1 hit, 3 load (evicts 2), 1 hit, 2 load.
        assert_eq!(loads, 4);
    }

    #[test]
    fn index_follows_evictions() {
        let c = L2Cache::new(8);
        let mut loads = 0;
        // Two passes over 12 keys with room for 8: every lookup misses (the oldest is always
        // the next one wanted), and the index must stay right through the swaps.
        for k in (0..12).chain(0..12) {
            let t = c
                .get_or_load(k, || {
                    loads += 1;
                    Ok(vec![k * 10])
                })
                .unwrap()
                .unwrap();
            assert_eq!(t[0], k * 10);
        }
        assert_eq!(loads, 24);
        // The last 8 are cached.
        for k in 4..12 {
            let t = c
                .get_or_load(k, || panic!("{k} should be cached"))
                .unwrap()
                .unwrap();
            assert_eq!(t[0], k * 10);
        }
        let g = c.inner.lock().unwrap();
        assert_eq!(g.index.len(), g.entries.len());
        assert!(g.index.iter().all(|(k, &i)| g.entries[i].key == *k));
    }
}
