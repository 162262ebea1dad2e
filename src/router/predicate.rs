//! Shard-key values in expressions: the values a WHERE clause allows each sharded table's
//! key (`constraints`), and a literal or parameter as a key (`value_of`).

use super::Rules;
use super::analyze::{KeyRange, KeyRef, ident};
use crate::sharding::cast::Cast;
use sqlparser::ast::{BinaryOperator, DataType, Expr, UnaryOperator, Value};
use std::collections::HashMap;

/// For each sharded table constrained by `e`: the key values it allows (`e` true implies
/// the row's key is one of them).
pub(super) fn constraints(
    e: &Expr,
    rules: &Rules,
    scope: &[(String, usize)],
) -> HashMap<usize, Vec<KeyRef>> {
    let mut out = HashMap::new();
    match e {
        Expr::Nested(x) => return constraints(x, rules, scope),
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            // Either side's constraint holds; keep the narrower one per table: values
            // over bounds, fewer values over more, and bounds from both sides together
            // (`k >= a AND k < b`).
            let l = constraints(left, rules, scope);
            let r = constraints(right, rules, scope);
            out = l;
            for (t, keys) in r {
                match (out.get_mut(&t).map(Vec::as_mut_slice), keys.as_slice()) {
                    (Some([KeyRef::Range(a)]), [KeyRef::Range(b)]) => {
                        a.lower.extend(b.lower.iter().cloned());
                        a.upper.extend(b.upper.iter().cloned());
                    }
                    (Some(existing), _) if narrower(existing, &keys) => {}
                    _ => {
                        out.insert(t, keys);
                    }
                }
            }
        }
        Expr::BinaryOp {
            left,
            op: BinaryOperator::Or,
            right,
        } => {
            // Both sides must constrain a table for the disjunction to.
            let l = constraints(left, rules, scope);
            let mut r = constraints(right, rules, scope);
            for (t, mut keys) in l {
                if let Some(more) = r.remove(&t) {
                    keys.extend(more);
                    out.insert(t, keys);
                }
            }
        }
        Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq,
            right,
        } => {
            for (col, val) in [(left, right), (right, left)] {
                if let (Some(t), Some(v)) = (key_column(col, rules, scope), value_of(val)) {
                    out.insert(t, vec![v]);
                    break;
                }
            }
        }
        Expr::BinaryOp { left, op, right }
            if matches!(
                op,
                BinaryOperator::Lt
                    | BinaryOperator::LtEq
                    | BinaryOperator::Gt
                    | BinaryOperator::GtEq
            ) =>
        {
            // `k < v` bounds k from above, `v < k` from below.
            let below = matches!(op, BinaryOperator::Gt | BinaryOperator::GtEq);
            for (col, val, lower) in [(left, right, below), (right, left, !below)] {
                if let (Some(t), Some(v)) = (key_column(col, rules, scope), value_of(val)) {
                    let mut range = KeyRange::default();
                    if lower {
                        range.lower.push(v);
                    } else {
                        range.upper.push(v);
                    }
                    out.insert(t, vec![KeyRef::Range(Box::new(range))]);
                    break;
                }
            }
        }
        Expr::Between {
            expr,
            negated: false,
            low,
            high,
        } => {
            if let (Some(t), Some(lo), Some(hi)) = (
                key_column(expr, rules, scope),
                value_of(low),
                value_of(high),
            ) {
                let range = KeyRange {
                    lower: vec![lo],
                    upper: vec![hi],
                };
                out.insert(t, vec![KeyRef::Range(Box::new(range))]);
            }
        }
        Expr::AnyOp {
            left,
            compare_op: BinaryOperator::Eq,
            right,
            ..
        } => {
            if let (Some(t), Some(keys)) = (key_column(left, rules, scope), elements(right)) {
                out.insert(t, keys);
            }
        }
        Expr::InList {
            expr,
            list,
            negated: false,
        } => {
            if let Some(t) = key_column(expr, rules, scope) {
                let vals: Option<Vec<KeyRef>> = list.iter().map(value_of).collect();
                if let Some(v) = vals {
                    out.insert(t, v);
                }
            }
        }
        _ => {}
    }
    out
}

/// The keys `= ANY(e)` allows: the values of `ARRAY[...]`, or the elements of an array
/// literal or parameter (through casts to an array type).
pub(super) fn elements(e: &Expr) -> Option<Vec<KeyRef>> {
    match e {
        Expr::Nested(x) => elements(x),
        Expr::Array(a) => a.elem.iter().map(value_of).collect(),
        Expr::Cast {
            expr,
            data_type: DataType::Array(_),
            ..
        } => elements(expr),
        Expr::Value(v) => match constant(&v.value)? {
            k @ (KeyRef::Literal(_) | KeyRef::Param(..)) => {
                Some(vec![KeyRef::Elements(Box::new(k))])
            }
            _ => None,
        },
        _ => None,
    }
}

/// Whether constraint `a` narrows a key at least as much as `b`: values do more than
/// bounds, and fewer values more than more.
fn narrower(a: &[KeyRef], b: &[KeyRef]) -> bool {
    let bounds = |k: &[KeyRef]| k.iter().any(|k| matches!(k, KeyRef::Range(_)));
    match (bounds(a), bounds(b)) {
        (false, true) => true,
        (true, false) => false,
        _ => a.len() <= b.len(),
    }
}

/// The sharded table whose key column `e` names, if it does.
fn key_column(e: &Expr, rules: &Rules, scope: &[(String, usize)]) -> Option<usize> {
    match e {
        Expr::Nested(x) => key_column(x, rules, scope),
        Expr::Identifier(id) => {
            let col = ident(id);
            // Unqualified: the one sharded table in scope with that key column.
            let mut hits = scope.iter().filter(|(_, i)| rules.tables[*i].column == col);
            let first = hits.next()?.1;
            hits.all(|(_, i)| *i == first).then_some(first)
        }
        Expr::CompoundIdentifier(ids) if ids.len() >= 2 => {
            let col = ident(&ids[ids.len() - 1]);
            let qual = ident(&ids[ids.len() - 2]);
            scope
                .iter()
                .find(|(n, i)| *n == qual && rules.tables[*i].column == col)
                .map(|x| x.1)
        }
        _ => None,
    }
}

/// A literal, parameter or NULL, through casts and parentheses, with the value the casts
/// give it (`(14.5)::float8::bigint` is 14); None where routing cannot tell the value.
pub(super) fn value_of(e: &Expr) -> Option<KeyRef> {
    match e {
        Expr::Nested(x) => value_of(x),
        Expr::Cast {
            expr, data_type, ..
        } => cast(value_of(expr)?, data_type),
        // `DATE '2024-01-01'`, `bigint '42'`.
        Expr::TypedString(ts) => cast(constant(&ts.value.value)?, &ts.data_type),
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => match value_of(expr)? {
            KeyRef::Literal(s) => Some(KeyRef::Literal(match s.strip_prefix('-') {
                Some(positive) => positive.to_string(),
                None => format!("-{s}"),
            })),
            _ => None,
        },
        Expr::Value(v) => constant(&v.value),
        _ => None,
    }
}

fn constant(v: &Value) -> Option<KeyRef> {
    match v {
        Value::Number(n, _) => Some(KeyRef::Literal(n.to_string())),
        Value::SingleQuotedString(s)
        | Value::EscapedStringLiteral(s)
        | Value::DoubleQuotedString(s) => Some(KeyRef::Literal(s.clone())),
        // As pgshard writes the constants of subqueries it evaluated first.
        Value::DollarQuotedString(d) => Some(KeyRef::Literal(d.value.clone())),
        Value::Boolean(b) => Some(KeyRef::Literal(b.to_string())),
        Value::Null => Some(KeyRef::Null),
        Value::Placeholder(p) => p
            .strip_prefix('$')
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n >= 1)
            .map(|n| KeyRef::Param(n - 1, None)),
        _ => None,
    }
}

/// A key value cast to `ty`.
fn cast(v: KeyRef, ty: &DataType) -> Option<KeyRef> {
    let c = Cast::of(&ty.to_string());
    match v {
        KeyRef::Literal(s) => {
            let s = c.apply(&s)?.into_owned();
            Some(match c {
                Cast::Timestamp { zoned: true, .. } => KeyRef::Instant(s),
                _ => KeyRef::Literal(s),
            })
        }
        // An instant's text in any other type depends on the session's zone (and
        // DateStyle): only a further timestamptz cast is followed.
        KeyRef::Instant(s) => match c {
            Cast::Timestamp { zoned: true, .. } => Some(KeyRef::Instant(c.apply(&s)?.into_owned())),
            _ => None,
        },
        // The first cast tells how the parameter is read; the value is converted at
        // routing, where the key's type is known.
        KeyRef::Param(i, None) => Some(KeyRef::Param(i, Some(c))),
        KeyRef::Param(i, Some(first)) => c.keeps(first).then_some(KeyRef::Param(i, Some(first))),
        KeyRef::Null => Some(KeyRef::Null),
        KeyRef::Range(_) | KeyRef::Elements(_) => None,
    }
}
