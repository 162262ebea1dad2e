//! The names PostgreSQL gives output columns without an alias (`FigureColname`): a final
//! query's columns must be named as the client's query would have named them.

use crate::router::analyze::{ident, name_of};
use sqlparser::ast::Expr;

/// The name PostgreSQL gives an output column without an alias (its `FigureColname`),
/// with its strength: 2 for a column or function name, 1 for a type name or `case`, 0 for
/// `?column?`.
pub(crate) fn column_name(e: &Expr) -> (String, u8) {
    match e {
        Expr::Identifier(id) => (ident(id), 2),
        Expr::CompoundIdentifier(ids) => ids
            .last()
            .map_or(("?column?".into(), 0), |id| (ident(id), 2)),
        Expr::Function(f) => name_of(&f.name).map_or(("?column?".into(), 0), |n| (n, 2)),
        Expr::Nested(x) => column_name(x),
        Expr::Cast {
            expr, data_type, ..
        } => match column_name(expr) {
            (n, 2) => (n, 2),
            _ => (type_name(data_type), 1),
        },
        Expr::Case { else_result, .. } => match else_result.as_deref().map(column_name) {
            Some((n, 2)) => (n, 2),
            _ => ("case".into(), 1),
        },
        Expr::Ceil { .. } => ("ceil".into(), 2),
        Expr::Floor { .. } => ("floor".into(), 2),
        Expr::Extract { .. } => ("extract".into(), 2),
        Expr::Substring { .. } => ("substring".into(), 2),
        Expr::Position { .. } => ("position".into(), 2),
        Expr::Array(_) => ("array".into(), 2),
        Expr::Exists { .. } => ("exists".into(), 2),
        // A scalar subquery is named by its one column.
        Expr::Subquery(q) => (first_column_name(q), 2),
        Expr::TypedString(t) => (type_name(&t.data_type), 1),
        _ => ("?column?".into(), 0),
    }
}

/// The name of a query's first output column (of its leftmost SELECT).
fn first_column_name(q: &sqlparser::ast::Query) -> String {
    use sqlparser::ast::{SelectItem, SetExpr};
    let mut body = &*q.body;
    loop {
        match body {
            SetExpr::Select(s) => {
                return match s.projection.first() {
                    Some(SelectItem::ExprWithAlias { alias, .. }) => ident(alias),
                    Some(SelectItem::UnnamedExpr(e)) => column_name(e).0,
                    _ => "?column?".into(),
                };
            }
            SetExpr::SetOperation { left, .. } => body = left,
            SetExpr::Query(q) => body = &q.body,
            _ => return "?column?".into(),
        }
    }
}

/// The name PostgreSQL's grammar gives a type in a cast (`int` is `int4`).
fn type_name(t: &sqlparser::ast::DataType) -> String {
    use sqlparser::ast::{DataType as T, TimezoneInfo};
    match t {
        T::Int(_) | T::Integer(_) | T::Int4(_) => "int4",
        T::BigInt(_) | T::Int8(_) => "int8",
        T::SmallInt(_) | T::Int2(_) => "int2",
        T::Real | T::Float4 => "float4",
        T::Double(_) | T::DoublePrecision | T::Float8 => "float8",
        T::Float(info) => match info {
            sqlparser::ast::ExactNumberInfo::Precision(p)
            | sqlparser::ast::ExactNumberInfo::PrecisionAndScale(p, _)
                if *p <= 24 =>
            {
                "float4"
            }
            _ => "float8",
        },
        T::Numeric(_) | T::Decimal(_) | T::Dec(_) => "numeric",
        T::Bool | T::Boolean => "bool",
        T::Varchar(_) | T::CharacterVarying(_) | T::CharVarying(_) => "varchar",
        T::Char(_) | T::Character(_) => "bpchar",
        T::Timestamp(_, TimezoneInfo::WithTimeZone | TimezoneInfo::Tz) => "timestamptz",
        T::Timestamp(..) => "timestamp",
        T::Time(_, TimezoneInfo::WithTimeZone | TimezoneInfo::Tz) => "timetz",
        T::Time(..) => "time",
        T::Custom(name, _) => return name_of(name).unwrap_or_else(|| "?column?".into()),
        other => {
            return other
                .to_string()
                .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                .next()
                .unwrap_or("?column?")
                .to_ascii_lowercase();
        }
    }
    .into()
}
