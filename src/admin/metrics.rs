//! The Prometheus text format (version 0.0.4) of everything an operator pages on: node
//! health, roles, fencing and replication lag; pools; per-shard queries, transactions,
//! errors by SQLSTATE class and latency; clients; failovers.

use crate::frontend::Server;
use crate::metrics::{BUCKETS, Histogram};
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write;
use std::sync::atomic::Ordering;

/// One metric family: its samples, written under one HELP/TYPE header.
struct Family {
    help: &'static str,
    kind: &'static str,
    samples: Vec<String>,
}

#[derive(Default)]
struct Out {
    families: BTreeMap<&'static str, Family>,
}

impl Out {
    fn family(
        &mut self,
        name: &'static str,
        kind: &'static str,
        help: &'static str,
    ) -> &mut Family {
        self.families.entry(name).or_insert_with(|| Family {
            help,
            kind,
            samples: Vec::new(),
        })
    }

    fn gauge(&mut self, name: &'static str, help: &'static str, labels: &str, v: f64) {
        self.family(name, "gauge", help)
            .samples
            .push(format!("{name}{{{labels}}} {}", num(v)));
    }

    fn counter(&mut self, name: &'static str, help: &'static str, labels: &str, v: u64) {
        self.family(name, "counter", help)
            .samples
            .push(format!("{name}{{{labels}}} {v}"));
    }

    fn histogram(&mut self, name: &'static str, help: &'static str, labels: &str, h: &Histogram) {
        let (cum, sum) = h.snapshot();
        let f = self.family(name, "histogram", help);
        for (i, c) in cum.iter().enumerate() {
            let le = BUCKETS.get(i).map_or("+Inf".to_string(), |b| num(*b));
            f.samples
                .push(format!("{name}_bucket{{{labels},le=\"{le}\"}} {c}"));
        }
        f.samples
            .push(format!("{name}_sum{{{labels}}} {}", num(sum)));
        f.samples.push(format!(
            "{name}_count{{{labels}}} {}",
            cum.last().copied().unwrap_or(0)
        ));
    }

    fn render(self) -> String {
        let mut s = String::new();
        for (name, f) in self.families {
            let _ = writeln!(s, "# HELP {name} {}", f.help);
            let _ = writeln!(s, "# TYPE {name} {}", f.kind);
            for line in f.samples {
                s.push_str(&line);
                s.push('\n');
            }
        }
        s
    }
}

fn num(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// A label value, escaped as the text format wants.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Everything, now.
pub fn render(server: &Server) -> String {
    let mut o = Out::default();
    let state = server.state.load();
    o.gauge(
        "pgshard_clients_connected",
        "Client connections open now.",
        "",
        server.clients().len() as f64,
    );
    for l in server.listeners.stats() {
        let d = format!("database=\"{}\"", esc(&l.database));
        o.gauge(
            "pgshard_listen_channels",
            "Channels clients LISTEN on through pgshard (transaction pooling).",
            &d,
            l.channels as f64,
        );
        o.counter(
            "pgshard_notifications_total",
            "Notifications pgshard's listener connections received.",
            &d,
            l.notifications,
        );
        for (shard, up) in l.connected.iter().enumerate() {
            o.gauge(
                "pgshard_listener_connected",
                "Whether the listener connection to the shard's primary is up (0: notifications from that shard are lost).",
                &format!("{d},shard=\"{shard}\""),
                if *up { 1.0 } else { 0.0 },
            );
        }
    }
    let mut pools_seen = HashSet::new();
    let mut dbs: Vec<_> = state.topology.databases.iter().collect();
    dbs.sort_by_key(|(n, _)| n.as_str());
    for (name, db) in dbs {
        let d = esc(name);
        o.counter(
            "pgshard_failovers_total",
            "Failovers this pgshard carried out.",
            &format!("database=\"{d}\""),
            db.failovers.load(Ordering::Relaxed),
        );
        o.gauge(
            "pgshard_last_failover_duration_seconds",
            "From the dead primary's detection to the new primary taking writes, last failover.",
            &format!("database=\"{d}\""),
            db.last_failover_ms.load(Ordering::Relaxed) as f64 / 1000.0,
        );
        let dl = format!("database=\"{d}\"");
        o.counter(
            "pgshard_deadlocks_total",
            "Deadlocks across shards pgshard broke by cancelling a transaction's wait.",
            &dl,
            db.deadlocks.load(Ordering::Relaxed),
        );
        o.counter(
            "pgshard_merge_limit_exceeded_total",
            "Statements over several shards cancelled because a shard's answer passed max_merge_bytes.",
            &dl,
            db.merge_limit_hits.load(Ordering::Relaxed),
        );
        o.counter(
            "pgshard_subqueries_evaluated_first_total",
            "Statements whose uncorrelated subqueries over sharded tables pgshard evaluated before them.",
            &dl,
            db.pre_evaluated.load(Ordering::Relaxed),
        );
        o.counter(
            "pgshard_2pc_prepared_total",
            "Multi-shard transactions prepared on every shard.",
            &dl,
            db.two_phase_prepared.load(Ordering::Relaxed),
        );
        o.counter(
            "pgshard_2pc_committed_total",
            "Multi-shard transactions whose commit decision was recorded.",
            &dl,
            db.two_phase_commits.load(Ordering::Relaxed),
        );
        o.counter(
            "pgshard_2pc_recovered_total",
            "In-doubt prepared transactions finished by recovery.",
            &format!("{dl},outcome=\"commit\""),
            db.recovered_commits.load(Ordering::Relaxed),
        );
        o.counter(
            "pgshard_2pc_recovered_total",
            "In-doubt prepared transactions finished by recovery.",
            &format!("{dl},outcome=\"rollback\""),
            db.recovered_rollbacks.load(Ordering::Relaxed),
        );
        for f in &db.router.rules.tables {
            let differs = matches!(
                f.key.observed(),
                crate::sharding::column::Observed::Type { matches: false, .. }
            );
            o.gauge(
                "pgshard_shard_key_type_mismatch",
                "1 when a sharded table's key column has another type on the servers than pgshard reads its keys as (set its `type`).",
                &format!("{dl},table=\"{}\"", esc(&f.table)),
                if differs { 1.0 } else { 0.0 },
            );
        }
        for (s, shard) in db.shards.iter().enumerate() {
            let sl = format!("database=\"{d}\",shard=\"{s}\"");
            let view = shard.view();
            o.gauge(
                "pgshard_shard_has_primary",
                "1 when the shard has a primary taking writes.",
                &sl,
                if view.primary.is_some_and(|p| view.nodes[p].up) {
                    1.0
                } else {
                    0.0
                },
            );
            for (n, node) in shard.nodes.iter().enumerate() {
                let st = &view.nodes[n];
                let nl = format!("{sl},node=\"{}\"", esc(&node.addr));
                let b = |x: bool| if x { 1.0 } else { 0.0 };
                o.gauge(
                    "pgshard_node_up",
                    "1 while the node passes health checks.",
                    &nl,
                    b(st.up && st.failures == 0),
                );
                o.gauge(
                    "pgshard_node_primary",
                    "1 for the node taking the shard's writes.",
                    &nl,
                    b(view.primary == Some(n)),
                );
                o.gauge(
                    "pgshard_node_fenced",
                    "1 for a node fenced as a stale primary.",
                    &nl,
                    b(st.fenced),
                );
                o.gauge(
                    "pgshard_node_banned",
                    "1 for a node banned by an operator.",
                    &nl,
                    b(node.is_banned()),
                );
                o.gauge(
                    "pgshard_node_timeline",
                    "The node's timeline.",
                    &nl,
                    st.timeline as f64,
                );
                if view.primary != Some(n) && st.in_recovery == Some(true) {
                    o.gauge(
                        "pgshard_replication_lag_bytes",
                        "Replay lag behind the primary, bytes.",
                        &nl,
                        st.lag_bytes as f64,
                    );
                    o.gauge(
                        "pgshard_replication_lag_seconds",
                        "Replay lag behind the primary, seconds.",
                        &nl,
                        st.lag_ms as f64 / 1000.0,
                    );
                }
                let p = &node.pool;
                let key = (
                    p.target.addr.clone(),
                    p.target.database.clone(),
                    p.target.user.clone(),
                );
                if pools_seen.insert(key) {
                    let pl = format!(
                        "node=\"{}\",server_database=\"{}\",user=\"{}\"",
                        esc(&node.addr),
                        esc(&p.target.database),
                        esc(&p.target.user)
                    );
                    let ps = p.state();
                    let idle = ps.idle_connections as f64;
                    let in_use = ps.connections.saturating_sub(ps.idle_connections) as f64;
                    o.gauge(
                        "pgshard_pool_connections",
                        "Server connections by state.",
                        &format!("{pl},state=\"in_use\""),
                        in_use,
                    );
                    o.gauge(
                        "pgshard_pool_connections",
                        "Server connections by state.",
                        &format!("{pl},state=\"idle\""),
                        idle,
                    );
                    o.gauge(
                        "pgshard_pool_waiting",
                        "Checkouts waiting for a server connection now.",
                        &pl,
                        p.stats().waiting.load(Ordering::Relaxed) as f64,
                    );
                    o.histogram(
                        "pgshard_pool_checkout_wait_seconds",
                        "Time to get a server connection.",
                        &pl,
                        &p.stats().checkout,
                    );
                    let st = p.stats();
                    o.counter(
                        "pgshard_pool_checkout_timeouts_total",
                        "Checkouts that waited the whole checkout timeout (clients got 53300).",
                        &pl,
                        st.timeouts.load(Ordering::Relaxed),
                    );
                    o.counter(
                        "pgshard_pool_connections_opened_total",
                        "Server connections opened.",
                        &pl,
                        st.opened.load(Ordering::Relaxed),
                    );
                    o.counter(
                        "pgshard_pool_connect_failures_total",
                        "Server connections that could not be opened (refused, auth, timeout).",
                        &pl,
                        st.connect_failures.load(Ordering::Relaxed),
                    );
                    for why in crate::metrics::CloseReason::ALL {
                        o.counter(
                            "pgshard_pool_connections_closed_total",
                            "Server connections closed by pgshard, by reason.",
                            &format!("{pl},reason=\"{}\"", why.label()),
                            st.closed[why as usize].load(Ordering::Relaxed),
                        );
                    }
                }
            }
            let st = &shard.stats;
            o.counter(
                "pgshard_queries_total",
                "Requests answered by the shard (a query, or a batch up to Sync).",
                &sl,
                st.queries.load(Ordering::Relaxed),
            );
            o.counter(
                "pgshard_transactions_total",
                "Transactions (and single statements outside one) ended on the shard.",
                &sl,
                st.transactions.load(Ordering::Relaxed),
            );
            o.counter(
                "pgshard_cross_shard_total",
                "Requests that read or wrote several shards, counted on each.",
                &sl,
                st.cross_shard.load(Ordering::Relaxed),
            );
            o.counter(
                "pgshard_broadcast_total",
                "DDL and writes sent to every shard, counted on each.",
                &sl,
                st.broadcast.load(Ordering::Relaxed),
            );
            o.counter(
                "pgshard_finalized_total",
                "Final queries of aggregates over several shards run on this shard's servers.",
                &sl,
                st.finalized.load(Ordering::Relaxed),
            );
            o.counter(
                "pgshard_finalized_bytes_total",
                "Bytes of merged groups or gathered rows sent to this shard's servers for final queries.",
                &sl,
                st.finalized_bytes.load(Ordering::Relaxed),
            );
            let ss = &st.statements;
            for (name, help, n) in [
                (
                    "pgshard_server_statements_prepared_total",
                    "Statements pgshard prepared on server connections (Parses it sent for named statements in transaction mode and for the statement cache).",
                    &ss.prepared,
                ),
                (
                    "pgshard_server_statements_reused_total",
                    "Uses of a statement the server connection already held, where PostgreSQL would have parsed the text again.",
                    &ss.reused,
                ),
                (
                    "pgshard_server_statements_evicted_total",
                    "Statements closed on a server connection to keep pool.statement_cache.per_connection (many: raise it).",
                    &ss.evicted,
                ),
                (
                    "pgshard_server_statements_retried_total",
                    "Requests sent again after the server refused a cached statement (DDL changed its result) or a simple query's prepared form failed.",
                    &ss.retried,
                ),
            ] {
                o.counter(name, help, &sl, n.load(Ordering::Relaxed));
            }
            for (class, n) in st.errors() {
                o.counter(
                    "pgshard_errors_total",
                    "Errors returned to clients, by SQLSTATE class.",
                    &format!("{sl},class=\"{}\"", esc(&class)),
                    n,
                );
            }
            o.histogram(
                "pgshard_query_duration_seconds",
                "From a request reaching the shard to its ReadyForQuery.",
                &sl,
                &st.latency,
            );
        }
    }
    o.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_labels() {
        assert_eq!(num(3.0), "3");
        assert_eq!(num(0.25), "0.25");
        assert_eq!(esc("a\"b\\"), "a\\\"b\\\\");
        let mut o = Out::default();
        o.counter("x_total", "X.", "a=\"1\"", 2);
        o.counter("x_total", "X.", "a=\"2\"", 3);
        let h = Histogram::default();
        h.observe(std::time::Duration::from_millis(2));
        o.histogram("y_seconds", "Y.", "a=\"1\"", &h);
        let text = o.render();
        assert_eq!(text.matches("# TYPE x_total counter").count(), 1);
        assert!(text.contains("x_total{a=\"2\"} 3\n"));
        assert!(text.contains("y_seconds_bucket{a=\"1\",le=\"0.0025\"} 1\n"));
        assert!(text.contains("y_seconds_bucket{a=\"1\",le=\"+Inf\"} 1\n"));
        assert!(text.contains("y_seconds_count{a=\"1\"} 1\n"));
    }
}
