//! `SELECT ... FROM (subquery) AS t ...` whose subquery needs every shard's rows at once
//! (it aggregates, groups, de-duplicates, limits or computes windows over sharded tables
//! without their shard keys): merged through the subquery's final query, with the outer
//! query around it (`merge::derived_spec`). Without this, each shard would run the
//! subquery over its own rows only, which is refused.

use super::*;

/// The analysis of such a query; None for any other (the usual analysis applies).
pub(super) fn derived_select(q: &Query, rules: &Rules) -> Option<Result<Analysis, String>> {
    if let Some(derived) = cte_as_derived(q) {
        return derived_select(&derived, rules);
    }
    let SetExpr::Select(sel) = &*q.body else {
        return None;
    };
    if q.with.is_some() || q.fetch.is_some() || !q.locks.is_empty() {
        return None;
    }
    let [from] = sel.from.as_slice() else {
        return None;
    };
    let TableFactor::Derived {
        lateral: false,
        subquery,
        alias: Some(_),
        sample: None,
    } = &from.relation
    else {
        return None;
    };
    if !from.joins.is_empty() || !super::super::nested::cross_row(subquery, rules) {
        return None;
    }
    // The outer query reads nothing but the derived table.
    let mut outer = sel.clone();
    outer.from.clear();
    let nested = sqlparser::ast::visit_expressions(&outer, |e| match e {
        Expr::Subquery(_) | Expr::Exists { .. } | Expr::InSubquery { .. } => {
            std::ops::ControlFlow::Break(())
        }
        _ => std::ops::ControlFlow::Continue(()),
    });
    let ordered_by_subquery = q.order_by.as_ref().is_some_and(|o| {
        sqlparser::ast::visit_expressions(o, |e| match e {
            Expr::Subquery(_) | Expr::Exists { .. } | Expr::InSubquery { .. } => {
                std::ops::ControlFlow::Break(())
            }
            _ => std::ops::ControlFlow::Continue(()),
        })
        .is_break()
    });
    if nested.is_break() || ordered_by_subquery {
        return None;
    }
    // Only a subquery over sharded tables. It goes where it reads: when its keys place it
    // on one shard, the client's statement runs there as written.
    let inner = match statement(&Statement::Query(subquery.clone()), rules) {
        Ok(a) => a,
        Err(e) => return Some(Err(e)),
    };
    if inner.kind != Kind::Read
        || inner.one_shard
        || !matches!(inner.target, Target::All | Target::Keys(_))
    {
        return None;
    }
    Some(
        crate::router::merge::derived_spec(q, subquery, rules).map(|spec| Analysis {
            shard_sql: spec.finalize.as_ref().map(|f| f.shard_sql.clone()),
            merge: Some(Ok(spec)),
            ..Analysis::of(inner.target, Kind::Read)
        }),
    )
}

/// `WITH t AS (subquery) SELECT ... FROM t ...`, with one CTE read once as the only FROM
/// item, as the `SELECT ... FROM (subquery) AS t ...` it means (a CTE read once is not
/// evaluated apart from the query that reads it).
fn cte_as_derived(q: &Query) -> Option<Query> {
    let with = q.with.as_ref()?;
    let [cte] = with.cte_tables.as_slice() else {
        return None;
    };
    if with.recursive || cte.from.is_some() {
        return None;
    }
    let SetExpr::Select(sel) = &*q.body else {
        return None;
    };
    let [from] = sel.from.as_slice() else {
        return None;
    };
    let TableFactor::Table {
        name,
        alias,
        args: None,
        ..
    } = &from.relation
    else {
        return None;
    };
    let [ObjectNamePart::Identifier(id)] = name.0.as_slice() else {
        return None;
    };
    if ident(id) != ident(&cte.alias.name) || !from.joins.is_empty() {
        return None;
    }
    let alias = match alias {
        None => cte.alias.clone(),
        Some(a) if a.columns.is_empty() => sqlparser::ast::TableAlias {
            columns: cte.alias.columns.clone(),
            ..a.clone()
        },
        Some(_) => return None,
    };
    let mut derived = q.clone();
    derived.with = None;
    if let SetExpr::Select(s) = &mut *derived.body {
        s.from[0].relation = TableFactor::Derived {
            lateral: false,
            subquery: cte.query.clone(),
            alias: Some(alias),
            sample: None,
        };
    }
    Some(derived)
}
