//! The light-weight statement classification the session needs for pooling (session
//! settings, LISTEN, PREPARE, DEALLOCATE) and for splitting query strings. A small lexer rather than
//! a SQL parser on purpose: it must never fail on statements a full parser cannot read
//! (`DO $$...$$`, `COPY ... WITH (freeze on)`), and it runs on every statement.

/// What the pooling layer needs to know about one statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatementKind {
    /// `SET`/`RESET` of a session parameter (or a call of `set_config`).
    SessionSetting,
    Listen,
    Unlisten,
    /// `DISCARD ALL` or `DEALLOCATE ALL`: every prepared statement of the session is gone.
    DropsAllStatements,
    /// `DEALLOCATE [PREPARE] name`.
    Deallocate(String),
    /// `PREPARE name ...` (SQL-level; not `PREPARE TRANSACTION`), with the name as the
    /// server knows it.
    Prepare(String),
    /// `EXECUTE name ...` (SQL-level), with the name as the server knows it.
    Execute(String),
    /// `BEGIN` / `START TRANSACTION`.
    Begin,
    /// `COMMIT`, `END`, `ROLLBACK`, `ABORT` (not `ROLLBACK TO`, not `COMMIT PREPARED`).
    EndTransaction,
    Other,
}

/// Splits a query string into statements (outside quotes, comments and dollar quotes) and
/// returns each statement's text, trimmed, without empty ones.
pub fn split_statements(sql: &str) -> Vec<&str> {
    if let Some(t) = single_statement(sql) {
        return vec![t];
    }
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b';' => {
                push_trimmed(&mut out, &sql[start..i]);
                start = i + 1;
                i += 1;
            }
            b'\'' | b'"' | b'-' | b'/' | b'$' => i = skip_token(b, i),
            _ => i += 1,
        }
    }
    push_trimmed(&mut out, &sql[start..]);
    out
}

/// The common case without lexing (or allocating): one non-empty statement, at most a
/// trailing semicolon, no quote, dollar quote or comment. `None` when [`split_statements`]
/// must look closer.
pub fn single_statement(sql: &str) -> Option<&str> {
    let b = sql.as_bytes();
    if memchr::memchr2(b'\'', b'"', b).is_some() {
        return None;
    }
    // `$1` is a parameter, `-` and `/` alone are operators (as in `skip_token`).
    for i in memchr::memchr3_iter(b'$', b'-', b'/', b) {
        let next = b.get(i + 1).copied();
        let starts_token = match b[i] {
            b'$' => !next.is_some_and(|c| c.is_ascii_digit()),
            b'-' => next == Some(b'-'),
            _ => next == Some(b'*'),
        };
        if starts_token {
            return None;
        }
    }
    let t = sql.trim_ascii();
    let t = t.strip_suffix(';').unwrap_or(t);
    if memchr::memchr(b';', t.as_bytes()).is_some() {
        return None;
    }
    let t = t.trim_ascii_end();
    (!t.is_empty()).then_some(t)
}

fn push_trimmed<'a>(out: &mut Vec<&'a str>, s: &'a str) {
    let t = s.trim_ascii();
    if !t.is_empty() && !only_comments(t) {
        out.push(t);
    }
}

fn only_comments(s: &str) -> bool {
    let b = s.as_bytes();
    let i = skip_space(b, 0);
    i >= b.len()
}

/// Skips one lexical unit starting at `i` (a quoted string, comment, dollar quote, or one
/// byte) and returns the index after it.
pub(super) fn skip_token(b: &[u8], i: usize) -> usize {
    match b[i] {
        b'\'' => {
            // E'..' strings allow backslash escapes; a doubled quote is an escaped quote.
            let escapes = i > 0 && (b[i - 1] == b'E' || b[i - 1] == b'e');
            let mut j = i + 1;
            while j < b.len() {
                if escapes && b[j] == b'\\' {
                    j += 2;
                    continue;
                }
                if b[j] == b'\'' {
                    if j + 1 < b.len() && b[j + 1] == b'\'' {
                        j += 2;
                        continue;
                    }
                    return j + 1;
                }
                j += 1;
            }
            b.len()
        }
        b'"' => match b[i + 1..].iter().position(|&c| c == b'"') {
            Some(p) => i + 1 + p + 1,
            None => b.len(),
        },
        b'-' if b.get(i + 1) == Some(&b'-') => match b[i..].iter().position(|&c| c == b'\n') {
            Some(p) => i + p + 1,
            None => b.len(),
        },
        b'/' if b.get(i + 1) == Some(&b'*') => {
            let mut depth = 1;
            let mut j = i + 2;
            while j < b.len() && depth > 0 {
                if b[j] == b'/' && b.get(j + 1) == Some(&b'*') {
                    depth += 1;
                    j += 2;
                } else if b[j] == b'*' && b.get(j + 1) == Some(&b'/') {
                    depth -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            j
        }
        b'$' => {
            // $tag$ ... $tag$ (tag may be empty); `$1` parameters are not quotes.
            let mut j = i + 1;
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                j += 1;
            }
            if j < b.len() && b[j] == b'$' && !b[i + 1].is_ascii_digit() {
                let tag = &b[i..=j];
                let body = j + 1;
                match b[body..].windows(tag.len()).position(|w| w == tag) {
                    Some(p) => body + p + tag.len(),
                    None => b.len(),
                }
            } else {
                i + 1
            }
        }
        _ => i + 1,
    }
}

/// A character of an unquoted identifier or keyword after its first (PostgreSQL's lexer).
pub(super) fn is_ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

/// The index after the quoted identifier that starts at `i` (a `"`).
pub(super) fn quoted_ident_end(b: &[u8], i: usize) -> usize {
    let mut e = skip_token(b, i);
    // A doubled quote inside the identifier: still the same identifier.
    while e < b.len() && b[e] == b'"' {
        e = skip_token(b, e);
    }
    e
}

pub(super) fn skip_space(b: &[u8], mut i: usize) -> usize {
    loop {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i + 1 < b.len() && (&b[i..i + 2] == b"--" || &b[i..i + 2] == b"/*") {
            i = skip_token(b, i);
        } else {
            return i;
        }
    }
}

/// The first words of a statement (up to `N`), skipping comments; quoted identifiers keep
/// their quotes. Returns the words and how many there are.
pub fn leading_words<const N: usize>(s: &str) -> ([&str; N], usize) {
    let b = s.as_bytes();
    let mut words = [""; N];
    let mut n = 0;
    let mut i = 0;
    while n < N {
        i = skip_space(b, i);
        let st = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'.') {
            i += 1;
        }
        if st == i {
            if i < b.len() && b[i] == b'"' {
                let e = quoted_ident_end(b, i);
                words[n] = &s[i..e];
                n += 1;
                i = e;
                continue;
            }
            break;
        }
        words[n] = &s[st..i];
        n += 1;
    }
    (words, n)
}

/// Classifies one statement.
pub fn classify(stmt: &str) -> StatementKind {
    // Most statements are decided by their first word (SELECT, INSERT...): the next two
    // are read only after one of the keywords below.
    let (first, one) = leading_words::<1>(stmt);
    const LEADS: [&str; 14] = [
        "SET",
        "RESET",
        "LISTEN",
        "UNLISTEN",
        "BEGIN",
        "START",
        "COMMIT",
        "END",
        "ROLLBACK",
        "ABORT",
        "DISCARD",
        "DEALLOCATE",
        "PREPARE",
        "EXECUTE",
    ];
    if one == 0 || !LEADS.iter().any(|k| first[0].eq_ignore_ascii_case(k)) {
        return if mentions_set_config(stmt) {
            StatementKind::SessionSetting
        } else {
            StatementKind::Other
        };
    }
    let (w, n) = leading_words::<3>(stmt);
    let is = |i: usize, kw: &str| i < n && w[i].eq_ignore_ascii_case(kw);
    if is(0, "SET") {
        if is(1, "LOCAL") || is(1, "TRANSACTION") {
            return StatementKind::Other;
        }
        return StatementKind::SessionSetting;
    }
    if is(0, "RESET") {
        return StatementKind::SessionSetting;
    }
    if is(0, "LISTEN") {
        return StatementKind::Listen;
    }
    if is(0, "UNLISTEN") {
        return StatementKind::Unlisten;
    }
    if is(0, "BEGIN") || (is(0, "START") && is(1, "TRANSACTION")) {
        return StatementKind::Begin;
    }
    if (is(0, "COMMIT") || is(0, "END") || is(0, "ROLLBACK") || is(0, "ABORT"))
        && !(is(1, "TO") || is(1, "PREPARED"))
        && !(is(1, "TRANSACTION") && is(2, "TO") || is(1, "WORK") && is(2, "TO"))
    {
        return StatementKind::EndTransaction;
    }
    if (is(0, "DISCARD") && is(1, "ALL")) || (is(0, "DEALLOCATE") && is(1, "ALL")) {
        return StatementKind::DropsAllStatements;
    }
    if is(0, "DEALLOCATE") && n >= 2 {
        if is(1, "PREPARE") {
            if is(2, "ALL") {
                return StatementKind::DropsAllStatements;
            }
            if n == 3 {
                return StatementKind::Deallocate(unquote(w[2]));
            }
        }
        return StatementKind::Deallocate(unquote(w[1]));
    }
    if is(0, "PREPARE") && n >= 2 && !is(1, "TRANSACTION") {
        return StatementKind::Prepare(unquote(w[1]));
    }
    if is(0, "EXECUTE") && n >= 2 {
        return StatementKind::Execute(unquote(w[1]));
    }
    if mentions_set_config(stmt) {
        return StatementKind::SessionSetting;
    }
    StatementKind::Other
}

pub(super) fn unquote(w: &str) -> String {
    w.strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .map(str::to_string)
        .unwrap_or_else(|| w.to_ascii_lowercase())
}

/// Whether the text calls `set_config` (case-insensitively); cheap because it only looks
/// around underscores.
/// Whether a statement does nothing but call `set_config` (`SELECT set_config(...), ...`,
/// as PostgREST starts each transaction): a setting, like `SET`.
pub fn sets_config_only(stmt: &str) -> bool {
    let b = stmt.as_bytes();
    let word_at = |i: usize, w: &str| {
        b.len() >= i + w.len()
            && b[i..i + w.len()].eq_ignore_ascii_case(w.as_bytes())
            && b.get(i + w.len())
                .is_none_or(|c| !(c.is_ascii_alphanumeric() || *c == b'_'))
    };
    let mut i = skip_space(b, 0);
    if !word_at(i, "select") {
        return false;
    }
    i += "select".len();
    loop {
        i = skip_space(b, i);
        if word_at(i, "pg_catalog") && b.get(i + 10) == Some(&b'.') {
            i += 11;
        }
        if !word_at(i, "set_config") {
            return false;
        }
        i = skip_space(b, i + "set_config".len());
        if b.get(i) != Some(&b'(') {
            return false;
        }
        let mut depth = 0usize;
        loop {
            match b.get(i) {
                None => return false,
                Some(b'(') => {
                    depth += 1;
                    i += 1;
                }
                Some(b')') => {
                    depth -= 1;
                    i += 1;
                    if depth == 0 {
                        break;
                    }
                }
                Some(_) => i = skip_token(b, i),
            }
        }
        i = skip_space(b, i);
        if word_at(i, "as") {
            i = skip_space(b, i + 2);
            let st = i;
            i = match b.get(i) {
                Some(b'"') => skip_token(b, i),
                _ => {
                    while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                        i += 1;
                    }
                    i
                }
            };
            if i == st {
                return false;
            }
            i = skip_space(b, i);
        }
        match b.get(i) {
            None => return true,
            Some(b',') => i += 1,
            Some(b';') => return skip_space(b, i + 1) >= b.len(),
            Some(_) => return false,
        }
    }
}

fn mentions_set_config(s: &str) -> bool {
    const NEEDLE: &[u8] = b"set_config";
    let b = s.as_bytes();
    memchr::memchr_iter(b'_', b).any(|i| {
        i >= 3
            && b.len() >= i - 3 + NEEDLE.len()
            && b[i - 3..i - 3 + NEEDLE.len()].eq_ignore_ascii_case(NEEDLE)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_that_only_set_configuration() {
        for yes in [
            "select set_config('search_path', $1, true), set_config('role', $2, true)",
            "SELECT pg_catalog.set_config('request.jwt.claims', '{\"a\": \")\"}', true) AS c;",
            "/* app */ SELECT set_config('x.y', lower('A'), false)",
        ] {
            assert!(sets_config_only(yes), "{yes}");
        }
        for no in [
            "SELECT set_config('x.y', 'z', true) FROM t",
            "SELECT set_config('x.y', 'z', true), nextval('s')",
            "SELECT 1",
            "SELECT set_config('x.y', 'z', true); DELETE FROM t",
            "SELECT set_config('x.y', 'z'",
            "SET x.y = 1",
        ] {
            assert!(!sets_config_only(no), "{no}");
        }
    }

    #[test]
    fn the_fast_path_agrees_with_the_lexer() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
            "select 1 - 2 / 3",
            "  select $1 -$2  ;  ",
            "select 1; select 2",
            "select '$1;'",
            "select $$a;b$$",
            "select $t$;$t$;",
            "select 1 -- x;",
            "-- only a comment",
            "/* c */ select 1",
            ";",
            "",
        ] {
            if let Some(one) = single_statement(sql) {
                assert_eq!(split_statements(sql), vec![one], "{sql}");
            }
        }
        assert_eq!(
            single_statement("SELECT abalance FROM pgbench_accounts WHERE aid = $1;"),
            Some("SELECT abalance FROM pgbench_accounts WHERE aid = $1")
        );
        assert_eq!(single_statement("select $$a;b$$"), None);
        assert_eq!(single_statement("select 1 -- x;"), None);
        assert_eq!(single_statement(";"), None);
    }

    #[test]
    fn splits_outside_quotes_and_comments() {
        let s = "select 'a;b'; select \"x;y\" -- c;d\n; select $$ ; $$; select $t$ $$; $t$ ; /* ; /* ; */ */ ;";
        let parts = split_statements(s);
        assert_eq!(
            parts,
            vec![
                "select 'a;b'",
                "select \"x;y\" -- c;d",
                "select $$ ; $$",
                "select $t$ $$; $t$"
            ]
        );
        assert_eq!(
            split_statements("select $1; select 2"),
            vec!["select $1", "select 2"]
        );
        assert_eq!(
            split_statements("select E'\\';'; x"),
            vec!["select E'\\';'", "x"]
        );
        assert!(split_statements("  ;; -- only\n").is_empty());
        assert_eq!(split_statements("select 1 ;  "), vec!["select 1"]);
        assert_eq!(
            split_statements("select 1; select 2;"),
            vec!["select 1", "select 2"]
        );
        assert!(split_statements(" ; ").is_empty());
    }

    #[test]
    fn classifies_pooling_relevant_statements() {
        use StatementKind::*;
        assert_eq!(classify("SET search_path TO a, b"), SessionSetting);
        assert_eq!(classify("/* hi */ set TimeZone = 'UTC'"), SessionSetting);
        assert_eq!(classify("reset all"), SessionSetting);
        assert_eq!(classify("SET LOCAL work_mem = '1MB'"), Other);
        assert_eq!(
            classify("set transaction isolation level serializable"),
            Other
        );
        assert_eq!(
            classify("select set_config('a.b', '1', false)"),
            SessionSetting
        );
        assert_eq!(classify("LISTEN chan"), Listen);
        assert_eq!(classify("unlisten *"), Unlisten);
        assert_eq!(classify("discard all"), DropsAllStatements);
        assert_eq!(classify("DEALLOCATE PREPARE s1"), Deallocate("s1".into()));
        assert_eq!(
            classify("PREPARE P1(int) AS SELECT $1"),
            Prepare("p1".into())
        );
        assert_eq!(classify("prepare \"Q\" as select 1"), Prepare("Q".into()));
        assert_eq!(classify("PREPARE TRANSACTION 'pgshard_1'"), Other);
        assert_eq!(classify("EXECUTE P1(2)"), Execute("p1".into()));
        assert_eq!(classify("execute \"Q\""), Execute("Q".into()));
        assert_eq!(classify("deallocate \"S1\""), Deallocate("S1".into()));
        assert_eq!(classify("select 1"), Other);
        assert_eq!(classify("begin"), Begin);
        assert_eq!(
            classify("START TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
            Begin
        );
        assert_eq!(classify("commit"), EndTransaction);
        assert_eq!(classify("ROLLBACK"), EndTransaction);
        assert_eq!(classify("rollback to savepoint s"), Other);
        assert_eq!(classify("ROLLBACK TRANSACTION TO s"), Other);
        assert_eq!(classify("commit prepared 'x'"), Other);
        assert_eq!(
            classify("SELECT pg_catalog.SET_CONFIG('x', '1', false)"),
            SessionSetting
        );
        assert_eq!(classify("DEALLOCATE PREPARE ALL"), DropsAllStatements);
        assert_eq!(classify("select _x"), Other);
        assert_eq!(classify("DO $$ begin perform 1; end $$"), Other);
    }
}
