//! Directory sharding's in-memory side: the cache of key -> shard entries read from (or
//! written to) the lookup table in PostgreSQL, bounded in size. The reading and writing
//! of the table itself is `exec::directory`'s.

use super::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// A directory's cached entries (one lock per lookup of a directory-sharded key; other
/// tables never take it).
pub struct DirectoryCache {
    /// The lookup table.
    pub table: String,
    /// The shard holding the lookup table (None: the database's default shard).
    pub shard: Option<usize>,
    capacity: usize,
    entries: Mutex<(HashMap<String, usize>, VecDeque<String>)>,
}

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
            entries: Mutex::new((HashMap::new(), VecDeque::new())),
        }
    }

    pub fn get(&self, key: &str) -> Option<usize> {
        self.entries
            .lock()
            .expect("not poisoned")
            .0
            .get(key)
            .copied()
    }

    /// Records an entry; the oldest go first when full.
    pub fn put(&self, key: String, shard: usize) {
        let mut e = self.entries.lock().expect("not poisoned");
        if e.0.insert(key.clone(), shard).is_none() {
            e.1.push_back(key);
            while e.1.len() > self.capacity {
                if let Some(old) = e.1.pop_front() {
                    e.0.remove(&old);
                }
            }
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
    fn the_cache_is_bounded() {
        let c = DirectoryCache::new("d".into(), None, 2);
        c.put("a".into(), 0);
        c.put("b".into(), 1);
        c.put("c".into(), 1);
        assert_eq!(c.len(), 2);
        assert_eq!(c.get("a"), None);
        assert_eq!(c.get("c"), Some(1));
        c.forget("c");
        assert_eq!(c.get("c"), None);
        assert_eq!(canonical(&Value::Text("x'y".into())), "x'y");
        assert_eq!(canonical(&Value::Int(-5)), "-5");
    }
}
