//! COPY on a sharded table: reading the COPY statement (by hand: sqlparser does not read
//! every option real clients send, such as pgbench's `WITH (freeze on)`), and splitting a
//! COPY FROM STDIN data stream into rows with their shard key, in text and CSV formats,
//! whatever the chunking of the CopyData messages. Rows are passed on as the client sent
//! them; only the key field is decoded.

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
            name = ident(t.get(i + 1).ok_or("bad table name")?).ok_or("bad table name")?;
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
                _ => {}
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

/// One row of a COPY FROM stream.
pub struct Row<'a> {
    /// The row's bytes, end of line included, as the client sent them.
    pub bytes: &'a [u8],
    /// The key field: None for NULL, else its decoded text.
    pub key: Option<String>,
}

/// What a chunk of COPY data held.
pub enum Piece<'a> {
    /// The header line (CSV HEADER): every shard gets it.
    Header(&'a [u8]),
    Row(Row<'a>),
    /// The end-of-data marker `\.`: nothing after it is data.
    End,
}

/// Splits a COPY FROM STDIN data stream into rows, across CopyData boundaries.
pub struct RowSplitter {
    c: CopyStmt,
    key: usize,
    /// Bytes of a row not complete yet.
    partial: Vec<u8>,
    header_pending: bool,
    ended: bool,
    max_row: usize,
}

impl RowSplitter {
    /// `key`: the position of the key column in the rows.
    pub fn new(c: CopyStmt, key: usize, max_row: usize) -> RowSplitter {
        RowSplitter {
            header_pending: c.header,
            c,
            key,
            partial: Vec::new(),
            ended: false,
            max_row,
        }
    }

    /// Feeds a chunk; calls `f` for each complete piece. Errors name the problem (a row
    /// longer than the limit, a key field missing).
    pub fn feed(&mut self, data: &[u8], f: &mut dyn FnMut(Piece<'_>)) -> Result<(), String> {
        let mut rest = data;
        while !rest.is_empty() && !self.ended {
            // Where the current row ends (in CSV, newlines inside quotes are data).
            let (end, complete) = self.row_end(rest);
            if !complete {
                if self.partial.len() + rest.len() > self.max_row {
                    return Err(format!("a COPY row is longer than {} bytes", self.max_row));
                }
                self.partial.extend_from_slice(rest);
                return Ok(());
            }
            let (line, after) = rest.split_at(end);
            rest = after;
            if self.partial.is_empty() {
                self.piece(line, f)?;
            } else {
                let mut row = std::mem::take(&mut self.partial);
                row.extend_from_slice(line);
                self.piece(&row, f)?;
            }
        }
        Ok(())
    }

    /// Data ended: a last row without its newline is still a row.
    pub fn finish(&mut self, f: &mut dyn FnMut(Piece<'_>)) -> Result<(), String> {
        if self.partial.is_empty() || self.ended {
            return Ok(());
        }
        let row = std::mem::take(&mut self.partial);
        self.piece(&row, f)
    }

    /// The length of the row starting at `data` (with the partial row before it), and
    /// whether its end is in `data`.
    fn row_end(&self, data: &[u8]) -> (usize, bool) {
        if self.c.format != Format::Csv {
            return match memchr::memchr(b'\n', data) {
                Some(i) => (i + 1, true),
                None => (data.len(), false),
            };
        }
        // Quote state at the start of `data`: replay the partial row (rare and short).
        let mut in_quote = false;
        let scan = |b: &[u8], in_quote: &mut bool| -> Option<usize> {
            let mut i = 0;
            while i < b.len() {
                let ch = b[i];
                if *in_quote {
                    if ch == self.c.escape && self.c.escape != self.c.quote && i + 1 < b.len() {
                        i += 2;
                        continue;
                    }
                    if ch == self.c.quote {
                        *in_quote = false;
                    }
                } else if ch == self.c.quote {
                    *in_quote = true;
                } else if ch == b'\n' {
                    return Some(i);
                }
                i += 1;
            }
            None
        };
        let _ = scan(&self.partial, &mut in_quote);
        match scan(data, &mut in_quote) {
            Some(i) => (i + 1, true),
            None => (data.len(), false),
        }
    }

    fn piece(&mut self, line: &[u8], f: &mut dyn FnMut(Piece<'_>)) -> Result<(), String> {
        let body = line
            .strip_suffix(b"\n")
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .unwrap_or(line);
        if self.header_pending {
            self.header_pending = false;
            f(Piece::Header(line));
            return Ok(());
        }
        if self.c.format == Format::Text && body == b"\\." {
            self.ended = true;
            f(Piece::End);
            return Ok(());
        }
        let key = match self.c.format {
            Format::Csv => csv_field(body, self.key, &self.c),
            _ => text_field(body, self.key, &self.c),
        }
        .ok_or_else(|| {
            format!(
                "a COPY row has no column {} (the shard key): {}",
                self.key + 1,
                String::from_utf8_lossy(&body[..body.len().min(80)])
            )
        })?;
        f(Piece::Row(Row { bytes: line, key }));
        Ok(())
    }
}

/// Field `n` of a text-format row: None if absent; Some(None) for NULL.
fn text_field(row: &[u8], n: usize, c: &CopyStmt) -> Option<Option<String>> {
    let mut field = 0;
    let mut start = 0;
    let mut i = 0;
    while i <= row.len() {
        if i == row.len() || row[i] == c.delimiter {
            if field == n {
                let raw = &row[start..i];
                if raw == c.null.as_slice() {
                    return Some(None);
                }
                return Some(Some(unescape_text(raw)));
            }
            field += 1;
            start = i + 1;
        } else if row[i] == b'\\' {
            i += 1;
        }
        i += 1;
    }
    None
}

fn unescape_text(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] != b'\\' || i + 1 >= raw.len() {
            out.push(raw[i]);
            i += 1;
            continue;
        }
        let n = raw[i + 1];
        i += 2;
        out.push(match n {
            b'b' => 8,
            b'f' => 12,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'v' => 11,
            b'0'..=b'7' => {
                let mut v = (n - b'0') as u32;
                for _ in 0..2 {
                    match raw.get(i) {
                        Some(d @ b'0'..=b'7') => {
                            v = v * 8 + (d - b'0') as u32;
                            i += 1;
                        }
                        _ => break,
                    }
                }
                v as u8
            }
            b'x' => {
                let mut v = 0u32;
                let mut k = 0;
                while k < 2 {
                    match raw.get(i).and_then(|d| (*d as char).to_digit(16)) {
                        Some(d) => {
                            v = v * 16 + d;
                            i += 1;
                            k += 1;
                        }
                        None => break,
                    }
                }
                v as u8
            }
            other => other,
        });
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Field `n` of a CSV row: None if absent; Some(None) for NULL (unquoted and equal to
/// the NULL string).
fn csv_field(row: &[u8], n: usize, c: &CopyStmt) -> Option<Option<String>> {
    let mut field = 0;
    let mut i = 0;
    loop {
        let mut value = Vec::new();
        let mut quoted = false;
        let mut in_quote = false;
        while i < row.len() {
            let ch = row[i];
            if in_quote {
                if c.escape != c.quote
                    && ch == c.escape
                    && matches!(row.get(i + 1), Some(&x) if x == c.quote || x == c.escape)
                {
                    value.push(row[i + 1]);
                    i += 2;
                    continue;
                }
                if ch == c.quote {
                    if c.escape == c.quote && row.get(i + 1) == Some(&c.quote) {
                        value.push(c.quote);
                        i += 2;
                        continue;
                    }
                    in_quote = false;
                    i += 1;
                    continue;
                }
                value.push(ch);
            } else if ch == c.quote {
                in_quote = true;
                quoted = true;
            } else if ch == c.delimiter {
                break;
            } else {
                value.push(ch);
            }
            i += 1;
        }
        if field == n {
            if !quoted && value == c.null {
                return Some(None);
            }
            return Some(Some(String::from_utf8_lossy(&value).into_owned()));
        }
        if i >= row.len() {
            return None;
        }
        i += 1;
        field += 1;
    }
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

    fn split(c: &str, key: usize, chunks: &[&[u8]]) -> Vec<(String, Option<String>)> {
        let c = parse_copy(c).unwrap().unwrap();
        let mut s = RowSplitter::new(c, key, 1 << 20);
        let mut out = Vec::new();
        let mut f = |p: Piece<'_>| match p {
            Piece::Row(r) => out.push((String::from_utf8_lossy(r.bytes).into_owned(), r.key)),
            Piece::Header(h) => out.push((
                String::from_utf8_lossy(h).into_owned(),
                Some("HEADER".into()),
            )),
            Piece::End => out.push(("END".into(), None)),
        };
        for ch in chunks {
            s.feed(ch, &mut f).unwrap();
        }
        s.finish(&mut f).unwrap();
        out
    }

    #[test]
    fn text_rows_split_across_chunks() {
        let rows = split(
            "COPY t FROM STDIN",
            1,
            &[
                b"1\ta\\tb\n2\t\\N\n3\tx",
                b"y\\\\\n4\t\\101\\x42\n\\.\n5\tignored\n",
            ],
        );
        assert_eq!(
            rows,
            vec![
                ("1\ta\\tb\n".into(), Some("a\tb".into())),
                ("2\t\\N\n".into(), None),
                ("3\txy\\\\\n".into(), Some("xy\\".into())),
                ("4\t\\101\\x42\n".into(), Some("AB".into())),
                ("END".into(), None),
            ]
        );
        // A last row without newline.
        let rows = split("COPY t FROM STDIN", 0, &[b"7\tz\r\n8"]);
        assert_eq!(rows[0].1.as_deref(), Some("7"));
        assert_eq!(rows[1], ("8".into(), Some("8".into())));
    }

    #[test]
    fn csv_rows_with_quotes_newlines_header_and_nulls() {
        let rows = split(
            "COPY t FROM STDIN WITH (FORMAT csv, HEADER)",
            1,
            &[
                b"id,name\n1,\"a,b\"\n2,\"multi\nli",
                b"ne \"\"q\"\"\"\n3,\n4,\"\"\n",
            ],
        );
        assert_eq!(rows[0].1.as_deref(), Some("HEADER"));
        assert_eq!(rows[1].1.as_deref(), Some("a,b"));
        assert_eq!(
            rows[2],
            (
                "2,\"multi\nline \"\"q\"\"\"\n".into(),
                Some("multi\nline \"q\"".into())
            )
        );
        assert_eq!(rows[3].1, None, "unquoted empty is NULL in CSV");
        assert_eq!(
            rows[4].1.as_deref(),
            Some(""),
            "quoted empty is an empty string"
        );
    }

    #[test]
    fn missing_key_and_long_rows_are_errors() {
        let c = parse_copy("COPY t FROM STDIN").unwrap().unwrap();
        let mut s = RowSplitter::new(c.clone(), 3, 1 << 20);
        assert!(s.feed(b"1\t2\n", &mut |_| {}).is_err());
        let mut s = RowSplitter::new(c, 0, 8);
        assert!(s.feed(b"123456789", &mut |_| {}).is_err());
    }
}
