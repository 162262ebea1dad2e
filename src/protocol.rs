//! PostgreSQL v3 wire framing and the few messages pgshard writes itself.
//!
//! Frames are kept as raw bytes (`tag`, 4-byte length, body): the hot path only looks at the
//! 5-byte header and forwards the rest untouched. Where a message's content matters (startup,
//! routing, prepared statements) it is decoded here or with pgwire's message types.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use pgwire::messages::Message;
use pgwire::messages::response::{ErrorResponse, NoticeResponse};

/// Protocol 3.0 in a StartupMessage.
pub const PROTOCOL_3_0: i32 = 196_608;
/// Request codes that take the place of a protocol version in the first packet.
pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;

/// A framing or decoding problem on one connection.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("message of {len} bytes exceeds the limit of {max} bytes (limits.max_message_size)")]
    TooLarge { len: usize, max: usize },
    #[error("invalid message length {0}")]
    BadLength(i64),
    #[error("malformed {what} message: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("connection closed")]
    Closed,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn malformed(what: &'static str, detail: impl Into<String>) -> ProtocolError {
    ProtocolError::Malformed {
        what,
        detail: detail.into(),
    }
}

/// Length of the next complete typed frame (`tag` + length + body) in `buf`, if it is all
/// there. Errors on a negative, too small or too large length.
#[inline]
pub fn frame_len(buf: &[u8], max: usize) -> Result<Option<usize>, ProtocolError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(ProtocolError::BadLength(len as i64));
    }
    let total = len as usize + 1;
    if total > max {
        return Err(ProtocolError::TooLarge { len: total, max });
    }
    Ok(if buf.len() >= total {
        Some(total)
    } else {
        None
    })
}

/// Length of the next complete untyped (startup-phase) packet in `buf`.
pub fn startup_len(buf: &[u8], max: usize) -> Result<Option<usize>, ProtocolError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 {
        return Err(ProtocolError::BadLength(len as i64));
    }
    let len = len as usize;
    if len > max {
        return Err(ProtocolError::TooLarge { len, max });
    }
    Ok(if buf.len() >= len { Some(len) } else { None })
}

/// What the first packet of a connection asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum FirstPacket {
    Ssl,
    GssEnc,
    Cancel { pid: i32, secret: i32 },
    Startup { params: Vec<(String, String)> },
}

/// Decodes an untyped packet (length included).
pub fn parse_first_packet(pkt: &[u8]) -> Result<FirstPacket, ProtocolError> {
    let mut b = pkt.get(4..).unwrap_or_default();
    if b.len() < 4 {
        return Err(malformed("startup", "too short"));
    }
    let code = b.get_i32();
    match code {
        SSL_REQUEST => Ok(FirstPacket::Ssl),
        GSSENC_REQUEST => Ok(FirstPacket::GssEnc),
        CANCEL_REQUEST => {
            if b.len() < 8 {
                return Err(malformed("cancel request", "too short"));
            }
            Ok(FirstPacket::Cancel {
                pid: b.get_i32(),
                secret: b.get_i32(),
            })
        }
        v if v >> 16 == 3 && v & 0xffff == 0 => {
            let mut params = Vec::new();
            loop {
                let k = read_cstr(&mut b, "startup")?;
                if k.is_empty() {
                    break;
                }
                let v = read_cstr(&mut b, "startup")?;
                params.push((k, v));
            }
            Ok(FirstPacket::Startup { params })
        }
        v => Err(ProtocolError::UnsupportedVersion {
            major: (v >> 16) as u16,
            minor: (v & 0xffff) as u16,
        }),
    }
}

/// Reads a NUL-terminated string and advances past it.
pub fn read_cstr(b: &mut &[u8], what: &'static str) -> Result<String, ProtocolError> {
    let end = b
        .iter()
        .position(|&c| c == 0)
        .ok_or_else(|| malformed(what, "missing string terminator"))?;
    let s = std::str::from_utf8(&b[..end])
        .map_err(|_| malformed(what, "string is not valid UTF-8"))?
        .to_string();
    *b = &b[end + 1..];
    Ok(s)
}

/// Reads a NUL-terminated string as bytes and advances past it.
pub fn read_cbytes<'a>(b: &mut &'a [u8], what: &'static str) -> Result<&'a [u8], ProtocolError> {
    let end = memchr::memchr(0, b).ok_or_else(|| malformed(what, "missing string terminator"))?;
    let s = &b[..end];
    *b = &b[end + 1..];
    Ok(s)
}

/// The body of a typed frame (empty if the frame is too short to have one).
#[inline]
pub fn body(frame: &[u8]) -> &[u8] {
    frame.get(5..).unwrap_or_default()
}

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
    // Where the result format codes start: after formats and values.
    let nfmt = u16::from_be_bytes([rest[0], rest[1]]) as usize;
    let mut pos = 2 + 2 * nfmt + 2;
    for v in &values {
        pos += 4 + v.map_or(0, <[u8]>::len);
    }
    let tail = &rest[pos..];
    let mut out = Vec::with_capacity(rest.len());
    out.extend_from_slice(&(keep.len() as u16).to_be_bytes());
    for &k in keep {
        let b = binary.get(k).copied().unwrap_or(false);
        out.extend_from_slice(&(i16::from(b)).to_be_bytes());
    }
    out.extend_from_slice(&(keep.len() as u16).to_be_bytes());
    for &k in keep {
        match values.get(k).copied().flatten() {
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(v) => {
                out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                out.extend_from_slice(v);
            }
        }
    }
    out.extend_from_slice(tail);
    Ok(out)
}

/// A Parse's parameter type list kept to `keep` (as [`select_bind_params`]).
pub fn select_param_types(types: &[u8], keep: &[usize]) -> Vec<u8> {
    let oids = parse_oids(types);
    let mut out = Vec::with_capacity(2 + 4 * keep.len());
    out.extend_from_slice(&(keep.len() as u16).to_be_bytes());
    for &k in keep {
        out.extend_from_slice(&oids.get(k).copied().unwrap_or(0).to_be_bytes());
    }
    out
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

/// The SQL text of a Query ('Q') frame.
pub fn parse_query(frame: &[u8]) -> Result<&str, ProtocolError> {
    let mut b = body(frame);
    let q = read_cbytes(&mut b, "Query")?;
    std::str::from_utf8(q).map_err(|_| malformed("Query", "query is not valid UTF-8"))
}

/// Builds a simple Query frame.
pub fn write_query(out: &mut BytesMut, sql: &str) {
    out.put_u8(b'Q');
    out.put_i32((4 + sql.len() + 1) as i32);
    out.put_slice(sql.as_bytes());
    out.put_u8(0);
}

/// Appends a message with a fixed body.
pub fn write_msg(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.put_u8(tag);
    out.put_i32((4 + body.len()) as i32);
    out.put_slice(body);
}

/// ReadyForQuery with a transaction status byte (`I`, `T` or `E`).
pub fn write_ready(out: &mut BytesMut, status: u8) {
    write_msg(out, b'Z', &[status]);
}

/// An authentication request ('R') with a code and body.
pub fn write_auth(out: &mut BytesMut, code: i32, extra: &[u8]) {
    out.put_u8(b'R');
    out.put_i32((8 + extra.len()) as i32);
    out.put_i32(code);
    out.put_slice(extra);
}

/// ParameterStatus ('S').
pub fn write_parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    out.put_u8(b'S');
    out.put_i32((4 + name.len() + 1 + value.len() + 1) as i32);
    out.put_slice(name.as_bytes());
    out.put_u8(0);
    out.put_slice(value.as_bytes());
    out.put_u8(0);
}

/// BackendKeyData ('K').
pub fn write_backend_key(out: &mut BytesMut, pid: i32, secret: i32) {
    out.put_u8(b'K');
    out.put_i32(12);
    out.put_i32(pid);
    out.put_i32(secret);
}

/// A PostgreSQL error or notice to send to a client, with its SQLSTATE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    pub severity: &'static str,
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl PgError {
    /// An ERROR with a SQLSTATE.
    pub fn new(code: &'static str, message: impl Into<String>) -> PgError {
        PgError {
            severity: "ERROR",
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    /// A FATAL error: the connection ends after it.
    pub fn fatal(code: &'static str, message: impl Into<String>) -> PgError {
        PgError {
            severity: "FATAL",
            ..PgError::new(code, message)
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> PgError {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> PgError {
        self.detail = Some(detail.into());
        self
    }

    fn fields(&self) -> Vec<(u8, String)> {
        let mut f = vec![
            (b'S', self.severity.to_string()),
            (b'V', self.severity.to_string()),
            (b'C', self.code.to_string()),
            (b'M', self.message.clone()),
        ];
        if let Some(d) = &self.detail {
            f.push((b'D', d.clone()));
        }
        if let Some(h) = &self.hint {
            f.push((b'H', h.clone()));
        }
        f
    }

    /// Appends an ErrorResponse.
    pub fn write(&self, out: &mut BytesMut) {
        ErrorResponse::new(self.fields())
            .encode(out)
            .expect("encoding an ErrorResponse into memory cannot fail");
    }

    /// Appends the same fields as a NoticeResponse.
    pub fn write_notice(&self, out: &mut BytesMut) {
        NoticeResponse::new(self.fields())
            .encode(out)
            .expect("encoding a NoticeResponse into memory cannot fail");
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)
    }
}

/// Reads the SQLSTATE and message out of an ErrorResponse/NoticeResponse body.
pub fn error_fields(frame: &[u8]) -> (String, String) {
    let mut b = body(frame);
    let (mut code, mut msg) = (String::new(), String::new());
    while let Some((&t, rest)) = b.split_first() {
        if t == 0 {
            break;
        }
        b = rest;
        let Ok(v) = read_cstr(&mut b, "ErrorResponse") else {
            break;
        };
        match t {
            b'C' => code = v,
            b'M' => msg = v,
            _ => {}
        }
    }
    (code, msg)
}

/// Whether an ErrorResponse is FATAL or PANIC: the server closes the connection after it.
pub fn is_fatal(frame: &[u8]) -> bool {
    let mut b = body(frame);
    while let Some((&t, rest)) = b.split_first() {
        if t == 0 {
            break;
        }
        b = rest;
        let Ok(v) = read_cbytes(&mut b, "ErrorResponse") else {
            break;
        };
        if t == b'V' || t == b'S' {
            return v == b"FATAL" || v == b"PANIC";
        }
    }
    false
}

/// Appends a frame taken from `src` (already a whole frame) to `out`.
#[inline]
pub fn copy_frame(out: &mut BytesMut, frame: &[u8]) {
    out.extend_from_slice(frame);
}

/// Splits one whole frame off the front of `buf`.
#[inline]
pub fn split_frame(buf: &mut BytesMut, len: usize) -> Bytes {
    buf.split_to(len).freeze()
}

/// Advances `buf` past a frame that was handled in place.
#[inline]
pub fn skip(buf: &mut BytesMut, len: usize) {
    buf.advance(len);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_delimited_by_their_header() {
        let mut b = BytesMut::new();
        write_query(&mut b, "select 1");
        assert_eq!(frame_len(&b, 1 << 20).unwrap(), Some(b.len()));
        assert_eq!(frame_len(&b[..b.len() - 1], 1 << 20).unwrap(), None);
        assert!(matches!(
            frame_len(&b, 8),
            Err(ProtocolError::TooLarge { .. })
        ));
        assert!(matches!(
            frame_len(&[b'Q', 0, 0, 0, 3], 100),
            Err(ProtocolError::BadLength(3))
        ));
        assert_eq!(parse_query(&b).unwrap(), "select 1");
    }

    #[test]
    fn parse_and_bind_round_trip() {
        let mut b = BytesMut::new();
        write_parse(&mut b, b"s1", b"select $1", &[0, 1, 0, 0, 0, 23]);
        let p = parse_parse(&b).unwrap();
        assert_eq!(p.name, b"s1");
        assert_eq!(p.query, b"select $1");
        let mut c = BytesMut::new();
        write_bind(&mut c, b"", b"s1", &[0, 0, 0, 0, 0, 0]);
        let bind = parse_bind(&c).unwrap();
        assert_eq!(
            bind,
            Bind {
                portal: b"",
                stmt: b"s1",
                rest: &[0u8; 6]
            }
        );
    }

    #[test]
    fn bind_parameters_decode() {
        let mut c = BytesMut::new();
        let mut rest = vec![0, 1, 0, 1, 0, 2];
        rest.extend(4i32.to_be_bytes());
        rest.extend(7i32.to_be_bytes());
        rest.extend((-1i32).to_be_bytes());
        rest.extend([0, 0]);
        write_bind(&mut c, b"", b"s", &rest);
        let b = parse_bind(&c).unwrap();
        let (binary, values) = bind_params(b.rest).unwrap();
        assert_eq!(binary, vec![true, true]);
        assert_eq!(values, vec![Some(&7i32.to_be_bytes()[..]), None]);
        assert_eq!(parse_oids(&[0, 1, 0, 0, 0, 20]), vec![20]);
    }

    #[test]
    fn errors_encode_sqlstate() {
        let mut b = BytesMut::new();
        PgError::new("3D000", "no such database").write(&mut b);
        assert_eq!(b[0], b'E');
        assert!(!is_fatal(&b));
        let mut f = BytesMut::new();
        PgError::fatal("57P01", "terminating").write(&mut f);
        assert!(is_fatal(&f));
        assert_eq!(
            error_fields(&b),
            ("3D000".to_string(), "no such database".to_string())
        );
    }

    proptest::proptest! {
        /// Whatever the bytes, decoding returns a value or an error, never panics.
        #[test]
        fn decoders_never_panic(
            tag in proptest::prelude::any::<u8>(),
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        ) {
            let mut f = vec![tag];
            f.extend(((body.len() + 4) as i32).to_be_bytes());
            f.extend(&body);
            proptest::prop_assert_eq!(frame_len(&f, 1 << 20).unwrap(), Some(f.len()));
            let _ = frame_len(&body, 1 << 20);
            let _ = startup_len(&body, 10_000);
            let _ = parse_first_packet(&body);
            let _ = parse_parse(&f);
            if let Ok(b) = parse_bind(&f) {
                let _ = bind_params(b.rest);
            }
            let _ = parse_oids(&body);
            let _ = parse_target(&f, "Describe");
            let _ = parse_query(&f);
            let _ = error_fields(&f);
            if let Ok(q) = std::str::from_utf8(&body) {
                for st in crate::router::split_statements(q) {
                    let _ = crate::router::classify(st);
                }
            }
        }
    }

    #[test]
    fn startup_packet_decodes() {
        let mut b = BytesMut::new();
        b.put_i32(0);
        b.put_i32(PROTOCOL_3_0);
        b.put_slice(b"user\0app\0database\0db\0\0");
        let n = b.len() as i32;
        b[..4].copy_from_slice(&n.to_be_bytes());
        assert_eq!(startup_len(&b, 10_000).unwrap(), Some(b.len()));
        assert_eq!(
            parse_first_packet(&b).unwrap(),
            FirstPacket::Startup {
                params: vec![
                    ("user".into(), "app".into()),
                    ("database".into(), "db".into())
                ]
            }
        );
    }
}
