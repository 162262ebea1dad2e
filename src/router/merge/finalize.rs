//! Aggregate queries over shards that need more than adding groups up: expressions over
//! aggregates (`coalesce(sum(x), 0)`, `max(x) - min(x)`, `round(avg(x), 2)`), any HAVING,
//! ORDER BY an aggregate that is not selected, GROUP BY what is not selected, DISTINCT and
//! OFFSET. Each shard computes its groups' partial aggregates (the *partial* query),
//! pgshard adds the groups up as for any aggregate merge, and PostgreSQL itself evaluates
//! the rest over the merged groups ([`Finalize::sql`], run by `exec::finalize`), so that
//! everything above the aggregates has PostgreSQL's own types, arithmetic, collations and
//! NULL rules rather than a re-implementation of them.

use super::aggregate::is_aggregate;
use super::colname::column_name;
use super::{MergeSpec, plan, shard_statement};
use crate::router::Rules;
use crate::router::analyze::{KeyRef, ident, value_of};
use crate::sql::quote_ident;
use sqlparser::ast::{
    Distinct, Expr, GroupByExpr, Ident, LimitClause, OrderByKind, Query, SelectItem, SetExpr,
    Value, VisitMut, VisitorMut,
};
use std::ops::ControlFlow;

/// What PostgreSQL evaluates over the merged groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finalize {
    /// The partial query: what each shard runs.
    pub shard_sql: String,
    /// The query over the merged groups, without LIMIT and OFFSET: it reads them as
    /// `ROWS FROM (unnest($1), ..., unnest($n)) AS pgshard_m(k0, ..., a0, ...)`, one array parameter per
    /// merged column (group keys, then aggregates).
    pub sql: String,
    /// The number of merged columns (array parameters).
    pub columns: usize,
    /// For each output column that is a group key as it is (`k{i}`): its position and
    /// i. The final query's description of it takes the shards' table, column number
    /// and type modifier (an array parameter has none), as a plain query's has.
    pub key_outputs: Vec<(usize, usize)>,
    /// LIMIT and OFFSET, applied by the final query.
    pub limit: Option<Count>,
    pub offset: Option<Count>,
    /// The client's parameters keep their numbers in the final query (`$1` to
    /// `$params`); the arrays come after them.
    pub params: usize,
    /// The client's parameters (0-based) the final query uses: it gets their values and
    /// types; the others are sent as NULL text.
    pub final_params: Vec<usize>,
    /// The client's parameters only the final query uses: the shards get NULL text for
    /// them (the partial query does not name them, so their types could not be told).
    pub final_only: Vec<usize>,
}

/// A LIMIT or OFFSET of the final query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Count {
    /// As the client wrote it (a number, ALL, NULL).
    Text(String),
    /// The client's parameter (0-based), whose value each Bind gives.
    Param(usize),
}

impl Finalize {
    /// The final query's text with LIMIT and OFFSET; None while one is a parameter not
    /// bound yet ([`MergeSpec::bound`]).
    pub fn text(&self) -> Option<String> {
        let mut sql = self.sql.clone();
        for (count, what) in [(&self.limit, "LIMIT"), (&self.offset, "OFFSET")] {
            match count {
                None => {}
                Some(Count::Text(t)) => sql.push_str(&format!(" {what} {t}")),
                Some(Count::Param(_)) => return None,
            }
        }
        Some(sql)
    }

    /// [`Finalize::text`] with merged columns read in the given collations (a group key
    /// of a column declared `COLLATE "C"` compares and sorts as the column does, not in
    /// the database's default collation): `unnest($n COLLATE c)`.
    pub fn text_collated(&self, collations: &[Option<String>]) -> Option<String> {
        let mut sql = self.text()?;
        if collations.iter().all(Option::is_none) {
            return Some(sql);
        }
        let unnest = |i: usize, c: Option<&String>| match c {
            None => format!("pg_catalog.unnest(${})", self.params + i + 1),
            Some(c) => format!("pg_catalog.unnest(${} COLLATE {c})", self.params + i + 1),
        };
        let from = |with: bool| {
            let calls: Vec<String> = (0..self.columns)
                .map(|i| {
                    unnest(
                        i,
                        collations.get(i).and_then(Option::as_ref).filter(|_| with),
                    )
                })
                .collect();
            format!("ROWS FROM ({}) AS {MERGED}(", calls.join(", "))
        };
        sql = sql.replacen(&from(false), &from(true), 1);
        Some(sql)
    }

    /// The client's parameters the final query needs.
    pub fn params(&self) -> impl Iterator<Item = usize> + '_ {
        [&self.limit, &self.offset]
            .into_iter()
            .filter_map(|c| match c {
                Some(Count::Param(i)) => Some(*i),
                _ => None,
            })
    }
}

/// The alias of the merged groups in the final query.
pub(super) const MERGED: &str = "pgshard_m";

/// The merge of an aggregate query through a final query, with the statement the shards
/// run: None when the query is not one this applies to.
/// `params`: how many parameters the client's whole statement has (the final query's
/// arrays are numbered after them).
pub(super) fn plan_final(
    q: &Query,
    rules: &Rules,
    params: usize,
) -> Option<Result<MergeSpec, String>> {
    let Parts {
        sel,
        group_by,
        modifiers,
        items,
        order,
    } = parts(q)?;
    let aggregates = items.iter().any(|(e, _)| super::has_plain_aggregate(e))
        || sel.having.as_ref().is_some_and(super::has_plain_aggregate)
        || order.iter().any(|o| super::has_plain_aggregate(&o.expr));
    let windows = items.iter().any(|(e, _)| super::has_window(e))
        || order.iter().any(|o| super::has_window(&o.expr));
    if (!aggregates && group_by.is_empty())
        || windows
        || !modifiers.is_empty()
        || !sel.named_window.is_empty()
        || sel.qualify.is_some()
        || q.fetch.is_some()
        || !q.locks.is_empty()
        || super::super::nested::groups_by_key(sel, rules)
    {
        return None;
    }
    Some(build(q, sel, &items, group_by, &order, rules, params))
}

/// The parts of a plain SELECT that final queries are made of.
pub(super) struct Parts<'q> {
    pub sel: &'q sqlparser::ast::Select,
    pub group_by: &'q [Expr],
    pub modifiers: &'q [sqlparser::ast::GroupByWithModifier],
    /// The select list's expressions and aliases.
    pub items: Vec<(&'q Expr, Option<&'q Ident>)>,
    pub order: Vec<&'q sqlparser::ast::OrderByExpr>,
}

/// [`Parts`] of `q`; None for other queries than a SELECT, and for a select list with `*`
/// (columns only the servers know).
pub(super) fn parts(q: &Query) -> Option<Parts<'_>> {
    let SetExpr::Select(sel) = &*q.body else {
        return None;
    };
    let GroupByExpr::Expressions(group_by, modifiers) = &sel.group_by else {
        return None;
    };
    let mut items = Vec::new();
    for item in &sel.projection {
        match item {
            SelectItem::UnnamedExpr(e) => items.push((e, None)),
            SelectItem::ExprWithAlias { expr, alias } => items.push((expr, Some(alias))),
            _ => return None,
        }
    }
    let order = match q.order_by.as_ref().map(|o| &o.kind) {
        None => Vec::new(),
        Some(OrderByKind::Expressions(e)) => e.iter().collect(),
        Some(_) => return None,
    };
    Some(Parts {
        sel,
        group_by,
        modifiers,
        items,
        order,
    })
}

fn build(
    q: &Query,
    sel: &sqlparser::ast::Select,
    items: &[(&Expr, Option<&Ident>)],
    group_by: &[Expr],
    order: &[&sqlparser::ast::OrderByExpr],
    rules: &Rules,
    params: usize,
) -> Result<MergeSpec, String> {
    let refusal = |what: &str| {
        format!(
            "{what} in an aggregate query across shards is not supported yet; add a shard key condition or a /* pgshard: shard=N */ hint"
        )
    };
    let refuse = |what: &str| Err(refusal(what));
    // GROUP BY 2 and GROUP BY an output name: the expression they stand for. PostgreSQL
    // takes an input column of that name first: a name the query uses as a column
    // elsewhere is one (`input_column_names`); others are taken as the alias.
    let inputs = super::input_column_names(sel);
    let mut groups: Vec<Expr> = Vec::new();
    for g in group_by {
        let resolved = match g {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => match n.parse::<usize>() {
                    Ok(k) if k >= 1 && k <= items.len() => items[k - 1].0.clone(),
                    _ => return refuse("GROUP BY a position that is not an output column"),
                },
                _ => return refuse("GROUP BY a constant"),
            },
            Expr::Identifier(id) if !inputs.contains(&ident(id)) => items
                .iter()
                .find(|(e, alias)| {
                    alias.is_some_and(|a| ident(a) == ident(id))
                        && !matches!(e, Expr::Identifier(x) if ident(x) == ident(id))
                })
                .map_or_else(|| g.clone(), |(e, _)| (*e).clone()),
            _ if has_rollup(g) => return refuse("GROUPING SETS, ROLLUP or CUBE"),
            _ => g.clone(),
        };
        if super::has_aggregate(&resolved) {
            return refuse("GROUP BY an aggregate");
        }
        if !groups.contains(&resolved) {
            groups.push(resolved);
        }
    }
    // The aggregate calls the final query needs, each computed once by the shards.
    let mut calls: Vec<Expr> = Vec::new();
    let mut collect = |e: &Expr| collect_aggregates(e, &mut calls);
    for (e, _) in items {
        collect(e);
    }
    if let Some(h) = &sel.having {
        collect(h);
    }
    for o in order {
        collect(&o.expr);
    }
    if let Some(Distinct::On(on)) = &sel.distinct {
        on.iter().for_each(&mut collect);
    }
    // The partial query: the groups' keys, then their aggregates.
    let mut partial = q.clone();
    partial.order_by = None;
    partial.limit_clause = None;
    let SetExpr::Select(p) = &mut *partial.body else {
        unreachable!("checked by plan_final")
    };
    p.distinct = None;
    p.having = None;
    p.projection = projection(&groups, &calls, 'a');
    p.group_by = GroupByExpr::Expressions(groups.clone(), Vec::new());
    // Aggregates whose partial results do not combine (string_agg, percentile_cont,
    // stddev, aggregates of DISTINCT values, ...): the shards return the rows they read
    // instead (group keys and the columns the aggregates use), and the final query
    // aggregates all of them.
    let mut inputs: Vec<Expr> = Vec::new();
    let (mut spec, shard_sql, gather) = match plan(&partial, rules) {
        Ok(spec) => {
            let sql = shard_statement(&partial, &spec).unwrap_or_else(|| partial.to_string());
            (spec, sql, false)
        }
        Err(why) => {
            for c in &calls {
                collect_inputs(c, &mut inputs).map_err(|()| why.clone())?;
            }
            if inputs.is_empty() && groups.is_empty() {
                // Aggregates of constants still need a row per row read.
                inputs.push(Expr::value(Value::Number("1".into(), false)));
            }
            let SetExpr::Select(p) = &mut *partial.body else {
                unreachable!("checked by plan_final")
            };
            p.projection = projection(&groups, &inputs, 'v');
            p.group_by = GroupByExpr::Expressions(Vec::new(), Vec::new());
            let spec = plan(&partial, rules).map_err(|_| why)?;
            (spec, partial.to_string(), true)
        }
    };
    // The final query, over the merged groups (or the gathered rows).
    let group_texts: Vec<String> = groups.iter().map(ToString::to_string).collect();
    let call_texts: Vec<String> = calls.iter().map(ToString::to_string).collect();
    let input_texts: Vec<String> = inputs.iter().map(ToString::to_string).collect();
    let mut sub = Substitute {
        groups: &group_texts,
        calls: if gather { &[] } else { &call_texts },
        inputs: &input_texts,
        inside: 0,
        outputs: Vec::new(),
        refused: None,
    };
    // The client's parameters the final query uses.
    let mut final_params: Vec<usize> = Vec::new();
    let names = output_names(items);
    let (out_items, key_outputs) = final_items(items, &names, &mut sub, 'k', &mut final_params);
    let having = sel.having.clone().map(|mut h| {
        let _ = h.visit(&mut sub);
        placeholders(&h, &mut final_params);
        h
    });
    // A bare name in DISTINCT ON and ORDER BY is an output column when one has that name
    // (PostgreSQL's rule): it stays a name, which the final query resolves the same way.
    sub.outputs = names;
    let distinct = match &sel.distinct {
        None => String::new(),
        Some(Distinct::Distinct) => "DISTINCT ".into(),
        Some(Distinct::On(on)) => {
            let on: Vec<String> = on
                .iter()
                .map(|e| {
                    let mut x = e.clone();
                    let _ = x.visit(&mut sub);
                    placeholders(&x, &mut final_params);
                    x.to_string()
                })
                .collect();
            format!("DISTINCT ON ({}) ", on.join(", "))
        }
        #[allow(unreachable_patterns)]
        Some(_) => return refuse("this DISTINCT form"),
    };
    let order_texts: Vec<String> = order
        .iter()
        .map(|o| {
            let mut o = (*o).clone();
            let _ = o.expr.visit(&mut sub);
            placeholders(&o.expr, &mut final_params);
            o.to_string()
        })
        .collect();
    if let Some(why) = sub.refused {
        return Err(why);
    }
    let names: Vec<String> = if gather {
        (0..groups.len())
            .map(|i| format!("k{i}"))
            .chain((0..inputs.len()).map(|j| format!("v{j}")))
            .collect()
    } else {
        (0..groups.len())
            .map(|i| format!("k{i}"))
            .chain((0..calls.len()).map(|j| format!("a{j}")))
            .collect()
    };
    let columns = names.len();
    let mut sql = format!(
        "SELECT {distinct}{} FROM {}",
        out_items.join(", "),
        merged_rows(params, &names)
    );
    if gather {
        if !groups.is_empty() {
            let keys: Vec<String> = (0..groups.len())
                .map(|i| format!("{MERGED}.k{i}"))
                .collect();
            sql.push_str(&format!(" GROUP BY {}", keys.join(", ")));
        }
        if let Some(h) = having {
            sql.push_str(&format!(" HAVING {h}"));
        }
    } else if let Some(h) = having {
        sql.push_str(&format!(" WHERE {h}"));
    }
    if !order_texts.is_empty() {
        sql.push_str(&format!(" ORDER BY {}", order_texts.join(", ")));
    }
    let mut partial_params = Vec::new();
    placeholders(&partial, &mut partial_params);
    let fin = finish(
        q,
        Final {
            sql,
            columns,
            key_outputs,
            params,
            final_params,
            partial_params,
            shard_sql,
        },
        &refusal,
    )?;
    spec.finalize = Some(Box::new(fin));
    Ok(spec)
}

/// The output column names of a select list, as PostgreSQL names them.
pub(super) fn output_names(items: &[(&Expr, Option<&Ident>)]) -> Vec<String> {
    items
        .iter()
        .map(|(e, alias)| match alias {
            Some(a) => ident(a),
            None => column_name(e).0,
        })
        .collect()
}

/// The final query's select list: each item rewritten by `sub` over the merged columns,
/// `AS` its name (the client's parameters it uses added to `params`); and the items that
/// are a merged column `{prefix}{i}` as it is, by position and i, whose description is
/// the shards' (table, column number, type modifier), as a plain query's is
/// ([`Finalize::key_outputs`]).
pub(super) fn final_items(
    items: &[(&Expr, Option<&Ident>)],
    names: &[String],
    sub: &mut Substitute<'_>,
    prefix: char,
    params: &mut Vec<usize>,
) -> (Vec<String>, Vec<(usize, usize)>) {
    let mut out = Vec::with_capacity(items.len());
    let mut key_outputs = Vec::new();
    for ((e, _), name) in items.iter().zip(names) {
        let mut x = (*e).clone();
        let _ = x.visit(sub);
        placeholders(&x, params);
        if let Expr::CompoundIdentifier(parts) = &x
            && let [m, k] = parts.as_slice()
            && m.value == MERGED
            && let Some(i) = k.value.strip_prefix(prefix).and_then(|i| i.parse().ok())
        {
            key_outputs.push((out.len(), i));
        }
        out.push(format!("{x} AS {}", quote_ident(name)));
    }
    (out, key_outputs)
}

/// How many parameters the client's query has (the highest `$n`): the final query's
/// arrays are numbered after them.
pub(super) fn client_params(q: &Query) -> usize {
    let mut all = Vec::new();
    placeholders(q, &mut all);
    all.iter().max().map_or(0, |m| m + 1)
}

/// The final query's FROM: the merged columns `names`, one array parameter each,
/// numbered after the client's `client_params`.
pub(super) fn merged_rows(client_params: usize, names: &[String]) -> String {
    let unnests: Vec<String> = (1..=names.len())
        .map(|i| format!("pg_catalog.unnest(${})", client_params + i))
        .collect();
    format!(
        "ROWS FROM ({}) AS {MERGED}({})",
        unnests.join(", "),
        names.join(", ")
    )
}

/// A final query before LIMIT and OFFSET ([`finish`]).
pub(super) struct Final {
    /// Its text without LIMIT and OFFSET.
    pub sql: String,
    /// The merged columns it reads.
    pub columns: usize,
    /// See [`Finalize::key_outputs`].
    pub key_outputs: Vec<(usize, usize)>,
    /// How many parameters the client's statement has.
    pub params: usize,
    /// The client's parameters (0-based) it uses.
    pub final_params: Vec<usize>,
    /// The client's parameters (0-based) the shards' statement uses.
    pub partial_params: Vec<usize>,
    /// The shards' statement.
    pub shard_sql: String,
}

/// The [`Finalize`] of `fin`: the client's LIMIT and OFFSET (of `q`) applied by the final
/// query, and the client's parameters each side needs.
/// Err: what is not supported (a LIMIT form, worded by `refusal`).
pub(super) fn finish(
    q: &Query,
    fin: Final,
    refusal: &dyn Fn(&str) -> String,
) -> Result<Finalize, String> {
    let Final {
        sql,
        columns,
        key_outputs,
        params: client_params,
        mut final_params,
        partial_params,
        mut shard_sql,
    } = fin;
    let (limit, offset) = match &q.limit_clause {
        None => (None, None),
        Some(LimitClause::LimitOffset {
            limit,
            offset,
            limit_by,
        }) if limit_by.is_empty() => (
            limit.as_ref().map(count),
            offset.as_ref().map(|o| count(&o.value)),
        ),
        Some(_) => return Err(refusal("this LIMIT form")),
    };
    final_params.sort_unstable();
    let final_only = final_params
        .iter()
        .copied()
        .filter(|p| !partial_params.contains(p))
        .collect();
    let mut fin = Finalize {
        shard_sql: String::new(),
        sql,
        columns,
        key_outputs,
        limit: limit.transpose()?,
        offset: offset.transpose()?,
        params: client_params,
        final_params: final_params
            .into_iter()
            .filter(|&p| p < client_params)
            .collect(),
        final_only,
    };
    // The shards' statement takes the client's Bind as it is: LIMIT and OFFSET parameters
    // it no longer applies are still used.
    let unused: Vec<String> = fin
        .params()
        .map(|i| format!("(${}::BIGINT * 0)", i + 1))
        .collect();
    if !unused.is_empty() {
        shard_sql.push_str(&format!(" OFFSET ({})", unused.join(" + ")));
    }
    fin.shard_sql = shard_sql;
    Ok(fin)
}

/// The 0-based indexes of the `$n` parameters in `e`, each once.
pub(super) fn placeholders<V: sqlparser::ast::Visit>(e: &V, out: &mut Vec<usize>) {
    let _ = sqlparser::ast::visit_expressions(e, |x| {
        if let Expr::Value(v) = x
            && let Value::Placeholder(p) = &v.value
            && let Some(n) = p.strip_prefix('$').and_then(|n| n.parse::<usize>().ok())
            && n >= 1
            && !out.contains(&(n - 1))
        {
            out.push(n - 1);
        }
        ControlFlow::<()>::Continue(())
    });
}

/// The partial query's select list: the group keys as `k0, k1, ...`, then `rest` as
/// `{prefix}0, ...` (aggregates, or gathered columns).
fn projection(groups: &[Expr], rest: &[Expr], prefix: char) -> Vec<SelectItem> {
    let keys = groups.iter().enumerate().map(|(i, g)| (g, format!("k{i}")));
    let others = rest
        .iter()
        .enumerate()
        .map(|(j, e)| (e, format!("{prefix}{j}")));
    keys.chain(others)
        .map(|(e, name)| SelectItem::ExprWithAlias {
            expr: e.clone(),
            alias: Ident::new(name),
        })
        .collect()
}

/// A LIMIT or OFFSET expression of the final query.
pub(super) fn count(e: &Expr) -> Result<Count, String> {
    match value_of(e) {
        Some(KeyRef::Param(i, _)) => Ok(Count::Param(i)),
        Some(KeyRef::Literal(_) | KeyRef::Null) => Ok(Count::Text(e.to_string())),
        _ => Err("LIMIT or OFFSET with an expression across shards is not supported yet".into()),
    }
}

fn has_rollup(e: &Expr) -> bool {
    matches!(e, Expr::Rollup(_) | Expr::Cube(_) | Expr::GroupingSets(_))
}

/// The aggregate calls in `e` (outside windows), each once, in order of appearance.
fn collect_aggregates(e: &Expr, out: &mut Vec<Expr>) {
    let _ = sqlparser::ast::visit_expressions(e, |x| {
        if let Expr::Function(f) = x
            && f.over.is_none()
            && is_aggregate(f)
            && !out.contains(x)
        {
            out.push(x.clone());
        }
        ControlFlow::<()>::Continue(())
    });
}

/// The columns an aggregate call reads (in its arguments, ORDER BY, FILTER and WITHIN
/// GROUP), each once. Err: it has a nested query.
pub(super) fn collect_inputs(call: &Expr, out: &mut Vec<Expr>) -> Result<(), ()> {
    let flow = sqlparser::ast::visit_expressions(call, |x| match x {
        Expr::Identifier(_) | Expr::CompoundIdentifier(_) => {
            if !out.contains(x) {
                out.push(x.clone());
            }
            ControlFlow::Continue(())
        }
        Expr::Subquery(_) | Expr::Exists { .. } | Expr::InSubquery { .. } => ControlFlow::Break(()),
        _ => ControlFlow::Continue(()),
    });
    if flow.is_break() { Err(()) } else { Ok(()) }
}

/// Rewrites an expression of the client's query into one over the merged groups: group
/// keys and aggregate calls become the merged columns. When the shards' rows are gathered
/// instead (no `calls`), the aggregates stay and the columns they read become the
/// gathered ones.
pub(super) struct Substitute<'a> {
    groups: &'a [String],
    calls: &'a [String],
    inputs: &'a [String],
    /// How many gathered aggregate calls the visit is inside.
    inside: usize,
    /// Output column names (set for ORDER BY).
    outputs: Vec<String>,
    refused: Option<String>,
}

impl<'a> Substitute<'a> {
    /// For rows gathered for window functions: each column of `inputs`, wherever it is,
    /// becomes its gathered column `v{j}`.
    pub(super) fn everywhere(inputs: &'a [String]) -> Self {
        Substitute {
            groups: &[],
            calls: &[],
            inputs,
            // As inside an aggregate over gathered rows, from the start.
            inside: 1,
            outputs: Vec::new(),
            refused: None,
        }
    }

    /// Why the query cannot be rewritten, if it cannot.
    pub(super) fn refused(self) -> Option<String> {
        self.refused
    }
}

fn is_aggregate_call(e: &Expr) -> bool {
    matches!(e, Expr::Function(f) if f.over.is_none() && is_aggregate(f))
}

fn merged_column(name: String) -> Expr {
    Expr::CompoundIdentifier(vec![Ident::new(MERGED), Ident::new(name)])
}

impl VisitorMut for Substitute<'_> {
    type Break = ();

    fn pre_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
        let text = e.to_string();
        if let Some(i) = self.groups.iter().position(|g| *g == text) {
            let bare_output =
                matches!(e, Expr::Identifier(id) if self.outputs.contains(&ident(id)));
            if !bare_output {
                *e = merged_column(format!("k{i}"));
            }
            return ControlFlow::Continue(());
        }
        if let Some(j) = self.calls.iter().position(|c| *c == text) {
            *e = merged_column(format!("a{j}"));
            return ControlFlow::Continue(());
        }
        if self.calls.is_empty() && is_aggregate_call(e) {
            self.inside += 1;
            return ControlFlow::Continue(());
        }
        if self.inside > 0
            && let Some(j) = self.inputs.iter().position(|c| *c == text)
        {
            *e = merged_column(format!("v{j}"));
            return ControlFlow::Continue(());
        }
        match e {
            Expr::Identifier(id) if self.outputs.contains(&ident(id)) => {}
            Expr::Identifier(_) | Expr::CompoundIdentifier(_) => {
                self.refused.get_or_insert_with(|| {
                    format!(
                        "column {e} must appear in the GROUP BY clause or be used in an aggregate function"
                    )
                });
            }
            Expr::Subquery(_) | Expr::Exists { .. } | Expr::InSubquery { .. } => {
                self.refused.get_or_insert_with(|| {
                    "a subquery over an aggregate query's groups across shards is not supported yet".into()
                });
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
        if self.calls.is_empty() && is_aggregate_call(e) {
            self.inside -= 1;
        }
        ControlFlow::Continue(())
    }
}
