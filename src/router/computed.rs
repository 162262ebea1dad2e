//! Shard keys of an INSERT ... VALUES that pgshard cannot read itself (expressions, text
//! it does not parse as the key's type, the column's default): the query a server
//! evaluates them with (see `analyze::ComputedKeys`; carried out by the session's
//! `insert_keys`).

use super::Rules;
use super::analyze::KeyRef;
use sqlparser::ast::{Expr, SetExpr, Statement};

/// Whether pgshard reads a key as written: a parameter, NULL, or text it can parse as
/// the key's type (the session's zone does not change which texts parse).
pub(super) fn readable(k: &KeyRef, rule: &crate::sharding::ShardFn) -> bool {
    match k {
        KeyRef::Literal(s) | KeyRef::Instant(s) => {
            rule.ty.parse_text(s, &crate::sharding::Zone::utc()).is_ok()
        }
        KeyRef::Param(..) | KeyRef::Null => true,
        // Bounds come from WHERE clauses, never from rows to insert.
        KeyRef::Range(_) | KeyRef::Elements(_) => false,
    }
}

/// The type a key's value is cast to for routing (schema-qualified: the client's
/// `search_path` must not change it).
pub(super) fn cast_type(ty: crate::sharding::KeyType) -> &'static str {
    use crate::sharding::KeyType;
    match ty {
        KeyType::Int => "pg_catalog.int8",
        KeyType::Numeric => "pg_catalog.numeric",
        KeyType::Text => "pg_catalog.text",
        KeyType::Date => "pg_catalog.date",
        KeyType::Timestamp => "pg_catalog.timestamp",
        KeyType::TimestampTz => "pg_catalog.timestamptz",
        KeyType::Uuid => "pg_catalog.uuid",
    }
}

/// An INSERT ... VALUES whose keys `computed` a server evaluates (None: the column's
/// default, looked up when the statement runs). The expressions may read reference
/// tables, not sharded ones (a column default cannot read tables).
pub(super) fn evaluated(
    ins: &sqlparser::ast::Insert,
    rules: &Rules,
    table: usize,
    key: usize,
    n: &str,
    computed: Vec<Option<String>>,
    rows: Vec<Option<KeyRef>>,
) -> Result<super::analyze::InsertVia, String> {
    use super::analyze::{AnalyzeError, Kind, Target, analyze};
    let ty = rules.tables[table].ty;
    // Checked with NULL in place of the defaults.
    let exprs: Vec<String> = computed
        .iter()
        .map(|e| e.clone().unwrap_or_else(|| "NULL".into()))
        .collect();
    let select_sql = evaluation_sql(ty, &exprs);
    let unroutable = |why: String| {
        format!(
            "cannot route INSERT into sharded table {n}: its shard key {} must be a literal, a parameter, or an expression that reads no sharded table ({why})",
            rules.tables[table].column
        )
    };
    let select = analyze(&select_sql, rules).map_err(|e| match e {
        AnalyzeError::Parse(m) | AnalyzeError::Unroutable(m) => unroutable(m),
    })?;
    if select.target != Target::Default || select.kind > Kind::Read {
        return Err(unroutable("it reads a sharded table or locks rows".into()));
    }
    Ok(super::analyze::InsertVia {
        insert: Statement::Insert(ins.clone()),
        select_sql,
        select,
        table,
        key,
        how: super::analyze::Via::Computed(super::analyze::ComputedKeys {
            rows,
            independent: transaction_independent(
                &computed
                    .iter()
                    .flatten()
                    .map(String::as_str)
                    .collect::<Vec<_>>(),
            ),
            exprs: computed,
        }),
    })
}

/// The query that evaluates keys `exprs` of a key of type `ty`: each expression's value,
/// then that value cast to the key's type, each expression evaluated once (`OFFSET 0`
/// keeps PostgreSQL from pulling the subquery up and repeating a volatile expression).
pub fn evaluation_sql(ty: crate::sharding::KeyType, exprs: &[String]) -> String {
    let ty = cast_type(ty);
    let mut outer = Vec::with_capacity(2 * exprs.len());
    let mut inner = Vec::with_capacity(exprs.len());
    for (i, e) in exprs.iter().enumerate() {
        outer.push(format!("pgshard_k{i}, CAST(pgshard_k{i} AS {ty})"));
        inner.push(format!("{e} AS pgshard_k{i}"));
    }
    format!(
        "SELECT {} FROM (SELECT {} OFFSET 0) AS pgshard_keys",
        outer.join(", "),
        inner.join(", ")
    )
}

/// The INSERT with its key column (quoted: the name as PostgreSQL has it) added, DEFAULT
/// in each row; `DEFAULT VALUES` becomes `(key) VALUES (DEFAULT)`.
pub(super) fn with_default_key(ins: &sqlparser::ast::Insert, col: &str) -> sqlparser::ast::Insert {
    let mut with_key = ins.clone();
    let default = || Expr::Identifier(sqlparser::ast::Ident::new("DEFAULT"));
    with_key
        .columns
        .push(sqlparser::ast::Ident::with_quote('"', col).into());
    match &mut with_key.source {
        Some(src) => {
            if let SetExpr::Values(v) = &mut *src.body {
                for row in &mut v.rows {
                    row.content.push(default());
                }
            }
        }
        None => {
            let values = sqlparser::parser::Parser::parse_sql(
                &sqlparser::dialect::PostgreSqlDialect {},
                "VALUES (DEFAULT)",
            );
            if let Ok(Some(Statement::Query(q))) = values.map(|mut st| st.pop()) {
                with_key.source = Some(q);
            }
        }
    }
    with_key
}

/// Whether keys `exprs` evaluate alike outside the client's transaction and inside it,
/// so that one evaluation serves both to find where a transaction begins and to route
/// its rows: literals (but not the date/time inputs read at the transaction's start,
/// `'now'`, `'today'`, ...), casts and operators over them, and the key generators
/// (`nextval`, `gen_random_uuid`, `random`, ...), whose values no transaction sees
/// differently. Anything else may read the transaction: `now()`, `current_timestamp`, a
/// parameter (its text may be `now`), a function that reads tables.
pub fn transaction_independent(exprs: &[&str]) -> bool {
    let dialect = sqlparser::dialect::PostgreSqlDialect {};
    exprs.iter().all(|e| {
        sqlparser::parser::Parser::new(&dialect)
            .try_with_sql(e)
            .and_then(|mut p| p.parse_expr())
            .is_ok_and(|x| independent(&x))
    })
}

fn independent(e: &Expr) -> bool {
    use sqlparser::ast::{FunctionArg, FunctionArgExpr, FunctionArguments, Value};
    match e {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) | Value::EscapedStringLiteral(s) => {
                let s = s.to_ascii_lowercase();
                !["now", "today", "tomorrow", "yesterday"]
                    .iter()
                    .any(|w| s.contains(w))
            }
            Value::Number(..) | Value::Boolean(_) | Value::Null => true,
            _ => false,
        },
        Expr::Nested(x) | Expr::UnaryOp { expr: x, .. } => independent(x),
        Expr::Cast { expr, .. } => independent(expr),
        Expr::BinaryOp { left, right, .. } => independent(left) && independent(right),
        Expr::Function(f) => {
            let parts = &f.name.0;
            let name = |i: usize| {
                parts[i]
                    .as_ident()
                    .map(|id| id.value.to_ascii_lowercase())
                    .unwrap_or_default()
            };
            let generator = match parts.len() {
                1 => true,
                2 => ["pg_catalog", "public", "extensions"].contains(&name(0).as_str()),
                _ => false,
            } && [
                "nextval",
                "gen_random_uuid",
                "uuid_generate_v1",
                "uuid_generate_v1mc",
                "uuid_generate_v4",
                "random",
                "clock_timestamp",
            ]
            .contains(&name(parts.len() - 1).as_str());
            let FunctionArguments::List(list) = &f.args else {
                return generator && matches!(f.args, FunctionArguments::None);
            };
            // A sequence's name is a name, whatever words it holds.
            let sequence = |a: &Expr| {
                let mut a = a;
                while let Expr::Cast { expr, .. } | Expr::Nested(expr) = a {
                    a = expr;
                }
                matches!(a, Expr::Value(v) if matches!(v.value, Value::SingleQuotedString(_)))
            };
            generator
                && f.filter.is_none()
                && f.over.is_none()
                && list.args.iter().all(|a| match a {
                    FunctionArg::Unnamed(FunctionArgExpr::Expr(x)) => {
                        independent(x) || (name(parts.len() - 1) == "nextval" && sequence(x))
                    }
                    _ => false,
                })
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::transaction_independent;

    #[test]
    fn only_keys_no_transaction_sees_differently_are_evaluated_once() {
        let one = |e: &str| transaction_independent(&[e]);
        for e in [
            "nextval('t_id_seq'::regclass)",
            "nextval('snowflake_today_seq')",
            "pg_catalog.nextval('s')",
            "gen_random_uuid()",
            "public.uuid_generate_v4()",
            "(random() * 1000)::bigint + 7",
            "'infinity'::timestamptz",
            "'2026-01-02 03:04:05 Europe/Paris'::timestamptz",
            "-42",
        ] {
            assert!(one(e), "{e}");
        }
        for e in [
            "now()",
            "current_timestamp",
            "CURRENT_DATE",
            "'now'::timestamptz",
            "'Today'::date",
            "date_trunc('month', now())",
            "$1::timestamptz",
            "nextval($1)",
            "my_schema.nextval('s')",
            "my_next_id()",
            "(SELECT max(id) + 1 FROM counters)",
            "random() FILTER (WHERE true)",
            "nextval(now()::text)",
        ] {
            assert!(!one(e), "{e}");
        }
        assert!(transaction_independent(&[
            "nextval('a')",
            "gen_random_uuid()"
        ]));
        assert!(!transaction_independent(&["nextval('a')", "now()"]));
    }
}
