//! Cancel requests: each client gets its own BackendKeyData from pgshard; the registry
//! maps it to the server connection running that client's query, if any.

use crate::net::ServerAddr;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Where a client's running query executes (for its cancel requests and `SHOW CLIENTS`),
/// and its transaction status.
///
/// Written at every checkout and return, so without a lock on that path: the server's key
/// is one atomic word, and the address is locked and written only when it is not the one
/// written last (a client mostly stays on one node). The session is the only writer.
#[derive(Default)]
pub struct CancelSlot {
    /// pid (high half) and secret (low half); 0 when no server connection is attached.
    key: AtomicU64,
    addr: Mutex<Option<ServerAddr>>,
    /// `addr` packed (IPv4) or hashed (others), compared without the lock.
    addr_hash: AtomicU64,
    status: AtomicU8,
}

impl CancelSlot {
    /// Updated when a server connection is attached or released (never per message).
    pub fn set(&self, v: Option<(&ServerAddr, i32, i32)>) {
        let Some((addr, pid, secret)) = v else {
            self.key.store(0, Ordering::Release);
            return;
        };
        // Never 0, the value before the first write.
        let h = match addr {
            ServerAddr::Tcp(std::net::SocketAddr::V4(a)) => {
                1 << 63 | (u32::from(*a.ip()) as u64) << 16 | a.port() as u64
            }
            _ => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                std::hash::Hash::hash(addr, &mut h);
                std::hash::Hasher::finish(&h) | 1
            }
        };
        if self.addr_hash.load(Ordering::Relaxed) != h {
            *self.addr.lock().expect("not poisoned") = Some(addr.clone());
            self.addr_hash.store(h, Ordering::Relaxed);
        }
        // After the address: a reader that sees this key sees its address (or a later one,
        // whose server ignores a key it does not know).
        let key = ((pid as u32 as u64) << 32) | secret as u32 as u64;
        self.key.store(key, Ordering::Release);
    }

    pub fn get(&self) -> Option<(ServerAddr, i32, i32)> {
        let key = self.key.load(Ordering::Acquire);
        if key == 0 {
            return None;
        }
        let addr = self.addr.lock().expect("not poisoned").clone()?;
        Some((addr, (key >> 32) as u32 as i32, key as u32 as i32))
    }

    /// The status of the client's last ReadyForQuery (`I`, `T`, `E`).
    pub fn set_status(&self, s: u8) {
        self.status.store(s, Ordering::Relaxed);
    }

    pub fn status(&self) -> u8 {
        match self.status.load(Ordering::Relaxed) {
            0 => b'I',
            s => s,
        }
    }
}

/// The BackendKeyData pgshard handed to each client, and where that client's query runs.
#[derive(Default)]
pub struct CancelRegistry {
    next_pid: AtomicI32,
    map: Mutex<HashMap<(i32, i32), Arc<CancelSlot>>>,
}

pub(super) struct CancelGuard<'a> {
    reg: &'a CancelRegistry,
    key: (i32, i32),
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        self.reg.map.lock().expect("not poisoned").remove(&self.key);
    }
}

impl CancelRegistry {
    pub(super) fn register(&self) -> (CancelGuard<'_>, (i32, i32), Arc<CancelSlot>) {
        let pid = self.next_pid.fetch_add(1, Ordering::Relaxed) & 0x3fff_ffff;
        let key = (pid + 1, rand::random::<i32>());
        let slot = Arc::new(CancelSlot::default());
        self.map
            .lock()
            .expect("not poisoned")
            .insert(key, slot.clone());
        (CancelGuard { reg: self, key }, key, slot)
    }

    pub(super) fn lookup(&self, pid: i32, secret: i32) -> Option<(ServerAddr, i32, i32)> {
        let slot = self
            .map
            .lock()
            .expect("not poisoned")
            .get(&(pid, secret))
            .cloned()?;
        slot.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slot_keeps_key_and_address_together() {
        let s = CancelSlot::default();
        assert_eq!(s.get(), None);
        let a = ServerAddr::parse("127.0.0.1:5432").unwrap();
        let b = ServerAddr::parse("[::1]:5433").unwrap();
        let c = ServerAddr::parse("/tmp:5432").unwrap();
        s.set(Some((&a, 4242, -7)));
        assert_eq!(s.get(), Some((a.clone(), 4242, -7)));
        s.set(None);
        assert_eq!(s.get(), None);
        s.set(Some((&b, i32::MAX, i32::MIN)));
        assert_eq!(s.get(), Some((b, i32::MAX, i32::MIN)));
        s.set(Some((&c, 3, 4)));
        assert_eq!(s.get(), Some((c, 3, 4)));
        s.set(Some((&a, 1, 2)));
        assert_eq!(s.get(), Some((a, 1, 2)));
    }
}
