//! The constants of a simple query that may become parameters, so that queries differing
//! only in them share one prepared statement (`pool.statement_cache.simple`).
//!
//! Deliberately narrow: only an integer or decimal constant right after a comparison
//! operator (`aid = 42`, `price >= -1.5`), written back as `$n::type` with the type
//! PostgreSQL's lexer gives that constant (int4, int8 or numeric). A comparison's result
//! keeps its column name (`?column?`) and the operator PostgreSQL picks is the same for a
//! typed parameter as for the constant, so the statement means what it meant; a custom
//! plan sees the values as constants again. Constants elsewhere (`LIMIT 10`, `ORDER BY 1`,
//! the select list, `IN (1, 2)`) stay in the text, where a parameter could change a name,
//! a type or the meaning.

use super::lexer::is_ident_char;

/// A constant that becomes a parameter: `sql[start..end]`, with a minus sign before it
/// (perhaps apart from it, `= - 5`) when `negative`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Literal {
    pub negative: bool,
    pub start: usize,
    pub end: usize,
}

/// Most constants one statement gives as parameters; later ones stay in the text.
const MAX_PARAMETERS: usize = 100;

/// Writes into `text` the statement `sql` with its parameterizable constants replaced by
/// `$n::type`, and their places into `found`; false when the statement is not one to
/// prepare this way (not a SELECT, INSERT, UPDATE, DELETE or WITH; `SELECT ... INTO`;
/// `ON CONFLICT`; already holding `$n`; a constant not followed by a delimiter) or has no
/// such constant. `sql` must be one statement without quotes, dollar quotes or comments
/// (what [`super::single_statement`] accepts).
pub fn parameterize(sql: &str, text: &mut String, found: &mut Vec<Literal>) -> bool {
    text.clear();
    found.clear();
    let b = sql.as_bytes();
    if memchr::memchr2(b'$', b'\'', b).is_some() {
        return false;
    }
    let first = super::lexer::leading_words::<1>(sql).0[0];
    let select = first.eq_ignore_ascii_case("select");
    if !(select
        || ["insert", "update", "delete", "with"]
            .iter()
            .any(|k| first.eq_ignore_ascii_case(k)))
    {
        return false;
    }
    // The operator run last seen, and the one before it (for `= -5`), as byte ranges;
    // reset by anything that is neither an operator nor white space.
    let mut ops: [Option<(usize, usize)>; 2] = [None, None];
    let mut copied = 0;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if is_ident_start(c) {
            let s = i;
            while i < b.len() && is_ident_char(b[i]) {
                i += 1;
            }
            let w = &b[s..i];
            if (select && w.eq_ignore_ascii_case(b"into")) || w.eq_ignore_ascii_case(b"conflict") {
                return false;
            }
            ops = [None, None];
        } else if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
        {
            let s = i;
            let Some(end) = number_end(b, i) else {
                return false;
            };
            i = end;
            if found.len() < MAX_PARAMETERS
                && let Some((negative, sign)) = after_comparison(b, ops)
            {
                text.push_str(&sql[copied..sign.unwrap_or(s)]);
                found.push(Literal {
                    negative,
                    start: s,
                    end,
                });
                let ty = type_of(negative, &sql[s..end]);
                use std::fmt::Write;
                let _ = write!(text, "${}::{ty}", found.len());
                copied = end;
            }
            ops = [None, None];
        } else if is_op_char(c) {
            let s = i;
            while i < b.len() && is_op_char(b[i]) {
                i += 1;
            }
            ops = [ops[1], Some((s, i))];
        } else {
            i += 1;
            ops = [None, None];
        }
    }
    text.push_str(&sql[copied..]);
    !found.is_empty()
}

impl Literal {
    /// The constant's digits (without its sign).
    pub fn digits<'a>(&self, sql: &'a str) -> &'a [u8] {
        &sql.as_bytes()[self.start..self.end]
    }
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

/// PostgreSQL's operator characters.
fn is_op_char(c: u8) -> bool {
    matches!(
        c,
        b'+' | b'-'
            | b'*'
            | b'/'
            | b'<'
            | b'>'
            | b'='
            | b'~'
            | b'!'
            | b'@'
            | b'#'
            | b'%'
            | b'^'
            | b'&'
            | b'|'
            | b'`'
            | b'?'
    )
}

/// The end of a numeric constant starting at `i` (digits, a fraction, an exponent), or
/// None when an identifier character or a dot follows it (`5e`, `0x1F`, `1_000`, `1.2.3`):
/// forms this module leaves alone.
fn number_end(b: &[u8], mut i: usize) -> Option<usize> {
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    if i < b.len() && b[i] == b'.' {
        i += 1;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        let mut j = i + 1;
        if j < b.len() && (b[j] == b'+' || b[j] == b'-') {
            j += 1;
        }
        if j < b.len() && b[j].is_ascii_digit() {
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            i = j;
        }
    }
    match b.get(i) {
        Some(&c) if is_ident_char(c) || c == b'.' => None,
        _ => Some(i),
    }
}

/// Whether the operator runs just before a constant make it the right side of a
/// comparison; then whether a minus sign belongs to the constant, and where that sign is.
fn after_comparison(b: &[u8], ops: [Option<(usize, usize)>; 2]) -> Option<(bool, Option<usize>)> {
    let (s, e) = ops[1]?;
    let run = &b[s..e];
    if is_comparison(run) {
        return Some((false, None));
    }
    // `=-5`: PostgreSQL ends an operator before a trailing minus unless the operator has
    // one of ~ ! @ # % ^ & | ` ? in it, which comparisons (`!=` aside) do not.
    if run.len() >= 2
        && run[run.len() - 1] == b'-'
        && is_comparison(&run[..run.len() - 1])
        && !run.contains(&b'!')
    {
        return Some((true, Some(e - 1)));
    }
    // `= -5`, `= - 5`.
    if run == b"-" {
        let (ps, pe) = ops[0]?;
        if is_comparison(&b[ps..pe]) {
            return Some((true, Some(s)));
        }
    }
    None
}

fn is_comparison(op: &[u8]) -> bool {
    matches!(op, b"=" | b"<>" | b"!=" | b"<" | b">" | b"<=" | b">=")
}

/// The type PostgreSQL's lexer gives the constant: int4 when it fits, then int8, else
/// numeric (a fraction or an exponent is always numeric).
fn type_of(negative: bool, digits: &str) -> &'static str {
    if digits.bytes().all(|c| c.is_ascii_digit()) {
        let v = digits
            .parse::<i128>()
            .ok()
            .map(|v| if negative { -v } else { v });
        match v {
            Some(v) if i32::try_from(v).is_ok() => return "int4",
            Some(v) if i64::try_from(v).is_ok() => return "int8",
            _ => {}
        }
    }
    "numeric"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(sql: &str) -> Option<(String, Vec<String>)> {
        let mut text = String::new();
        let mut found = Vec::new();
        parameterize(sql, &mut text, &mut found).then(|| {
            let vals = found
                .iter()
                .map(|l| {
                    let d = std::str::from_utf8(l.digits(sql)).unwrap();
                    if l.negative {
                        format!("-{d}")
                    } else {
                        d.to_string()
                    }
                })
                .collect();
            (text, vals)
        })
    }

    #[test]
    fn constants_after_comparisons_become_typed_parameters() {
        assert_eq!(
            p("SELECT abalance FROM pgbench_accounts WHERE aid = 12345"),
            Some((
                "SELECT abalance FROM pgbench_accounts WHERE aid = $1::int4".into(),
                vec!["12345".into()]
            ))
        );
        assert_eq!(
            p("update t set v = v + 1 where k>=3000000000 and x<>-2 and y = - 7 and z=-2147483648"),
            Some((
                "update t set v = v + 1 where k>=$1::int8 and x<>$2::int4 and y = $3::int4 and z=$4::int4"
                    .into(),
                vec![
                    "3000000000".into(),
                    "-2".into(),
                    "-7".into(),
                    "-2147483648".into()
                ]
            ))
        );
        assert_eq!(
            p("delete from t where a < 1.5 and b > .5e3 and c <= 99999999999999999999"),
            Some((
                "delete from t where a < $1::numeric and b > $2::numeric and c <= $3::numeric"
                    .into(),
                vec!["1.5".into(), ".5e3".into(), "99999999999999999999".into()]
            ))
        );
    }

    #[test]
    fn other_constants_stay_in_the_text() {
        // LIMIT, ORDER BY 1, the select list, IN lists, arithmetic.
        assert_eq!(
            p("SELECT 1, a FROM t WHERE b = 2 AND c IN (3, 4) AND d = 5 + 6 ORDER BY 1 LIMIT 7"),
            Some((
                "SELECT 1, a FROM t WHERE b = $1::int4 AND c IN (3, 4) AND d = $2::int4 + 6 ORDER BY 1 LIMIT 7"
                    .into(),
                vec!["2".into(), "5".into()]
            ))
        );
        // Operators that are not comparisons, or that keep a trailing minus.
        assert_eq!(
            p("SELECT * FROM t WHERE a @> 1 OR j->>2 = a OR b !=- 3"),
            None
        );
        assert_eq!(p("SELECT * FROM t WHERE a + - 1 = b"), None);
    }

    #[test]
    fn statements_left_alone() {
        for sql in [
            "SELECT 1",
            "SELECT a INTO new_t FROM t WHERE a = 1",
            "INSERT INTO t VALUES (1) ON CONFLICT (a) WHERE a > 0 DO NOTHING",
            "SET x = 5",
            "EXPLAIN SELECT * FROM t WHERE a = 1",
            "SELECT * FROM t WHERE a = $1",
            "SELECT * FROM t WHERE a = 5e",
            "SELECT * FROM t WHERE a = 0x1F",
            "SELECT * FROM t WHERE a = 1_000",
            "VALUES (1)",
            "CREATE TABLE t AS SELECT * FROM u WHERE a = 1",
        ] {
            assert_eq!(p(sql), None, "{sql}");
        }
        // INSERT ... INTO is not SELECT ... INTO.
        assert!(p("INSERT INTO t SELECT * FROM u WHERE a = 1").is_some());
        assert!(p("WITH x AS (SELECT 1) SELECT * FROM t WHERE a = 1").is_some());
    }
}
