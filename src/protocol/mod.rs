//! PostgreSQL v3 wire framing and the few messages pgshard writes itself.
//!
//! Frames are kept as raw bytes (`tag`, 4-byte length, body): the hot path only looks at the
//! 5-byte header and forwards the rest untouched. Where a message's content matters (startup,
//! routing, prepared statements) it is decoded here or with pgwire's message types.

use bytes::{Buf, BufMut, Bytes, BytesMut};

mod error;
mod extended;

pub use error::*;
pub use extended::*;

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

/// CommandComplete with its tag (`SELECT 3`, `COMMIT`).
pub fn write_complete(out: &mut BytesMut, tag: &str) {
    out.put_u8(b'C');
    out.put_i32((4 + tag.len() + 1) as i32);
    out.put_slice(tag.as_bytes());
    out.put_u8(0);
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

/// The frames of a buffer of whole messages (a truncated last one is left out).
pub fn frames(b: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut i = 0;
    std::iter::from_fn(move || {
        let len = b.get(i + 1..i + 5)?;
        let end = i + 1 + u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let f = b.get(i..end)?;
        i = end;
        Some(f)
    })
}

/// Whether a buffer of whole frames holds an ErrorResponse.
pub fn has_error(b: &[u8]) -> bool {
    frames(b).any(|f| f[0] == b'E')
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
