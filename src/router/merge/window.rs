//! Window functions over rows of several shards whose partitions are not whole on one
//! shard (`row_number() OVER (ORDER BY created_at)`, `rank() OVER (ORDER BY score DESC)`,
//! `lag(x) OVER (PARTITION BY status ...)`, running sums): each shard returns the columns
//! the query reads, its WHERE applied (the *partial* query); PostgreSQL computes the
//! windows over all of them, then DISTINCT, ORDER BY, LIMIT and OFFSET (the final query,
//! run as aggregate queries' final queries are: `exec::finalize`). Every row the windows
//! read passes through pgshard's memory, as it would pass through a coordinator's.
//! Windows partitioned by the shard key do not come here: each shard computes them
//! (`windows_by_key`).

use super::finalize::{
    Final, Parts, Substitute, collect_inputs, final_items, finish, merged_rows, output_names,
    parts, placeholders,
};
use super::{MergeSpec, has_plain_aggregate, has_window, plan};
use crate::router::Rules;
use crate::router::analyze::ident;
use sqlparser::ast::{Distinct, Expr, Ident, Query, SelectItem, SetExpr, Value, VisitMut};

/// The merge of a query with window functions through a final query, with the statement
/// the shards run: None when the query is not one this applies to (no window; also
/// aggregates or grouping, which `finalize::plan_final` takes).
///
/// `params`: how many parameters the client's whole statement has. `window`: whether the
/// query must have a window function (a derived table's query is gathered without one:
/// `derived`).
pub(super) fn plan_window(
    q: &Query,
    rules: &Rules,
    params: usize,
    window: bool,
) -> Option<Result<MergeSpec, String>> {
    let Parts {
        sel,
        group_by,
        modifiers,
        items,
        order,
    } = parts(q)?;
    let windows =
        items.iter().any(|(e, _)| has_window(e)) || order.iter().any(|o| has_window(&o.expr));
    let aggregates = items.iter().any(|(e, _)| has_plain_aggregate(e))
        || order.iter().any(|o| has_plain_aggregate(&o.expr));
    if (window && !windows)
        || aggregates
        || !group_by.is_empty()
        || !modifiers.is_empty()
        || sel.having.is_some()
        || !sel.named_window.is_empty()
        || sel.qualify.is_some()
        || matches!(sel.distinct, Some(Distinct::On(_)))
        || q.fetch.is_some()
        || !q.locks.is_empty()
    {
        return None;
    }
    Some(build(q, &items, &order, rules, params))
}

fn build(
    q: &Query,
    items: &[(&Expr, Option<&Ident>)],
    order: &[&sqlparser::ast::OrderByExpr],
    rules: &Rules,
    params: usize,
) -> Result<MergeSpec, String> {
    let SetExpr::Select(sel) = &*q.body else {
        unreachable!("checked by plan_window")
    };
    let nested = || {
        "a subquery in a query with window functions across shards is not supported yet; add a shard key condition or a /* pgshard: shard=N */ hint".to_string()
    };
    let names = output_names(items);
    // A bare name in ORDER BY is an output column when one has that name (PostgreSQL's
    // rule): it stays a name, which the final query resolves the same way.
    let is_output = |e: &Expr| matches!(e, Expr::Identifier(id) if names.contains(&ident(id)));
    // The columns the query reads, each once.
    let mut inputs: Vec<Expr> = Vec::new();
    for (e, _) in items {
        collect_inputs(e, &mut inputs).map_err(|()| nested())?;
    }
    for o in order {
        if !is_output(&o.expr) {
            collect_inputs(&o.expr, &mut inputs).map_err(|()| nested())?;
        }
    }
    if inputs.is_empty() {
        // Windows over nothing but the rows themselves (`row_number() OVER ()`).
        inputs.push(Expr::value(Value::Number("1".into(), false)));
    }
    // The partial query: the rows' columns, as `v0, v1, ...`.
    let mut partial = q.clone();
    partial.order_by = None;
    partial.limit_clause = None;
    let SetExpr::Select(p) = &mut *partial.body else {
        unreachable!("checked by plan_window")
    };
    p.distinct = None;
    p.projection = inputs
        .iter()
        .enumerate()
        .map(|(j, e)| SelectItem::ExprWithAlias {
            expr: e.clone(),
            alias: Ident::new(format!("v{j}")),
        })
        .collect();
    let mut spec = plan(&partial, rules)?;
    // The final query, over the gathered rows: every column read becomes its gathered one.
    let input_texts: Vec<String> = inputs.iter().map(ToString::to_string).collect();
    let mut sub = Substitute::everywhere(&input_texts);
    let mut final_params: Vec<usize> = Vec::new();
    let (out_items, key_outputs) = final_items(items, &names, &mut sub, 'v', &mut final_params);
    let order_texts: Vec<String> = order
        .iter()
        .map(|o| {
            let mut o = (*o).clone();
            if !is_output(&o.expr) {
                let _ = o.expr.visit(&mut sub);
                placeholders(&o.expr, &mut final_params);
            }
            o.to_string()
        })
        .collect();
    if let Some(why) = sub.refused() {
        return Err(why);
    }
    let distinct = if matches!(sel.distinct, Some(Distinct::Distinct)) {
        "DISTINCT "
    } else {
        ""
    };
    let gathered: Vec<String> = (0..inputs.len()).map(|j| format!("v{j}")).collect();
    let mut sql = format!(
        "SELECT {distinct}{} FROM {}",
        out_items.join(", "),
        merged_rows(params, &gathered)
    );
    if !order_texts.is_empty() {
        sql.push_str(&format!(" ORDER BY {}", order_texts.join(", ")));
    }
    let shard_sql = partial.to_string();
    let mut partial_params = Vec::new();
    placeholders(&partial, &mut partial_params);
    let fin = finish(
        q,
        Final {
            sql,
            columns: inputs.len(),
            key_outputs,
            params,
            final_params,
            partial_params,
            shard_sql,
        },
        &|what| {
            format!(
                "{what} in a query with window functions across shards is not supported yet; add a shard key condition or a /* pgshard: shard=N */ hint"
            )
        },
    )?;
    spec.finalize = Some(Box::new(fin));
    Ok(spec)
}
