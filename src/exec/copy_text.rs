//! Merged rows written as `COPY ... TO STDOUT` writes them, for `COPY (query) TO STDOUT`
//! over several shards whose rows only a merge gives (ORDER BY, LIMIT, DISTINCT,
//! aggregates): the query's merged result in COPY's text or CSV format, with the
//! statement's delimiter, NULL string, quote, escape and header. Values are the servers'
//! text output, as COPY's own are, so only the escaping is pgshard's; it follows
//! PostgreSQL's `CopyAttributeOutText` and `CopyAttributeOutCSV` byte for byte, which is
//! exact for UTF-8 and every encoding whose multibyte characters contain no ASCII bytes.

use crate::protocol;
use crate::router::copy::{CopyStmt, Format};
use bytes::BytesMut;

/// The answer to the COPY from the merged answer to its query (RowDescription, rows,
/// CommandComplete; text results): CopyOutResponse, one CopyData per line (the header
/// first when asked for), CopyDone and `COPY n`. An error is passed on as it is.
pub fn from_merged(merged: &[u8], cs: &CopyStmt) -> BytesMut {
    if protocol::has_error(merged) {
        return BytesMut::from(merged);
    }
    let mut out = BytesMut::with_capacity(merged.len() + 64);
    let mut line = Vec::new();
    let mut rows = 0u64;
    for f in protocol::frames(merged) {
        match f[0] {
            b'T' => {
                let columns = super::merge::columns(f);
                // The overall format, then each column's: text.
                let mut h = vec![0u8];
                h.extend_from_slice(&(columns.len() as i16).to_be_bytes());
                h.resize(h.len() + 2 * columns.len(), 0);
                protocol::write_msg(&mut out, b'H', &h);
                if cs.header {
                    let names: Vec<Option<&[u8]>> =
                        columns.iter().map(|(n, _)| Some(n.as_bytes())).collect();
                    write_line(&mut line, &names, cs);
                    protocol::write_msg(&mut out, b'd', &line);
                }
            }
            b'D' => {
                write_line(&mut line, &super::merge::fields(f), cs);
                protocol::write_msg(&mut out, b'd', &line);
                rows += 1;
            }
            b'C' => {
                protocol::write_msg(&mut out, b'c', &[]);
                protocol::write_complete(&mut out, &format!("COPY {rows}"));
            }
            // Notices, in their place.
            _ => out.extend_from_slice(f),
        }
    }
    out
}

/// One line of `values` (None: NULL), replacing `line`'s contents.
pub fn write_line(line: &mut Vec<u8>, values: &[Option<&[u8]>], cs: &CopyStmt) {
    line.clear();
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            line.push(cs.delimiter);
        }
        match v {
            None => line.extend_from_slice(&cs.null),
            Some(v) if cs.format == Format::Csv => csv(line, v, cs, values.len() == 1),
            Some(v) => text(line, v, cs.delimiter),
        }
    }
    line.push(b'\n');
}

/// A value in the text format: control characters, backslashes and the delimiter escaped
/// with a backslash.
fn text(out: &mut Vec<u8>, v: &[u8], delimiter: u8) {
    for &c in v {
        let escaped = match c {
            0x08 => b'b',
            0x0c => b'f',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0x0b => b'v',
            b'\\' => b'\\',
            c if c == delimiter => c,
            c => {
                out.push(c);
                continue;
            }
        };
        out.extend_from_slice(&[b'\\', escaped]);
    }
}

/// A value in the CSV format: quoted when it holds the delimiter, the quote, a line break,
/// when it reads as the NULL string, or when it is `\.` alone on its line (the end-of-data
/// marker); inside quotes, the quote and the escape character are escaped.
fn csv(out: &mut Vec<u8>, v: &[u8], cs: &CopyStmt, alone: bool) {
    let quote = v == cs.null.as_slice()
        || (alone && v == b"\\.")
        || v.iter()
            .any(|&c| c == cs.delimiter || c == cs.quote || c == b'\n' || c == b'\r');
    if !quote {
        out.extend_from_slice(v);
        return;
    }
    out.push(cs.quote);
    for &c in v {
        if c == cs.quote || c == cs.escape {
            out.push(cs.escape);
        }
        out.push(c);
    }
    out.push(cs.quote);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(sql: &str, values: &[Option<&str>]) -> String {
        let cs = crate::router::copy::parse_copy(sql).unwrap().unwrap();
        let values: Vec<Option<&[u8]>> = values.iter().map(|v| v.map(str::as_bytes)).collect();
        let mut out = Vec::new();
        write_line(&mut out, &values, &cs);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn values_are_escaped_as_postgresql_escapes_them() {
        let text = "COPY (SELECT 1) TO STDOUT";
        assert_eq!(
            line(
                text,
                &[
                    Some("a\tb\\c\nd\re"),
                    None,
                    Some(""),
                    Some("\x08\x0b\x0c\x01")
                ]
            ),
            "a\\tb\\\\c\\nd\\re\t\\N\t\t\\b\\v\\f\x01\n"
        );
        assert_eq!(
            line(
                "COPY (SELECT 1) TO STDOUT (DELIMITER '|', NULL 'nil')",
                &[Some("a|b"), None]
            ),
            "a\\|b|nil\n"
        );
        let csv = "COPY (SELECT 1) TO STDOUT (FORMAT csv)";
        assert_eq!(
            line(
                csv,
                &[
                    Some("plain"),
                    Some("a,b"),
                    Some("say \"hi\""),
                    Some("two\nlines"),
                    Some(""),
                    None
                ]
            ),
            "plain,\"a,b\",\"say \"\"hi\"\"\",\"two\nlines\",\"\",\n"
        );
        assert_eq!(line(csv, &[Some("\\.")]), "\"\\.\"\n");
        assert_eq!(line(csv, &[Some("\\."), Some("x")]), "\\.,x\n");
        assert_eq!(
            line(
                "COPY (SELECT 1) TO STDOUT (FORMAT csv, QUOTE '''', ESCAPE '\\', NULL 'NULL', DELIMITER ';')",
                &[Some("it's"), Some("NULL"), None, Some("a\\b;")]
            ),
            "'it\\'s';'NULL';NULL;'a\\\\b;'\n"
        );
    }
}
