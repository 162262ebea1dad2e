//! A query over a derived table whose query needs every shard's rows at once: `SELECT *
//! FROM (SELECT id, row_number() OVER (ORDER BY score DESC) AS r FROM users) t WHERE r <=
//! 10`, `SELECT avg(n) FROM (SELECT status, count(*) AS n FROM orders GROUP BY status) s`.
//! The derived table's query is merged as it would be on its own (its partial query on the
//! shards, its final query over what they return); the outer query runs around that
//! final query, on the same server: `SELECT ... FROM (<final query>) AS t WHERE ...`.

use super::finalize::{Final, client_params, finish, placeholders, plan_final};
use super::window::plan_window;
use super::{MergeSpec, has_plain_aggregate};
use crate::router::Rules;
use sqlparser::ast::{GroupByExpr, Query, SelectItem, SetExpr, TableFactor};

/// Stands for the derived table's query in the outer query's text, replaced by its final
/// query.
const MARK: &str = "pgshard_derived_table";

/// The merge of `q`, whose only FROM item is the derived table `inner`.
pub(crate) fn derived_spec(q: &Query, inner: &Query, rules: &Rules) -> Result<MergeSpec, String> {
    let refusal = |what: &str| {
        format!(
            "{what} in a query over a derived table across shards is not supported yet; add a shard key condition or a /* pgshard: shard=N */ hint"
        )
    };
    let params = client_params(q);
    let SetExpr::Select(sel) = &*inner.body else {
        return Err(refusal("a set operation"));
    };
    let grouped = !matches!(&sel.group_by, GroupByExpr::Expressions(g, m) if g.is_empty() && m.is_empty())
        || sel.having.is_some()
        || sel.projection.iter().any(|i| match i {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                has_plain_aggregate(e)
            }
            _ => false,
        });
    let planned = if grouped {
        plan_final(inner, rules, params)
    } else {
        plan_window(inner, rules, params, false)
    };
    let mut spec = planned.unwrap_or_else(|| Err(refusal("this derived table")))?;
    let inner_fin = spec
        .finalize
        .take()
        .ok_or_else(|| refusal("this derived table"))?;
    let inner_sql = inner_fin
        .text()
        .ok_or_else(|| refusal("a LIMIT or OFFSET parameter in the derived table"))?;
    // The outer query around the derived table's final query (its LIMIT and OFFSET are
    // the Finalize's).
    let mut outer = q.clone();
    outer.limit_clause = None;
    let mark = crate::router::parse_query(&format!("SELECT 1 AS {MARK}"))?;
    if let SetExpr::Select(s) = &mut *outer.body
        && let Some(from) = s.from.first_mut()
        && let TableFactor::Derived { subquery, .. } = &mut from.relation
    {
        **subquery = mark;
    }
    let text = outer.to_string();
    let marked = format!("(SELECT 1 AS {MARK})");
    if text.matches(&marked).count() != 1 {
        return Err(refusal("this derived table"));
    }
    let sql = text.replacen(&marked, &format!("({inner_sql})"), 1);
    let mut final_params = inner_fin.final_params.clone();
    placeholders(&outer, &mut final_params);
    let mut inner_params = Vec::new();
    placeholders(inner, &mut inner_params);
    let partial_params = inner_params
        .into_iter()
        .filter(|p| !inner_fin.final_only.contains(p))
        .collect();
    let fin = finish(
        q,
        Final {
            sql,
            columns: inner_fin.columns,
            key_outputs: Vec::new(),
            params,
            final_params,
            partial_params,
            shard_sql: inner_fin.shard_sql,
        },
        &refusal,
    )?;
    spec.finalize = Some(Box::new(fin));
    Ok(spec)
}
