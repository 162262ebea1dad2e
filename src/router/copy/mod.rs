//! COPY on a sharded table: reading the COPY statement (by hand: sqlparser does not read
//! every option real clients send, such as pgbench's `WITH (freeze on)`); `rows.rs`
//! splits a COPY FROM STDIN data stream into rows with their shard key.

mod binary;
mod rows;

pub use rows::{Key, Piece, Row, RowSplitter};

/// Data format of a COPY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Csv,
    Binary,
}

/// A COPY statement, as far as routing needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyStmt {
    /// The table (unqualified, normalized), or None for `COPY (query) TO`.
    pub table: Option<String>,
    /// The table's schema, where the statement names one (normalized).
    pub schema: Option<String>,
    pub columns: Option<Vec<String>>,
    /// The query of `COPY (query) TO STDOUT`.
    pub query: Option<String>,
    /// FROM (into the table) or TO (out of it).
    pub from: bool,
    /// STDIN / STDOUT (a file or program runs on the server: not split).
    pub stdio: bool,
    pub format: Format,
    pub delimiter: u8,
    pub quote: u8,
    pub escape: u8,
    pub null: Vec<u8>,
    pub header: bool,
    /// Options read and not applied here (`force_quote`, `encoding`, ...), lowercased:
    /// where pgshard writes the rows itself, it must refuse them.
    pub ignored: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    /// A quoted identifier.
    Ident(String),
    Str(String),
    Open,
    Close,
    Comma,
    Dot,
    Other(char),
}

fn tokens(sql: &str) -> Vec<Tok> {
    let b: Vec<char> = sql.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < b.len() {
        let c = b[i];
        if c.is_whitespace() || c == ';' {
            i += 1;
        } else if c == '-' && b.get(i + 1) == Some(&'-') {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && b.get(i + 1) == Some(&'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == '*' && b[i + 1] == '/') {
                i += 1;
            }
            i += 2;
        } else if c == '(' {
            out.push(Tok::Open);
            i += 1;
        } else if c == ')' {
            out.push(Tok::Close);
            i += 1;
        } else if c == ',' {
            out.push(Tok::Comma);
            i += 1;
        } else if c == '.' {
            out.push(Tok::Dot);
            i += 1;
        } else if c == '"' {
            let mut s = String::new();
            i += 1;
            while i < b.len() {
                if b[i] == '"' {
                    if b.get(i + 1) == Some(&'"') {
                        s.push('"');
                        i += 2;
                        continue;
                    }
                    i += 1;
                    break;
                }
                s.push(b[i]);
                i += 1;
            }
            out.push(Tok::Ident(s));
        } else if c == '\'' || ((c == 'e' || c == 'E') && b.get(i + 1) == Some(&'\'')) {
            let escapes = c != '\'';
            i += if escapes { 2 } else { 1 };
            let mut s = String::new();
            while i < b.len() {
                match b[i] {
                    '\'' if b.get(i + 1) == Some(&'\'') => {
                        s.push('\'');
                        i += 2;
                    }
                    '\'' => {
                        i += 1;
                        break;
                    }
                    '\\' if escapes && i + 1 < b.len() => {
                        s.push(match b[i + 1] {
                            't' => '\t',
                            'n' => '\n',
                            'r' => '\r',
                            other => other,
                        });
                        i += 2;
                    }
                    other => {
                        s.push(other);
                        i += 1;
                    }
                }
            }
            out.push(Tok::Str(s));
        } else if c.is_alphanumeric() || c == '_' {
            let mut s = String::new();
            while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_' || b[i] == '$') {
                s.push(b[i]);
                i += 1;
            }
            out.push(Tok::Word(s));
        } else {
            out.push(Tok::Other(c));
            i += 1;
        }
    }
    out
}

fn word(t: Option<&Tok>) -> Option<String> {
    match t {
        Some(Tok::Word(w)) => Some(w.to_ascii_lowercase()),
        _ => None,
    }
}

fn ident(t: &Tok) -> Option<String> {
    match t {
        Tok::Word(w) => Some(w.to_ascii_lowercase()),
        Tok::Ident(s) => Some(s.clone()),
        _ => None,
    }
}

/// The length of the binary COPY header at the start of `data`, when all of it is there.
pub fn binary_header_len(data: &[u8]) -> Option<usize> {
    binary::header(data).ok().flatten()
}

/// Reads a COPY statement. None when `sql` is not one; Err when it is but cannot be read.
pub fn parse_copy(sql: &str) -> Option<Result<CopyStmt, String>> {
    let t = tokens(sql);
    if word(t.first()).as_deref() != Some("copy") {
        return None;
    }
    Some(parse_tokens(&t[1..], sql))
}

fn parse_tokens(t: &[Tok], sql: &str) -> Result<CopyStmt, String> {
    let mut c = CopyStmt {
        table: None,
        schema: None,
        columns: None,
        query: None,
        from: false,
        stdio: false,
        format: Format::Text,
        delimiter: b'\t',
        quote: b'"',
        escape: 0,
        null: b"\\N".to_vec(),
        header: false,
        ignored: Vec::new(),
    };
    let mut i = 0;
    if t.first() == Some(&Tok::Open) {
        // COPY (query) TO ...: the query's text between the outer parentheses.
        let start = sql.find('(').ok_or("unbalanced parentheses")?;
        let mut depth = 0;
        let mut end = None;
        let mut quote: Option<char> = None;
        for (k, ch) in sql[start..].char_indices() {
            match (quote, ch) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '\'' | '"') => quote = Some(ch),
                (None, '(') => depth += 1,
                (None, ')') => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(start + k);
                        break;
                    }
                }
                _ => {}
            }
        }
        let end = end.ok_or("unbalanced parentheses")?;
        c.query = Some(sql[start + 1..end].to_string());
        let mut d = 0;
        while i < t.len() {
            match t[i] {
                Tok::Open => d += 1,
                Tok::Close => {
                    d -= 1;
                    if d == 0 {
                        i += 1;
                        break;
                    }
                }
                _ => {}
            }
            i += 1;
        }
    } else {
        let mut name = ident(t.get(i).ok_or("no table")?).ok_or("no table")?;
        i += 1;
        while t.get(i) == Some(&Tok::Dot) {
            let part = ident(t.get(i + 1).ok_or("bad table name")?).ok_or("bad table name")?;
            c.schema = Some(std::mem::replace(&mut name, part));
            i += 2;
        }
        c.table = Some(name);
        if t.get(i) == Some(&Tok::Open) {
            let mut cols = Vec::new();
            i += 1;
            while let Some(tok) = t.get(i) {
                match tok {
                    Tok::Close => {
                        i += 1;
                        break;
                    }
                    Tok::Comma => i += 1,
                    other => {
                        cols.push(ident(other).ok_or("bad column list")?);
                        i += 1;
                    }
                }
            }
            c.columns = Some(cols);
        }
    }
    match word(t.get(i)).as_deref() {
        Some("from") => c.from = true,
        Some("to") => c.from = false,
        _ => return Err("expected FROM or TO".into()),
    }
    i += 1;
    c.stdio = matches!(word(t.get(i)).as_deref(), Some("stdin" | "stdout"));
    i += 1;
    if word(t.get(i)).as_deref() == Some("with") {
        i += 1;
    }
    let str_opt = |t: Option<&Tok>| -> Result<String, String> {
        match t {
            Some(Tok::Str(s)) => Ok(s.clone()),
            Some(Tok::Word(w)) => Ok(w.clone()),
            _ => Err("expected a value".into()),
        }
    };
    let one_byte = |s: String, what: &str| -> Result<u8, String> {
        match s.as_bytes() {
            [b] => Ok(*b),
            _ => Err(format!("COPY {what} must be a single one-byte character")),
        }
    };
    let mut csv_default_null = true;
    let mut escape_set = false;
    if t.get(i) == Some(&Tok::Open) {
        // New-style options: ( name [value], ... ).
        i += 1;
        while i < t.len() && t[i] != Tok::Close {
            let name = word(t.get(i)).ok_or("bad COPY option")?;
            i += 1;
            let has_value = !matches!(t.get(i), Some(Tok::Comma | Tok::Close) | None);
            let value = if has_value {
                let v = match t.get(i) {
                    // FORCE_* column lists.
                    Some(Tok::Open) => {
                        while i < t.len() && t[i] != Tok::Close {
                            i += 1;
                        }
                        String::new()
                    }
                    other => str_opt(other)?,
                };
                i += 1;
                Some(v)
            } else {
                None
            };
            let on = || {
                !matches!(
                    value.as_deref().map(str::to_ascii_lowercase).as_deref(),
                    Some("false" | "off" | "0")
                )
            };
            match name.as_str() {
                "format" => {
                    c.format = match value.as_deref().map(str::to_ascii_lowercase).as_deref() {
                        Some("text") => Format::Text,
                        Some("csv") => Format::Csv,
                        Some("binary") => Format::Binary,
                        _ => return Err("unknown COPY format".into()),
                    }
                }
                "delimiter" => c.delimiter = one_byte(value.unwrap_or_default(), "delimiter")?,
                "quote" => c.quote = one_byte(value.unwrap_or_default(), "quote")?,
                "escape" => {
                    c.escape = one_byte(value.unwrap_or_default(), "escape")?;
                    escape_set = true;
                }
                "null" => {
                    c.null = value.unwrap_or_default().into_bytes();
                    csv_default_null = false;
                }
                "header" => c.header = on(),
                _ => c.ignored.push(name.clone()),
            }
            if t.get(i) == Some(&Tok::Comma) {
                i += 1;
            }
        }
    } else {
        // Old-style options: BINARY, CSV, HEADER, DELIMITER [AS] 'x', NULL [AS] 'x', ...
        while i < t.len() {
            let w = word(t.get(i)).unwrap_or_default();
            i += 1;
            let mut value = || -> Result<String, String> {
                if word(t.get(i)).as_deref() == Some("as") {
                    i += 1;
                }
                let v = str_opt(t.get(i));
                i += 1;
                v
            };
            match w.as_str() {
                "binary" => c.format = Format::Binary,
                "csv" => c.format = Format::Csv,
                "header" => c.header = true,
                "delimiter" => c.delimiter = one_byte(value()?, "delimiter")?,
                "null" => {
                    c.null = value()?.into_bytes();
                    csv_default_null = false;
                }
                "quote" => c.quote = one_byte(value()?, "quote")?,
                "escape" => {
                    c.escape = one_byte(value()?, "escape")?;
                    escape_set = true;
                }
                w if !w.is_empty() => c.ignored.push(w.to_string()),
                _ => {}
            }
        }
    }
    if c.format == Format::Csv {
        if c.delimiter == b'\t' && !sql.to_ascii_lowercase().contains("delimiter") {
            c.delimiter = b',';
        }
        if csv_default_null {
            c.null = Vec::new();
        }
        if !escape_set {
            c.escape = c.quote;
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_statements_are_read() {
        let c = parse_copy("copy pgbench_accounts from stdin with (freeze on)")
            .unwrap()
            .unwrap();
        assert_eq!(c.table.as_deref(), Some("pgbench_accounts"));
        assert!(c.from && c.stdio && c.columns.is_none());
        assert_eq!((c.format, c.delimiter), (Format::Text, b'\t'));
        let c = parse_copy(
            "COPY public.\"Users\" (id, \"Name\") FROM STDIN WITH (FORMAT csv, HEADER true, DELIMITER ';', NULL 'x')",
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.table.as_deref(), Some("Users"));
        assert_eq!(c.schema.as_deref(), Some("public"));
        assert_eq!(c.columns, Some(vec!["id".into(), "Name".into()]));
        assert_eq!((c.format, c.delimiter, c.header), (Format::Csv, b';', true));
        assert_eq!(c.null, b"x");
        let c = parse_copy("copy t from stdin csv header delimiter as '|'")
            .unwrap()
            .unwrap();
        assert_eq!((c.format, c.delimiter, c.header), (Format::Csv, b'|', true));
        assert_eq!(c.null, b"");
        let c = parse_copy("COPY (SELECT * FROM t WHERE x = ')') TO STDOUT")
            .unwrap()
            .unwrap();
        assert_eq!(c.query.as_deref(), Some("SELECT * FROM t WHERE x = ')'"));
        assert!(!c.from && c.stdio);
        let c = parse_copy("COPY t TO '/tmp/x'").unwrap().unwrap();
        assert!(!c.stdio);
        assert!(parse_copy("SELECT 1").is_none());
        let c = parse_copy("COPY t FROM STDIN WITH (DELIMITER E'\\t', FORMAT binary)")
            .unwrap()
            .unwrap();
        assert_eq!((c.format, c.delimiter), (Format::Binary, b'\t'));
    }
}
