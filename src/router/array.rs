//! The elements of an array given as a literal or a parameter, for `key = ANY(array)`
//! (`WHERE id = ANY($1)`, as asyncpg, pgx and node-postgres users write a list of keys):
//! PostgreSQL's text form of a one-dimensional array, and its binary form.

/// The elements of an array in PostgreSQL's text form (`{1,2,3}`, `{"a b",NULL,"c\"d"}`;
/// None for NULL). Only one-dimensional arrays without explicit bounds: others are an
/// error, and the caller asks every shard.
pub fn text_elements(s: &str) -> Result<Vec<Option<String>>, String> {
    let bad = || format!("not a one-dimensional array: {s}");
    let inner = s
        .trim()
        .strip_prefix('{')
        .and_then(|r| r.strip_suffix('}'))
        .ok_or_else(bad)?;
    let mut out = Vec::new();
    if inner.trim().is_empty() {
        return Ok(out);
    }
    let mut chars = inner.chars().peekable();
    loop {
        while chars.next_if(char::is_ascii_whitespace).is_some() {}
        let mut v = String::new();
        if chars.next_if_eq(&'"').is_some() {
            loop {
                match chars.next().ok_or_else(bad)? {
                    '\\' => v.push(chars.next().ok_or_else(bad)?),
                    '"' => break,
                    c => v.push(c),
                }
            }
            out.push(Some(v));
            while chars.next_if(char::is_ascii_whitespace).is_some() {}
        } else {
            // Unquoted: up to the delimiter, trailing spaces not kept; NULL unless escaped.
            let (mut kept, mut escaped) = (0, false);
            while let Some(&c) = chars.peek() {
                match c {
                    ',' => break,
                    '{' | '}' | '"' => return Err(bad()),
                    '\\' => {
                        chars.next();
                        v.push(chars.next().ok_or_else(bad)?);
                        (kept, escaped) = (v.len(), true);
                    }
                    c => {
                        chars.next();
                        v.push(c);
                        if !c.is_ascii_whitespace() {
                            kept = v.len();
                        }
                    }
                }
            }
            v.truncate(kept);
            if v.is_empty() {
                return Err(bad());
            }
            out.push((escaped || !v.eq_ignore_ascii_case("null")).then_some(v));
        }
        match chars.next() {
            None => return Ok(out),
            Some(',') => {}
            Some(_) => return Err(bad()),
        }
    }
}

/// An array's element type and its elements (None for NULL).
pub type Elements<'a> = (u32, Vec<Option<&'a [u8]>>);

/// The element type and elements of an array in PostgreSQL's binary form (every
/// dimension's elements, in order).
pub fn binary_elements(b: &[u8]) -> Result<Elements<'_>, String> {
    let bad = || "malformed binary array".to_string();
    let int = |at: usize| -> Result<i32, String> {
        b.get(at..at + 4)
            .map(|x| i32::from_be_bytes([x[0], x[1], x[2], x[3]]))
            .ok_or_else(bad)
    };
    let dims = usize::try_from(int(0)?).map_err(|_| bad())?;
    let element = int(8)? as u32;
    if dims > 6 {
        return Err(bad());
    }
    let mut count = usize::from(dims > 0);
    for d in 0..dims {
        let n = usize::try_from(int(12 + 8 * d)?).map_err(|_| bad())?;
        count = count.checked_mul(n).ok_or_else(bad)?;
    }
    let mut at = 12 + 8 * dims;
    // At least four bytes per element: a count beyond that is malformed, not allocated.
    if count > b.len() / 4 {
        return Err(bad());
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let len = int(at)?;
        at += 4;
        if len < 0 {
            out.push(None);
            continue;
        }
        let end = at.checked_add(len as usize).ok_or_else(bad)?;
        out.push(Some(b.get(at..end).ok_or_else(bad)?));
        at = end;
    }
    Ok((element, out))
}

/// The element type of array type `oid` (the types a shard key can have), 0 when unknown.
pub fn element_oid(oid: u32) -> u32 {
    match oid {
        1005 => 21,   // int2[]
        1007 => 23,   // int4[]
        1016 => 20,   // int8[]
        1021 => 700,  // float4[]
        1022 => 701,  // float8[]
        1231 => 1700, // numeric[]
        1009 => 25,   // text[]
        1015 => 1043, // varchar[]
        1014 => 1042, // bpchar[]
        1182 => 1082, // date[]
        1115 => 1114, // timestamp[]
        1185 => 1184, // timestamptz[]
        2951 => 2950, // uuid[]
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Result<Vec<Option<&str>>, String> {
        text_elements(s).map(|v| {
            v.into_iter()
                .map(|e| e.map(|e| &*Box::leak(e.into_boxed_str())))
                .collect()
        })
    }

    #[test]
    fn text_arrays_are_read_as_postgresql_writes_them() {
        assert_eq!(text("{1,2,3}"), Ok(vec![Some("1"), Some("2"), Some("3")]));
        assert_eq!(text(" { 1 , 2 } "), Ok(vec![Some("1"), Some("2")]));
        assert_eq!(text("{}"), Ok(vec![]));
        assert_eq!(
            text(r#"{"a b",NULL,"c\"d",null,"NULL",e\,f}"#),
            Ok(vec![
                Some("a b"),
                None,
                Some("c\"d"),
                None,
                Some("NULL"),
                Some("e,f")
            ])
        );
        assert_eq!(
            text(r#"{"2026-01-01 00:00:00+00"}"#),
            Ok(vec![Some("2026-01-01 00:00:00+00")])
        );
        for bad in [
            "1,2",
            "{{1,2},{3,4}}",
            "[1:2]={1,2}",
            "{1,",
            "{\"a}",
            "{\"a\"b}",
            "{1,}",
        ] {
            assert!(text(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn binary_arrays_give_their_elements() {
        // int8[] {5, NULL, 7}.
        let mut b = Vec::new();
        for x in [1i32, 1, 20, 3, 1] {
            b.extend_from_slice(&x.to_be_bytes());
        }
        b.extend_from_slice(&8i32.to_be_bytes());
        b.extend_from_slice(&5i64.to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&8i32.to_be_bytes());
        b.extend_from_slice(&7i64.to_be_bytes());
        let (oid, el) = binary_elements(&b).unwrap();
        assert_eq!(oid, 20);
        assert_eq!(
            el,
            [
                Some(&5i64.to_be_bytes()[..]),
                None,
                Some(&7i64.to_be_bytes()[..])
            ]
        );
        // Empty: no dimensions.
        let empty: Vec<u8> = [0i32, 0, 20].iter().flat_map(|x| x.to_be_bytes()).collect();
        assert_eq!(binary_elements(&empty).unwrap().1.len(), 0);
        assert!(binary_elements(&b[..b.len() - 1]).is_err());
        let huge: Vec<u8> = [1i32, 0, 20, i32::MAX, 1]
            .iter()
            .flat_map(|x| x.to_be_bytes())
            .collect();
        assert!(binary_elements(&huge).is_err());
    }
}
