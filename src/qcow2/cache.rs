//! A small bounded cache of decoded L2 tables, shared by reader threads.
//!
//! Least-recently-used eviction over a fixed number of tables; the lock is held only to look up
//! or insert, never during I/O (two threads may load the same table at once; both results are
//! identical and one wins).

use crate::error::Result;
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
            if let Some(e) = g.entries.iter_mut().find(|e| e.key == key) {
                e.used = tick;
                return Ok(Some(e.table.clone()));
            }
        }
        let table: Arc<[u64]> = load()?.into();
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.tick += 1;
        let tick = g.tick;
        if !g.entries.iter().any(|e| e.key == key) {
            if g.entries.len() >= self.capacity {
                if let Some(i) = g
                    .entries
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, e)| e.used)
                    .map(|(i, _)| i)
                {
                    g.entries.swap_remove(i);
                }
            }
            g.entries.push(Entry {
                key,
                table: table.clone(),
                used: tick,
            });
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
}
