//! Cancel requests: each client gets its own BackendKeyData from pgshard; the registry
//! maps it to the server connection running that client's query, if any.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

/// Where a client's running query executes (for its cancel requests and `SHOW CLIENTS`),
/// and its transaction status.
#[derive(Default)]
pub struct CancelSlot {
    server: Mutex<Option<(SocketAddr, i32, i32)>>,
    status: AtomicU8,
}

impl CancelSlot {
    /// Updated when a server connection is attached or released (never per message).
    pub fn set(&self, v: Option<(SocketAddr, i32, i32)>) {
        *self.server.lock().expect("not poisoned") = v;
    }

    pub fn get(&self) -> Option<(SocketAddr, i32, i32)> {
        *self.server.lock().expect("not poisoned")
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

    pub(super) fn lookup(&self, pid: i32, secret: i32) -> Option<(SocketAddr, i32, i32)> {
        let slot = self
            .map
            .lock()
            .expect("not poisoned")
            .get(&(pid, secret))
            .cloned()?;
        slot.get()
    }
}
