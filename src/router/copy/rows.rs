//! Splitting a COPY FROM STDIN data stream into rows with their shard key, in text, CSV
//! and binary formats, whatever the chunking of the CopyData messages. Rows are passed on
//! as the client sent them; only the key field is decoded.

use super::{CopyStmt, Format};

/// One row of a COPY FROM stream.
pub struct Row<'a> {
    /// The row's bytes, end of line included, as the client sent them.
    pub bytes: &'a [u8],
    /// The key field: None for NULL.
    pub key: Option<Key<'a>>,
}

/// A row's key field.
#[derive(Debug, PartialEq)]
pub enum Key<'a> {
    /// Decoded text (text and CSV formats).
    Text(String),
    /// The field's bytes in the binary format.
    Binary(&'a [u8]),
}

/// What a chunk of COPY data held.
pub enum Piece<'a> {
    /// The header (CSV HEADER, the binary format's header): every shard gets it.
    Header(&'a [u8]),
    Row(Row<'a>),
    /// The end of the data: text's `\.` (nothing after it is data; not passed on, so
    /// empty) or binary's trailer, which every shard gets.
    End(&'a [u8]),
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
            header_pending: c.header || c.format == Format::Binary,
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
        if self.c.format == Format::Binary {
            return self.feed_binary(data, f);
        }
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
        if self.c.format == Format::Binary {
            return Err("the binary COPY data ends in the middle of a row".into());
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
            f(Piece::End(&[]));
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
        f(Piece::Row(Row {
            bytes: line,
            key: key.map(Key::Text),
        }));
        Ok(())
    }

    /// Binary format: the header, then rows of length-prefixed fields, then the trailer.
    fn feed_binary(&mut self, data: &[u8], f: &mut dyn FnMut(Piece<'_>)) -> Result<(), String> {
        if self.ended {
            return Ok(());
        }
        self.partial.extend_from_slice(data);
        let mut used = 0;
        let result = loop {
            let buf = &self.partial[used..];
            let next = if self.header_pending {
                super::binary::header(buf)?.map(|n| (Piece::Header(&buf[..n]), n))
            } else {
                super::binary::row(buf, self.key)?
            };
            let Some((piece, n)) = next else {
                break if buf.len() > self.max_row {
                    Err(format!("a COPY row is longer than {} bytes", self.max_row))
                } else {
                    Ok(())
                };
            };
            self.header_pending = false;
            self.ended = matches!(piece, Piece::End(_));
            f(piece);
            used += n;
            if self.ended {
                break Ok(());
            }
        };
        self.partial.drain(..used);
        result
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
    use super::super::parse_copy;
    use super::*;

    fn split(c: &str, key: usize, chunks: &[&[u8]]) -> Vec<(String, Option<String>)> {
        let c = parse_copy(c).unwrap().unwrap();
        let mut s = RowSplitter::new(c, key, 1 << 20);
        let mut out = Vec::new();
        let mut f = |p: Piece<'_>| match p {
            Piece::Row(r) => out.push((
                String::from_utf8_lossy(r.bytes).into_owned(),
                r.key.map(|k| match k {
                    Key::Text(t) => t,
                    Key::Binary(b) => format!("{b:?}"),
                }),
            )),
            Piece::Header(h) => out.push((
                String::from_utf8_lossy(h).into_owned(),
                Some("HEADER".into()),
            )),
            Piece::End(_) => out.push(("END".into(), None)),
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
