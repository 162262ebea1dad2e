//! Whether the sharded tables joined in one SELECT are joined on their shard keys. Each
//! shard runs a statement on its own rows, which is right only when related rows live on
//! one shard: tables sharded alike and equated on their keys (`o.user_id = u.id`), as
//! Citus's co-located joins. Tables joined on anything else (`o.total = u.score`, or not
//! at all) would be joined shard by shard and miss the pairs across shards, unless each of
//! them is pinned to one key value, and then the statement must run on one shard.

use super::Rules;
use super::analyze::{ident, name_of, value_of};
use super::predicate::elements;
use sqlparser::ast::{
    BinaryOperator, Expr, JoinConstraint, JoinOperator, Select, TableFactor, TableWithJoins,
};

/// One occurrence of a sharded table in a FROM clause.
struct Instance {
    /// Names it is referred to by: its alias, and its table name.
    names: Vec<String>,
    table: usize,
}

/// Checks a SELECT's sharded tables: Ok(false) when they are joined on their keys (or
/// there are fewer than two), Ok(true) when they are not but each is pinned to key values
/// (the statement must then run on one shard), Err naming the tables otherwise.
pub(super) fn check(sel: &Select, rules: &Rules) -> Result<bool, String> {
    let items = sel.projection.iter().filter_map(|item| match item {
        sqlparser::ast::SelectItem::UnnamedExpr(e)
        | sqlparser::ast::SelectItem::ExprWithAlias { expr: e, .. } => Some(e),
        _ => None,
    });
    check_parts(sel.from.iter(), sel.selection.as_ref(), items, rules)
}

/// The same for an UPDATE (its table, FROM, WHERE and SET values) or a DELETE (its
/// tables, USING and WHERE).
pub(super) fn check_write(st: &sqlparser::ast::Statement, rules: &Rules) -> Result<bool, String> {
    match st {
        sqlparser::ast::Statement::Update(u) => {
            let from: &[TableWithJoins] = match &u.from {
                Some(
                    sqlparser::ast::UpdateTableFromKind::BeforeSet(t)
                    | sqlparser::ast::UpdateTableFromKind::AfterSet(t),
                ) => t,
                None => &[],
            };
            check_parts(
                std::iter::once(&u.table).chain(from),
                u.selection.as_ref(),
                u.assignments.iter().map(|a| &a.value),
                rules,
            )
        }
        sqlparser::ast::Statement::Delete(d) => {
            let tables = match &d.from {
                sqlparser::ast::FromTable::WithFromKeyword(t)
                | sqlparser::ast::FromTable::WithoutKeyword(t) => t,
            };
            check_parts(
                tables.iter().chain(d.using.iter().flatten()),
                d.selection.as_ref(),
                std::iter::empty(),
                rules,
            )
        }
        _ => Ok(false),
    }
}

fn check_parts<'a>(
    from: impl Iterator<Item = &'a TableWithJoins>,
    selection: Option<&'a Expr>,
    items: impl Iterator<Item = &'a Expr>,
    rules: &Rules,
) -> Result<bool, String> {
    let mut inst = Vec::new();
    let mut conjuncts: Vec<&Expr> = Vec::new();
    let mut using: Vec<(usize, &[sqlparser::ast::ObjectName])> = Vec::new();
    for t in from {
        from_item(t, rules, &mut inst, &mut conjuncts, &mut using);
    }
    if let Some(w) = selection {
        split_and(w, &mut conjuncts);
    }
    let exprs: Vec<&Expr> = selection.into_iter().chain(items).collect();
    let one_shard = subqueries(&exprs, rules, &inst, &conjuncts)?;
    if inst.len() < 2 {
        return Ok(one_shard);
    }
    let mut parent: Vec<usize> = (0..inst.len()).collect();
    fn root(p: &mut [usize], mut i: usize) -> usize {
        while p[i] != i {
            p[i] = p[p[i]];
            i = p[i];
        }
        i
    }
    fn union(p: &mut [usize], a: usize, b: usize) {
        let (ra, rb) = (root(p, a), root(p, b));
        p[ra] = rb;
    }
    let co =
        |a: usize, b: usize| rules.tables[inst[a].table].co_located(&rules.tables[inst[b].table]);
    let mut pinned = vec![false; inst.len()];
    for e in &conjuncts {
        if let Some(i) = pin_of(e, rules, &inst) {
            pinned[i] = true;
        } else if let Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq,
            right,
        } = e
            && let (Some(a), Some(b)) = (key_of(left, rules, &inst), key_of(right, rules, &inst))
            && co(a, b)
        {
            union(&mut parent, a, b);
        }
    }
    // JOIN ... USING (col): the joined table with any earlier one, both keyed by col.
    for (right, cols) in using {
        for c in cols {
            let Some(col) = name_of(c) else { continue };
            if rules.tables[inst[right].table].column != col {
                continue;
            }
            for (left, l) in inst.iter().enumerate().take(right) {
                if rules.tables[l.table].column == col && co(left, right) {
                    union(&mut parent, left, right);
                }
            }
        }
    }
    let mut groups: Vec<(usize, bool, usize)> = Vec::new(); // (root, pinned, an instance)
    for (i, &pin) in pinned.iter().enumerate() {
        let r = root(&mut parent, i);
        match groups.iter_mut().find(|g| g.0 == r) {
            Some(g) => g.1 |= pin,
            None => groups.push((r, pin, i)),
        }
    }
    if groups.len() == 1 {
        return Ok(one_shard);
    }
    if groups.iter().all(|g| g.1) {
        return Ok(true);
    }
    let t = |i: usize| &rules.tables[inst[i].table];
    let (a, b) = (t(groups[0].2), t(groups[1].2));
    Err(format!(
        "tables {} and {} are not joined on their shard keys ({}.{} = {}.{}): each shard would join only its own rows",
        a.table, b.table, a.table, a.column, b.table, b.column
    ))
}

/// The instance a conjunct pins to key values (`key = v`, `key IN (v, ...)`,
/// `key = ANY(array)`), if any.
fn pin_of(e: &Expr, rules: &Rules, inst: &[Instance]) -> Option<usize> {
    match e {
        Expr::AnyOp {
            left,
            compare_op: BinaryOperator::Eq,
            right,
            ..
        } => key_of(left, rules, inst).filter(|_| elements(right).is_some()),
        Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq,
            right,
        } => [(left, right), (right, left)]
            .into_iter()
            .find_map(|(k, v)| key_of(k, rules, inst).filter(|_| value_of(v).is_some())),
        Expr::InList {
            expr,
            list,
            negated: false,
        } => key_of(expr, rules, inst).filter(|_| list.iter().all(|v| value_of(v).is_some())),
        _ => None,
    }
}

/// Whether any instance is pinned to key values by one of the conjuncts.
fn any_pinned(conjuncts: &[&Expr], rules: &Rules, inst: &[Instance]) -> bool {
    conjuncts.iter().any(|e| pin_of(e, rules, inst).is_some())
}

/// The subqueries of a SELECT's WHERE and select list that read sharded tables row by row
/// (those that aggregate without being correlated are `nested`'s): each must be related
/// to the outer tables by their shard keys, `key IN (SELECT key ...)` or a correlation
/// `inner.key = outer.key`; or both sides pinned to key values (then Ok(true): one
/// shard only).
fn subqueries(
    exprs: &[&Expr],
    rules: &Rules,
    outer: &[Instance],
    conjuncts: &[&Expr],
) -> Result<bool, String> {
    // The subquery expressions of the WHERE and select list (or SET values), not those of
    // the subqueries themselves.
    let mut found: Vec<&Expr> = Vec::new();
    for e in exprs {
        top_subqueries(e, &mut found);
    }
    let outer_pinned = !outer.is_empty() && any_pinned(conjuncts, rules, outer);
    let mut one_shard = false;
    for e in found {
        let (q, lhs) = match e {
            Expr::InSubquery { expr, subquery, .. } => (&**subquery, Some(&**expr)),
            Expr::Exists { subquery, .. } | Expr::Subquery(subquery) => (&**subquery, None),
            // `key = ANY (SELECT key ...)` is `key IN (SELECT key ...)`.
            Expr::AnyOp {
                left,
                compare_op,
                right,
                ..
            } => match &**right {
                Expr::Subquery(q) => (&**q, (*compare_op == BinaryOperator::Eq).then_some(&**left)),
                _ => continue,
            },
            Expr::AllOp { right, .. } => match &**right {
                Expr::Subquery(q) => (&**q, None),
                _ => continue,
            },
            _ => continue,
        };
        let sqlparser::ast::SetExpr::Select(inner) = &*q.body else {
            continue;
        };
        if super::nested::cross_row(q, rules) && !super::nested::correlated(q) {
            continue;
        }
        let mut inner_inst = Vec::new();
        let mut inner_conj: Vec<&Expr> = Vec::new();
        let mut using = Vec::new();
        for t in &inner.from {
            from_item(t, rules, &mut inner_inst, &mut inner_conj, &mut using);
        }
        if inner_inst.is_empty() {
            continue;
        }
        if let Some(w) = &inner.selection {
            split_and(w, &mut inner_conj);
        }
        let co = |a: usize, b: usize| {
            rules.tables[outer[a].table].co_located(&rules.tables[inner_inst[b].table])
        };
        // key IN (SELECT key ...)
        let by_in = lhs.is_some_and(|l| {
            let out_key = key_of(l, rules, outer);
            let in_key = match inner.projection.first() {
                Some(
                    sqlparser::ast::SelectItem::UnnamedExpr(p)
                    | sqlparser::ast::SelectItem::ExprWithAlias { expr: p, .. },
                ) if inner.projection.len() == 1 => key_of(p, rules, &inner_inst),
                _ => None,
            };
            matches!((out_key, in_key), (Some(a), Some(b)) if co(a, b))
        });
        // inner.key = outer.key in the subquery's WHERE (outer names qualified).
        let by_correlation = inner_conj.iter().any(|c| match c {
            Expr::BinaryOp {
                left,
                op: BinaryOperator::Eq,
                right,
            } => [(left, right), (right, left)].into_iter().any(|(x, y)| {
                matches!(&**y, Expr::CompoundIdentifier(_))
                    && matches!(
                        (key_of(x, rules, &inner_inst), key_of(y, rules, outer)),
                        (Some(b), Some(a)) if co(a, b)
                    )
            }),
            _ => false,
        });
        if by_in || by_correlation {
            continue;
        }
        if (outer.is_empty() || outer_pinned) && any_pinned(&inner_conj, rules, &inner_inst) {
            one_shard = true;
            continue;
        }
        let t = &rules.tables[inner_inst[0].table];
        return Err(format!(
            "a subquery on sharded table {} is not related to the outer query by its shard key {} (key IN (SELECT key ...), or a correlation on the keys): each shard would see only its own rows",
            t.table, t.column
        ));
    }
    Ok(one_shard)
}

/// Subquery expressions in `e`, not looking inside subqueries.
fn top_subqueries<'a>(e: &'a Expr, out: &mut Vec<&'a Expr>) {
    match e {
        Expr::InSubquery { expr, .. } => {
            out.push(e);
            top_subqueries(expr, out);
        }
        Expr::Exists { .. } | Expr::Subquery(_) => out.push(e),
        Expr::AnyOp { left, right, .. } | Expr::AllOp { left, right, .. } => {
            if matches!(&**right, Expr::Subquery(_)) {
                out.push(e);
            }
            top_subqueries(left, out);
        }
        Expr::BinaryOp { left, right, .. } => {
            top_subqueries(left, out);
            top_subqueries(right, out);
        }
        Expr::Nested(x)
        | Expr::UnaryOp { expr: x, .. }
        | Expr::Cast { expr: x, .. }
        | Expr::IsNull(x)
        | Expr::IsNotNull(x) => top_subqueries(x, out),
        Expr::Function(f) => {
            if let sqlparser::ast::FunctionArguments::List(l) = &f.args {
                for a in &l.args {
                    if let sqlparser::ast::FunctionArg::Unnamed(
                        sqlparser::ast::FunctionArgExpr::Expr(x),
                    ) = a
                    {
                        top_subqueries(x, out);
                    }
                }
            }
        }
        _ => {}
    }
}

/// For `INSERT INTO target (..) SELECT ...`: the occurrence, in the SELECT's FROM, of a
/// table co-located with `target` whose shard key is the SELECT's column `pos` (the new
/// rows' key). Some(table) when there is one: each shard then inserts rows made from its
/// own rows, which belong to it. None when the column is something else (a constant, an
/// expression, another column). Err when the SELECT's columns cannot be counted.
pub(super) fn insert_source(
    sel: &Select,
    pos: usize,
    target: usize,
    rules: &Rules,
) -> Result<Option<usize>, String> {
    use sqlparser::ast::SelectItem;
    let mut expr = None;
    for (i, item) in sel.projection.iter().enumerate().take(pos + 1) {
        match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                if i == pos {
                    expr = Some(e);
                }
            }
            _ => {
                return Err(
                    "name the SELECT's columns instead of * (pgshard must see which one becomes the shard key)"
                        .into(),
                );
            }
        }
    }
    let Some(e) = expr else {
        return Err("the SELECT has fewer columns than the INSERT names".into());
    };
    let inst = instances(sel, rules);
    Ok(key_of(e, rules, &inst)
        .map(|i| inst[i].table)
        .filter(|&t| rules.tables[t].co_located(&rules.tables[target])))
}

/// Whether `e` is the shard-key column of a sharded table in `sel`'s FROM.
pub(super) fn is_shard_key(sel: &Select, e: &Expr, rules: &Rules) -> bool {
    key_of(e, rules, &instances(sel, rules)).is_some()
}

/// The sharded tables of a SELECT's FROM.
fn instances(sel: &Select, rules: &Rules) -> Vec<Instance> {
    let mut inst = Vec::new();
    let (mut conjuncts, mut using) = (Vec::new(), Vec::new());
    for t in &sel.from {
        from_item(t, rules, &mut inst, &mut conjuncts, &mut using);
    }
    inst
}

/// The sharded tables of a FROM item, their ON conditions, and USING joins.
fn from_item<'a>(
    t: &'a TableWithJoins,
    rules: &Rules,
    inst: &mut Vec<Instance>,
    conjuncts: &mut Vec<&'a Expr>,
    using: &mut Vec<(usize, &'a [sqlparser::ast::ObjectName])>,
) {
    factor(&t.relation, rules, inst, conjuncts, using);
    for j in &t.joins {
        factor(&j.relation, rules, inst, conjuncts, using);
        let constraint = match &j.join_operator {
            JoinOperator::Join(c)
            | JoinOperator::Inner(c)
            | JoinOperator::Left(c)
            | JoinOperator::LeftOuter(c)
            | JoinOperator::Right(c)
            | JoinOperator::RightOuter(c)
            | JoinOperator::FullOuter(c) => Some(c),
            _ => None,
        };
        match constraint {
            Some(JoinConstraint::On(e)) => split_and(e, conjuncts),
            Some(JoinConstraint::Using(cols)) if !inst.is_empty() => {
                using.push((inst.len() - 1, cols));
            }
            _ => {}
        }
    }
}

fn factor<'a>(
    f: &'a TableFactor,
    rules: &Rules,
    inst: &mut Vec<Instance>,
    conjuncts: &mut Vec<&'a Expr>,
    using: &mut Vec<(usize, &'a [sqlparser::ast::ObjectName])>,
) {
    match f {
        TableFactor::Table { name, alias, .. } => {
            let Some(n) = name_of(name) else { return };
            if let Some(table) = rules.table(&n) {
                let mut names = vec![n];
                if let Some(a) = alias {
                    names.push(ident(&a.name));
                }
                inst.push(Instance { names, table });
            }
        }
        TableFactor::NestedJoin {
            table_with_joins, ..
        } => from_item(table_with_joins, rules, inst, conjuncts, using),
        _ => {}
    }
}

fn split_and<'a>(e: &'a Expr, out: &mut Vec<&'a Expr>) {
    match e {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            split_and(left, out);
            split_and(right, out);
        }
        Expr::Nested(x) => split_and(x, out),
        other => out.push(other),
    }
}

/// The instance whose shard-key column `e` is: `alias.key`, or an unqualified name that
/// is the key of exactly one instance.
fn key_of(e: &Expr, rules: &Rules, inst: &[Instance]) -> Option<usize> {
    match e {
        Expr::Nested(x) | Expr::Cast { expr: x, .. } => key_of(x, rules, inst),
        Expr::Identifier(id) => {
            let col = ident(id);
            let mut hits = (0..inst.len()).filter(|&i| rules.tables[inst[i].table].column == col);
            let first = hits.next()?;
            hits.next().is_none().then_some(first)
        }
        Expr::CompoundIdentifier(ids) if ids.len() >= 2 => {
            let col = ident(&ids[ids.len() - 1]);
            let qual = ident(&ids[ids.len() - 2]);
            (0..inst.len()).find(|&i| {
                inst[i].names.contains(&qual) && rules.tables[inst[i].table].column == col
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use crate::router::analyze::tests::rules;
    use crate::router::analyze::{AnalyzeError, analyze};

    #[test]
    fn joins_must_be_on_the_shard_keys() {
        for sql in [
            "SELECT * FROM users u JOIN orders o ON o.user_id = u.id",
            "SELECT * FROM users u JOIN orders o ON u.id = o.user_id AND o.total > 5 WHERE u.id = 3",
            "SELECT * FROM users u, orders o WHERE o.user_id = u.id",
            "SELECT * FROM users JOIN orders ON user_id = id",
            "SELECT * FROM users u LEFT JOIN orders o ON o.user_id = u.id LEFT JOIN countries c ON c.code = u.name",
            "SELECT * FROM users a JOIN users b ON a.id = b.id",
        ] {
            let a = analyze(sql, &rules()).unwrap();
            assert!(!a.one_shard, "{sql}");
        }
        // Pinned to keys on each side: right on one shard only.
        for sql in [
            "SELECT * FROM users u, orders o WHERE u.id = 5 AND o.user_id = 5",
            "SELECT * FROM users u JOIN orders o ON o.total = u.score WHERE u.id = 1 AND o.user_id IN (1, 2)",
            "SELECT * FROM users u, orders o WHERE u.id = ANY('{5}') AND o.user_id = ANY($1::bigint[])",
            "SELECT * FROM users u, orders o WHERE u.id = ANY(ARRAY[5, 6]) AND o.user_id = 5",
        ] {
            let a = analyze(sql, &rules()).unwrap();
            assert!(a.one_shard, "{sql}");
        }
        for sql in [
            "SELECT * FROM users u JOIN orders o ON o.total = u.score",
            "SELECT * FROM users u JOIN orders o ON o.total = u.score WHERE u.id = 1",
            "SELECT * FROM users u, orders o WHERE u.id = 5",
            "SELECT * FROM users u, orders o WHERE u.id = 5 AND o.user_id = ANY(SELECT 5)",
            "SELECT * FROM users u, orders o WHERE u.id = 5 AND o.user_id <> ANY('{5}')",
            "SELECT * FROM users a JOIN users b ON a.name = b.name WHERE a.id = 1",
            "SELECT * FROM users u JOIN orders o ON o.user_id = u.id OR o.total > 1",
            // Equal keys, but hashed on one side and ranged on the other.
            "SELECT * FROM users u JOIN events e ON e.id = u.id",
        ] {
            let e = analyze(sql, &rules());
            assert!(
                matches!(&e, Err(AnalyzeError::Unroutable(m)) if m.contains("not joined on their shard keys")),
                "{sql}: {e:?}"
            );
        }
        // Subqueries: related by the keys, pinned alike, or refused.
        for sql in [
            "SELECT * FROM users WHERE id IN (SELECT user_id FROM orders WHERE total > 1)",
            "SELECT * FROM users WHERE id NOT IN (SELECT user_id FROM orders)",
            "SELECT * FROM users u WHERE EXISTS (SELECT 1 FROM orders o WHERE o.user_id = u.id)",
            "SELECT u.id, (SELECT count(*) FROM orders o WHERE o.user_id = u.id) FROM users u",
            "SELECT * FROM users WHERE score > coalesce((SELECT max(score) FROM countries), 0)",
        ] {
            assert!(!analyze(sql, &rules()).unwrap().one_shard, "{sql}");
        }
        let a = analyze(
            "SELECT * FROM users WHERE id = 1 AND EXISTS (SELECT 1 FROM orders WHERE user_id = 1)",
            &rules(),
        )
        .unwrap();
        assert!(a.one_shard);
        // Uncorrelated: pgshard evaluates them first.
        for sql in [
            "SELECT * FROM users WHERE name IN (SELECT name FROM users WHERE score > 1)",
            "SELECT * FROM users WHERE EXISTS (SELECT 1 FROM orders WHERE total > 100)",
            "SELECT * FROM users WHERE id IN (SELECT id FROM events)",
        ] {
            assert!(crate::router::analyze::tests::evaluated_first(sql), "{sql}");
        }
        for sql in [
            "SELECT * FROM users u WHERE EXISTS (SELECT 1 FROM orders o WHERE o.total = u.score)",
            "SELECT u.id, (SELECT count(*) FROM orders o WHERE o.total = u.score) FROM users u",
        ] {
            let e = analyze(sql, &rules());
            assert!(
                matches!(&e, Err(AnalyzeError::Unroutable(m)) if m.contains("not related to the outer query")),
                "{sql}: {e:?}"
            );
        }
        // The shapes ORMs write (quoted, schema-qualified, aliased, parenthesized) pass.
        for sql in [
            r#"SELECT "orders"."id" FROM "orders" INNER JOIN "users" ON ("orders"."user_id" = "users"."id") WHERE "users"."id" = 5"#,
            r#"SELECT "orders".* FROM "orders" INNER JOIN "users" ON "users"."id" = "orders"."user_id" WHERE "users"."id" = $1"#,
            "SELECT users_1.id FROM users AS users_1 JOIN orders AS orders_1 ON users_1.id = orders_1.user_id",
            r#"SELECT "public"."users"."id" FROM "public"."users" WHERE ("public"."users"."id") IN (SELECT "t0"."id" FROM "public"."users" AS "t0" INNER JOIN "public"."orders" AS "j0" ON ("j0"."user_id") = ("t0"."id") WHERE "j0"."total" > $1)"#,
            r#"SELECT u.id FROM users u LEFT OUTER JOIN orders o ON (o.user_id = u.id AND o.total > 0) WHERE u.id IN (1, 2, 3)"#,
        ] {
            let a = analyze(sql, &rules());
            assert!(a.as_ref().is_ok_and(|a| !a.one_shard), "{sql}: {a:?}");
        }
        // UPDATE and DELETE: their tables, FROM/USING and subqueries alike.
        for sql in [
            "UPDATE orders o SET total = 1 FROM users u WHERE o.user_id = u.id AND u.id = 3",
            "DELETE FROM orders WHERE user_id IN (SELECT id FROM users WHERE score < 0)",
            "UPDATE users u SET score = (SELECT sum(o.total) FROM orders o WHERE o.user_id = u.id)",
        ] {
            assert!(analyze(sql, &rules()).is_ok(), "{sql}");
        }
        assert!(crate::router::analyze::tests::evaluated_first(
            "UPDATE users SET score = 0 WHERE name IN (SELECT name FROM users WHERE score > 1)"
        ));
        for sql in [
            "DELETE FROM orders o USING users u WHERE o.total = u.score",
            "UPDATE users u SET score = (SELECT sum(o.total) FROM orders o WHERE o.total = u.score)",
        ] {
            assert!(
                matches!(analyze(sql, &rules()), Err(AnalyzeError::Unroutable(_))),
                "{sql}"
            );
        }
        // USING a column that is not both tables' key.
        assert!(analyze("SELECT * FROM users u JOIN orders o USING (id)", &rules()).is_err());
    }
}
