//! ErrorResponse and NoticeResponse: the errors pgshard sends, and reading a server's.

use super::{body, read_cbytes, read_cstr};
use bytes::BytesMut;
use pgwire::messages::Message;
use pgwire::messages::response::{ErrorResponse, NoticeResponse};

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
