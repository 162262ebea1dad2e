//! What a statement touches: which sharded tables, with which shard-key values (literals
//! or `$n` parameters), found with sqlparser. The result depends only on the statement text
//! and the sharding rules, so the session caches it by text and resolves parameters per Bind.

use super::Rules;
pub use super::merge::{MergeSpec, OrderCol, OrderKey};
use super::merge::{fetch_as_limit, merge_spec, shard_statement};
use super::predicate::constraints;
pub(super) use super::predicate::value_of;
use crate::sharding::cast::Cast;
use sqlparser::ast::{
    AssignmentTarget, Expr, FromTable, ObjectName, ObjectNamePart, Query, Select, SetExpr,
    Statement, TableFactor, TableWithJoins,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

mod collect;
mod derived;
mod exists;
pub(super) use collect::{Collector, query};
use collect::{ddl_names, relation, select, where_keys};

/// A shard-key value as written in the statement.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyRef {
    Literal(String),
    /// A constant cast to `timestamptz` (`'2026-01-01 00:30'::timestamptz`): an instant,
    /// which a `timestamp` key sees as its wall-clock time in the session's time zone.
    Instant(String),
    /// `$n`, zero-based, with the type it is cast to (`$1::text`), if any: it tells how a
    /// parameter sent in binary is encoded when Parse left its type unspecified, and what
    /// the cast does to its value.
    Param(usize, Option<Cast>),
    Null,
    /// Not one value but bounds on the key, from comparisons in a WHERE clause (`>`,
    /// `>=`, `<`, `<=`, BETWEEN): only a range-sharded table's shards are narrowed by it.
    Range(Box<KeyRange>),
    /// The elements of an array, given as a literal or a parameter (`key = ANY($1)`,
    /// `key = ANY('{1,2}')`): the key is one of them.
    Elements(Box<KeyRef>),
}

/// Bounds on a key: it is at least every lower bound and at most every upper one. Each is
/// taken as inclusive (a strict `<` narrows as `<=` does), which can only add a shard.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct KeyRange {
    pub lower: Vec<KeyRef>,
    pub upper: Vec<KeyRef>,
}

/// Which shards a statement needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// No sharded table: `default_shard` (or wherever the transaction is).
    Default,
    /// The shards of these (table, key) pairs.
    Keys(Vec<(usize, KeyRef)>),
    /// Sharded (or reference) tables without a usable key: every shard.
    All,
    /// Rows whose keys the shards generate (an INSERT that leaves out the key of a
    /// `generate_keys` table): any one shard, the session's own if it has one.
    Any,
}

/// What kind of statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Other,
    Read,
    Write,
    Ddl,
}

/// The routing-relevant facts of a statement (or a query string).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Analysis {
    pub target: Target,
    pub kind: Kind,
    /// An UPDATE that assigns a shard key: (table, new value when it is a literal/param).
    pub key_update: Option<(usize, Option<KeyRef>)>,
    /// A write to a reference table (it must go to every shard).
    pub writes_reference: bool,
    /// Number of statements in the text.
    pub statements: usize,
    /// For a single SELECT: how to merge its results from several shards, or why pgshard
    /// cannot do that yet.
    pub merge: Option<Result<MergeSpec, String>>,
    /// The text each shard runs for a cross-shard SELECT, when it differs from the
    /// client's (OFFSET applied after merging).
    pub shard_sql: Option<String>,
    /// An INSERT into a sharded table (its rows must never be broadcast).
    pub inserts_sharded: bool,
    /// For a single INSERT ... VALUES into a sharded table: the statement and each row's
    /// key, so that it can be split per shard.
    pub insert_split: Option<std::sync::Arc<super::insert::InsertSplit>>,
    /// An INSERT ... SELECT into a sharded table whose rows each shard makes from its own
    /// rows (the new key is the key of a co-located table read): it runs as written on
    /// every shard the SELECT needs.
    pub insert_select: bool,
    /// An INSERT ... SELECT whose new rows' shards only their values tell: pgshard runs the
    /// SELECT, then inserts its rows split by key (see [`InsertVia`]).
    pub insert_via: Option<std::sync::Arc<InsertVia>>,
    /// Only reads, with no locking clause, data-modifying CTE or writing function: may run
    /// on a replica.
    pub replica_safe: bool,
    /// A SELECT whose only write is its locking clause (`FOR UPDATE`, `FOR SHARE`, ...):
    /// over several shards each shard's primary locks the rows it returns, and the rows
    /// merge as a read's (its `kind` stays `Write`: it needs the primary, and a
    /// transaction that ran it is no longer a read).
    pub locking_read: bool,
    /// A nested query needs every row of a sharded table and names its key (see
    /// `nested`): the statement is right on one shard only.
    pub one_shard: bool,
    /// The tables whose keys the shards make for this statement's rows (`Target::Any`):
    /// the shard it runs on must be set up for them.
    pub keyless: Vec<usize>,
    /// A `DECLARE ... CURSOR FOR query`: the rest of the analysis is the query's (and
    /// `shard_sql` its text), so that over several shards pgshard runs the query merged
    /// and holds its rows as the cursor.
    pub cursor: Option<std::sync::Arc<Cursor>>,
    /// The query of a `COPY (query) TO STDOUT` over several shards that only a merge
    /// answers (set by the session): pgshard writes the merged rows as the COPY's data.
    pub copy_to: Option<std::sync::Arc<crate::router::copy::CopyStmt>>,
    /// An EXPLAIN: routed as the statement it explains (a read unless ANALYZE runs it);
    /// over several shards each shard's plan is shown, never merged.
    pub explain: bool,
    /// It may change the session's `TimeZone` (SET or RESET of it or of everything,
    /// `set_config`, DISCARD ALL): timestamp keys in it, or sent after it before the
    /// server reports the new zone, cannot be read in the zone pgshard knows.
    pub sets_time_zone: bool,
    /// Subqueries pgshard can evaluate before the statement (see `preeval`), from
    /// [`analyze_evaluating_first`] only.
    pub pre_eval: Option<std::sync::Arc<super::preeval::PreEval>>,
}

/// A cursor declared with SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// As PostgreSQL resolves it (folded unless quoted).
    pub name: String,
    /// WITH HOLD: it outlives its transaction.
    pub hold: bool,
    /// BINARY: its rows in binary format.
    pub binary: bool,
    /// NO SCROLL: it moves only forward.
    pub no_scroll: bool,
}

/// An INSERT ... SELECT carried out through pgshard: the SELECT's rows are read (merged
/// over the shards it needs), then inserted as VALUES rows, each on its key's shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InsertVia {
    /// The INSERT; its source is replaced by the rows.
    pub insert: Statement,
    /// The SELECT that makes the rows, and its own analysis.
    pub select_sql: String,
    pub select: Analysis,
    /// The sharded table inserted into, and its key's position among the INSERT's columns.
    pub table: usize,
    pub key: usize,
    /// What the session does before the rows are placed.
    pub how: Via,
}

/// How an [`InsertVia`] finds its rows' shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// INSERT ... SELECT: `select_sql` makes the rows, which are inserted as VALUES.
    Select,
    /// INSERT ... VALUES whose keys the servers must evaluate: `select_sql` evaluates
    /// them and the rows stay as written.
    Computed(ComputedKeys),
    /// INSERT ... VALUES without a column list: the session reads the table's columns
    /// where the INSERT runs (its transaction, its `search_path`), then carries out the
    /// same INSERT with them listed (`select_sql` and `key` unused). Listed, a column
    /// dropped or renamed in between makes PostgreSQL refuse the statement instead of rows
    /// being placed by a stale position.
    Unlisted,
}

impl InsertVia {
    /// The keys the servers evaluate, for [`Via::Computed`].
    pub fn computed(&self) -> Option<&ComputedKeys> {
        match &self.how {
            Via::Computed(k) => Some(k),
            _ => None,
        }
    }
}

/// The keys of an INSERT ... VALUES that pgshard cannot read itself: expressions
/// (`now()`, `$1::date + 1`, `date_trunc('month', now())`) and text it cannot parse as
/// the key's type (`'now'`, `'infinity'`, a zone name in a timestamp). A server evaluates
/// them (in the client's transaction, or on their own outside one), each row goes to the
/// shard of its value, and the value replaces the expression in the row, bound as a
/// parameter of the expression's own type: the row stores what was routed, and converts
/// to the column's type as the expression would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComputedKeys {
    /// Per VALUES row: its key as written (a literal or parameter pgshard reads), or
    /// None for the next key `select_sql` evaluates. Each evaluated key is two columns:
    /// the value of its expression, then that value cast to the key's type.
    pub rows: Vec<Option<KeyRef>>,
    /// The evaluated keys' expressions, None for the column's default (`DEFAULT`, or the
    /// key left out of the column list): when there is one, the session looks the default
    /// up and builds the evaluation again with it.
    pub exprs: Vec<Option<String>>,
    /// Whether the expressions written in the statement (the defaults aside) evaluate
    /// alike outside the client's transaction and in it (`computed::transaction_independent`).
    pub independent: bool,
}

impl Target {
    /// Where two statements (or parts) together need to go.
    pub(super) fn and(self, other: Target) -> Target {
        match (self, other) {
            (Target::All, _) | (_, Target::All) => Target::All,
            // Rows whose keys the shards make may go wherever the other statements go
            // (statements of a string over several shards are routed one by one).
            (Target::Any, t) | (t, Target::Any) => t,
            (Target::Default, t) | (t, Target::Default) => t,
            (Target::Keys(mut a), Target::Keys(b)) => {
                a.extend(b);
                Target::Keys(a)
            }
        }
    }
}

impl Analysis {
    /// One statement going to `target` and doing `kind`, with nothing else known.
    pub fn of(target: Target, kind: Kind) -> Analysis {
        Analysis {
            target,
            kind,
            key_update: None,
            writes_reference: false,
            statements: 1,
            merge: None,
            shard_sql: None,
            inserts_sharded: false,
            insert_split: None,
            insert_select: false,
            insert_via: None,
            replica_safe: false,
            locking_read: false,
            one_shard: false,
            keyless: Vec::new(),
            cursor: None,
            copy_to: None,
            explain: false,
            sets_time_zone: false,
            pre_eval: None,
        }
    }
}

/// Why a statement has no analysis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnalyzeError {
    /// sqlparser cannot read it (it may still be routable without parsing).
    Parse(String),
    /// It is read, but pgshard cannot tell its shard (the message says why).
    Unroutable(String),
}

/// `TABLE name ...`, which sqlparser does not read, as the `SELECT * FROM name ...` it
/// is, for the analysis (the shards run the client's text, or a rewrite of the SELECT);
/// None when no statement of `sql` is one.
fn table_commands_as_selects(sql: &str) -> Option<String> {
    let mut changed = false;
    let statements: Vec<String> = super::split_statements(sql)
        .into_iter()
        .map(|st| match super::lexer::leading_words::<1>(st) {
            ([w], 1) if w.eq_ignore_ascii_case("table") => {
                changed = true;
                let at = w.as_ptr() as usize - st.as_ptr() as usize;
                format!("{}SELECT * FROM{}", &st[..at], &st[at + w.len()..])
            }
            _ => st.to_string(),
        })
        .collect();
    changed.then(|| statements.join(";\n"))
}

/// [`analyze`], and for a single statement it refuses because of subqueries the shards
/// cannot answer alone, the subqueries pgshard can evaluate first (`pre_eval`; see
/// `preeval`). Only for callers that carry that out: the rest of such an analysis is the
/// statement's with answers of no rows in the subqueries' places.
pub fn analyze_evaluating_first(sql: &str, rules: &Rules) -> Result<Analysis, AnalyzeError> {
    let written = analyze(sql, rules);
    let refused = match &written {
        Err(AnalyzeError::Unroutable(why)) => Some(why.clone()),
        Ok(a) if a.one_shard => None,
        _ => return written,
    };
    let Ok([st]) = <[Statement; 1]>::try_from(
        Parser::parse_sql(&PostgreSqlDialect {}, sql).unwrap_or_default(),
    ) else {
        return written;
    };
    use super::preeval::{Pick, plan};
    // The fewest subqueries first, when the statement then routes; else the outermost.
    for pick in [Pick::Innermost, Pick::Outermost] {
        let Some(pre) = plan(&st, rules, refused.clone(), pick) else {
            return written;
        };
        let Ok(Ok(placeholder)) = pre.placeholder().map(|sql| analyze(&sql, rules)) else {
            continue;
        };
        if placeholder.one_shard {
            continue;
        }
        let mut a = written.unwrap_or(placeholder);
        a.pre_eval = Some(std::sync::Arc::new(pre));
        return Ok(a);
    }
    written
}

/// What a statement (or query string) touches, as written.
pub fn analyze(sql: &str, rules: &Rules) -> Result<Analysis, AnalyzeError> {
    let parse = |sql: &str| Parser::parse_sql(&PostgreSqlDialect {}, sql);
    let stmts = match parse(sql) {
        Ok(stmts) => stmts,
        Err(e) => table_commands_as_selects(sql)
            .and_then(|selects| parse(&selects).ok())
            .ok_or_else(|| AnalyzeError::Parse(e.to_string()))?,
    };
    let mut out = Analysis {
        statements: stmts.len(),
        sets_time_zone: stmts.iter().any(sets_time_zone)
            || sql.to_ascii_lowercase().contains("set_config"),
        ..Analysis::of(Target::Default, Kind::Other)
    };
    // `Any` joins whatever the other statements need (the first statement's target for
    // one statement); with no statement, the default shard.
    if !stmts.is_empty() {
        out.target = Target::Any;
    }
    let cursor = declared_cursor(&stmts);
    if let Some((c, q)) = &cursor {
        out.cursor = Some(std::sync::Arc::new(c.clone()));
        // The shards run the query, never the DECLARE.
        out.shard_sql = Some(q.to_string());
    }
    let query = match stmts.as_slice() {
        [Statement::Query(q)] => Some(q),
        _ => cursor.as_ref().map(|(_, q)| q),
    };
    if cursor.is_none()
        && let Some(q) = query
        && let Some(a) = exists::exists_select(q, rules)
    {
        let mut a = a.map_err(AnalyzeError::Unroutable)?;
        a.replica_safe = !rules.calls_writing_function(sql);
        return Ok(a);
    }
    if cursor.is_none()
        && let Some(q) = query
        && let Some(a) = derived::derived_select(q, rules)
    {
        let mut a = a.map_err(AnalyzeError::Unroutable)?;
        a.replica_safe = !rules.calls_writing_function(sql);
        return Ok(a);
    }
    let as_limit = query.and_then(|q| fetch_as_limit(q));
    if let Some(q) = as_limit.as_ref().or(query.map(|q| &**q)) {
        let spec = merge_spec(q, rules)
            .and_then(|spec| union_rows_partitioned(q, &spec, rules).map(|()| spec));
        if let Ok(spec) = &spec
            && let Some(sql) = shard_statement(q, spec)
        {
            out.shard_sql = Some(sql);
        }
        out.merge = Some(spec);
    }
    for st in &stmts {
        let a = statement(st, rules).map_err(AnalyzeError::Unroutable)?;
        out.explain |= a.explain;
        out.kind = out.kind.max(a.kind);
        out.inserts_sharded |= a.inserts_sharded;
        out.insert_select |= a.insert_select;
        if a.insert_via.is_some() {
            out.insert_via = a.insert_via;
        }
        out.key_update = out.key_update.or(a.key_update);
        out.writes_reference |= a.writes_reference;
        out.one_shard |= a.one_shard;
        out.keyless.extend(&a.keyless);
        out.target = std::mem::replace(&mut out.target, Target::Default).and(a.target);
    }
    out.replica_safe = out.kind == Kind::Read && !rules.calls_writing_function(sql);
    out.locking_read = cursor.is_none()
        && matches!(stmts.as_slice(), [Statement::Query(q)] if locks_only(q))
        && !rules.calls_writing_function(sql);
    if let [st @ Statement::Insert(_)] = stmts.as_slice()
        && let Target::Keys(keys) = &out.target
        && out.inserts_sharded
        && !out.insert_select
        && out.insert_via.is_none()
    {
        out.insert_split = Some(std::sync::Arc::new(super::insert::InsertSplit {
            statement: st.clone(),
            keys: keys.clone(),
        }));
    }
    Ok(out)
}

/// The reference table `f` names, if it names one.
fn reference_named(f: &TableFactor, rules: &Rules) -> Option<String> {
    match f {
        TableFactor::Table { name, .. } => name_of(name).filter(|n| rules.is_reference(n)),
        _ => None,
    }
}

/// A SET or RESET of the time zone (or of every setting), or a DISCARD.
fn sets_time_zone(st: &Statement) -> bool {
    let text = || st.to_string().to_ascii_lowercase();
    match st {
        Statement::Set(_) => {
            let t = text();
            t.contains("time zone") || t.contains("timezone")
        }
        Statement::Reset(_) => {
            let t = text();
            t.contains("all") || t.contains("timezone")
        }
        Statement::Discard { .. } => true,
        _ => false,
    }
}

/// The cursor and query of a `DECLARE name CURSOR FOR query` (the only statement).
fn declared_cursor(stmts: &[Statement]) -> Option<(Cursor, Box<Query>)> {
    let [Statement::Declare { stmts }] = stmts else {
        return None;
    };
    let [d] = stmts.as_slice() else {
        return None;
    };
    let (Some(q), [name]) = (&d.for_query, d.names.as_slice()) else {
        return None;
    };
    Some((
        Cursor {
            name: ident(name),
            hold: d.hold == Some(true),
            binary: d.binary == Some(true),
            no_scroll: d.scroll == Some(false),
        },
        q.clone(),
    ))
}

/// A UNION ALL over several shards concatenates what each shard's run of it returns: right
/// only when every SELECT in it reads a sharded table (whose rows the shards partition);
/// the rows of any other SELECT would come back once per shard.
fn union_rows_partitioned(q: &Query, spec: &MergeSpec, rules: &Rules) -> Result<(), String> {
    if matches!(*q.body, SetExpr::Select(_)) || spec.distinct {
        return Ok(());
    }
    let (leaves, _) = super::merge::union_leaves(&q.body)?;
    for leaf in leaves {
        let mut c = Collector::default();
        select(leaf, rules, &mut c);
        if c.seen.is_empty() {
            return Err("UNION ALL across shards of a SELECT that reads no sharded table would repeat its rows once per shard; use UNION, or run that SELECT on its own".into());
        }
    }
    Ok(())
}

/// Why a statement with an INSERT whose keys the shards generate cannot be routed: its
/// other parts need particular shards, and the new rows must all go to one.
const KEYLESS_ALONE: &str = "an INSERT that leaves its shard key to the shards runs on one shard of pgshard's choosing; it cannot be part of a statement that needs other shards (send it on its own)";

pub(super) fn name_of(n: &ObjectName) -> Option<String> {
    match n.0.last()? {
        ObjectNamePart::Identifier(id) => Some(ident(id)),
        _ => None,
    }
}

/// An identifier as PostgreSQL resolves it: folded to lower case unless quoted.
pub(super) fn ident(id: &sqlparser::ast::Ident) -> String {
    if id.quote_style.is_some() {
        id.value.clone()
    } else {
        id.value.to_ascii_lowercase()
    }
}

fn statement(st: &Statement, rules: &Rules) -> Result<Analysis, String> {
    // A cursor goes where its query goes.
    if let Some((_, q)) = declared_cursor(std::slice::from_ref(st)) {
        return statement(&Statement::Query(q), rules);
    }
    // EXPLAIN goes where the statement goes; it runs it only with ANALYZE.
    if let Statement::Explain {
        statement: inner,
        analyze,
        options,
        ..
    } = st
    {
        let mut a = statement(inner, rules)?;
        let runs = *analyze
            || options.iter().flatten().any(|o| {
                ident(&o.name) == "analyze"
                    && o.arg.as_ref().is_none_or(|v| {
                        !matches!(
                            v.to_string().to_ascii_lowercase().as_str(),
                            "false" | "off" | "0"
                        )
                    })
            });
        if !runs {
            a.kind = a.kind.min(Kind::Read);
            a.inserts_sharded = false;
        }
        a.explain = true;
        return Ok(a);
    }
    let mut independent = super::nested::independent(st, rules);
    let mut c = Collector {
        skip: independent.iter().map(|i| i.addr).collect(),
        ..Collector::default()
    };
    let mut key_update = None;
    let mut kind = Kind::Other;
    // The reference table an UPDATE or DELETE writes, if it writes one.
    let mut written_reference = None;
    match st {
        Statement::Query(q) => {
            kind = if q.locks.is_empty() {
                Kind::Read
            } else {
                Kind::Write
            };
            query(q, rules, &mut c);
        }
        Statement::Insert(ins) => {
            kind = Kind::Write;
            super::insert::insert(ins, rules, &mut c)?;
            if c.insert_via.is_some() {
                // The SELECT runs on its own, where its own analysis checked its nested
                // queries.
                independent.clear();
            }
        }
        Statement::Update(u) => {
            kind = Kind::Write;
            let mut scope = Vec::new();
            written_reference = reference_named(&u.table.relation, rules);
            relation(&u.table, rules, &mut c, &mut scope);
            if let Some(from) = &u.from {
                let tables = match from {
                    sqlparser::ast::UpdateTableFromKind::BeforeSet(t)
                    | sqlparser::ast::UpdateTableFromKind::AfterSet(t) => t,
                };
                for t in tables {
                    relation(t, rules, &mut c, &mut scope);
                }
            }
            if let Some(sel) = &u.selection {
                where_keys(sel, rules, &scope, &mut c);
            }
            if let TableFactor::Table { name, .. } = &u.table.relation
                && let Some(idx) = name_of(name).and_then(|n| rules.table(&n))
            {
                for a in &u.assignments {
                    if let AssignmentTarget::ColumnName(col) = &a.target
                        && name_of(col).as_deref() == Some(rules.tables[idx].column.as_str())
                    {
                        key_update = Some((idx, value_of(&a.value)));
                    }
                }
            }
        }
        Statement::Delete(d) => {
            kind = Kind::Write;
            let mut scope = Vec::new();
            let tables = match &d.from {
                FromTable::WithFromKeyword(t) | FromTable::WithoutKeyword(t) => t,
            };
            written_reference = tables
                .iter()
                .find_map(|t| reference_named(&t.relation, rules));
            for t in tables.iter().chain(d.using.iter().flatten()) {
                relation(t, rules, &mut c, &mut scope);
            }
            if let Some(sel) = &d.selection {
                where_keys(sel, rules, &scope, &mut c);
            }
        }
        Statement::CreateTable(ct) => {
            kind = Kind::Ddl;
            ddl_names(std::iter::once(&ct.name), rules, &mut c);
        }
        Statement::CreateIndex(ci) => {
            kind = Kind::Ddl;
            ddl_names(std::iter::once(&ci.table_name), rules, &mut c);
        }
        Statement::AlterTable(at) => {
            kind = Kind::Ddl;
            ddl_names(std::iter::once(&at.name), rules, &mut c);
        }
        // Objects the tables of every shard may use: types, domains, schemas, extensions.
        // They go to every shard, as DDL of sharded tables does (a table of a type made
        // on the default shard only could not be created on the others).
        Statement::CreateType { .. }
        | Statement::AlterType(_)
        | Statement::CreateDomain(_)
        | Statement::DropDomain(_)
        | Statement::CreateSchema { .. }
        | Statement::CreateExtension(_)
        | Statement::DropExtension(_)
        | Statement::Drop {
            object_type:
                sqlparser::ast::ObjectType::Type
                | sqlparser::ast::ObjectType::Schema
                | sqlparser::ast::ObjectType::Collation,
            ..
        } => {
            kind = Kind::Ddl;
            c.seen.push(usize::MAX);
        }
        Statement::Drop { names, .. } => {
            kind = Kind::Ddl;
            ddl_names(names.iter(), rules, &mut c);
        }
        Statement::Truncate(t) => {
            kind = Kind::Write;
            ddl_names(t.table_names.iter().map(|t| &t.name), rules, &mut c);
        }
        // COPY (query) TO: where the query reads. COPY of a reference table TO: any shard.
        // (COPY into sharded or reference tables, and out of sharded ones, is carried out
        // by the session over every shard before routing gets here.)
        Statement::Copy {
            source: sqlparser::ast::CopySource::Query(q),
            to: true,
            ..
        } => {
            kind = Kind::Read;
            query(q, rules, &mut c);
        }
        Statement::Copy {
            source: sqlparser::ast::CopySource::Table { table_name, .. },
            to: true,
            ..
        } if name_of(table_name).is_some_and(|n| rules.is_reference(&n)) => {
            kind = Kind::Read;
        }
        Statement::Copy { .. } if rules.mentioned_in(&st.to_string()) => {
            return Err(
                "this COPY of a sharded or reference table needs several shards, which pgshard does for COPY ... FROM STDIN and ... TO STDOUT only; COPY to or from a server file runs per shard with a /* pgshard: shard=N */ hint"
                    .into(),
            );
        }
        Statement::Merge(m) => {
            kind = Kind::Write;
            let target = match &m.table {
                TableFactor::Table { name, .. } => name_of(name),
                _ => None,
            };
            if let Some(t) = target.as_deref().filter(|t| rules.table(t).is_some()) {
                return Err(format!(
                    "MERGE into sharded table {t} is not supported: every shard would run it on its own rows and insert the rows it finds no match for; use INSERT ... ON CONFLICT, or UPDATE and INSERT by shard key"
                ));
            }
            let mut read = Vec::new();
            let _ = sqlparser::ast::visit_relations(st, |r| {
                if let Some(t) = name_of(r).and_then(|n| rules.table(&n)) {
                    read.push(t);
                }
                std::ops::ControlFlow::<()>::Continue(())
            });
            if let Some(&t) = read.first() {
                let t = &rules.tables[t].table;
                return Err(match target.filter(|n| rules.is_reference(n)) {
                    Some(r) => format!(
                        "a MERGE into reference table {r} that reads sharded table {t} would change each shard's copy by that shard's rows only"
                    ),
                    None => format!(
                        "a MERGE that reads sharded table {t} would see one shard's rows; pgshard does not gather them for a MERGE"
                    ),
                });
            }
            written_reference = target.filter(|n| rules.is_reference(n));
        }
        // Transaction control, SET, SHOW and the like: wherever the session is.
        Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Savepoint { .. }
        | Statement::ReleaseSavepoint { .. }
        | Statement::Set(_)
        | Statement::ShowVariable { .. }
        | Statement::Copy { .. } => {}
        // Anything else naming a sharded or reference table (GRANT, COMMENT, VACUUM,
        // ANALYZE, CREATE VIEW ...) must reach every shard, like DDL.
        other => {
            if rules.mentioned_in(&other.to_string()) {
                kind = Kind::Ddl;
                c.seen.push(usize::MAX);
            }
        }
    }
    if let Some(r) = written_reference {
        // Every shard holds a copy: each must change alike, from rows every shard has.
        if let Some(t) = c.seen.iter().find_map(|&t| rules.tables.get(t)) {
            return Err(format!(
                "an UPDATE or DELETE of reference table {r} that reads sharded table {} would change each shard's copy by that shard's rows only",
                t.table
            ));
        }
        c.reference = true;
    }
    if matches!(st, Statement::Update(_) | Statement::Delete(_)) {
        match super::colocation::check_write(st, rules) {
            Ok(one) => c.one_shard |= one,
            Err(e) => {
                c.error.get_or_insert(e);
            }
        }
    }
    // Nested queries that need all rows of their sharded tables: each must name its key,
    // and the outer query's tables do not get their shard from it.
    let one_shard = !independent.is_empty();
    if one_shard {
        c.unkeyed |= !c.seen.is_empty() && c.keys.is_empty();
        for i in independent {
            if i.part.keys.is_empty() {
                let t = i.part.seen.iter().find_map(|&t| rules.tables.get(t));
                return Err(format!(
                    "a subquery that aggregates, groups, de-duplicates or limits rows of sharded table {} without its shard key {} would see one shard's rows only",
                    t.map_or("?", |t| t.table.as_str()),
                    t.map_or("?", |t| t.column.as_str()),
                ));
            }
            c.seen.extend(i.part.seen);
            c.keys.extend(i.part.keys);
            if c.error.is_none() {
                c.error = i.part.error;
            }
        }
    }
    if let Some(e) = c.error {
        return Err(e);
    }
    let kind = c.kind.map_or(kind, |k| k.max(kind));
    let target = if c.any_shard {
        if !c.seen.is_empty() || c.reference && kind >= Kind::Write {
            return Err(KEYLESS_ALONE.into());
        }
        Target::Any
    } else if c.reference && kind >= Kind::Write {
        Target::All
    } else if c.seen.is_empty() {
        Target::Default
    } else if c.keys.is_empty() || c.unkeyed || kind == Kind::Ddl {
        Target::All
    } else {
        // Tables without a key of their own are taken to be co-located with the keyed ones
        // (joined on the shard key), as with Citus's and Vitess's co-location.
        Target::Keys(c.keys)
    };
    Ok(Analysis {
        target,
        kind,
        key_update,
        writes_reference: c.reference && kind >= Kind::Write,
        statements: 1,
        merge: None,
        shard_sql: None,
        inserts_sharded: matches!(st, Statement::Insert(_))
            && (!c.seen.is_empty() || c.any_shard || c.insert_select),
        insert_split: None,
        insert_select: c.insert_select,
        insert_via: c.insert_via.map(std::sync::Arc::new),
        replica_safe: false,
        locking_read: false,
        one_shard: one_shard || c.one_shard,
        keyless: c.keyless,
        cursor: None,
        copy_to: None,
        explain: false,
        sets_time_zone: false,
        pre_eval: None,
    })
}

/// A query with a locking clause and no other write: no data-modifying CTE (PostgreSQL
/// allows those only at the top level).
fn locks_only(q: &Query) -> bool {
    !q.locks.is_empty()
        && q.with.as_ref().is_none_or(|w| {
            w.cte_tables.iter().all(|cte| {
                !matches!(
                    *cte.query.body,
                    SetExpr::Insert(_)
                        | SetExpr::Update(_)
                        | SetExpr::Delete(_)
                        | SetExpr::Merge(_)
                )
            })
        })
}

#[cfg(test)]
pub(super) mod tests;
