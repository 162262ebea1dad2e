//! `SELECT EXISTS (subquery)` over several shards: whether any shard has a row.

use super::*;

/// `SELECT EXISTS (subquery) [, NOT EXISTS (subquery) ...]` with nothing else (as
/// SQLAlchemy's `exists()` sends it): the subqueries go where they read, and over several
/// shards the answer is whether any shard has a row (for NOT EXISTS, whether none has):
/// a maximum (minimum) of the shards' booleans. None for any other query.
pub(super) fn exists_select(q: &Query, rules: &Rules) -> Option<Result<Analysis, String>> {
    let SetExpr::Select(sel) = &*q.body else {
        return None;
    };
    let plain = sel.from.is_empty()
        && sel.selection.is_none()
        && sel.having.is_none()
        && sel.distinct.is_none()
        && matches!(&sel.group_by, sqlparser::ast::GroupByExpr::Expressions(g, _) if g.is_empty())
        && q.with.is_none()
        && q.limit_clause.is_none()
        && q.fetch.is_none()
        && q.order_by.is_none()
        && !sel.projection.is_empty();
    if !plain {
        return None;
    }
    let mut subqueries = Vec::new();
    for item in &sel.projection {
        let mut e = match item {
            sqlparser::ast::SelectItem::UnnamedExpr(e)
            | sqlparser::ast::SelectItem::ExprWithAlias { expr: e, .. } => e,
            _ => return None,
        };
        while let Expr::Nested(x) = e {
            e = x;
        }
        let Expr::Exists { subquery, negated } = e else {
            return None;
        };
        subqueries.push((subquery, *negated));
    }
    let mut target = Target::Default;
    let mut columns = Vec::new();
    for (sub, negated) in subqueries {
        // Each shard's rows decide only for plain row sources: a grouped, limited or
        // offset subquery's rows depend on the other shards' rows.
        let grouped = match &*sub.body {
            SetExpr::Select(s) => {
                s.having.is_some()
                    || !matches!(&s.group_by, sqlparser::ast::GroupByExpr::Expressions(g, _) if g.is_empty())
                    || s.projection.iter().any(|i| match i {
                        sqlparser::ast::SelectItem::UnnamedExpr(e)
                        | sqlparser::ast::SelectItem::ExprWithAlias { expr: e, .. } => {
                            crate::router::merge::has_window(e)
                        }
                        _ => false,
                    })
            }
            _ => false,
        };
        if grouped || sub.limit_clause.is_some() || sub.fetch.is_some() {
            return Some(Err(
                "EXISTS of a grouped, windowed or limited subquery across shards is not supported yet; add a shard key condition or a /* pgshard: shard=N */ hint".into(),
            ));
        }
        let a = match statement(&Statement::Query(sub.clone()), rules) {
            Ok(a) => a,
            Err(e) => return Some(Err(e)),
        };
        if a.kind > Kind::Read {
            return None;
        }
        target = target.and(a.target);
        columns.push(if negated {
            crate::router::merge::Column::Min
        } else {
            crate::router::merge::Column::Max
        });
    }
    let spec = MergeSpec {
        aggregates: Some(columns),
        ..MergeSpec::default()
    };
    Some(Ok(Analysis {
        merge: Some(Ok(spec)),
        ..Analysis::of(target, Kind::Read)
    }))
}
