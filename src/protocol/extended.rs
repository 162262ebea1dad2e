//! Extended-query messages pgshard reads or writes: Parse, Bind (and its parameters),
//! Describe/Close/Execute targets.

use super::{ProtocolError, body, malformed, read_cbytes};
use bytes::{BufMut, BytesMut};

/// A Parse message's parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parse<'a> {
    pub name: &'a [u8],
    pub query: &'a [u8],
    /// Parameter type OIDs, raw (count-prefixed) as on the wire.
    pub types: &'a [u8],
}

/// Decodes a Parse ('P') frame without copying.
pub fn parse_parse(frame: &[u8]) -> Result<Parse<'_>, ProtocolError> {
    let mut b = body(frame);
    let name = read_cbytes(&mut b, "Parse")?;
    let query = read_cbytes(&mut b, "Parse")?;
    if b.len() < 2 {
        return Err(malformed("Parse", "missing parameter count"));
    }
    let n = u16::from_be_bytes([b[0], b[1]]) as usize;
    if b.len() != 2 + 4 * n {
        return Err(malformed(
            "Parse",
            "parameter type list does not match its count",
        ));
    }
    Ok(Parse {
        name,
        query,
        types: b,
    })
}

/// Builds a Parse frame.
pub fn write_parse(out: &mut BytesMut, name: &[u8], query: &[u8], types: &[u8]) {
    let len = 4 + name.len() + 1 + query.len() + 1 + types.len();
    out.reserve(len + 1);
    out.put_u8(b'P');
    out.put_i32(len as i32);
    out.put_slice(name);
    out.put_u8(0);
    out.put_slice(query);
    out.put_u8(0);
    out.put_slice(types);
}

/// A Bind message's names; `rest` is the remainder of the body (formats, values).
#[derive(Debug, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a [u8],
    pub stmt: &'a [u8],
    pub rest: &'a [u8],
}

/// Splits a Bind ('B') frame into portal name, statement name and the rest of the body.
pub fn parse_bind(frame: &[u8]) -> Result<Bind<'_>, ProtocolError> {
    let mut b = body(frame);
    let portal = read_cbytes(&mut b, "Bind")?;
    let stmt = read_cbytes(&mut b, "Bind")?;
    Ok(Bind {
        portal,
        stmt,
        rest: b,
    })
}

/// A Bind's parameters: per parameter whether it is binary, and its value (None = NULL).
pub type BindParams<'a> = (Vec<bool>, Vec<Option<&'a [u8]>>);

/// Decodes the parameters in the `rest` of a Bind (after the two names).
/// A Bind's parameters kept to `keep` (0-based indexes into the original ones, in the new
/// order): the new Bind body after the portal and statement names. Per-parameter format
/// codes follow their parameters; result format codes are kept.
pub fn select_bind_params(rest: &[u8], keep: &[usize]) -> Result<Vec<u8>, ProtocolError> {
    let (binary, values) = bind_params(rest)?;
    let tail = &rest[result_formats_at(rest, &values)..];
    let kept_binary: Vec<bool> = keep
        .iter()
        .map(|&k| binary.get(k).copied().unwrap_or(false))
        .collect();
    let kept: Vec<Option<&[u8]>> = keep
        .iter()
        .map(|&k| values.get(k).copied().flatten())
        .collect();
    let mut out = bind_params_body(&kept_binary, &kept);
    out.extend_from_slice(tail);
    Ok(out)
}

/// The parameters part of a Bind body (after the names, before the result formats): a
/// format code per parameter (`binary`; none: all text), then the values (None: NULL).
pub fn bind_params_body(binary: &[bool], values: &[Option<&[u8]>]) -> Vec<u8> {
    let size: usize = values.iter().map(|v| 4 + v.map_or(0, <[u8]>::len)).sum();
    let mut out = Vec::with_capacity(4 + 2 * binary.len() + size);
    out.extend_from_slice(&(binary.len() as u16).to_be_bytes());
    for &b in binary {
        out.extend_from_slice(&u16::from(b).to_be_bytes());
    }
    out.extend_from_slice(&(values.len() as u16).to_be_bytes());
    for v in values {
        match v {
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(v) => {
                out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                out.extend_from_slice(v);
            }
        }
    }
    out
}

/// Where a Bind body's result format codes start: after the parameter formats and values.
fn result_formats_at(rest: &[u8], values: &[Option<&[u8]>]) -> usize {
    let nfmt = u16::from_be_bytes([rest[0], rest[1]]) as usize;
    let mut pos = 2 + 2 * nfmt + 2;
    for v in values {
        pos += 4 + v.map_or(0, <[u8]>::len);
    }
    pos
}

/// A Bind body with these parameters (each binary or text) and `rest`'s result formats.
pub fn with_params(
    rest: &[u8],
    binary: &[bool],
    values: &[Option<&[u8]>],
) -> Result<Vec<u8>, ProtocolError> {
    let (_, old) = bind_params(rest)?;
    let tail = &rest[result_formats_at(rest, &old)..];
    let binary: Vec<bool> = (0..values.len())
        .map(|i| binary.get(i).copied().unwrap_or(false))
        .collect();
    let mut out = bind_params_body(&binary, values);
    out.extend_from_slice(tail);
    Ok(out)
}

/// A Bind body with the same parameters and these result formats, one per column
/// (true: binary; none: every column in text).
pub fn with_result_formats(rest: &[u8], binary: &[bool]) -> Result<Vec<u8>, ProtocolError> {
    let (_, values) = bind_params(rest)?;
    let mut out = rest[..result_formats_at(rest, &values)].to_vec();
    out.extend_from_slice(&(binary.len() as u16).to_be_bytes());
    for &b in binary {
        out.extend_from_slice(&u16::from(b).to_be_bytes());
    }
    Ok(out)
}

/// A Parse's raw parameter type list of `oids`.
pub fn param_types(oids: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + 4 * oids.len());
    out.extend_from_slice(&(oids.len() as u16).to_be_bytes());
    for o in oids {
        out.extend_from_slice(&o.to_be_bytes());
    }
    out
}

/// A Parse's parameter type list kept to `keep` (as [`select_bind_params`]).
pub fn select_param_types(types: &[u8], keep: &[usize]) -> Vec<u8> {
    let oids = parse_oids(types);
    let kept: Vec<u32> = keep
        .iter()
        .map(|&k| oids.get(k).copied().unwrap_or(0))
        .collect();
    param_types(&kept)
}

pub fn bind_params(rest: &[u8]) -> Result<BindParams<'_>, ProtocolError> {
    let bad = |d: &str| malformed("Bind", d.to_string());
    let mut b = rest;
    let mut take = |n: usize| -> Result<&[u8], ProtocolError> {
        if b.len() < n {
            return Err(bad("truncated"));
        }
        let (x, r) = b.split_at(n);
        b = r;
        Ok(x)
    };
    let nfmt = u16::from_be_bytes(take(2)?.try_into().expect("2")) as usize;
    let mut fmts = Vec::with_capacity(nfmt);
    for _ in 0..nfmt {
        fmts.push(i16::from_be_bytes(take(2)?.try_into().expect("2")) == 1);
    }
    let n = u16::from_be_bytes(take(2)?.try_into().expect("2")) as usize;
    let mut values = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32::from_be_bytes(take(4)?.try_into().expect("4"));
        values.push(if len < 0 {
            None
        } else {
            Some(take(len as usize)?)
        });
    }
    let binary = match fmts.len() {
        0 => vec![false; n],
        1 => vec![fmts[0]; n],
        k if k == n => fmts,
        _ => {
            return Err(bad(
                "format count matches neither 0, 1 nor the parameter count",
            ));
        }
    };
    Ok((binary, values))
}

/// The built-in text types (text, varchar, bpchar, name): their binary form is their
/// UTF-8 text, and they order as bytes in a bytewise collation.
pub fn text_type(oid: u32) -> bool {
    matches!(oid, 25 | 1043 | 1042 | 19)
}

/// The parameter type OIDs of a Parse's raw type list.
pub fn parse_oids(types: &[u8]) -> Vec<u32> {
    types
        .get(2..)
        .unwrap_or_default()
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Builds a Bind frame from its parts.
pub fn write_bind(out: &mut BytesMut, portal: &[u8], stmt: &[u8], rest: &[u8]) {
    let len = 4 + portal.len() + 1 + stmt.len() + 1 + rest.len();
    out.reserve(len + 1);
    out.put_u8(b'B');
    out.put_i32(len as i32);
    out.put_slice(portal);
    out.put_u8(0);
    out.put_slice(stmt);
    out.put_u8(0);
    out.put_slice(rest);
}

/// Builds a Bind of the unnamed portal to `stmt` with text parameters, each a value's
/// pieces written one after the other (a sign and digits), and text results.
pub fn write_text_bind<'a>(
    out: &mut BytesMut,
    stmt: &[u8],
    values: impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone,
) {
    let size: usize = values.clone().map(|(a, b)| 4 + a.len() + b.len()).sum();
    let count = values.clone().count();
    out.reserve(1 + 4 + 1 + stmt.len() + 1 + 2 + 2 + size + 2);
    out.put_u8(b'B');
    out.put_i32((4 + 1 + stmt.len() + 1 + 2 + 2 + size + 2) as i32);
    out.put_u8(0);
    out.put_slice(stmt);
    out.put_u8(0);
    out.put_u16(0);
    out.put_u16(count as u16);
    for (a, b) in values {
        out.put_i32((a.len() + b.len()) as i32);
        out.put_slice(a);
        out.put_slice(b);
    }
    out.put_u16(0);
}

/// Builds an Execute of the unnamed portal (all rows).
pub fn write_execute(out: &mut BytesMut) {
    out.put_u8(b'E');
    out.put_i32(4 + 1 + 4);
    out.put_u8(0);
    out.put_i32(0);
}

/// Decodes a Describe ('D') or Close ('C') frame: the kind byte ('S' or 'P') and the name.
pub fn parse_target<'a>(
    frame: &'a [u8],
    what: &'static str,
) -> Result<(u8, &'a [u8]), ProtocolError> {
    let mut b = body(frame);
    if b.is_empty() {
        return Err(malformed(what, "empty"));
    }
    let kind = b[0];
    if kind != b'S' && kind != b'P' {
        return Err(malformed(
            what,
            format!("unknown target kind {:?}", kind as char),
        ));
    }
    b = &b[1..];
    let name = read_cbytes(&mut b, what)?;
    Ok((kind, name))
}

/// Builds a Describe or Close frame.
pub fn write_target(out: &mut BytesMut, tag: u8, kind: u8, name: &[u8]) {
    out.put_u8(tag);
    out.put_i32((4 + 1 + name.len() + 1) as i32);
    out.put_u8(kind);
    out.put_slice(name);
    out.put_u8(0);
}
