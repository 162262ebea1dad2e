//! Client authentication: the server side of SCRAM-SHA-256 (RFC 5802/7677, as PostgreSQL
//! speaks it, without channel binding), md5 and trust.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use md5::Md5;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// A SCRAM-SHA-256 verifier, as PostgreSQL stores it in `pg_authid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

impl ScramVerifier {
    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(s: &str) -> Result<ScramVerifier, String> {
        let rest = s
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or("must start with SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$').ok_or("missing '$' before the keys")?;
        let (iter, salt) = params
            .split_once(':')
            .ok_or("missing ':' after iterations")?;
        let (stored, server) = keys.split_once(':').ok_or("missing ':' between the keys")?;
        let iterations: u32 = iter.parse().map_err(|_| "iterations is not a number")?;
        if iterations == 0 {
            return Err("iterations must be positive".into());
        }
        let dec = |v: &str, what: &str| B64.decode(v).map_err(|_| format!("{what} is not base64"));
        let v = ScramVerifier {
            iterations,
            salt: dec(salt, "salt")?,
            stored_key: dec(stored, "StoredKey")?,
            server_key: dec(server, "ServerKey")?,
        };
        if v.stored_key.len() != 32 || v.server_key.len() != 32 {
            return Err("keys must be 32 bytes".into());
        }
        Ok(v)
    }

    /// Derives a verifier from a plain password, with a random salt (done once per user at
    /// load, never per connection: it costs thousands of HMACs).
    pub fn from_password(password: &str) -> ScramVerifier {
        Self::parse(&postgres_protocol::password::scram_sha_256(
            password.as_bytes(),
        ))
        .expect("postgres-protocol produces valid verifiers")
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any size");
    m.update(data);
    m.finalize().into_bytes().into()
}

/// Why a SCRAM exchange failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("password authentication failed")]
    BadProof,
}

/// The server side of one SCRAM-SHA-256 exchange.
pub struct ScramServer<'a> {
    verifier: &'a ScramVerifier,
    client_first_bare: String,
    server_first: String,
    gs2_header: String,
    nonce: String,
}

impl<'a> ScramServer<'a> {
    /// Handles the client-first-message; returns the server-first-message to send.
    pub fn start(
        verifier: &'a ScramVerifier,
        client_first: &[u8],
    ) -> Result<(ScramServer<'a>, String), ScramError> {
        let msg =
            std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        // gs2-header: cbind-flag "," [authzid] ","
        let mut parts = msg.splitn(3, ',');
        let flag = parts.next().ok_or(ScramError::Malformed("empty"))?;
        let authzid = parts
            .next()
            .ok_or(ScramError::Malformed("missing authzid"))?;
        let bare = parts
            .next()
            .ok_or(ScramError::Malformed("missing client-first-bare"))?;
        match flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed("bad channel binding flag")),
        }
        let client_nonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty())
            .ok_or(ScramError::Malformed("missing client nonce"))?;
        let mut raw = [0u8; 18];
        rand::fill(&mut raw);
        let nonce = format!("{client_nonce}{}", B64.encode(raw));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        Ok((
            ScramServer {
                verifier,
                client_first_bare: bare.to_string(),
                server_first: server_first.clone(),
                gs2_header: format!("{flag},{authzid},"),
                nonce,
            },
            server_first,
        ))
    }

    /// Checks the client-final-message; returns the server-final-message on success.
    pub fn finish(self, client_final: &[u8]) -> Result<String, ScramError> {
        let msg =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("missing proof"))?;
        let mut cbind = None;
        let mut nonce = None;
        for a in without_proof.split(',') {
            if let Some(v) = a.strip_prefix("c=") {
                cbind = Some(v);
            } else if let Some(v) = a.strip_prefix("r=") {
                nonce = Some(v);
            }
        }
        let cbind = cbind.ok_or(ScramError::Malformed("missing channel binding"))?;
        if B64.decode(cbind).ok().as_deref() != Some(self.gs2_header.as_bytes()) {
            return Err(ScramError::Malformed("channel binding does not match"));
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof is not base64"))?;
        if proof.len() != 32 {
            return Err(ScramError::BadProof);
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_sig = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof.iter().zip(client_sig).map(|(p, s)| p ^ s).collect();
        let stored: [u8; 32] = Sha256::digest(&client_key).into();
        // Constant-time comparison: the proof is attacker-controlled.
        let diff = stored
            .iter()
            .zip(&self.verifier.stored_key)
            .fold(0u8, |d, (a, b)| d | (a ^ b));
        if diff != 0 {
            return Err(ScramError::BadProof);
        }
        let server_sig = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_sig)))
    }
}

/// What a client must send for md5 authentication: `md5` + md5(md5(password + user) + salt).
pub fn md5_expected(user: &str, password: &str, salt: [u8; 4]) -> String {
    let inner = if let Some(h) = password.strip_prefix("md5").filter(|h| h.len() == 32) {
        h.to_string() // already stored as PostgreSQL's md5 hash
    } else {
        hex(&Md5::digest(format!("{password}{user}")))
    };
    let mut h = Md5::new();
    h.update(inner.as_bytes());
    h.update(salt);
    format!("md5{}", hex(&h.finalize()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    #[test]
    fn scram_exchange_with_the_postgres_protocol_client() {
        let v = ScramVerifier::from_password("s3cret");
        for (pw, ok) in [("s3cret", true), ("wrong", false)] {
            let mut client = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
            let (server, first) = ScramServer::start(&v, client.message()).unwrap();
            client.update(first.as_bytes()).unwrap();
            match server.finish(client.message()) {
                Ok(fin) => {
                    assert!(ok);
                    client.finish(fin.as_bytes()).unwrap();
                }
                Err(e) => {
                    assert!(!ok);
                    assert_eq!(e, ScramError::BadProof);
                }
            }
        }
    }

    #[test]
    fn verifier_parsing() {
        let s = postgres_protocol::password::scram_sha_256(b"x");
        let v = ScramVerifier::parse(&s).unwrap();
        assert_eq!(v.iterations, 4096);
        assert!(ScramVerifier::parse("SCRAM-SHA-256$4096:abc").is_err());
        assert!(ScramVerifier::parse("md5abc").is_err());
    }

    #[test]
    fn md5_matches_postgres_protocol() {
        let salt = [1, 2, 3, 4];
        assert_eq!(
            md5_expected("app", "pw", salt),
            postgres_protocol::authentication::md5_hash(b"app", b"pw", salt)
        );
        let stored = postgres_protocol::password::md5(b"pw", "app");
        assert_eq!(
            md5_expected("app", &stored, salt),
            md5_expected("app", "pw", salt)
        );
    }

    #[test]
    fn channel_binding_is_refused() {
        let v = ScramVerifier::from_password("x");
        assert!(matches!(
            ScramServer::start(&v, b"p=tls-server-end-point,,n=,r=abc"),
            Err(ScramError::ChannelBinding)
        ));
    }
}
