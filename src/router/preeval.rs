//! Subqueries pgshard evaluates before their statement (as Citus's recursive planning
//! does): an uncorrelated subquery over sharded tables that the shards cannot each answer
//! from their own rows (`score > (SELECT avg(score) FROM users)`, `id IN (SELECT user_id
//! FROM orders WHERE ...)` with orders sharded by another key) is run on its own, merged
//! over the shards it needs, and its result takes its place as constants: the statement
//! then routes like any other (an `IN` list of keys goes to those keys' shards only).
//!
//! PostgreSQL evaluates an uncorrelated subquery once per statement too; what differs is
//! the snapshot: outside a transaction block the subquery and the statement read
//! separately (as they would under READ COMMITTED in a transaction).

use super::Rules;
use super::analyze::{Collector, query};
use sqlparser::ast::{
    CastKind, DataType, DollarQuotedString, Expr, Ident, LimitClause, Query, SelectItem, SetExpr,
    Statement, Value, VisitMut, VisitorMut,
};
use std::ops::ControlFlow;

/// A statement whose subqueries pgshard evaluates first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreEval {
    statement: Statement,
    /// In the order they are found (and replaced).
    pub subqueries: Vec<Subquery>,
    /// Per subquery expression of the statement, in pre-order: whether it is one of
    /// `subqueries`, and how many subquery expressions it holds (itself included).
    taken: Vec<bool>,
    subtree: Vec<usize>,
    /// Why the statement as written is refused. None: it is right when it runs on one
    /// shard (its subqueries name their shard keys), and they are evaluated first only
    /// when it needs several; the analysis is then the statement's as written.
    pub refused: Option<String>,
}

/// One subquery evaluated first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subquery {
    /// What pgshard runs (an EXISTS subquery limited to one row).
    pub sql: String,
}

/// Where the subquery stands, which tells what its result becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// `(SELECT ...)` as a value.
    Scalar,
    /// `expr [NOT] IN (SELECT ...)`.
    In,
    /// `expr op ANY|ALL (SELECT ...)`.
    Compared,
    /// `[NOT] EXISTS (SELECT ...)`.
    Exists,
}

/// A subquery's result, as text: its columns' type names (as `format_type` prints them)
/// and its rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answer {
    pub types: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
}

/// Why a result cannot take its subquery's place: PostgreSQL's own errors for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubstituteError {
    pub code: &'static str,
    pub message: String,
}

fn error(code: &'static str, message: &str) -> SubstituteError {
    SubstituteError {
        code,
        message: message.to_string(),
    }
}

/// Which of a statement's subqueries that could be evaluated first are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pick {
    /// The innermost: the least pgshard runs on its own, the rest goes to the shards
    /// with the statement (`id IN (SELECT user_id FROM orders WHERE total > (SELECT
    /// avg(total) FROM orders))`: only the average, the IN runs co-located).
    Innermost,
    /// The outermost, each with its own subqueries (evaluated first in turn when they
    /// need it).
    Outermost,
}

/// The subqueries of a single SELECT, INSERT, UPDATE or DELETE (or an EXPLAIN of one: the
/// plan of the statement with their answers in place, as Citus shows it) that pgshard
/// can evaluate first (uncorrelated, reading sharded tables), as `pick` picks them. None
/// when there is none or the statement is of another kind.
pub(super) fn plan(
    st: &Statement,
    rules: &Rules,
    refused: Option<String>,
    pick: Pick,
) -> Option<PreEval> {
    let inner = match st {
        Statement::Explain { statement, .. } => &**statement,
        st => st,
    };
    if !matches!(
        inner,
        Statement::Query(_) | Statement::Update(_) | Statement::Delete(_) | Statement::Insert(_)
    ) {
        return None;
    }
    let mut survey = Survey {
        rules,
        found: Vec::new(),
        open: Vec::new(),
        operands: Vec::new(),
    };
    let _ = sqlparser::ast::Visit::visit(st, &mut survey);
    let found = survey.found;
    let mut taken = vec![false; found.len()];
    let mut covered = 0;
    for i in 0..found.len() {
        let inside = i + 1..i + found[i].subtree;
        taken[i] = found[i].sub.is_some()
            && match pick {
                Pick::Outermost => i >= covered,
                Pick::Innermost => !found[inside].iter().any(|c| c.sub.is_some()),
            };
        if taken[i] {
            covered = i + found[i].subtree;
        }
    }
    if !taken.contains(&true) {
        return None;
    }
    let subtree = found.iter().map(|c| c.subtree).collect();
    let subqueries = found
        .into_iter()
        .zip(&taken)
        .filter_map(|(c, &t)| c.sub.filter(|_| t))
        .collect();
    let mut statement = st.clone();
    name_outputs(&mut statement);
    Some(PreEval {
        statement,
        subqueries,
        taken,
        subtree,
        refused,
    })
}

/// A subquery expression met in a statement (in pre-order).
struct Candidate {
    /// What pgshard runs for it, if it can be evaluated first.
    sub: Option<Subquery>,
    /// How many subquery expressions it holds, itself included.
    subtree: usize,
}

/// Lists a statement's subquery expressions in pre-order, with what they hold.
struct Survey<'a> {
    rules: &'a Rules,
    found: Vec<Candidate>,
    /// The candidates being visited (their `found` indices).
    open: Vec<usize>,
    /// The subqueries of the ANY/ALLs being visited: each part of its candidate, not one
    /// of its own.
    operands: Vec<*const Expr>,
}

impl sqlparser::ast::Visitor for Survey<'_> {
    type Break = ();

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if let Some((q, form)) = candidate(e, &mut self.operands) {
            self.open.push(self.found.len());
            self.found.push(Candidate {
                sub: evaluated_first(q, form, self.rules),
                subtree: 1,
            });
        }
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if is_candidate(e, &self.operands)
            && let Some(i) = self.open.pop()
        {
            self.found[i].subtree = self.found.len() - i;
        }
        operand_done(e, &mut self.operands);
        ControlFlow::Continue(())
    }
}

/// The subquery of a subquery expression and where it stands. An ANY/ALL's subquery
/// operand is part of it, not a candidate of its own: it goes on `operands` until the
/// ANY/ALL is left ([`operand_done`]).
fn candidate<'e>(e: &'e Expr, operands: &mut Vec<*const Expr>) -> Option<(&'e Query, Form)> {
    if !is_candidate(e, operands) {
        return None;
    }
    match e {
        Expr::Subquery(q) => Some((&**q, Form::Scalar)),
        Expr::InSubquery { subquery, .. } => Some((&**subquery, Form::In)),
        Expr::Exists { subquery, .. } => Some((&**subquery, Form::Exists)),
        Expr::AnyOp { right, .. } | Expr::AllOp { right, .. } => match &**right {
            Expr::Subquery(q) => {
                operands.push(&**right as *const Expr);
                Some((&**q, Form::Compared))
            }
            _ => None,
        },
        _ => None,
    }
}

/// Whether `e` is a subquery expression of its own.
fn is_candidate(e: &Expr, operands: &[*const Expr]) -> bool {
    match e {
        Expr::Subquery(_) => !operands.contains(&(e as *const Expr)),
        Expr::InSubquery { .. } | Expr::Exists { .. } => true,
        Expr::AnyOp { right, .. } | Expr::AllOp { right, .. } => {
            matches!(&**right, Expr::Subquery(_))
        }
        _ => false,
    }
}

/// Leaving an ANY/ALL: its subquery operand is no longer being visited.
fn operand_done(e: &Expr, operands: &mut Vec<*const Expr>) {
    if let Expr::AnyOp { right, .. } | Expr::AllOp { right, .. } = e
        && operands.last() == Some(&(&**right as *const Expr))
    {
        operands.pop();
    }
}

/// Gives the output columns that are subqueries their names as aliases: the constant
/// that replaces a subquery would be named by its type (`int8`), not as PostgreSQL names
/// `(SELECT count(*) ...)` (`count`) or `EXISTS (...)` (`exists`).
fn name_outputs(st: &mut Statement) {
    let Statement::Query(q) = st else {
        return;
    };
    let mut body = &mut *q.body;
    let select = loop {
        match body {
            SetExpr::Select(s) => break s,
            SetExpr::SetOperation { left, .. } => body = left,
            SetExpr::Query(q) => body = &mut q.body,
            _ => return,
        }
    };
    for item in &mut select.projection {
        let SelectItem::UnnamedExpr(e) = item else {
            continue;
        };
        let mut inner = &*e;
        while let Expr::Nested(x) = inner {
            inner = x;
        }
        if matches!(inner, Expr::Subquery(_) | Expr::Exists { .. }) {
            let (name, _) = super::merge::colname::column_name(e);
            *item = SelectItem::ExprWithAlias {
                expr: e.clone(),
                alias: Ident::with_quote('"', name),
            };
        }
    }
}

impl PreEval {
    /// The statement with each subquery's answer in its place.
    pub fn substitute(&self, answers: &[Answer]) -> Result<String, SubstituteError> {
        let mut st = self.statement.clone();
        let mut replace = Replace {
            taken: &self.taken,
            subtree: &self.subtree,
            answers,
            next: 0,
            operands: Vec::new(),
            answered: 0,
            failed: None,
        };
        let _ = st.visit(&mut replace);
        match replace.failed {
            Some(e) => Err(e),
            None => Ok(st.to_string()),
        }
    }

    /// The statement with answers of no rows in its subqueries' places, to see whether
    /// it routes once they are evaluated.
    pub(super) fn placeholder(&self) -> Result<String, SubstituteError> {
        let none: Vec<Answer> = self
            .subqueries
            .iter()
            .map(|_| Answer {
                // One column: the width of a scalar or a comparison's list (IN and
                // EXISTS of no rows do not need one).
                types: vec!["text".into()],
                rows: Vec::new(),
            })
            .collect();
        self.substitute(&none)
    }
}

/// Puts the answers in the places of the subqueries taken, meeting the subquery
/// expressions in the pre-order the survey met them in (a replaced one's own are not
/// visited: they are skipped in the count).
struct Replace<'a> {
    taken: &'a [bool],
    subtree: &'a [usize],
    answers: &'a [Answer],
    /// The pre-order index of the next subquery expression met.
    next: usize,
    operands: Vec<*const Expr>,
    answered: usize,
    failed: Option<SubstituteError>,
}

/// Whether pgshard evaluates subquery `q` (of `form`) first, and what it runs for it.
fn evaluated_first(q: &Query, form: Form, rules: &Rules) -> Option<Subquery> {
    if super::nested::correlated(q) {
        return None;
    }
    let mut c = Collector::default();
    query(q, rules, &mut c);
    if !c.seen.iter().any(|&t| t < rules.tables.len()) {
        return None;
    }
    let mut q = q.clone();
    if form == Form::Exists && q.limit_clause.is_none() && q.fetch.is_none() {
        // Whether there is a row: one is enough.
        q.limit_clause = Some(LimitClause::LimitOffset {
            limit: Some(Expr::value(Value::Number("1".into(), false))),
            offset: None,
            limit_by: Vec::new(),
        });
    }
    Some(Subquery { sql: q.to_string() })
}

impl VisitorMut for Replace<'_> {
    type Break = ();

    fn pre_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
        let Some((_, form)) = candidate(e, &mut self.operands) else {
            return ControlFlow::Continue(());
        };
        let i = self.next;
        if !self.taken.get(i).copied().unwrap_or(false) {
            self.next += 1;
            return ControlFlow::Continue(());
        }
        self.next += self.subtree.get(i).copied().unwrap_or(1);
        let Some(answer) = self.answers.get(self.answered) else {
            self.failed = Some(error("XX000", "a subquery has no answer"));
            return ControlFlow::Break(());
        };
        self.answered += 1;
        match replaced(e, form, answer) {
            Ok(new) => *e = new,
            Err(err) => {
                self.failed = Some(err);
                return ControlFlow::Break(());
            }
        }
        if form == Form::Compared {
            // The rows that replaced its subquery are not a candidate either.
            self.operands.pop();
            if let Expr::AnyOp { right, .. } | Expr::AllOp { right, .. } = e {
                self.operands.push(&**right as *const Expr);
            }
        }
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
        operand_done(e, &mut self.operands);
        ControlFlow::Continue(())
    }
}

/// What takes the place of expression `e` (of `form`) given its subquery's answer.
fn replaced(e: &Expr, form: Form, answer: &Answer) -> Result<Expr, SubstituteError> {
    let width = answer.types.len();
    match (form, e) {
        (Form::Scalar, _) => {
            if width != 1 {
                return Err(error("42601", "subquery must return only one column"));
            }
            if answer.rows.len() > 1 {
                return Err(error(
                    "21000",
                    "more than one row returned by a subquery used as an expression",
                ));
            }
            let v = answer.rows.first().and_then(|r| r[0].as_deref());
            Ok(Expr::Nested(Box::new(constant(v, &answer.types[0])?)))
        }
        (Form::Exists, Expr::Exists { negated, .. }) => Ok(Expr::value(Value::Boolean(
            answer.rows.is_empty() == *negated,
        ))),
        (Form::In, Expr::InSubquery { expr, negated, .. }) => {
            let left = match &**expr {
                Expr::Tuple(t) => t.len(),
                _ => 1,
            };
            if answer.rows.is_empty() {
                // Nothing is in an empty set (not even NULL).
                return Ok(Expr::value(Value::Boolean(*negated)));
            }
            if width != left {
                return Err(error(
                    "42601",
                    if width > left {
                        "subquery has too many columns"
                    } else {
                        "subquery has too few columns"
                    },
                ));
            }
            if width == 1 {
                let mut list = Vec::with_capacity(answer.rows.len());
                for r in &answer.rows {
                    list.push(constant(r[0].as_deref(), &answer.types[0])?);
                }
                return Ok(Expr::InList {
                    expr: expr.clone(),
                    list,
                    negated: *negated,
                });
            }
            Ok(Expr::InSubquery {
                expr: expr.clone(),
                subquery: Box::new(rows_query(answer)?),
                negated: *negated,
            })
        }
        (Form::Compared, Expr::AnyOp { .. } | Expr::AllOp { .. }) => {
            if width != 1 {
                return Err(error("42601", "subquery has too many columns"));
            }
            let rows = Box::new(Expr::Subquery(Box::new(rows_query(answer)?)));
            let mut e = e.clone();
            if let Expr::AnyOp { right, .. } | Expr::AllOp { right, .. } = &mut e {
                *right = rows;
            }
            Ok(e)
        }
        _ => Err(error("XX000", "subquery changed form")),
    }
}

/// A query of the answer's rows as constants (VALUES, as a SELECT from them, which
/// sqlparser reads after ANY and ALL too; or a SELECT of no rows with the columns' types),
/// standing in for the subquery.
fn rows_query(answer: &Answer) -> Result<Query, SubstituteError> {
    let mut sql = String::new();
    if answer.rows.is_empty() {
        sql.push_str("SELECT ");
        for (i, t) in answer.types.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&constant(None, t)?.to_string());
        }
        sql.push_str(" WHERE false");
    } else {
        sql.push_str("SELECT * FROM (VALUES ");
        for (i, r) in answer.rows.iter().enumerate() {
            sql.push_str(if i > 0 { ", (" } else { "(" });
            for (j, (v, t)) in r.iter().zip(&answer.types).enumerate() {
                if j > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&constant(v.as_deref(), t)?.to_string());
            }
            sql.push(')');
        }
        sql.push_str(") AS pgshard_rows");
    }
    super::parse_query(&sql).map_err(|e| error("XX000", &e))
}

/// `$tag$text$tag$::type`, or `NULL::type`: the value as the server printed it, read
/// back as its type (dollar quoting reads alike whatever `standard_conforming_strings`).
fn constant(v: Option<&str>, ty: &str) -> Result<Expr, SubstituteError> {
    let data_type = data_type(ty)?;
    let expr = match v {
        None => Expr::value(Value::Null),
        Some(v) => {
            let mut tag = "pgshard".to_string();
            while v.contains(&format!("${tag}$")) {
                tag.push('_');
            }
            Expr::value(Value::DollarQuotedString(DollarQuotedString {
                value: v.to_string(),
                tag: Some(tag),
            }))
        }
    };
    Ok(Expr::Cast {
        kind: CastKind::DoubleColon,
        expr: Box::new(expr),
        data_type,
        format: None,
    })
}

/// A type name as sqlparser reads it (so that the router knows `timestamp with time zone`
/// and the like when the constant is a shard key).
fn data_type(ty: &str) -> Result<DataType, SubstituteError> {
    let e = sqlparser::parser::Parser::new(&sqlparser::dialect::PostgreSqlDialect {})
        .try_with_sql(&format!("NULL::{ty}"))
        .and_then(|mut p| p.parse_expr())
        .map_err(|e| error("0A000", &format!("pgshard cannot read type {ty}: {e}")))?;
    match e {
        Expr::Cast { data_type, .. } => Ok(data_type),
        _ => Err(error("0A000", &format!("pgshard cannot read type {ty}"))),
    }
}

/// The name of a built-in type, by OID, as a cast names it; None for other types (whose
/// names the server tells, `format_type`) and for types no constant can have (`record`).
/// Types whose modifier changes what a cast does (`bit`, `character`) are left to the
/// server, which names them with it.
pub fn builtin_type(oid: u32) -> Option<&'static str> {
    Some(match oid {
        16 => "boolean",
        17 => "bytea",
        19 => "name",
        20 => "bigint",
        21 => "smallint",
        23 => "integer",
        25 => "text",
        26 => "oid",
        114 => "json",
        142 => "xml",
        650 => "cidr",
        700 => "real",
        701 => "double precision",
        790 => "money",
        829 => "macaddr",
        869 => "inet",
        1043 => "character varying",
        1082 => "date",
        1083 => "time without time zone",
        1114 => "timestamp without time zone",
        1184 => "timestamp with time zone",
        1186 => "interval",
        1266 => "time with time zone",
        1700 => "numeric",
        2950 => "uuid",
        3802 => "jsonb",
        1000 => "boolean[]",
        1001 => "bytea[]",
        1005 => "smallint[]",
        1007 => "integer[]",
        1009 => "text[]",
        1015 => "character varying[]",
        1016 => "bigint[]",
        1021 => "real[]",
        1022 => "double precision[]",
        1115 => "timestamp without time zone[]",
        1182 => "date[]",
        1185 => "timestamp with time zone[]",
        1231 => "numeric[]",
        2951 => "uuid[]",
        3807 => "jsonb[]",
        _ => return None,
    })
}

#[cfg(test)]
mod tests;
