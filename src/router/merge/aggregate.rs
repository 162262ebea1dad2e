//! Aggregates in a cross-shard SELECT: which calls merge (count, sum, min, max, avg),
//! whether an expression aggregates at all, and HAVING conditions translated into
//! [`Pred`]s pgshard evaluates on the merged groups.

use super::{CmpOp, Column, Pred, compare_decimal};
use crate::router::analyze::{KeyRef, name_of, value_of};
use sqlparser::ast::Expr;

/// A HAVING condition as a [`Pred`]; aggregates that are not output columns become hidden
/// aggregate columns (`extra`).
pub(super) fn having(
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
/// The aggregate an output column is, when it is one call of count/sum/min/max/avg (or
/// of bool_and/every and bool_or: a minimum and a maximum of booleans).
pub(super) fn top_aggregate(e: &Expr) -> Option<Result<Column, &'static str>> {
    let Expr::Function(f) = e else {
        return None;
    };
    if f.over.is_some() {
        return Some(Err("a window function"));
    }
    let column = match name_of(&f.name)?.as_str() {
        "count" => Column::Count,
        "sum" => Column::Sum,
        "min" | "bool_and" | "every" => Column::Min,
        "max" | "bool_or" => Column::Max,
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

/// Whether an expression calls a window function (whose result depends on rows of every
/// shard, unless its partitions live on one: `windows_by_key`).
pub(crate) fn has_window(e: &Expr) -> bool {
    calls(e, &|f| f.over.is_some())
}

/// The argument of `count(DISTINCT x)` (no FILTER, ORDER BY or window).
pub(super) fn count_distinct_arg(e: &Expr) -> Option<&Expr> {
    use sqlparser::ast::{DuplicateTreatment, FunctionArg, FunctionArgExpr, FunctionArguments};
    let Expr::Function(f) = e else { return None };
    if f.over.is_some() || f.filter.is_some() || name_of(&f.name).as_deref() != Some("count") {
        return None;
    }
    let FunctionArguments::List(l) = &f.args else {
        return None;
    };
    if !matches!(l.duplicate_treatment, Some(DuplicateTreatment::Distinct)) || !l.clauses.is_empty()
    {
        return None;
    }
    match l.args.as_slice() {
        [FunctionArg::Unnamed(FunctionArgExpr::Expr(arg))] => Some(arg),
        _ => None,
    }
}

/// `count(DISTINCT k)` where `k` is the shard key of a sharded table `sel` reads: each
/// distinct value lives on one shard, so the shards' counts add up.
pub(super) fn counts_distinct_keys(
    e: &Expr,
    sel: &sqlparser::ast::Select,
    rules: &crate::router::Rules,
) -> bool {
    count_distinct_arg(e)
        .is_some_and(|arg| crate::router::colocation::is_shard_key(sel, arg, rules))
}

/// Aggregate functions (a call without OVER aggregates rows): PostgreSQL's built-in ones.
/// User-defined aggregates are read from the catalog (`Database::user_aggregates`).
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
    "range_intersect_agg",
    "bit_xor",
    "regr_avgx",
    "regr_avgy",
    "regr_intercept",
    "regr_r2",
    "regr_slope",
    "regr_sxx",
    "regr_sxy",
    "regr_syy",
    "any_value",
    // Hypothetical-set aggregates (`rank(3) WITHIN GROUP (ORDER BY x)`); with OVER they
    // are window functions, as before.
    "rank",
    "dense_rank",
    "percent_rank",
    "cume_dist",
];

/// Whether `e` calls a function `hit` accepts, anywhere in it but in nested queries
/// (which are checked on their own).
fn calls(e: &Expr, hit: &dyn Fn(&sqlparser::ast::Function) -> bool) -> bool {
    use sqlparser::ast::{VisitMut, VisitorMut};
    use std::ops::ControlFlow;
    /// Replaces nested queries (keeping the left side of `x IN (SELECT ...)`).
    struct WithoutQueries;
    impl VisitorMut for WithoutQueries {
        type Break = ();
        fn pre_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
            match e {
                Expr::Subquery(_) | Expr::Exists { .. } => {
                    *e = Expr::value(sqlparser::ast::Value::Null);
                }
                Expr::InSubquery { expr, .. } => *e = (**expr).clone(),
                _ => {}
            }
            ControlFlow::Continue(())
        }
    }
    let mut e = e.clone();
    let _ = e.visit(&mut WithoutQueries);
    sqlparser::ast::visit_expressions(&e, |x| match x {
        Expr::Function(f) if hit(f) => ControlFlow::Break(()),
        _ => ControlFlow::Continue(()),
    })
    .is_break()
}

pub(super) fn is_aggregate(f: &sqlparser::ast::Function) -> bool {
    name_of(&f.name).is_some_and(|n| AGGREGATES.contains(&n.as_str()))
}

/// Whether an expression calls an aggregate (or window) function.
pub(crate) fn has_aggregate(e: &Expr) -> bool {
    calls(e, &|f| f.over.is_some() || is_aggregate(f))
}

/// Whether an expression aggregates rows outside a window (`count(*)`, not
/// `count(*) OVER (...)`).
pub(crate) fn has_plain_aggregate(e: &Expr) -> bool {
    calls(e, &|f| f.over.is_none() && is_aggregate(f))
}

/// Whether every window function in `e` is partitioned by a shard key of `sel`'s tables:
/// each window partition then lives on one shard, where the shard computes it whole.
pub(crate) fn windows_by_key(
    e: &Expr,
    sel: &sqlparser::ast::Select,
    rules: &crate::router::Rules,
) -> bool {
    use sqlparser::ast::WindowType;
    sqlparser::ast::visit_expressions(e, |x| match x {
        Expr::Function(f) => match &f.over {
            None => std::ops::ControlFlow::Continue(()),
            Some(WindowType::WindowSpec(w))
                if w.partition_by
                    .iter()
                    .any(|p| crate::router::colocation::is_shard_key(sel, p, rules)) =>
            {
                std::ops::ControlFlow::Continue(())
            }
            Some(_) => std::ops::ControlFlow::Break(()),
        },
        _ => std::ops::ControlFlow::Continue(()),
    })
    .is_continue()
}
