//! Validation of a loaded configuration: everything serde cannot check, each problem
//! reported with the key it is about.

use super::*;

impl Config {
    /// Checks everything that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let listen = parse_addr(&self.listen).map_err(|p| invalid("listen", p))?;
        // Reads the certificate files: a bad one is a load error, not a failure later.
        crate::net::TlsClient::new(&self.server_tls).map_err(|(k, p)| invalid(k, p))?;
        if let Some(dir) = &self.unix_socket_dir {
            let key = "unix_socket_dir";
            if !dir.starts_with('/') {
                return Err(invalid(key, format!("'{dir}' is not an absolute path")));
            }
            if !std::path::Path::new(dir).is_dir() {
                return Err(invalid(key, format!("{dir} is not a directory")));
            }
            // The socket is named after the TCP port, so that clients name both the same.
            crate::net::check_socket_path(dir, listen.port()).map_err(|p| invalid(key, p))?;
        }
        if self.users.is_empty() {
            return Err(invalid("users", "at least one user is required"));
        }
        let mut names = HashSet::new();
        for (i, u) in self.users.iter().enumerate() {
            let key = format!("users[{i}]");
            if u.name.is_empty() {
                return Err(invalid(format!("{key}.name"), "must not be empty"));
            }
            if !names.insert(u.name.as_str()) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("user '{}' is listed twice", u.name),
                ));
            }
            match (u.auth, &u.password) {
                (AuthMethod::Trust, _) => {}
                (_, None) => {
                    return Err(invalid(
                        format!("{key}.password"),
                        format!("required for auth {:?}", u.auth).to_lowercase(),
                    ));
                }
                (AuthMethod::Md5, Some(p)) if p.starts_with("SCRAM-SHA-256$") => {
                    return Err(invalid(
                        format!("{key}.password"),
                        "md5 auth needs the plain password, not a SCRAM verifier",
                    ));
                }
                (AuthMethod::ScramSha256, Some(p)) if p.starts_with("SCRAM-SHA-256$") => {
                    crate::frontend::auth::ScramVerifier::parse(p).map_err(|e| {
                        invalid(
                            format!("{key}.password"),
                            format!("bad SCRAM verifier: {e}"),
                        )
                    })?;
                }
                _ => {}
            }
        }
        let p = &self.pool;
        if p.size == 0 {
            return Err(invalid("pool.size", "must be at least 1"));
        }
        if p.min_idle > p.size {
            return Err(invalid("pool.min_idle", "must not exceed pool.size"));
        }
        if p.checkout_timeout_ms == 0 {
            return Err(invalid("pool.checkout_timeout_ms", "must be positive"));
        }
        if p.connect_timeout_ms == 0 {
            return Err(invalid("pool.connect_timeout_ms", "must be positive"));
        }
        if p.statement_cache.per_connection == 0 {
            return Err(invalid(
                "pool.statement_cache.per_connection",
                "must be at least 1",
            ));
        }
        if p.mode == PoolMode::Session && (p.statement_cache.unnamed || p.statement_cache.simple) {
            return Err(invalid(
                "pool.statement_cache",
                "applies to transaction mode only (pool.mode is session)",
            ));
        }
        if self.limits.max_message_size < 1024 {
            return Err(invalid("limits.max_message_size", "must be at least 1024"));
        }
        if self.limits.startup_timeout_ms == 0 {
            return Err(invalid("limits.startup_timeout_ms", "must be positive"));
        }
        if self.databases.is_empty() {
            return Err(invalid("databases", "at least one database is required"));
        }
        let mut dbs = HashSet::new();
        for (i, d) in self.databases.iter().enumerate() {
            let key = format!("databases[{i}]");
            if d.name.is_empty() {
                return Err(invalid(format!("{key}.name"), "must not be empty"));
            }
            if !dbs.insert(d.name.as_str()) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("database '{}' is listed twice", d.name),
                ));
            }
            if d.server_user.is_empty() {
                return Err(invalid(format!("{key}.server_user"), "must not be empty"));
            }
            if d.shards.is_empty() {
                return Err(invalid(
                    format!("{key}.shards"),
                    "at least one shard is required",
                ));
            }
            let mut nodes = HashSet::new();
            for (s, shard) in d.shards.iter().enumerate() {
                let skey = format!("{key}.shards[{s}]");
                for (nkey, addr) in std::iter::once((format!("{skey}.primary"), &shard.primary))
                    .chain(
                        shard
                            .replicas
                            .iter()
                            .enumerate()
                            .map(|(r, a)| (format!("{skey}.replicas[{r}]"), a)),
                    )
                {
                    let sa = crate::net::ServerAddr::parse(addr).map_err(|p| invalid(&nkey, p))?;
                    if !nodes.insert(sa) {
                        return Err(invalid(
                            nkey,
                            format!("{addr} is used by another node of this database"),
                        ));
                    }
                }
            }
            let mut tables = HashSet::new();
            for (t, st) in d.sharded_tables.iter().enumerate() {
                let tkey = format!("{key}.sharded_tables[{t}]");
                if st.table.is_empty() || st.column.is_empty() {
                    return Err(invalid(&tkey, "table and column must not be empty"));
                }
                if !tables.insert(st.table.to_ascii_lowercase()) {
                    return Err(invalid(
                        format!("{tkey}.table"),
                        format!("table '{}' is listed twice", st.table),
                    ));
                }
                if let Some(ty) = &st.key_type
                    && crate::sharding::column::declared(ty).is_none()
                {
                    return Err(invalid(
                        format!("{tkey}.type"),
                        format!(
                            "unknown type '{ty}' (bigint, integer, smallint, numeric, text, varchar, date, timestamp, timestamptz, uuid; numeric(p,s), timestamp(p), timestamptz(p) and varchar(n) with the column's modifier)"
                        ),
                    ));
                }
                if let Some(dir) = &st.directory {
                    if st.method != ShardMethod::Directory {
                        return Err(invalid(
                            format!("{tkey}.directory"),
                            "only for method: directory",
                        ));
                    }
                    if dir.table.is_empty()
                        || !dir
                            .table
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_')
                    {
                        return Err(invalid(
                            format!("{tkey}.directory.table"),
                            "must be a plain table name (letters, digits, _)",
                        ));
                    }
                    if dir.shard.is_some_and(|s| s >= d.shards.len()) {
                        return Err(invalid(
                            format!("{tkey}.directory.shard"),
                            format!("shard {} does not exist", dir.shard.unwrap_or(0)),
                        ));
                    }
                    if dir.cache_size == 0 {
                        return Err(invalid(
                            format!("{tkey}.directory.cache_size"),
                            "must be positive",
                        ));
                    }
                }
                crate::sharding::ShardFn::new(st, d.shards.len(), &tkey).map_err(|e| {
                    ConfigError::Invalid {
                        key: e.split_once(": ").map(|x| x.0).unwrap_or(&tkey).to_string(),
                        problem: e.split_once(": ").map(|x| x.1).unwrap_or(&e).to_string(),
                    }
                })?;
            }
            for (t, rt) in d.reference_tables.iter().enumerate() {
                if tables.contains(&rt.to_ascii_lowercase()) {
                    return Err(invalid(
                        format!("{key}.reference_tables[{t}]"),
                        format!("'{rt}' is also a sharded table"),
                    ));
                }
            }
            replication::validate(d, &key)?;
            if d.two_phase_timeout_ms == 0 {
                return Err(invalid(
                    format!("{key}.two_phase_timeout_ms"),
                    "must be positive",
                ));
            }
            if (1..100).contains(&d.deadlock_detection_ms) {
                // Each round queries every primary; more often than this only loads them.
                return Err(invalid(
                    format!("{key}.deadlock_detection_ms"),
                    "must be 0 (off) or at least 100",
                ));
            }
            if d.default_shard >= d.shards.len() {
                return Err(invalid(
                    format!("{key}.default_shard"),
                    format!(
                        "shard {} does not exist (there are {} shards, numbered from 0)",
                        d.default_shard,
                        d.shards.len()
                    ),
                ));
            }
        }
        if let Some(a) = &self.admin {
            parse_addr(&a.listen).map_err(|p| invalid("admin.listen", p))?;
            if a.users.is_empty() {
                return Err(invalid("admin.users", "at least one user is required"));
            }
            for (i, u) in a.users.iter().enumerate() {
                if self.user(u).is_none() {
                    return Err(invalid(
                        format!("admin.users[{i}]"),
                        format!("'{u}' is not listed under users"),
                    ));
                }
            }
            if !a.listen.ends_with(":0")
                && parse_addr(&a.listen).ok() == parse_addr(&self.listen).ok()
            {
                return Err(invalid("admin.listen", "must differ from listen"));
            }
        }
        if let Some(m) = &self.metrics {
            parse_addr(&m.listen).map_err(|p| invalid("metrics.listen", p))?;
        }
        if let Some(tls) = &self.tls {
            if tls.cert.as_os_str().is_empty() {
                return Err(invalid("tls.cert", "must not be empty"));
            }
            if tls.key.as_os_str().is_empty() {
                return Err(invalid("tls.key", "must not be empty"));
            }
        }
        Ok(())
    }
}
