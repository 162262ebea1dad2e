//! Queries nested in a statement (subqueries, derived tables, CTEs) that do not combine
//! shard by shard. Routing assumes that the tables of a statement are co-located: a row and
//! the rows it is related to live on one shard, so each shard can run the statement on its
//! own rows. A nested query that aggregates, groups, de-duplicates or limits rows of a
//! sharded table, without being correlated with the outer query, breaks that: each shard
//! would see only its part of those rows (`score > (SELECT avg(score) FROM users)`). Such
//! a query must name the shard key, and then the statement runs on that one shard only.

use super::Rules;
use super::analyze::{Collector, ident, query};
use super::merge::{has_plain_aggregate, has_window, windows_by_key};
use sqlparser::ast::{
    Expr, GroupByExpr, Query, SelectItem, SetExpr, Statement, TableFactor, Visit, Visitor,
};
use std::collections::HashSet;
use std::ops::ControlFlow;

/// A nested query that needs every row of the sharded tables it reads: its address in the
/// statement (to leave it out of the outer query's keys) and what it reads.
pub(super) struct Independent {
    pub(super) addr: usize,
    pub(super) part: Collector,
}

/// The nested queries of `st` that aggregate, group, de-duplicate or limit, refer to no
/// table of an enclosing query, and read sharded tables. Only for queries and writes: DDL
/// (`CREATE VIEW ... AS SELECT avg(...)`) is run on every shard as written.
pub(super) fn independent(st: &Statement, rules: &Rules) -> Vec<Independent> {
    if !matches!(
        st,
        Statement::Query(_) | Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_)
    ) {
        return Vec::new();
    }
    struct Find<'r> {
        rules: &'r Rules,
        top: Option<usize>,
        out: Vec<Independent>,
    }
    impl Visitor for Find<'_> {
        type Break = ();
        fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
            let addr = q as *const Query as usize;
            if Some(addr) != self.top && cross_row(q, self.rules) && !correlated(q) {
                let mut part = Collector::default();
                query(q, self.rules, &mut part);
                if !part.seen.is_empty() {
                    self.out.push(Independent { addr, part });
                }
            }
            ControlFlow::Continue(())
        }
    }
    let mut find = Find {
        rules,
        top: match st {
            Statement::Query(q) => Some(&**q as *const Query as usize),
            _ => None,
        },
        out: Vec::new(),
    };
    let _ = st.visit(&mut find);
    find.out
}

/// Whether a query's result depends on all its rows at once: aggregates, GROUP BY, HAVING,
/// DISTINCT, LIMIT/OFFSET/FETCH, set operations, window functions. Grouping by the shard
/// key of every sharded table it reads does not: each group lives on one shard; nor does
/// a window partitioned by a shard key.
pub(super) fn cross_row(q: &Query, rules: &Rules) -> bool {
    if q.limit_clause.is_some() || q.fetch.is_some() {
        return true;
    }
    let items = |s: &sqlparser::ast::Select, hit: &dyn Fn(&Expr) -> bool| {
        s.projection.iter().any(|i| match i {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => hit(e),
            _ => false,
        })
    };
    match &*q.body {
        // A window whose partitions span shards, over rows or over groups.
        SetExpr::Select(s) if items(s, &|e| has_window(e) && !windows_by_key(e, s, rules)) => true,
        SetExpr::Select(s) if groups_by_key(s, rules) => s.distinct.is_some(),
        SetExpr::Select(s) => {
            !matches!(&s.group_by, GroupByExpr::Expressions(g, _) if g.is_empty())
                || s.having.is_some()
                || s.distinct.is_some()
                || items(s, &has_plain_aggregate)
        }
        SetExpr::Query(inner) => cross_row(inner, rules),
        SetExpr::SetOperation { .. } => true,
        _ => false,
    }
}

/// Whether a SELECT groups by the shard key of each sharded table in its FROM (by column
/// name, bare or qualified).
pub(super) fn groups_by_key(s: &sqlparser::ast::Select, rules: &Rules) -> bool {
    let GroupByExpr::Expressions(groups, _) = &s.group_by else {
        return false;
    };
    let grouped: Vec<String> = groups
        .iter()
        .filter_map(|g| match g {
            Expr::Identifier(id) => Some(ident(id)),
            Expr::CompoundIdentifier(parts) => parts.last().map(ident),
            _ => None,
        })
        .collect();
    let mut tables = Vec::new();
    for t in &s.from {
        for f in std::iter::once(&t.relation).chain(t.joins.iter().map(|j| &j.relation)) {
            if let TableFactor::Table { name, .. } = f
                && let Some(i) = super::analyze::name_of(name).and_then(|n| rules.table(&n))
            {
                tables.push(i);
            }
        }
    }
    !tables.is_empty()
        && tables
            .iter()
            .all(|&i| grouped.contains(&rules.tables[i].column))
}

/// Whether a query refers to a table it does not name itself (a correlated subquery):
/// a qualified column `t.col` whose `t` is none of its own tables, aliases or CTEs.
/// Unqualified columns are taken to be its own (SQL resolves them innermost first).
pub(super) fn correlated(q: &Query) -> bool {
    #[derive(Default)]
    struct Names {
        defined: HashSet<String>,
        qualifiers: HashSet<String>,
    }
    impl Visitor for Names {
        type Break = ();
        fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
            if let Some(with) = &q.with {
                for cte in &with.cte_tables {
                    self.defined.insert(ident(&cte.alias.name));
                }
            }
            ControlFlow::Continue(())
        }
        fn pre_visit_table_factor(&mut self, f: &TableFactor) -> ControlFlow<()> {
            match f {
                // An alias hides the table's name (`FROM orders o` cannot say orders.x).
                TableFactor::Table { alias: Some(a), .. } => {
                    self.defined.insert(ident(&a.name));
                }
                TableFactor::Table { name, .. } => {
                    if let Some(n) = super::analyze::name_of(name) {
                        self.defined.insert(n);
                    }
                }
                TableFactor::Derived { alias: Some(a), .. }
                | TableFactor::Function { alias: Some(a), .. }
                | TableFactor::UNNEST { alias: Some(a), .. } => {
                    self.defined.insert(ident(&a.name));
                }
                _ => {}
            }
            ControlFlow::Continue(())
        }
        fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
            if let Expr::CompoundIdentifier(parts) = e
                && parts.len() >= 2
            {
                self.qualifiers.insert(ident(&parts[parts.len() - 2]));
            }
            ControlFlow::Continue(())
        }
    }
    let mut names = Names::default();
    let _ = q.visit(&mut names);
    names.qualifiers.iter().any(|t| !names.defined.contains(t))
}

#[cfg(test)]
mod tests {
    use crate::router::analyze::tests::{lit, rules};
    use crate::router::analyze::{AnalyzeError, Target, analyze};

    #[test]
    fn aggregating_subqueries_need_their_own_key() {
        // In expressions, uncorrelated: pgshard evaluates them first.
        for sql in [
            "SELECT * FROM users WHERE score > (SELECT avg(score) FROM users)",
            "SELECT * FROM users WHERE id = 1 AND score > (SELECT avg(score) FROM users)",
            "SELECT id, (SELECT count(*) FROM orders) FROM users WHERE id = 1",
            "SELECT * FROM users WHERE id IN (SELECT user_id FROM orders ORDER BY total DESC LIMIT 3)",
            "UPDATE users SET score = (SELECT max(score) FROM users) WHERE id = 3",
            "DELETE FROM orders WHERE total < (SELECT avg(total) FROM orders)",
        ] {
            assert!(crate::router::analyze::tests::evaluated_first(sql), "{sql}");
        }
        // Derived tables and CTEs beside other tables: refused.
        for sql in [
            "SELECT * FROM users u, (SELECT max(total) AS m FROM orders) x WHERE u.id = 2",
            "WITH t AS (SELECT DISTINCT name FROM users) SELECT count(*) FROM t, countries",
            "WITH t AS (SELECT name, count(*) FROM users GROUP BY name) SELECT * FROM t WHERE name IN (SELECT name FROM t)",
        ] {
            let e = analyze(sql, &rules());
            assert!(
                matches!(e, Err(AnalyzeError::Unroutable(_))),
                "{sql}: {e:?}"
            );
        }
        // With its own key: the statement runs on that one shard, and the outer query
        // must be there too.
        let a = analyze(
            "SELECT * FROM orders WHERE user_id = 1 AND total > (SELECT avg(total) FROM orders WHERE user_id = 1)",
            &rules(),
        )
        .unwrap();
        assert!(a.one_shard);
        assert_eq!(a.target, Target::Keys(vec![(1, lit("1")), (1, lit("1"))]));
        let a = analyze(
            "SELECT * FROM users WHERE score > (SELECT max(score) FROM users WHERE id = 5)",
            &rules(),
        )
        .unwrap();
        assert!(a.one_shard);
        assert_eq!(a.target, Target::All, "the outer users need every shard");
        // The only FROM item of the query: merged on its own, the outer query around it
        // (`merge::derived_spec`).
        for sql in [
            "WITH t AS (SELECT DISTINCT name FROM users) SELECT count(*) FROM t",
            "WITH t AS (SELECT name, count(*) FROM users GROUP BY name) SELECT * FROM t",
            "SELECT max(m) FROM (SELECT max(total) AS m FROM orders GROUP BY total) x",
        ] {
            let a = analyze(sql, &rules()).unwrap();
            assert!(!a.one_shard, "{sql}");
            assert!(a.merge.unwrap().unwrap().finalize.is_some(), "{sql}");
        }
        // Correlated with the outer row, or row by row: co-located, shard by shard.
        for sql in [
            "SELECT u.id, (SELECT count(*) FROM orders o WHERE o.user_id = u.id) FROM users u",
            "SELECT * FROM users u WHERE EXISTS (SELECT 1 FROM orders o WHERE o.user_id = u.id AND o.total > 5)",
            "SELECT * FROM users WHERE id IN (SELECT user_id FROM orders WHERE total > 100)",
            "SELECT * FROM users WHERE score > (SELECT max(score) FROM countries)",
            "SELECT count(*) FROM (SELECT * FROM users WHERE score > 3) x",
            "WITH t AS (SELECT user_id, sum(total) AS s FROM orders GROUP BY user_id) SELECT * FROM t WHERE s > 10",
            "SELECT * FROM users u JOIN (SELECT o.user_id, count(*) AS n FROM orders o GROUP BY o.user_id) c ON c.user_id = u.id",
            "CREATE VIEW top AS SELECT * FROM users WHERE score > (SELECT avg(score) FROM users)",
        ] {
            let a = analyze(sql, &rules()).unwrap();
            assert!(!a.one_shard, "{sql}");
        }
    }
}
