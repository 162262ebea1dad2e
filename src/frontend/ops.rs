//! What operators act on, beside serving clients: the registry of connected clients
//! (`SHOW CLIENTS`), pausing a database's new transactions, and reloading the
//! configuration without dropping clients.

use super::{CancelSlot, Server, State};
use crate::config::Config;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Notify;

/// A connected client, as `SHOW CLIENTS` lists it.
pub struct ClientInfo {
    pub peer: crate::net::Peer,
    pub user: String,
    pub database: String,
    pub since: SystemTime,
    /// Its current server connection and transaction status.
    pub slot: Arc<CancelSlot>,
}

/// Holds a database's new transactions while it is paused.
#[derive(Default)]
pub struct PauseGate {
    paused: AtomicBool,
    notify: Notify,
}

impl PauseGate {
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// Returns once the database is not paused.
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so that a RESUME in between is not missed.
            notified.as_mut().enable();
            if !self.is_paused() {
                return;
            }
            notified.await;
        }
    }

    fn set(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
        if !paused {
            self.notify.notify_waiters();
        }
    }
}

impl Server {
    /// The clients connected now.
    pub fn clients(&self) -> Vec<Arc<ClientInfo>> {
        let mut v: Vec<_> = self
            .clients
            .lock()
            .expect("not poisoned")
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|c| c.since);
        v
    }

    pub(super) fn add_client(&self, id: u64, info: Arc<ClientInfo>) {
        self.clients.lock().expect("not poisoned").insert(id, info);
    }

    pub(super) fn remove_client(&self, id: u64) {
        self.clients.lock().expect("not poisoned").remove(&id);
    }

    /// The pause gate of a database (by client-facing name); it outlives reloads.
    pub fn gate(&self, database: &str) -> Arc<PauseGate> {
        self.gates
            .lock()
            .expect("not poisoned")
            .entry(database.to_string())
            .or_default()
            .clone()
    }

    fn database_names(&self, database: Option<&str>) -> Result<Vec<String>, String> {
        let state = self.state.load();
        match database {
            Some(d) if state.topology.databases.contains_key(d) => Ok(vec![d.to_string()]),
            Some(d) => Err(format!("database \"{d}\" does not exist")),
            None => Ok(state.topology.databases.keys().cloned().collect()),
        }
    }

    /// Pauses a database (or all): its new transactions wait; returns once no client of it
    /// holds a server connection (transactions in flight finished), or after `within`.
    pub async fn pause(&self, database: Option<&str>, within: Duration) -> Result<bool, String> {
        let names = self.database_names(database)?;
        for n in &names {
            self.gate(n).set(true);
        }
        let deadline = Instant::now() + within;
        loop {
            let busy = self
                .clients()
                .iter()
                .any(|c| names.contains(&c.database) && c.slot.get().is_some());
            if !busy {
                return Ok(true);
            }
            if Instant::now() > deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn resume(&self, database: Option<&str>) -> Result<(), String> {
        for n in self.database_names(database)? {
            self.gate(&n).set(false);
        }
        Ok(())
    }

    /// Where `RELOAD` and SIGHUP read the configuration from.
    pub fn set_config_path(&self, path: std::path::PathBuf) {
        *self.config_path.lock().expect("not poisoned") = Some(path);
    }

    /// Re-reads the configuration file. A file that does not load is refused with the
    /// reason and the running configuration stays. Pools of unchanged nodes, each shard's
    /// health view and statistics are kept; sessions move to the new configuration at
    /// their next transaction boundary; pools of removed nodes drain as their last
    /// sessions move.
    pub fn reload(&self) -> Result<String, String> {
        let path = self
            .config_path
            .lock()
            .expect("not poisoned")
            .clone()
            .ok_or("pgshard was not started from a configuration file")?;
        let config = Config::load(&path).map_err(|e| e.to_string())?;
        let old = self.state.load_full();
        let mut notes = Vec::new();
        if config.listen != old.config.listen {
            notes.push(format!(
                "listen stays {} until a restart",
                old.config.listen
            ));
        }
        if config.unix_socket_dir != old.config.unix_socket_dir {
            notes.push("unix_socket_dir changes need a restart".to_string());
        }
        if config.tls.is_some() != old.config.tls.is_some() {
            notes.push("TLS on/off changes need a restart".to_string());
        }
        let state = State::build(config, Some(&old.topology)).map_err(|e| e.to_string())?;
        state.topology.start_monitors();
        self.state.store(Arc::new(state));
        self.generation.fetch_add(1, Ordering::Relaxed);
        tracing::info!(path = %path.display(), "configuration reloaded");
        Ok(if notes.is_empty() {
            "reloaded".into()
        } else {
            format!("reloaded; {}", notes.join("; "))
        })
    }

    /// The configuration's generation: it changes with each reload.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }
}
