//! The binary COPY format, read only as far as routing needs: the header, each row's
//! length (and its key field), the trailer. See PostgreSQL's "Binary Format" of COPY.

use super::rows::{Key, Piece, Row};

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// The header's length when `buf` holds all of it (None: more data needed).
pub(super) fn header(buf: &[u8]) -> Result<Option<usize>, String> {
    let fixed = SIGNATURE.len() + 8;
    let k = buf.len().min(SIGNATURE.len());
    if buf[..k] != SIGNATURE[..k] {
        return Err("COPY file signature not recognized".into());
    }
    if buf.len() < fixed {
        return Ok(None);
    }
    let ext = i32::from_be_bytes(buf[fixed - 4..fixed].try_into().expect("4"));
    if ext < 0 {
        return Err("invalid COPY file header (wrong length)".into());
    }
    let n = fixed + ext as usize;
    Ok((buf.len() >= n).then_some(n))
}

/// The row (or trailer) at the start of `buf` and its length, when complete; `key` is the
/// position of the key field.
pub(super) fn row(buf: &[u8], key: usize) -> Result<Option<(Piece<'_>, usize)>, String> {
    let Some(count) = buf.get(..2) else {
        return Ok(None);
    };
    let count = i16::from_be_bytes([count[0], count[1]]);
    if count == -1 {
        return Ok(Some((Piece::End(&buf[..2]), 2)));
    }
    if count < 0 || key >= count as usize {
        return Err(format!(
            "a binary COPY row has {count} fields, without field {} (the shard key)",
            key + 1
        ));
    }
    let mut i = 2;
    let mut found = None;
    for k in 0..count as usize {
        let Some(len) = buf.get(i..i + 4) else {
            return Ok(None);
        };
        let len = i32::from_be_bytes(len.try_into().expect("4"));
        i += 4;
        let value = if len < 0 {
            if len != -1 {
                return Err(format!("invalid field length {len} in binary COPY data"));
            }
            None
        } else {
            let Some(v) = buf.get(i..i + len as usize) else {
                return Ok(None);
            };
            i += len as usize;
            Some(v)
        };
        if k == key {
            found = Some(value);
        }
    }
    let key = found.expect("key < count").map(Key::Binary);
    Ok(Some((
        Piece::Row(Row {
            bytes: &buf[..i],
            key,
        }),
        i,
    )))
}

#[cfg(test)]
mod tests {
    use super::super::{RowSplitter, parse_copy};
    use super::*;

    /// A binary COPY stream of (id int8, name text) rows.
    fn stream(rows: &[(i64, Option<&str>)]) -> Vec<u8> {
        let mut b = SIGNATURE.to_vec();
        b.extend_from_slice(&0i32.to_be_bytes());
        b.extend_from_slice(&4i32.to_be_bytes());
        b.extend_from_slice(b"ext!");
        for (id, name) in rows {
            b.extend_from_slice(&2i16.to_be_bytes());
            b.extend_from_slice(&8i32.to_be_bytes());
            b.extend_from_slice(&id.to_be_bytes());
            match name {
                Some(n) => {
                    b.extend_from_slice(&(n.len() as i32).to_be_bytes());
                    b.extend_from_slice(n.as_bytes());
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        b.extend_from_slice(&(-1i16).to_be_bytes());
        b
    }

    fn split(data: &[u8], key: usize, chunk: usize) -> Result<Vec<String>, String> {
        let c = parse_copy("COPY t (id, name) FROM STDIN (FORMAT binary)")
            .unwrap()
            .unwrap();
        let mut s = RowSplitter::new(c, key, 1 << 10);
        let mut out = Vec::new();
        let mut f = |p: Piece<'_>| {
            out.push(match p {
                Piece::Header(h) => format!("header {}", h.len()),
                Piece::Row(r) => format!("row {} {:?}", r.bytes.len(), r.key),
                Piece::End(t) => format!("end {t:?}"),
            })
        };
        for c in data.chunks(chunk) {
            s.feed(c, &mut f)?;
        }
        s.finish(&mut f)?;
        Ok(out)
    }

    #[test]
    fn rows_and_keys_across_chunks() {
        let data = stream(&[(1, Some("a")), (7, None)]);
        let whole = split(&data, 0, data.len()).unwrap();
        assert_eq!(
            whole,
            [
                "header 23".to_string(),
                format!("row 19 {:?}", Some(Key::Binary(&1i64.to_be_bytes()))),
                format!("row 18 {:?}", Some(Key::Binary(&7i64.to_be_bytes()))),
                "end [255, 255]".to_string(),
            ]
        );
        for chunk in [1, 2, 3, 7] {
            assert_eq!(split(&data, 0, chunk).unwrap(), whole, "chunks of {chunk}");
        }
        // A NULL key field.
        assert!(split(&data, 1, 5).unwrap()[2].ends_with("None"));
    }

    #[test]
    fn bad_data_is_refused() {
        assert!(split(b"PGCOPX\n\xff\r\n\0", 0, 4).is_err());
        let data = stream(&[(1, Some("a"))]);
        // No such field; a row cut short at the end.
        assert!(split(&data, 2, 64).is_err());
        assert!(split(&data[..30], 0, 64).is_err());
        // A row over the limit.
        let long = "x".repeat(2000);
        assert!(split(&stream(&[(1, Some(&long))]), 0, 64).is_err());
    }
}
