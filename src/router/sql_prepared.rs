//! The text of SQL-level `PREPARE` and `EXECUTE`, for prepared statements on a sharded
//! database: there pgshard keeps the statement itself and runs each `EXECUTE` as the
//! statement with the arguments in place of its parameters, so that it is routed by
//! their values like any statement (a statement prepared on one shard's server would run
//! there whatever the values).

use super::lexer::{is_ident_char, quoted_ident_end, skip_space, skip_token, unquote};

/// An `EXECUTE name [(arg, ...)]`: the name as the server knows it, and the arguments'
/// texts.
#[derive(Debug, PartialEq, Eq)]
pub struct ExecuteCall<'a> {
    pub name: String,
    pub args: Vec<&'a str>,
}

/// The statement a `PREPARE name [(type, ...)] AS statement` prepares; `None` when the
/// text is not of that form (the server then says what is wrong with it).
pub fn prepared_body(stmt: &str) -> Option<&str> {
    let b = stmt.as_bytes();
    let (_, i) = word(b, skip_space(b, 0))?;
    let (_, i) = name(b, skip_space(b, i))?;
    let mut i = skip_space(b, i);
    if b.get(i) == Some(&b'(') {
        i = skip_space(b, close_paren(b, i)?);
    }
    let (start, end) = word(b, i)?;
    if !stmt[start..end].eq_ignore_ascii_case("as") {
        return None;
    }
    let body = stmt[end..].trim_ascii();
    (!body.is_empty()).then_some(body)
}

/// Reads an `EXECUTE` statement; `None` when it is not a plain `EXECUTE name [(args)]`.
pub fn execute_call(stmt: &str) -> Option<ExecuteCall<'_>> {
    let b = stmt.as_bytes();
    let (start, end) = word(b, skip_space(b, 0))?;
    if !stmt[start..end].eq_ignore_ascii_case("execute") {
        return None;
    }
    let (start, end) = name(b, skip_space(b, end))?;
    let name = unquote(&stmt[start..end]);
    let mut i = skip_space(b, end);
    let mut args = Vec::new();
    if b.get(i) == Some(&b'(') {
        let close = close_paren(b, i)?;
        let mut depth = 0;
        let mut from = i + 1;
        while i < close {
            match b[i] {
                b'(' => {
                    depth += 1;
                    i += 1;
                }
                b')' | b',' if depth == 1 => {
                    args.push(stmt[from..i].trim_ascii());
                    from = i + 1;
                    if b[i] == b')' {
                        depth -= 1;
                    }
                    i += 1;
                }
                b')' => {
                    depth -= 1;
                    i += 1;
                }
                b'\'' | b'"' | b'-' | b'/' | b'$' => i = skip_token(b, i),
                _ => i += 1,
            }
        }
        if args.iter().any(|a| a.is_empty()) {
            return None;
        }
        i = skip_space(b, close);
    }
    (i == b.len()).then_some(ExecuteCall { name, args })
}

/// The prepared statement `body` with each parameter `$n` replaced by `((arg n)::type n)`:
/// the explicit cast gives the argument the type the parameter has in the prepared
/// statement. Parameters inside quotes, comments and dollar quotes are text, as for the
/// server.
pub fn substitute(body: &str, args: &[&str], types: &[String]) -> String {
    let b = body.as_bytes();
    let mut out =
        String::with_capacity(body.len() + args.iter().map(|a| a.len() + 24).sum::<usize>());
    let mut last = 0;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'$' if b.get(i + 1).is_some_and(u8::is_ascii_digit)
                && (i == 0 || !is_ident_char(b[i - 1])) =>
            {
                let mut j = i + 1;
                while j < b.len() && b[j].is_ascii_digit() {
                    j += 1;
                }
                let n = body[i + 1..j]
                    .parse::<usize>()
                    .ok()
                    .and_then(|n| n.checked_sub(1));
                if let Some(n) = n.filter(|&n| n < args.len() && n < types.len()) {
                    out.push_str(&body[last..i]);
                    out.push_str("((");
                    out.push_str(args[n]);
                    out.push_str(")::");
                    out.push_str(&types[n]);
                    out.push(')');
                    last = j;
                }
                i = j;
            }
            b'\'' | b'"' | b'-' | b'/' | b'$' => i = skip_token(b, i),
            _ => i += 1,
        }
    }
    out.push_str(&body[last..]);
    out
}

/// A keyword or unquoted identifier at `i`: its start and end.
fn word(b: &[u8], i: usize) -> Option<(usize, usize)> {
    let mut e = i;
    while e < b.len() && is_ident_char(b[e]) {
        e += 1;
    }
    (e > i).then_some((i, e))
}

/// A statement name (an identifier, quoted or not) at `i`.
fn name(b: &[u8], i: usize) -> Option<(usize, usize)> {
    if b.get(i) != Some(&b'"') {
        return word(b, i);
    }
    Some((i, quoted_ident_end(b, i)))
}

/// The index after the parenthesis that closes the one at `i`.
fn close_paren(b: &[u8], mut i: usize) -> Option<usize> {
    let mut depth = 0usize;
    while i < b.len() {
        match b[i] {
            b'(' => {
                depth += 1;
                i += 1;
            }
            b')' => {
                depth = depth.checked_sub(1)?;
                i += 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            b'\'' | b'"' | b'-' | b'/' | b'$' => i = skip_token(b, i),
            _ => i += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepared_bodies() {
        assert_eq!(prepared_body("PREPARE p AS SELECT $1"), Some("SELECT $1"));
        assert_eq!(
            prepared_body(
                "prepare \"P q\" (int, numeric(10, 2)) as\n  insert into t values ($1, $2)"
            ),
            Some("insert into t values ($1, $2)")
        );
        assert_eq!(
            prepared_body("PREPARE p(text)/* c */AS select ')'"),
            Some("select ')'")
        );
        assert_eq!(prepared_body("PREPARE p SELECT 1"), None);
        assert_eq!(prepared_body("PREPARE p AS"), None);
        assert_eq!(prepared_body("PREPARE p (int AS SELECT 1"), None);
    }

    #[test]
    fn execute_calls() {
        let c = |name: &str, args: &[&'static str]| {
            Some(ExecuteCall {
                name: name.into(),
                args: args.to_vec(),
            })
        };
        assert_eq!(execute_call("EXECUTE p"), c("p", &[]));
        assert_eq!(execute_call("execute P (1)"), c("p", &["1"]));
        assert_eq!(
            execute_call("EXECUTE \"Q\"( 'a,b' , f(1, (2)), -3 , $$x)$$ ,E'\\'')"),
            c("Q", &["'a,b'", "f(1, (2))", "-3", "$$x)$$", "E'\\''"])
        );
        assert_eq!(execute_call("EXECUTE p(1) -- done"), c("p", &["1"]));
        assert_eq!(execute_call("EXECUTE p()"), None);
        assert_eq!(execute_call("EXECUTE p(1,)"), None);
        assert_eq!(execute_call("EXECUTE p(1"), None);
        assert_eq!(execute_call("EXECUTE p(1) x"), None);
        assert_eq!(execute_call("EXPLAIN EXECUTE p(1)"), None);
    }

    #[test]
    fn substitution_casts_each_argument_to_its_parameter_type() {
        let types = ["bigint".to_string(), "text".to_string()];
        assert_eq!(
            substitute(
                "SELECT a$1, $1, '$2', \"$2\", $$ $1 $$, $2 -- $1\n, $10, ($1).x, $2[1]",
                &["42", "'it''s'"],
                &types
            ),
            "SELECT a$1, ((42)::bigint), '$2', \"$2\", $$ $1 $$, (('it''s')::text) -- $1\n, $10, (((42)::bigint)).x, (('it''s')::text)[1]"
        );
    }
}
