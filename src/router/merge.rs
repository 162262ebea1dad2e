//! Planning the merge of a cross-shard SELECT: which results combine by concatenation,
//! ORDER BY on output columns and LIMIT, and which do not (yet): those are refused with a
//! reason rather than answered wrongly.

use super::analyze::{KeyRef, name_of, value_of};
use sqlparser::ast::{Expr, Query, SetExpr, Value};

/// How rows from several shards combine into the client's result.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MergeSpec {
    pub order: Vec<OrderKey>,
    pub limit: Option<u64>,
    /// Rows to skip after merging (each shard is asked for `offset + limit` rows instead).
    pub offset: u64,
    /// SELECT DISTINCT: rows equal across shards are kept once.
    pub distinct: bool,
    /// For an aggregate query: what each output column is. None: plain rows.
    pub aggregates: Option<Vec<Column>>,
    /// ORDER BY expressions that are not output columns: each shard returns them as extra
    /// trailing columns, which pgshard sorts on and strips.
    pub hidden: Vec<Expr>,
}

impl MergeSpec {
    /// Whether the shards' rows, one shard after the other, are the answer.
    pub fn is_concatenation(&self) -> bool {
        self.order.is_empty()
            && self.limit.is_none()
            && self.offset == 0
            && !self.distinct
            && self.aggregates.is_none()
            && self.hidden.is_empty()
    }
}

/// An output column of an aggregate query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    /// A GROUP BY key.
    Key,
    /// count(...): per-shard counts add up.
    Count,
    /// sum(...): per-shard sums add up.
    Sum,
    Min,
    Max,
}

/// One ORDER BY key, by output column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderKey {
    pub col: OrderCol,
    pub desc: bool,
    pub nulls_first: bool,
}

/// An output column, by 0-based position or by name (resolved against RowDescription).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderCol {
    Position(usize),
    Name(String),
    /// The k-th hidden sort column.
    Hidden(usize),
    /// A bare name: the output column of that name if there is one (PostgreSQL's rule),
    /// else the k-th hidden sort column (the input column of that name).
    NameOr(String, usize),
}

/// What pgshard can merge today: plain rows; count/sum/min/max with or without GROUP BY on
/// output columns; ORDER BY output columns; LIMIT. Anything whose per-shard results do not
/// simply combine (avg, HAVING, DISTINCT, OFFSET, set operations, window functions,
/// expressions over aggregates) is refused rather than answered wrongly.
pub(super) fn merge_spec(q: &Query) -> Result<MergeSpec, String> {
    let spec = plan(q)?;
    if spec.offset > 0 && spec.aggregates.is_some() {
        return Err("OFFSET with aggregates across shards is not supported yet".into());
    }
    Ok(spec)
}

/// The statement each shard runs: the client's, with `LIMIT offset+limit` and no OFFSET
/// when an OFFSET must be applied after merging. None when the client's text serves.
pub(super) fn shard_statement(q: &Query, spec: &MergeSpec) -> Option<String> {
    if spec.offset == 0 && spec.hidden.is_empty() {
        return None;
    }
    let mut q = q.clone();
    if let SetExpr::Select(sel) = &mut *q.body {
        for (k, e) in spec.hidden.iter().enumerate() {
            sel.projection
                .push(sqlparser::ast::SelectItem::ExprWithAlias {
                    expr: e.clone(),
                    alias: sqlparser::ast::Ident::with_quote('"', format!("__pgshard_sort_{k}")),
                });
        }
    }
    if spec.offset == 0 {
        return Some(q.to_string());
    }
    q.limit_clause = Some(sqlparser::ast::LimitClause::LimitOffset {
        limit: spec.limit.map(|l| {
            Expr::value(Value::Number(
                (l.saturating_add(spec.offset)).to_string(),
                false,
            ))
        }),
        offset: None,
        limit_by: Vec::new(),
    });
    Some(q.to_string())
}

fn plan(q: &Query) -> Result<MergeSpec, String> {
    let unsupported = |what: &str| {
        Err(format!(
            "{what} across shards is not supported yet; add a shard key condition or a /* pgshard: shard=N */ hint"
        ))
    };
    let SetExpr::Select(sel) = &*q.body else {
        return unsupported("a set operation (UNION/INTERSECT/EXCEPT)");
    };
    let distinct = match &sel.distinct {
        None => false,
        Some(sqlparser::ast::Distinct::Distinct) => true,
        Some(_) => return unsupported("DISTINCT ON"),
    };
    let group_exprs: Vec<String> = match &sel.group_by {
        sqlparser::ast::GroupByExpr::All(_) => return unsupported("GROUP BY ALL"),
        sqlparser::ast::GroupByExpr::Expressions(e, _) => e.iter().map(|x| x.to_string()).collect(),
    };
    if sel.having.is_some() {
        return unsupported("HAVING");
    }
    let mut items = Vec::new();
    let mut columns = Vec::new();
    let wildcard = sel.projection.iter().any(|i| {
        matches!(
            i,
            sqlparser::ast::SelectItem::Wildcard(_)
                | sqlparser::ast::SelectItem::QualifiedWildcard(..)
        )
    });
    let mut any_aggregate = false;
    for item in &sel.projection {
        let (e, alias) = match item {
            sqlparser::ast::SelectItem::UnnamedExpr(e) => (e, None),
            sqlparser::ast::SelectItem::ExprWithAlias { expr, alias } => (expr, Some(alias)),
            _ if group_exprs.is_empty() => continue,
            _ => return unsupported("SELECT * with GROUP BY"),
        };
        let column = match top_aggregate(e) {
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
        columns.push(column);
        items.push((e.to_string(), alias.map(|a| a.value.to_ascii_lowercase())));
    }
    let mut spec = MergeSpec {
        distinct,
        ..MergeSpec::default()
    };
    if any_aggregate || !group_exprs.is_empty() {
        // Every non-aggregate output column must be a GROUP BY key (PostgreSQL requires it
        // too), and every key an output column, so that groups can be matched by value.
        for g in &group_exprs {
            let by_position = g.parse::<usize>().ok();
            let found = items.iter().enumerate().any(|(i, (t, alias))| {
                t == g || alias.as_deref() == Some(g.as_str()) || by_position == Some(i + 1)
            });
            if !found {
                return unsupported("GROUP BY an expression that is not an output column");
            }
        }
        spec.aggregates = Some(columns);
    }
    if let Some(ob) = &q.order_by {
        let sqlparser::ast::OrderByKind::Expressions(exprs) = &ob.kind else {
            return unsupported("ORDER BY ALL");
        };
        for o in exprs {
            let desc = matches!(o.options.sort, Some(sqlparser::ast::OrderBySort::Desc));
            let col = match &o.expr {
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
                    let no_hidden = spec.aggregates.is_some() || spec.distinct;
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
            });
        }
    }
    let number = |e: &Expr, what: &'static str| -> Result<Option<u64>, String> {
        match value_of(e) {
            Some(KeyRef::Literal(n)) => n
                .parse()
                .map(Some)
                .map_err(|_| format!("{what} must be a whole number")),
            Some(KeyRef::Null) => Ok(None),
            _ => Err(format!(
                "{what} with a parameter or expression across shards is not supported yet"
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
                spec.limit = number(l, "LIMIT")?;
            }
            if let Some(o) = offset {
                spec.offset = number(&o.value, "OFFSET")?.unwrap_or(0);
            }
        }
        Some(_) => return unsupported("this LIMIT form"),
    }
    if q.fetch.is_some() {
        return unsupported("FETCH FIRST");
    }
    Ok(spec)
}
/// The aggregate an output column is, when it is one call of count/sum/min/max.
fn top_aggregate(e: &Expr) -> Option<Result<Column, &'static str>> {
    let Expr::Function(f) = e else {
        return None;
    };
    if f.over.is_some() {
        return Some(Err("a window function"));
    }
    let column = match name_of(&f.name)?.as_str() {
        "count" => Column::Count,
        "sum" => Column::Sum,
        "min" => Column::Min,
        "max" => Column::Max,
        "avg" => return Some(Err("avg (use sum() and count())")),
        _ => return has_aggregate(e).then_some(Err("this aggregate")),
    };
    if let sqlparser::ast::FunctionArguments::List(l) = &f.args
        && matches!(
            l.duplicate_treatment,
            Some(sqlparser::ast::DuplicateTreatment::Distinct)
        )
    {
        return Some(Err("an aggregate over DISTINCT values"));
    }
    Some(Ok(column))
}

fn has_aggregate(e: &Expr) -> bool {
    const AGGREGATES: &[&str] = &[
        "count",
        "sum",
        "min",
        "max",
        "avg",
        "array_agg",
        "string_agg",
        "bool_and",
        "bool_or",
        "every",
        "json_agg",
        "jsonb_agg",
        "json_object_agg",
        "jsonb_object_agg",
        "bit_and",
        "bit_or",
        "stddev",
        "stddev_pop",
        "stddev_samp",
        "variance",
        "var_pop",
        "var_samp",
        "percentile_cont",
        "percentile_disc",
        "mode",
        "corr",
        "covar_pop",
        "covar_samp",
        "regr_count",
        "xmlagg",
        "range_agg",
    ];
    match e {
        Expr::Function(f) => {
            f.over.is_some()
                || name_of(&f.name).is_some_and(|n| AGGREGATES.contains(&n.as_str()))
                || match &f.args {
                    sqlparser::ast::FunctionArguments::List(l) => l.args.iter().any(|a| match a {
                        sqlparser::ast::FunctionArg::Unnamed(
                            sqlparser::ast::FunctionArgExpr::Expr(x),
                        ) => has_aggregate(x),
                        _ => false,
                    }),
                    _ => false,
                }
        }
        Expr::BinaryOp { left, right, .. } => has_aggregate(left) || has_aggregate(right),
        Expr::Nested(x) | Expr::UnaryOp { expr: x, .. } | Expr::Cast { expr: x, .. } => {
            has_aggregate(x)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::analyze::{analyze, tests::rules};

    #[test]
    fn merge_specs() {
        let m = |sql: &str| analyze(sql, &rules()).unwrap().merge.unwrap();
        assert_eq!(
            m("SELECT id, name FROM users ORDER BY name DESC, 1 LIMIT 5").unwrap(),
            MergeSpec {
                order: vec![
                    OrderKey {
                        col: OrderCol::Position(1),
                        desc: true,
                        nulls_first: true
                    },
                    OrderKey {
                        col: OrderCol::Position(0),
                        desc: false,
                        nulls_first: false
                    },
                ],
                limit: Some(5),
                offset: 0,
                distinct: false,
                aggregates: None,
                hidden: Vec::new(),
            }
        );
        let a = m("SELECT user_id, count(*), sum(total) AS t, min(id), max(id) FROM orders GROUP BY user_id ORDER BY t DESC LIMIT 3").unwrap();
        assert_eq!(
            a.aggregates,
            Some(vec![
                Column::Key,
                Column::Count,
                Column::Sum,
                Column::Min,
                Column::Max
            ])
        );
        assert_eq!(a.limit, Some(3));
        assert_eq!(
            m("SELECT count(*) FROM users").unwrap().aggregates,
            Some(vec![Column::Count])
        );
        assert!(m("SELECT name, count(*) FROM users GROUP BY 1").is_ok());
        assert!(
            m("SELECT DISTINCT name FROM users ORDER BY name")
                .unwrap()
                .distinct
        );
        let a = analyze(
            "SELECT id FROM users ORDER BY id LIMIT 5 OFFSET 10",
            &rules(),
        )
        .unwrap();
        let spec = a.merge.clone().unwrap().unwrap();
        assert_eq!((spec.limit, spec.offset), (Some(5), 10));
        assert_eq!(
            a.shard_sql.as_deref(),
            Some("SELECT id FROM users ORDER BY id LIMIT 15")
        );
        let a = analyze(
            "SELECT id FROM users u ORDER BY lower(u.name) DESC LIMIT 2",
            &rules(),
        )
        .unwrap();
        let spec = a.merge.clone().unwrap().unwrap();
        assert_eq!(spec.order[0].col, OrderCol::Hidden(0));
        assert_eq!(
            a.shard_sql.as_deref(),
            Some(
                "SELECT id, lower(u.name) AS \"__pgshard_sort_0\" FROM users u ORDER BY lower(u.name) DESC LIMIT 2"
            )
        );
        // A bare name is an output column name first (found in the RowDescription), else an
        // input column (hidden); aliases resolve directly.
        let a = analyze(
            "SELECT u.id, name AS n FROM users u ORDER BY id, n",
            &rules(),
        )
        .unwrap();
        let spec = a.merge.unwrap().unwrap();
        assert_eq!(spec.order[0].col, OrderCol::NameOr("id".into(), 0));
        assert_eq!(spec.order[1].col, OrderCol::Position(1));
        assert_eq!(
            m("SELECT lower(name) FROM users ORDER BY lower(name)")
                .unwrap()
                .order[0]
                .col,
            OrderCol::Position(0)
        );
        for bad in [
            "SELECT avg(id) FROM users",
            "SELECT count(DISTINCT name) FROM users",
            "SELECT user_id, sum(total) FROM orders GROUP BY user_id HAVING sum(total) > 1",
            "SELECT sum(total) FROM orders GROUP BY user_id + 1",
            "SELECT count(*)::int FROM users",
            "SELECT DISTINCT ON (name) name, id FROM users",
            "SELECT count(*) FROM users OFFSET 1",
            "SELECT id FROM users LIMIT $1",
            "SELECT id FROM users UNION SELECT user_id FROM orders",
            "SELECT row_number() OVER () FROM users",
            "SELECT 1 + max(id) FROM users",
        ] {
            assert!(m(bad).is_err(), "{bad}");
        }
    }
}
