//! Directory sharding's in-memory side: the cache of key -> shard entries read from (or
//! written to) the lookup table in PostgreSQL, bounded in size. The reading and writing
//! of the table itself is `exec::directory`'s.

use super::Value;
use std::collections::HashMap;
use std::sync::Mutex;

/// A directory's cached entries, least recently used evicted first (one lock per lookup
/// of a directory-sharded key; other tables never take it).
pub struct DirectoryCache {
    /// The lookup table.
    pub table: String,
    /// The shard holding the lookup table (None: the database's default shard).
    pub shard: Option<usize>,
    capacity: usize,
    entries: Mutex<Entries>,
    /// The lookup table is known to exist.
    pub ready: std::sync::atomic::AtomicBool,
}

/// key -> (shard, last use), and the use counter.
type Entries = (HashMap<String, (usize, u64)>, u64);

impl std::fmt::Debug for DirectoryCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectoryCache")
            .field("table", &self.table)
            .finish()
    }
}

impl DirectoryCache {
    pub fn new(table: String, shard: Option<usize>, capacity: usize) -> DirectoryCache {
        DirectoryCache {
            table,
            shard,
            capacity,
            entries: Mutex::new((HashMap::new(), 0)),
            ready: Default::default(),
        }
    }

    pub fn get(&self, key: &str) -> Option<usize> {
        let mut e = self.entries.lock().expect("not poisoned");
        e.1 += 1;
        let tick = e.1;
        let entry = e.0.get_mut(key)?;
        entry.1 = tick;
        Some(entry.0)
    }

    /// Records an entry; when full, the least recently used tenth goes (so that eviction
    /// costs O(log n) per insert, amortized).
    pub fn put(&self, key: String, shard: usize) {
        let mut e = self.entries.lock().expect("not poisoned");
        e.1 += 1;
        let tick = e.1;
        e.0.insert(key, (shard, tick));
        if e.0.len() > self.capacity {
            let mut ticks: Vec<u64> = e.0.values().map(|v| v.1).collect();
            ticks.sort_unstable();
            let drop = (self.capacity / 10).max(1) + (e.0.len() - self.capacity - 1);
            let cutoff = ticks[drop.min(ticks.len() - 1)];
            e.0.retain(|_, v| v.1 >= cutoff);
        }
    }

    /// Forgets an entry (its key moved).
    pub fn forget(&self, key: &str) {
        self.entries.lock().expect("not poisoned").0.remove(key);
    }

    pub fn len(&self) -> usize {
        self.entries.lock().expect("not poisoned").0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The text a key is stored under in the directory (one text per value).
pub fn canonical(v: &Value) -> String {
    match v {
        Value::Text(t) => t.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_is_bounded_and_keeps_what_is_used() {
        let c = DirectoryCache::new("d".into(), None, 3);
        c.put("a".into(), 0);
        c.put("b".into(), 1);
        c.put("c".into(), 1);
        assert_eq!(c.get("a"), Some(0)); // a is now the most recently used
        c.put("d".into(), 0);
        assert!(c.len() <= 3);
        assert_eq!(c.get("a"), Some(0));
        assert_eq!(c.get("b"), None, "the least recently used went first");
        c.forget("a");
        assert_eq!(c.get("a"), None);
        assert_eq!(canonical(&Value::Text("x'y".into())), "x'y");
        assert_eq!(canonical(&Value::Int(-5)), "-5");
    }
}
