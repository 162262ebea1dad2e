//! Planning the merge of a cross-shard SELECT: which results combine by concatenation,
//! ORDER BY on output columns and LIMIT, and which do not (yet): those are refused with a
//! reason rather than answered wrongly.

use super::analyze::{KeyRef, name_of, value_of};
use sqlparser::ast::{Expr, Query, Select, SetExpr, Value};

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
    /// ORDER BY expressions that are not output columns (or aggregates HAVING needs):
    /// each shard returns them as extra trailing columns, which pgshard uses and strips.
    pub hidden: Vec<Expr>,
    /// SELECT DISTINCT ON: the output columns whose values make a row's group; the first
    /// row of each group in ORDER BY order is kept.
    pub distinct_on: Vec<usize>,
    /// HAVING, evaluated on the merged groups (shards return every group).
    pub having: Option<Pred>,
    /// avg columns: (output position, position of their hidden count column). Shards
    /// return the sum in the avg's place; pgshard divides after merging.
    pub avg: Vec<(usize, usize)>,
}

/// A HAVING condition pgshard evaluates: comparisons of aggregate columns with numbers,
/// combined with AND, OR and NOT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pred {
    And(Box<Pred>, Box<Pred>),
    Or(Box<Pred>, Box<Pred>),
    Not(Box<Pred>),
    /// Column (position in the full row, hidden columns included) `op` number.
    Cmp {
        col: usize,
        op: CmpOp,
        value: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    NotEq,
    Lt,
    LtEq,
    Gt,
    GtEq,
}

impl Pred {
    /// The condition on a merged row's text values (SQL: NULL compares to nothing).
    pub fn eval(&self, row: &[Option<&[u8]>]) -> Option<bool> {
        match self {
            Pred::And(a, b) => match (a.eval(row), b.eval(row)) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            },
            Pred::Or(a, b) => match (a.eval(row), b.eval(row)) {
                (Some(true), _) | (_, Some(true)) => Some(true),
                (Some(false), Some(false)) => Some(false),
                _ => None,
            },
            Pred::Not(a) => a.eval(row).map(|v| !v),
            Pred::Cmp { col, op, value } => {
                let v = std::str::from_utf8(row.get(*col).copied().flatten()?).ok()?;
                let o = compare_decimal(v, value)?;
                Some(match op {
                    CmpOp::Eq => o.is_eq(),
                    CmpOp::NotEq => o.is_ne(),
                    CmpOp::Lt => o.is_lt(),
                    CmpOp::LtEq => o.is_le(),
                    CmpOp::Gt => o.is_gt(),
                    CmpOp::GtEq => o.is_ge(),
                })
            }
        }
    }
}

/// Compares two decimal numbers written in text, exactly (no floating point).
pub fn compare_decimal(a: &str, b: &str) -> Option<std::cmp::Ordering> {
    use std::cmp::Ordering;
    let parse = |s: &str| -> Option<(bool, String, String)> {
        let s = s.trim();
        let (neg, s) = match s.strip_prefix('-') {
            Some(r) => (true, r),
            None => (false, s.strip_prefix('+').unwrap_or(s)),
        };
        let (i, f) = s.split_once('.').unwrap_or((s, ""));
        if i.is_empty() && f.is_empty()
            || !i.bytes().all(|c| c.is_ascii_digit())
            || !f.bytes().all(|c| c.is_ascii_digit())
        {
            return None;
        }
        let i = i.trim_start_matches('0').to_string();
        let f = f.trim_end_matches('0').to_string();
        let zero = i.is_empty() && f.is_empty();
        Some((neg && !zero, i, f))
    };
    let (na, ia, fa) = parse(a)?;
    let (nb, ib, fb) = parse(b)?;
    let magnitude = ia
        .len()
        .cmp(&ib.len())
        .then_with(|| ia.cmp(&ib))
        .then_with(|| fa.cmp(&fb));
    Some(match (na, nb) {
        (false, true) => Ordering::Greater,
        (true, false) => Ordering::Less,
        (false, false) => magnitude,
        (true, true) => magnitude.reverse(),
    })
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
            && self.distinct_on.is_empty()
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
    /// avg(...): shards return sum(...) here and count(...) in a hidden column.
    Avg,
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
    if spec.offset == 0 && spec.hidden.is_empty() && spec.having.is_none() && spec.avg.is_empty() {
        return None;
    }
    let mut q = q.clone();
    if let SetExpr::Select(sel) = &mut *q.body {
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

/// Why a statement over several shards is refused: `what` is not supported there yet.
fn unsupported<T>(what: &str) -> Result<T, String> {
    Err(format!(
        "{what} across shards is not supported yet; add a shard key condition or a /* pgshard: shard=N */ hint"
    ))
}

fn plan(q: &Query) -> Result<MergeSpec, String> {
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
    let mut any_aggregate = false;
    // Hidden aggregate columns: avg's counts, then HAVING's aggregates.
    let mut extra: Vec<(Expr, Column)> = Vec::new();
    let mut avg = Vec::new();
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

/// A HAVING condition as a [`Pred`]; aggregates that are not output columns become hidden
/// aggregate columns (`extra`).
fn having(
    e: &Expr,
    items: &[(String, Option<String>)],
    extra: &mut Vec<(Expr, Column)>,
) -> Result<Pred, String> {
    use sqlparser::ast::{BinaryOperator as B, UnaryOperator};
    let refuse = || {
        Err("this HAVING condition across shards is not supported yet (pgshard evaluates comparisons of aggregates with numbers, AND, OR, NOT)".to_string())
    };
    match e {
        Expr::Nested(x) => having(x, items, extra),
        Expr::UnaryOp {
            op: UnaryOperator::Not,
            expr,
        } => Ok(Pred::Not(Box::new(having(expr, items, extra)?))),
        Expr::BinaryOp {
            left,
            op: B::And,
            right,
        } => Ok(Pred::And(
            Box::new(having(left, items, extra)?),
            Box::new(having(right, items, extra)?),
        )),
        Expr::BinaryOp {
            left,
            op: B::Or,
            right,
        } => Ok(Pred::Or(
            Box::new(having(left, items, extra)?),
            Box::new(having(right, items, extra)?),
        )),
        Expr::BinaryOp { left, op, right } => {
            let op = match op {
                B::Eq => CmpOp::Eq,
                B::NotEq => CmpOp::NotEq,
                B::Lt => CmpOp::Lt,
                B::LtEq => CmpOp::LtEq,
                B::Gt => CmpOp::Gt,
                B::GtEq => CmpOp::GtEq,
                _ => return refuse(),
            };
            let number = |x: &Expr| match value_of(x) {
                Some(KeyRef::Literal(n)) if compare_decimal(&n, "0").is_some() => Some(n),
                _ => None,
            };
            let flip = |op: CmpOp| match op {
                CmpOp::Lt => CmpOp::Gt,
                CmpOp::LtEq => CmpOp::GtEq,
                CmpOp::Gt => CmpOp::Lt,
                CmpOp::GtEq => CmpOp::LtEq,
                o => o,
            };
            let (agg, value, op) = match (number(left), number(right)) {
                (None, Some(v)) => (left, v, op),
                (Some(v), None) => (right, v, flip(op)),
                _ => return refuse(),
            };
            let Some(Ok(kind)) = top_aggregate(agg) else {
                return refuse();
            };
            if kind == Column::Avg {
                return refuse();
            }
            let text = agg.to_string();
            let col = match items.iter().position(|(t, _)| *t == text) {
                Some(p) => p,
                None => match extra.iter().position(|(x, _)| x.to_string() == text) {
                    Some(k) => items.len() + k,
                    None => {
                        extra.push(((**agg).clone(), kind));
                        items.len() + extra.len() - 1
                    }
                },
            };
            Ok(Pred::Cmp { col, op, value })
        }
        _ => refuse(),
    }
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
        "avg" => Column::Avg,
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

pub(super) fn has_aggregate(e: &Expr) -> bool {
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
                distinct_on: Vec::new(),
                having: None,
                avg: Vec::new(),
            }
        );
        let a = analyze(
            "SELECT user_id, avg(total) FROM orders GROUP BY user_id",
            &rules(),
        )
        .unwrap();
        assert_eq!(
            a.shard_sql.as_deref(),
            Some(
                "SELECT user_id, sum(total) AS avg, count(total) AS \"__pgshard_sort_0\" FROM orders GROUP BY user_id"
            )
        );
        assert_eq!(a.merge.unwrap().unwrap().avg, vec![(1, 2)]);
        // HAVING: every group comes back from the shards, the condition is applied after
        // merging, on hidden aggregate columns when they are not output columns.
        let a = analyze(
            "SELECT user_id FROM orders GROUP BY user_id HAVING count(*) > 2 AND sum(total) <= 10.5",
            &rules(),
        )
        .unwrap();
        let spec = a.merge.clone().unwrap().unwrap();
        assert_eq!(
            spec.aggregates,
            Some(vec![Column::Key, Column::Count, Column::Sum])
        );
        assert_eq!(spec.hidden.len(), 2);
        assert_eq!(
            a.shard_sql.as_deref(),
            Some(
                "SELECT user_id, count(*) AS \"__pgshard_sort_0\", sum(total) AS \"__pgshard_sort_1\" FROM orders GROUP BY user_id"
            )
        );
        let row: Vec<Option<&[u8]>> = vec![Some(b"1"), Some(b"3"), Some(b"10.50")];
        assert_eq!(spec.having.as_ref().unwrap().eval(&row), Some(true));
        let row: Vec<Option<&[u8]>> = vec![Some(b"1"), Some(b"2"), Some(b"1")];
        assert_eq!(spec.having.as_ref().unwrap().eval(&row), Some(false));
        assert!(
            m("SELECT user_id FROM orders GROUP BY user_id HAVING sum(total) > avg(total)")
                .is_err()
        );
        // DISTINCT ON: sorted by its columns first, then the first row of each run kept.
        let d = m("SELECT DISTINCT ON (name) name, id FROM users ORDER BY name, id DESC").unwrap();
        assert_eq!(d.distinct_on, vec![0]);
        assert!(m("SELECT DISTINCT ON (name) name, id FROM users ORDER BY id").is_err());
        assert_eq!(
            m("SELECT DISTINCT ON (id) id, name FROM users")
                .unwrap()
                .order
                .len(),
            1
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
            "SELECT avg(DISTINCT id) FROM users",
            "SELECT count(DISTINCT name) FROM users",
            "SELECT user_id, sum(total) FROM orders GROUP BY user_id HAVING sum(total) > max(id)",
            "SELECT sum(total) FROM orders GROUP BY user_id + 1",
            "SELECT count(*)::int FROM users",
            "SELECT DISTINCT ON (lower(name)) name, id FROM users",
            "SELECT count(*) FROM users OFFSET 1",
            "SELECT id FROM users LIMIT $1",
            "SELECT id FROM users INTERSECT SELECT user_id FROM orders",
            "SELECT id FROM users UNION ALL SELECT user_id FROM orders UNION SELECT 1",
            "SELECT count(*) FROM users UNION ALL SELECT count(*) FROM orders",
            "SELECT DISTINCT id FROM users UNION ALL SELECT user_id FROM orders",
            "SELECT id FROM users UNION ALL (SELECT user_id FROM orders LIMIT 1)",
            "SELECT id FROM users UNION SELECT id FROM users ORDER BY lower(name)",
            "SELECT row_number() OVER () FROM users",
            "SELECT 1 + max(id) FROM users",
        ] {
            let refused = analyze(bad, &rules()).map_or(true, |a| a.merge.unwrap().is_err());
            assert!(refused, "{bad}");
        }
        // UNION: the shards' rows de-duplicated; UNION ALL: concatenated; ORDER BY and
        // LIMIT over the result.
        let u =
            m("SELECT id FROM users UNION SELECT user_id FROM orders ORDER BY 1 LIMIT 3").unwrap();
        assert!(u.distinct);
        assert_eq!(u.limit, Some(3));
        assert_eq!(u.order.len(), 1);
        let a = m("SELECT id FROM users UNION ALL (SELECT user_id FROM orders)").unwrap();
        assert!(a.is_concatenation());
        // A SELECT of no sharded table would come back from every shard.
        let e = m("SELECT id FROM users UNION ALL SELECT 7").unwrap_err();
        assert!(e.contains("once per shard"), "{e}");
        assert!(m("SELECT id FROM users UNION SELECT 7").unwrap().distinct);
    }
}

#[cfg(test)]
mod decimal_tests {
    use super::compare_decimal;
    use std::cmp::Ordering::*;

    #[test]
    fn decimals_compare_exactly() {
        assert_eq!(compare_decimal("10.50", "10.5"), Some(Equal));
        assert_eq!(compare_decimal("-1", "0"), Some(Less));
        assert_eq!(compare_decimal("-0.0", "0"), Some(Equal));
        assert_eq!(
            compare_decimal("123456789012345678901234567890", "99"),
            Some(Greater)
        );
        assert_eq!(compare_decimal("-2.5", "-2.45"), Some(Less));
        assert_eq!(compare_decimal("0.1", ".09"), Some(Greater));
        assert_eq!(compare_decimal("x", "1"), None);
    }
}
