//! The walk over a statement that collects what it touches: the sharded tables it reads
//! or writes (in FROM, joins, CTEs and nested queries), the shard-key values its WHERE
//! clauses allow, and reference tables.

use super::*;

/// Collects the sharded tables a statement reads or writes, and key predicates on them.
#[derive(Default)]
pub(in crate::router) struct Collector {
    /// Sharded tables seen (by rule index).
    pub(in crate::router) seen: Vec<usize>,
    pub(in crate::router) keys: Vec<(usize, KeyRef)>,
    pub(in crate::router) reference: bool,
    pub(in crate::router) kind: Option<Kind>,
    /// An INSERT whose keys the shards generate (see `Target::Any`).
    pub(in crate::router) any_shard: bool,
    /// Why a nested statement (a data-modifying CTE) cannot be routed.
    pub(in crate::router) error: Option<String>,
    /// A part that is not joined to the others (a branch of UNION, INTERSECT, EXCEPT)
    /// reads sharded tables without a key: it needs every shard, whatever keys the other
    /// parts have (co-location does not apply).
    pub(in crate::router) unkeyed: bool,
    /// Nested queries (by address) collected on their own (`nested::independent`).
    pub(in crate::router) skip: Vec<usize>,
    /// Tables not joined on their keys but each pinned to key values (`colocation`).
    pub(in crate::router) one_shard: bool,
    /// Tables whose keys the shards make (with `any_shard`).
    pub(in crate::router) keyless: Vec<usize>,
    /// A co-located INSERT ... SELECT (`Analysis::insert_select`).
    pub(in crate::router) insert_select: bool,
    /// An INSERT ... SELECT through pgshard (`Analysis::insert_via`).
    pub(in crate::router) insert_via: Option<InsertVia>,
}

pub(super) fn ddl_names<'a>(
    names: impl Iterator<Item = &'a ObjectName>,
    rules: &Rules,
    c: &mut Collector,
) {
    for n in names {
        if let Some(n) = name_of(n) {
            if let Some(i) = rules.table(&n) {
                c.seen.push(i);
            } else if rules.is_reference(&n) {
                c.reference = true;
            }
        }
    }
}

/// A query: its CTEs, its body, and (for the target) nothing else.
pub(in crate::router) fn query(q: &Query, rules: &Rules, c: &mut Collector) {
    if c.skip.contains(&(q as *const Query as usize)) {
        return;
    }
    if let Some(with) = &q.with {
        for cte in &with.cte_tables {
            query(&cte.query, rules, c);
        }
    }
    if !q.locks.is_empty() {
        c.kind = Some(c.kind.map_or(Kind::Write, |k| k.max(Kind::Write)));
    }
    set_expr(&q.body, rules, c);
}

pub(super) fn set_expr(s: &SetExpr, rules: &Rules, c: &mut Collector) {
    match s {
        SetExpr::Select(sel) => select(sel, rules, c),
        SetExpr::Query(q) => query(q, rules, c),
        SetExpr::SetOperation { left, right, .. } => {
            for side in [left, right] {
                let mut part = Collector::default();
                set_expr(side, rules, &mut part);
                c.unkeyed |= part.unkeyed || (!part.seen.is_empty() && part.keys.is_empty());
                c.seen.extend(part.seen);
                c.keys.extend(part.keys);
                c.reference |= part.reference;
                c.kind = c.kind.max(part.kind);
                c.any_shard |= part.any_shard;
                c.one_shard |= part.one_shard;
                c.keyless.extend(part.keyless);
                if c.error.is_none() {
                    c.error = part.error;
                }
            }
        }
        SetExpr::Insert(st) | SetExpr::Update(st) | SetExpr::Delete(st) | SetExpr::Merge(st) => {
            // A data-modifying CTE.
            c.kind = Some(Kind::Write);
            match statement(st, rules) {
                // pgshard carries such an INSERT out in steps of its own, which a WITH
                // query cannot contain.
                Ok(a) if a.insert_via.is_some() => {
                    c.error.get_or_insert(
                        "an INSERT in WITH whose rows' shards only their values tell (INSERT ... SELECT, or keys a server must evaluate) is not supported; run it on its own".into(),
                    );
                }
                Ok(a) => {
                    match a.target {
                        Target::Keys(k) => {
                            c.seen.extend(k.iter().map(|x| x.0));
                            c.keys.extend(k);
                        }
                        Target::All => c.seen.push(usize::MAX),
                        Target::Any => {
                            c.any_shard = true;
                            c.keyless.extend(&a.keyless);
                        }
                        Target::Default => {}
                    }
                    c.reference |= a.writes_reference;
                }
                Err(e) => {
                    c.error.get_or_insert(e);
                }
            }
        }
        _ => {}
    }
}

pub(super) fn select(sel: &Select, rules: &Rules, c: &mut Collector) {
    let mut scope = Vec::new();
    for t in &sel.from {
        relation(t, rules, c, &mut scope);
    }
    if let Some(w) = &sel.selection {
        where_keys(w, rules, &scope, c);
    }
    match crate::router::colocation::check(sel, rules) {
        Ok(one_shard) => c.one_shard |= one_shard,
        Err(e) => {
            c.error.get_or_insert(e);
        }
    }
}

/// Tables in a FROM item; sharded ones enter the scope under their alias and their name.
pub(super) fn relation(
    t: &TableWithJoins,
    rules: &Rules,
    c: &mut Collector,
    scope: &mut Vec<(String, usize)>,
) {
    factor(&t.relation, rules, c, scope);
    for j in &t.joins {
        factor(&j.relation, rules, c, scope);
    }
}

pub(super) fn factor(
    f: &TableFactor,
    rules: &Rules,
    c: &mut Collector,
    scope: &mut Vec<(String, usize)>,
) {
    match f {
        TableFactor::Table { name, alias, .. } => {
            let Some(n) = name_of(name) else { return };
            if let Some(idx) = rules.table(&n) {
                c.seen.push(idx);
                if let Some(a) = alias {
                    scope.push((ident(&a.name), idx));
                }
                scope.push((n, idx));
            } else if rules.is_reference(&n) {
                // Reads of reference tables go anywhere: they do not widen the target.
            }
        }
        TableFactor::Derived { subquery, .. } => query(subquery, rules, c),
        TableFactor::NestedJoin {
            table_with_joins, ..
        } => relation(table_with_joins, rules, c, scope),
        _ => {}
    }
}

/// Shard-key constraints of a WHERE clause: per table, the key values a row may have.
pub(super) fn where_keys(e: &Expr, rules: &Rules, scope: &[(String, usize)], c: &mut Collector) {
    // Subqueries contribute their own tables.
    visit_subqueries(e, rules, c);
    for (idx, keys) in constraints(e, rules, scope) {
        c.keys.extend(keys.into_iter().map(|k| (idx, k)));
    }
}

pub(super) fn visit_subqueries(e: &Expr, rules: &Rules, c: &mut Collector) {
    match e {
        Expr::BinaryOp { left, right, .. } => {
            visit_subqueries(left, rules, c);
            visit_subqueries(right, rules, c);
        }
        Expr::Nested(x) | Expr::UnaryOp { expr: x, .. } => visit_subqueries(x, rules, c),
        Expr::InSubquery { subquery, .. } => query(subquery, rules, c),
        Expr::Exists { subquery, .. } | Expr::Subquery(subquery) => query(subquery, rules, c),
        _ => {}
    }
}
