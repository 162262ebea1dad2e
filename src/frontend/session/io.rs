//! Writing to the client and the server: what a round of handling produced goes out in one
//! write per direction, and a write that cannot complete keeps reading from the same peer
//! (a peer blocked writing to us would otherwise never read what we write).

use super::{Session, SessionError};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

impl Session {
    /// Writes what is pending in both directions.
    pub(super) async fn flush(&mut self) -> Result<(), SessionError> {
        // Handling the server's frames may write to it again (a simple query retried as
        // the client wrote it): loop until nothing is left for it.
        self.flush_server().await;
        while !self.bout.is_empty() {
            self.flush_server().await;
        }
        self.flush_client().await
    }

    async fn flush_server(&mut self) {
        if !self.bout.is_empty() {
            if let Some(b) = self.backend.as_mut() {
                let b: &mut crate::backend::BackendConn = b;
                let r =
                    write_draining(&mut b.writer, &mut self.bout, &mut b.reader, &mut b.rbuf).await;
                if let Err(e) = r {
                    b.broken = true;
                    self.bout.clear();
                    self.backend_lost(format!("server connection lost: {e}"));
                }
            } else {
                self.bout.clear();
            }
        }
        // Frames the server sent while we were writing to it.
        if self.backend.as_ref().is_some_and(|b| !b.rbuf.is_empty()) {
            self.handle_backend_frames();
            self.maybe_release().await;
        }
    }

    /// Writes what is pending towards the client.
    pub(super) async fn flush_client(&mut self) -> Result<(), SessionError> {
        if self.listen_ext.due {
            self.apply_committed_listens().await;
        }
        if self.synth_only && self.backend.is_some() && self.relay.ready_due() > 0 {
            // See `synth_only`: the server's answer to the batch's Sync is due.
            return Ok(());
        }
        self.synth_only = false;
        if !self.cout.is_empty() {
            if self.reads.capture_lsn
                && self.reads.executed
                && self.status == b'I'
                && self.backend.is_some()
            {
                // A commit goes out before its position is read (the connection is
                // still held): in `read_acknowledged_writes` reads are held to it anyway.
                self.db.wrote_unknown(self.shard);
            }
            write_draining(
                &mut self.writer,
                &mut self.cout,
                &mut self.reader,
                &mut self.crbuf,
            )
            .await
            .map_err(SessionError::ClientIo)?;
        }
        Ok(())
    }
}

/// Writes `data` fully while reading from the same peer into `rbuf`, so that a peer that
/// is itself blocked writing to us cannot deadlock the two of us.
async fn write_draining<W, R>(
    w: &mut W,
    data: &mut BytesMut,
    r: &mut R,
    rbuf: &mut BytesMut,
) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin + ?Sized,
    R: AsyncRead + Unpin + ?Sized,
{
    // Almost always the socket takes everything at once, without waiting.
    let first = std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut *w).poll_write(cx, data) {
            std::task::Poll::Ready(r) => Some(r),
            std::task::Poll::Pending => None,
        })
    })
    .await;
    if let Some(n) = first {
        let n = n?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        data.advance(n);
        if data.is_empty() {
            data.clear();
            // A no-op for TCP; TLS may hold records back until flushed.
            return w.flush().await;
        }
    }
    let mut r_open = true;
    while !data.is_empty() {
        tokio::select! {
            n = w.write(data) => {
                let n = n?;
                if n == 0 {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                data.advance(n);
            }
            n = r.read_buf(rbuf), if r_open && rbuf.len() < 256 << 20 => {
                if n? == 0 {
                    r_open = false;
                }
            }
        }
    }
    w.flush().await?;
    data.clear();
    Ok(())
}
