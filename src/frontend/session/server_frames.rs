//! Frames from the attached server: relayed to the client as bytes (rows without a
//! look), with the bookkeeping a few of them need (errors, command tags, ReadyForQuery,
//! FATAL).

use super::*;

impl Session {
    /// Handles every complete frame the server sent.
    pub(super) fn handle_backend_frames(&mut self) {
        self.synth_only = false;
        loop {
            let Some(b) = self.backend.as_mut() else {
                return;
            };
            let n = match b.next_frame_len() {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => {
                    self.backend_lost(e.to_string());
                    return;
                }
            };
            let tag = b.rbuf[0];
            // Rows are the bulk of the traffic: copy them through without looking further.
            if tag == b'D'
                && matches!(
                    self.relay.queue.front(),
                    Some(Pending::Query | Pending::Execute)
                )
            {
                self.cout.extend_from_slice(&b.rbuf[..n]);
                b.rbuf.advance(n);
                continue;
            }
            let fatal = tag == b'E' && protocol::is_fatal(&b.rbuf[..n]);
            // A deadlock victim's cancelled statement, told as the deadlock it was.
            let deadlock = match &self.multi.txn {
                Some(r) if tag == b'E' => r.deadlock_error(&b.rbuf[..n]),
                _ => None,
            };
            let frame = deadlock.as_deref().unwrap_or(&b.rbuf[..n]);
            if tag == b'E' {
                let code = crate::metrics::sqlstate_of(frame).unwrap_or("XX000");
                self.db.shards[self.shard].stats.error(code);
            }
            // The server dropped every prepared statement, pgshard's own too (a client's
            // DISCARD ALL, psycopg's DEALLOCATE ALL after ROLLBACK): they must be prepared
            // again on this connection (and after DISCARD its settings are the defaults).
            let mut dropped = None;
            if tag == b'C' {
                self.listen_ext.saw_tag(frame);
                let done = frame.get(5..).unwrap_or_default();
                if done.starts_with(b"DISCARD ALL") || done.starts_with(b"DEALLOCATE ALL") {
                    dropped = Some(done.starts_with(b"DISCARD"));
                }
            }
            if tag == b'S' {
                let internal = matches!(
                    self.relay.queue.front(),
                    Some(Pending::Internal | Pending::InternalSync)
                );
                if internal {
                    saw_parameter(&mut self.zone, frame);
                } else if !parameter_for_client(&mut self.zone, &mut self.app_name, frame) {
                    b.rbuf.advance(n);
                    continue;
                }
            }
            let event = self.relay.on_frame(frame, &mut self.cout);
            b.rbuf.advance(n);
            if let Some(discard) = dropped {
                b.prepared.clear();
                if discard {
                    b.settings = 0;
                }
            }
            if fatal {
                // The server closes after a FATAL: nothing more may be sent to it, and the
                // requests it will not answer are answered now.
                self.backend_fatal();
                return;
            }
            match event {
                Event::Ready(s) => self.ready(s),
                // A batch's part on one shard ended; the client's batch goes on.
                Event::InternalReady(s) => self.status = s,
                Event::CopyIn => self.in_copy = true,
                Event::Retry => {
                    if !self.retry() {
                        self.relay.give_up_retry(&mut self.cout);
                        self.ready(b'I');
                    }
                }
                Event::None => {}
            }
            if tag == b'E' || tag == b'C' {
                self.in_copy = false;
            }
            self.apply_undo();
        }
    }

    /// A ParameterStatus from a server whose answer pgshard reads itself (a streamed
    /// read over several shards): to the client, unless it tells nothing new.
    pub(super) fn parameter_to_client(&mut self, frame: &[u8]) {
        if parameter_for_client(&mut self.zone, &mut self.app_name, frame) {
            self.cout.extend_from_slice(frame);
        }
    }

    /// A ReadyForQuery reached the client.
    fn ready(&mut self, s: u8) {
        self.query_done();
        self.finished(s);
        self.status = s;
        self.in_copy = false;
        if s == b'I' {
            self.route.movable_begin = None;
            self.transaction_over();
            self.listen_ext.ended(None);
        }
    }
}

/// A ParameterStatus from a server the client is to see (after [`saw_parameter`]), unless
/// it reports the `application_name` the client already has. A transaction over several
/// shards marks its backends with a transaction-local `application_name` (see
/// `cluster::deadlock`, set by internal queries whose answers the client does not see);
/// when the transaction ends or fails, a backend reports the client's own value again,
/// which is no change for the client, and PostgreSQL reports only changes.
pub(super) fn parameter_for_client(
    zone: &mut crate::sharding::Zone,
    app_name: &mut Vec<u8>,
    frame: &[u8],
) -> bool {
    saw_parameter(zone, frame);
    let mut body = frame.get(5..).unwrap_or_default();
    if protocol::read_cstr(&mut body, "ParameterStatus").is_ok_and(|n| n == "application_name") {
        let value = body.strip_suffix(&[0]).unwrap_or(body);
        if value == app_name.as_slice() {
            return false;
        }
        app_name.clear();
        app_name.extend_from_slice(value);
    }
    true
}

/// A ParameterStatus from the server: a new `TimeZone` (after SET, RESET, SET LOCAL or
/// the end of a transaction that set it) changes how timestamp keys are read.
pub(super) fn saw_parameter(zone: &mut crate::sharding::Zone, frame: &[u8]) {
    let mut body = frame.get(5..).unwrap_or_default();
    let name = protocol::read_cstr(&mut body, "ParameterStatus");
    if name.is_ok_and(|n| n == "TimeZone")
        && let Ok(v) = protocol::read_cstr(&mut body, "ParameterStatus")
        && v != zone.setting()
    {
        *zone = crate::sharding::Zone::new(&v);
    }
}
