//! Planning the merge of a cross-shard SELECT: which results combine by concatenation,
//! ORDER BY on output columns and LIMIT, and which do not (yet): those are refused with a
//! reason rather than answered wrongly.

use super::Rules;
use super::analyze::{KeyRef, value_of};
use sqlparser::ast::{Expr, Query, Select, SetExpr, Value};

mod aggregate;
pub(super) mod colname;
mod derived;
mod finalize;
mod spec;
mod window;

use aggregate::{count_distinct_arg, counts_distinct_keys, having, top_aggregate};
pub(crate) use aggregate::{has_aggregate, has_plain_aggregate, has_window, windows_by_key};
pub(crate) use derived::derived_spec;
pub use finalize::{Count, Finalize};
pub use spec::*;

fn number(n: u64) -> Expr {
    Expr::value(Value::Number(n.to_string(), false))
}

fn bigint(e: Expr) -> Expr {
    Expr::Cast {
        kind: sqlparser::ast::CastKind::DoubleColon,
        expr: Box::new(e),
        data_type: sqlparser::ast::DataType::BigInt(None),
        format: None,
    }
}

/// `OFFSET ($n::BIGINT * 0)` for a LIMIT or OFFSET parameter the shards' statement no
/// longer applies: it must still use it, to take the client's Bind as it is.
fn unused_params(param: Option<Expr>) -> Option<sqlparser::ast::LimitClause> {
    let zero = Expr::Nested(Box::new(Expr::BinaryOp {
        left: Box::new(bigint(param?)),
        op: sqlparser::ast::BinaryOperator::Multiply,
        right: Box::new(number(0)),
    }));
    Some(sqlparser::ast::LimitClause::LimitOffset {
        limit: None,
        offset: Some(sqlparser::ast::Offset {
            value: zero,
            rows: sqlparser::ast::OffsetRows::None,
        }),
        limit_by: Vec::new(),
    })
}

/// `[OFFSET m ROWS] FETCH FIRST n ROWS ONLY` (as Hibernate 6 pages) as the
/// `LIMIT n [OFFSET m]` it means, for the merge to read and the shards to run; None when
/// there is no FETCH, or one that is not a plain limit (`WITH TIES`, `PERCENT`).
pub(super) fn fetch_as_limit(q: &Query) -> Option<Query> {
    use sqlparser::ast::LimitClause;
    let f = q.fetch.as_ref()?;
    if f.with_ties || f.percent {
        return None;
    }
    let offset = match &q.limit_clause {
        None => None,
        Some(LimitClause::LimitOffset {
            limit: None,
            offset,
            limit_by,
        }) if limit_by.is_empty() => offset.clone(),
        Some(_) => return None,
    };
    let mut q = q.clone();
    // `FETCH FIRST ROW ONLY`: one row.
    let limit = f.quantity.clone().unwrap_or_else(|| number(1));
    q.limit_clause = Some(LimitClause::LimitOffset {
        limit: Some(limit),
        offset,
        limit_by: Vec::new(),
    });
    q.fetch = None;
    Some(q)
}

/// What pgshard can merge today: plain rows; count/sum/min/max with or without GROUP BY on
/// output columns; ORDER BY output columns; LIMIT. Anything whose per-shard results do not
/// simply combine (avg, HAVING, DISTINCT, OFFSET, set operations, window functions,
/// expressions over aggregates) is refused rather than answered wrongly.
///
/// Aggregate queries beyond that (expressions over aggregates, any HAVING, ORDER BY an
/// aggregate not selected, OFFSET, ...) are finished by PostgreSQL over the merged groups
/// (`finalize`).
pub(super) fn merge_spec(q: &Query, rules: &Rules) -> Result<MergeSpec, String> {
    let spec = plan(q, rules).and_then(|spec| {
        if (spec.offset > 0 || spec.offset_param.is_some()) && spec.aggregates.is_some() {
            return Err("OFFSET with aggregates across shards is not supported yet".into());
        }
        Ok(spec)
    });
    match spec {
        Ok(spec) => Ok(spec),
        Err(why) => {
            let params = finalize::client_params(q);
            finalize::plan_final(q, rules, params)
                .or_else(|| window::plan_window(q, rules, params, true))
                .unwrap_or(Err(why))
        }
    }
}

/// The statement each shard runs: the client's, with `LIMIT offset+limit` and no OFFSET
/// when an OFFSET must be applied after merging, and no LIMIT (nor ORDER BY) when groups
/// are merged. None when the client's text serves.
pub(super) fn shard_statement(q: &Query, spec: &MergeSpec) -> Option<String> {
    if let Some(f) = &spec.finalize {
        return Some(f.shard_sql.clone());
    }
    // Groups merged over shards: a shard's top groups are not the top groups once their
    // totals are added up, so every shard returns every group.
    let all_groups = spec.aggregates.is_some() && q.limit_clause.is_some();
    if spec.offset == 0
        && spec.offset_param.is_none()
        && spec.hidden.is_empty()
        && spec.having.is_none()
        && spec.avg.is_empty()
        && spec.distinct_arg.is_none()
        && !all_groups
    {
        return None;
    }
    let mut q = q.clone();
    if let SetExpr::Select(sel) = &mut *q.body {
        // count(DISTINCT x): x itself, under the name the count would have had, and the
        // rows grouped by it too.
        if let Some(arg) = &spec.distinct_arg {
            let roles = spec.aggregates.as_deref().unwrap_or_default();
            for (i, item) in sel.projection.iter_mut().enumerate() {
                if roles.get(i) != Some(&Column::DistinctCount) {
                    continue;
                }
                let alias = match item {
                    sqlparser::ast::SelectItem::ExprWithAlias { alias, .. } => alias.clone(),
                    _ => sqlparser::ast::Ident::new("count"),
                };
                *item = sqlparser::ast::SelectItem::ExprWithAlias {
                    expr: (**arg).clone(),
                    alias,
                };
            }
            if let sqlparser::ast::GroupByExpr::Expressions(g, _) = &mut sel.group_by {
                g.push((**arg).clone());
            }
        }
        // Every group comes back: HAVING applies to the merged totals.
        sel.having = None;
        // avg(x) becomes sum(x), under the name avg(x) would have had.
        for &(col, _) in &spec.avg {
            let item = &mut sel.projection[col];
            let (expr, alias) = match item.clone() {
                sqlparser::ast::SelectItem::UnnamedExpr(e) => {
                    (e, sqlparser::ast::Ident::new("avg"))
                }
                sqlparser::ast::SelectItem::ExprWithAlias { expr, alias } => (expr, alias),
                _ => continue,
            };
            let Expr::Function(mut f) = expr else {
                continue;
            };
            f.name = sqlparser::ast::ObjectName::from(vec![sqlparser::ast::Ident::new("sum")]);
            *item = sqlparser::ast::SelectItem::ExprWithAlias {
                expr: Expr::Function(f),
                alias,
            };
        }
        for (k, e) in spec.hidden.iter().enumerate() {
            sel.projection
                .push(sqlparser::ast::SelectItem::ExprWithAlias {
                    expr: e.clone(),
                    alias: sqlparser::ast::Ident::with_quote('"', format!("__pgshard_sort_{k}")),
                });
        }
    }
    // The client's LIMIT and OFFSET expressions.
    let (limit, offset) = match &q.limit_clause {
        Some(sqlparser::ast::LimitClause::LimitOffset { limit, offset, .. }) => {
            (limit.clone(), offset.as_ref().map(|o| o.value.clone()))
        }
        _ => (None, None),
    };
    if spec.aggregates.is_some() {
        q.limit_clause = unused_params(limit.filter(|_| spec.limit_param.is_some()));
        q.order_by = None;
        return Some(q.to_string());
    }
    if spec.offset == 0 && spec.offset_param.is_none() {
        return Some(q.to_string());
    }
    // Each shard returns offset + limit rows (the client's expressions when they are
    // parameters: `LIMIT $1 + $2`), and pgshard skips the offset after merging.
    if limit.is_none() {
        q.limit_clause = unused_params(offset.filter(|_| spec.offset_param.is_some()));
        return Some(q.to_string());
    }
    let shard_limit = match (spec.limit, spec.limit_param, limit) {
        (Some(l), None, _) if spec.offset_param.is_none() => Some(Expr::value(Value::Number(
            l.saturating_add(spec.offset).to_string(),
            false,
        ))),
        (None, None, _) => None,
        // Typed: `$1 + $2` alone is ambiguous to PostgreSQL's parser.
        (_, _, Some(l)) => Some(Expr::Nested(Box::new(Expr::BinaryOp {
            left: Box::new(bigint(l)),
            op: sqlparser::ast::BinaryOperator::Plus,
            right: Box::new(bigint(offset.unwrap_or_else(|| number(0)))),
        }))),
        (_, _, None) => None,
    };
    q.limit_clause = Some(sqlparser::ast::LimitClause::LimitOffset {
        limit: shard_limit,
        offset: None,
        limit_by: Vec::new(),
    });
    Some(q.to_string())
}

/// The names `sel` uses as columns outside its GROUP BY (as PostgreSQL folds them). A
/// GROUP BY name among them is an input column, which PostgreSQL takes before a select
/// alias of the same name (`SELECT lower(name) AS name ... GROUP BY name` groups by the
/// column); one that is not is taken as the alias.
pub(super) fn input_column_names(sel: &Select) -> Vec<String> {
    let mut s = sel.clone();
    s.group_by = sqlparser::ast::GroupByExpr::Expressions(Vec::new(), Vec::new());
    let mut out = Vec::new();
    let _ = sqlparser::ast::visit_expressions(&s, |e| {
        match e {
            Expr::Identifier(id) => out.push(crate::router::analyze::ident(id)),
            Expr::CompoundIdentifier(ids) => {
                if let Some(id) = ids.last() {
                    out.push(crate::router::analyze::ident(id));
                }
            }
            _ => {}
        }
        std::ops::ControlFlow::<()>::Continue(())
    });
    out
}

/// Why a statement over several shards is refused: `what` is not supported there yet.
fn unsupported<T>(what: &str) -> Result<T, String> {
    Err(format!(
        "{what} across shards is not supported yet; add a shard key condition or a /* pgshard: shard=N */ hint"
    ))
}

fn plan(q: &Query, rules: &Rules) -> Result<MergeSpec, String> {
    let (sel, union_all) = match &*q.body {
        SetExpr::Select(sel) => (sel.as_ref(), None),
        body => {
            let (leaves, all) = union_leaves(body)?;
            (leaves[0], Some(all))
        }
    };
    let (distinct, distinct_on) = match &sel.distinct {
        None => (false, None),
        Some(sqlparser::ast::Distinct::Distinct) => (true, None),
        Some(sqlparser::ast::Distinct::On(exprs)) => (false, Some(exprs)),
        #[allow(unreachable_patterns)]
        Some(_) => return unsupported("this DISTINCT form"),
    };
    let group_exprs: Vec<String> = match &sel.group_by {
        sqlparser::ast::GroupByExpr::All(_) => return unsupported("GROUP BY ALL"),
        sqlparser::ast::GroupByExpr::Expressions(e, _) => e.iter().map(|x| x.to_string()).collect(),
    };
    let mut items = Vec::new();
    let mut columns = Vec::new();
    let wildcard = sel.projection.iter().any(|i| {
        matches!(
            i,
            sqlparser::ast::SelectItem::Wildcard(_)
                | sqlparser::ast::SelectItem::QualifiedWildcard(..)
        )
    });
    // Grouped by the shard key of every sharded table read: each group's rows, so each
    // output row, live on one shard. Shards compute whole groups (any aggregate, HAVING),
    // and their rows merge as plain rows.
    let whole_groups = union_all.is_none() && super::nested::groups_by_key(sel, rules);
    let mut any_aggregate = false;
    let mut windows = false;
    let mut distinct_arg: Option<Expr> = None;
    // Hidden aggregate columns: avg's counts, then HAVING's aggregates.
    let mut extra: Vec<(Expr, Column)> = Vec::new();
    let mut avg = Vec::new();
    for item in &sel.projection {
        let (e, alias) = match item {
            sqlparser::ast::SelectItem::UnnamedExpr(e) => (e, None),
            sqlparser::ast::SelectItem::ExprWithAlias { expr, alias } => (expr, Some(alias)),
            _ if group_exprs.is_empty() || whole_groups => continue,
            _ => return unsupported("SELECT * with GROUP BY"),
        };
        // A window partitioned by the shard key: each partition is whole on one shard.
        // Over groups, only when the groups are whole too.
        let window = has_window(e);
        if window
            && (!windows_by_key(e, sel, rules)
                || !whole_groups && (has_plain_aggregate(e) || !group_exprs.is_empty()))
        {
            return unsupported("a window function not partitioned by the shard key");
        }
        windows |= window;
        if whole_groups || window {
            columns.push(Column::Key);
            items.push((e.to_string(), alias.map(|a| a.value.to_ascii_lowercase())));
            continue;
        }
        // Distinct values of the shard key are on one shard each: the shards' counts of
        // them add up.
        let column = match top_aggregate(e) {
            Some(Err(_)) if counts_distinct_keys(e, sel, rules) => {
                any_aggregate = true;
                Column::Count
            }
            Some(Err(_)) if count_distinct_arg(e).is_some() => {
                let arg = count_distinct_arg(e).expect("checked");
                if distinct_arg.as_ref().is_some_and(|a: &Expr| a != arg) {
                    return unsupported("count(DISTINCT ...) of two different expressions");
                }
                distinct_arg = Some(arg.clone());
                any_aggregate = true;
                Column::DistinctCount
            }
            Some(Ok(c)) => {
                any_aggregate = true;
                c
            }
            Some(Err(why)) => return unsupported(why),
            None if has_aggregate(e) => {
                return unsupported("an expression over aggregates or a window function");
            }
            None => Column::Key,
        };
        if column == Column::Avg {
            let Expr::Function(f) = e else {
                unreachable!("top_aggregate")
            };
            let mut count = f.clone();
            count.name =
                sqlparser::ast::ObjectName::from(vec![sqlparser::ast::Ident::new("count")]);
            avg.push((columns.len(), extra.len()));
            extra.push((Expr::Function(count), Column::Count));
        }
        columns.push(column);
        items.push((e.to_string(), alias.map(|a| a.value.to_ascii_lowercase())));
    }
    let mut spec = MergeSpec {
        // UNION removes duplicates over every shard's rows; UNION ALL keeps them.
        distinct: union_all.map_or(distinct, |all| !all),
        ..MergeSpec::default()
    };
    if windows && any_aggregate && !whole_groups {
        return unsupported("window functions with aggregates");
    }
    if whole_groups {
        // HAVING stays in each shard's statement.
        spec.whole_groups = true;
    } else if any_aggregate || !group_exprs.is_empty() {
        // Every non-aggregate output column must be a GROUP BY key (PostgreSQL requires it
        // too), and every key an output column, so that groups can be matched by value.
        let inputs = input_column_names(sel);
        for g in &group_exprs {
            let by_position = g.parse::<usize>().ok();
            // A name the query also uses as a column is that input column (PostgreSQL
            // takes it before a select alias of the same name).
            let input = inputs.contains(&g.to_ascii_lowercase());
            let found = items.iter().enumerate().any(|(i, (t, alias))| {
                t == g
                    || (!input && alias.as_deref() == Some(g.as_str()))
                    || by_position == Some(i + 1)
            });
            if !found {
                return unsupported("GROUP BY an expression that is not an output column");
            }
        }
        if let Some(h) = &sel.having {
            spec.having = Some(having(h, &items, &mut extra)?);
        }
        spec.avg = avg
            .into_iter()
            .map(|(col, k)| (col, items.len() + k))
            .collect();
        for (e, c) in extra {
            spec.hidden.push(e);
            columns.push(c);
        }
        spec.distinct_arg = distinct_arg.map(Box::new);
        spec.aggregates = Some(columns);
    } else if sel.having.is_some() {
        return unsupported("HAVING without aggregates");
    }
    if let Some(exprs) = distinct_on {
        if spec.aggregates.is_some() {
            return unsupported("DISTINCT ON with aggregates");
        }
        for e in exprs {
            let text = e.to_string();
            let by_position = text.parse::<usize>().ok();
            let p = items
                .iter()
                .enumerate()
                .position(|(i, (t, alias))| {
                    *t == text
                        || alias.as_deref() == Some(text.to_ascii_lowercase().as_str())
                        || by_position == Some(i + 1)
                })
                .ok_or_else(|| {
                    "DISTINCT ON an expression that is not an output column across shards is not supported yet; add it to the select list".to_string()
                })?;
            spec.distinct_on.push(p);
        }
    }
    if let Some(ob) = &q.order_by {
        let sqlparser::ast::OrderByKind::Expressions(exprs) = &ob.kind else {
            return unsupported("ORDER BY ALL");
        };
        for o in exprs {
            if has_window(&o.expr) && !windows_by_key(&o.expr, sel, rules) {
                return unsupported("ORDER BY a window function not partitioned by the shard key");
            }
            let desc = matches!(o.options.sort, Some(sqlparser::ast::OrderBySort::Desc));
            // `x COLLATE c` orders the output column x by c: the merge needs c, the shards
            // return x.
            let (expr, collation) = match &o.expr {
                Expr::Collate { expr, collation } => (&**expr, Some(collation.to_string())),
                e => (e, None),
            };
            let col = match expr {
                Expr::Value(v) => match &v.value {
                    Value::Number(n, _) => match n.parse::<usize>() {
                        Ok(k) if k >= 1 => OrderCol::Position(k - 1),
                        _ => return unsupported("ORDER BY a constant"),
                    },
                    _ => return unsupported("ORDER BY a constant"),
                },
                e => {
                    let text = e.to_string();
                    let alias_hit = |n: &str| {
                        items
                            .iter()
                            .position(|(t, alias)| t == n || alias.as_deref() == Some(n))
                    };
                    // A UNION's ORDER BY names result columns only (PostgreSQL's rule).
                    let no_hidden = spec.aggregates.is_some()
                        || spec.distinct
                        || !spec.distinct_on.is_empty()
                        || union_all.is_some();
                    if let Some(p) = items.iter().position(|(t, _)| *t == text) {
                        OrderCol::Position(p)
                    } else if let Expr::Identifier(id) = e {
                        let n = id.value.to_ascii_lowercase();
                        match alias_hit(&n) {
                            Some(p) => OrderCol::Position(p),
                            // Output names are only known from the RowDescription.
                            None if no_hidden || wildcard => OrderCol::Name(n),
                            None => {
                                spec.hidden.push(e.clone());
                                OrderCol::NameOr(n, spec.hidden.len() - 1)
                            }
                        }
                    } else if no_hidden {
                        return unsupported(
                            "ORDER BY an expression that is not an output column of an aggregate or DISTINCT query",
                        );
                    } else {
                        spec.hidden.push(e.clone());
                        OrderCol::Hidden(spec.hidden.len() - 1)
                    }
                }
            };
            spec.order.push(OrderKey {
                col,
                desc,
                // PostgreSQL's default: NULLs sort as larger than any value.
                nulls_first: o.options.nulls_first.unwrap_or(desc),
                collation,
            });
        }
    }
    // A number, or the parameter that gives it.
    type Count = (Option<u64>, Option<usize>);
    let number = |e: &Expr, what: &'static str| -> Result<Count, String> {
        match value_of(e) {
            Some(KeyRef::Literal(n)) => n
                .parse()
                .map(|n| (Some(n), None))
                .map_err(|_| format!("{what} must be a whole number")),
            Some(KeyRef::Null) => Ok((None, None)),
            Some(KeyRef::Param(i, _)) => Ok((None, Some(i))),
            _ => Err(format!(
                "{what} with an expression across shards is not supported yet"
            )),
        }
    };
    match &q.limit_clause {
        None => {}
        Some(sqlparser::ast::LimitClause::LimitOffset {
            limit,
            offset,
            limit_by,
        }) if limit_by.is_empty() => {
            if let Some(l) = limit {
                (spec.limit, spec.limit_param) = number(l, "LIMIT")?;
            }
            if let Some(o) = offset {
                let (n, param) = number(&o.value, "OFFSET")?;
                (spec.offset, spec.offset_param) = (n.unwrap_or(0), param);
            }
        }
        Some(_) => return unsupported("this LIMIT form"),
    }
    if q.fetch.is_some() {
        return unsupported("FETCH FIRST ... WITH TIES or PERCENT");
    }
    if !spec.distinct_on.is_empty() {
        // Groups are found after sorting: the DISTINCT ON columns lead the order (as
        // PostgreSQL requires of a query's ORDER BY), ascending when there is none.
        let leads = spec
            .order
            .iter()
            .zip(&spec.distinct_on)
            .all(|(o, d)| o.col == OrderCol::Position(*d));
        if spec.order.is_empty() {
            spec.order = spec
                .distinct_on
                .iter()
                .map(|&d| OrderKey {
                    col: OrderCol::Position(d),
                    desc: false,
                    nulls_first: false,
                    collation: None,
                })
                .collect();
        } else if !leads || spec.order.len() < spec.distinct_on.len() {
            return unsupported(
                "DISTINCT ON whose expressions do not lead the ORDER BY by output position",
            );
        }
    }
    Ok(spec)
}

/// The SELECTs of a UNION (or UNION ALL) tree, left to right, and whether it is ALL: what
/// every shard's run of the whole query gives, concatenated (ALL) or de-duplicated, is the
/// answer when each SELECT is plain (no aggregates, grouping, window functions, and for
/// ALL no DISTINCT, whose per-shard results would not combine). INTERSECT and EXCEPT
/// need rows of other shards: refused.
pub(super) fn union_leaves(body: &SetExpr) -> Result<(Vec<&Select>, bool), String> {
    fn walk<'a>(
        e: &'a SetExpr,
        all: &mut Option<bool>,
        out: &mut Vec<&'a Select>,
    ) -> Result<(), String> {
        match e {
            SetExpr::SetOperation {
                op: sqlparser::ast::SetOperator::Union,
                set_quantifier,
                left,
                right,
            } => {
                let this = match set_quantifier {
                    sqlparser::ast::SetQuantifier::All => true,
                    sqlparser::ast::SetQuantifier::Distinct
                    | sqlparser::ast::SetQuantifier::None => false,
                    _ => return unsupported("UNION BY NAME"),
                };
                if all.is_some_and(|a| a != this) {
                    return unsupported("UNION mixed with UNION ALL");
                }
                *all = Some(this);
                walk(left, all, out)?;
                walk(right, all, out)
            }
            SetExpr::SetOperation { .. } => unsupported("INTERSECT or EXCEPT"),
            SetExpr::Query(q)
                if q.order_by.is_none()
                    && q.limit_clause.is_none()
                    && q.fetch.is_none()
                    && q.with.is_none() =>
            {
                walk(&q.body, all, out)
            }
            SetExpr::Select(s) => {
                let plain = matches!(s.group_by, sqlparser::ast::GroupByExpr::Expressions(ref g, _) if g.is_empty())
                    && s.having.is_none()
                    && !matches!(s.distinct, Some(sqlparser::ast::Distinct::On(_)))
                    && s.projection.iter().all(|i| match i {
                        sqlparser::ast::SelectItem::UnnamedExpr(e)
                        | sqlparser::ast::SelectItem::ExprWithAlias { expr: e, .. } => {
                            !has_aggregate(e)
                        }
                        _ => true,
                    });
                if !plain {
                    return unsupported("a UNION of grouped, aggregated or windowed SELECTs");
                }
                out.push(s);
                Ok(())
            }
            _ => unsupported(
                "this part of a UNION (VALUES, or a parenthesized query with ORDER BY or LIMIT)",
            ),
        }
    }
    let mut all = None;
    let mut out = Vec::new();
    walk(body, &mut all, &mut out)?;
    let all = all.unwrap_or(false);
    if all && out.iter().any(|s| s.distinct.is_some()) {
        return Err(
            "a DISTINCT SELECT inside UNION ALL across shards is not supported yet; use UNION"
                .into(),
        );
    }
    Ok((out, all))
}

#[cfg(test)]
mod tests;
