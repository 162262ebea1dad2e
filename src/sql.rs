//! Quoting for the SQL pgshard writes itself (replayed settings, savepoints, 2PC and
//! directory statements, key setup, LISTEN): one place, so that every statement quotes
//! names and values the same way.

/// An identifier, double-quoted (embedded quotes doubled).
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A string literal, single-quoted (embedded quotes doubled; pgshard never enables
/// backslash escapes in what it sends).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn quotes_are_doubled() {
        assert_eq!(super::quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(super::quote_literal("it's"), "'it''s'");
    }
}
