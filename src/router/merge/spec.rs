//! What a cross-shard SELECT's merge does, as planned (`super::plan`) and carried out
//! by `exec::merge`: order, limit, offset, DISTINCT, aggregate columns, HAVING.

use sqlparser::ast::Expr;

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
    /// The argument of the query's count(DISTINCT ...) columns ([`Column::DistinctCount`]):
    /// each shard returns it in their place and groups by it as well.
    pub distinct_arg: Option<Box<Expr>>,
    /// LIMIT and OFFSET given as parameters (`$n`, 0-based), as ORMs send them: their
    /// values come with each Bind ([`MergeSpec::bound`]).
    pub limit_param: Option<usize>,
    pub offset_param: Option<usize>,
    /// An aggregate query whose groups PostgreSQL finishes: the shards run its partial
    /// query, pgshard merges the groups, and the final query does the rest.
    pub finalize: Option<Box<super::Finalize>>,
    /// Grouped by the shard key: each shard computes whole groups, with any aggregate.
    pub whole_groups: bool,
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
    let parse = |s: &str| crate::sharding::value::Decimal::parse(s.trim()).ok();
    Some(parse(a)?.cmp(&parse(b)?))
}

impl MergeSpec {
    /// The merge with LIMIT and OFFSET parameters replaced by the values bound
    /// (`value(i)`: parameter i as an integer, None for NULL, which means no limit and no
    /// offset, as in PostgreSQL).
    pub fn bound(
        &self,
        value: impl Fn(usize) -> Result<Option<i64>, String>,
    ) -> Result<MergeSpec, (&'static str, String)> {
        let mut s = self.clone();
        let count = |i: usize, what: &str, code: &'static str| match value(i) {
            Ok(Some(n)) if n < 0 => Err((code, format!("{what} must not be negative"))),
            Ok(n) => Ok(n.map(|n| n as u64)),
            Err(e) => Err(("22023", format!("{what}: {e}"))),
        };
        if let Some(i) = s.limit_param.take() {
            s.limit = count(i, "LIMIT", "2201W")?;
        }
        if let Some(i) = s.offset_param.take() {
            s.offset = count(i, "OFFSET", "2201X")?.unwrap_or(0);
        }
        if let Some(f) = s.finalize.as_mut() {
            for (c, what, code) in [
                (&mut f.limit, "LIMIT", "2201W"),
                (&mut f.offset, "OFFSET", "2201X"),
            ] {
                if let Some(super::Count::Param(i)) = *c {
                    let n = count(i, what, code)?;
                    *c = Some(super::Count::Text(
                        n.map_or_else(|| "NULL".into(), |n| n.to_string()),
                    ));
                }
            }
        }
        Ok(s)
    }

    /// Whether every aggregate of the query is computed whole on one shard (so that any
    /// aggregate, user-defined ones included, is right).
    pub fn aggregates_whole(&self) -> bool {
        self.whole_groups && self.finalize.is_none()
    }

    /// Whether LIMIT or OFFSET are parameters, whose values each Bind gives.
    pub fn has_params(&self) -> bool {
        self.limit_param.is_some()
            || self.offset_param.is_some()
            || self
                .finalize
                .as_ref()
                .is_some_and(|f| f.params().next().is_some())
    }

    /// Whether the shards' rows, one shard after the other, are the answer.
    pub fn is_concatenation(&self) -> bool {
        self.order.is_empty()
            && self.limit.is_none()
            && self.limit_param.is_none()
            && self.offset_param.is_none()
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
    /// count(DISTINCT x) of a column that is not a shard key: shards return x here,
    /// grouped by it too (`MergeSpec::distinct_arg`); pgshard merges the groups with x,
    /// then counts the non-null x per group.
    DistinctCount,
}

/// One ORDER BY key, by output column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderKey {
    pub col: OrderCol,
    pub desc: bool,
    pub nulls_first: bool,
    /// The collation written in the ORDER BY item (`name COLLATE "C"`), as SQL; else the
    /// column's own collation orders it.
    pub collation: Option<String>,
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
