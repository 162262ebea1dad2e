//! Portals whose rows pgshard holds: the merged rows of a Bind over several shards, or
//! pgshard's own answer to a statement it carries out (BEGIN, COMMIT, a write over several
//! shards). pgshard answers the client's Describe, Execute and Close of them, as a server
//! would: Execute with a row limit returns that many rows and PortalSuspended (as cursors
//! in pgjdbc, node-postgres and asyncpg fetch), and a portal lives until it is closed,
//! replaced by a Bind of its name, or its transaction ends.

use super::{Pending, Session, SessionError};
use crate::protocol;
use bytes::{Bytes, BytesMut};

/// One portal's answers.
pub(super) struct VirtualPortal {
    /// RowDescription (or NoData).
    description: Bytes,
    /// The frames not returned yet: DataRows, notices and the CommandComplete.
    rest: Bytes,
    /// Every frame, for a cursor moved backward or to a row by its number.
    all: Bytes,
    /// Where each row's frame starts and ends in `all`, once a cursor scrolled.
    rows: Option<Vec<(usize, usize)>>,
    /// Where a cursor is, as PostgreSQL counts: 0 before the first row, n on row n;
    /// `past_end` after the last.
    at: u64,
    past_end: bool,
    /// A cursor declared NO SCROLL: it moves only forward.
    pub(super) forward_only: bool,
    /// An Execute returned rows and PortalSuspended before.
    suspended: bool,
    /// Every frame was returned.
    done: bool,
    hold: Hold,
}

/// Whether a portal outlives its transaction: a cursor declared WITH HOLD does, once the
/// transaction that declared it commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Hold {
    No,
    /// Declared WITH HOLD in a transaction still open.
    IfCommitted,
    Yes,
}

impl VirtualPortal {
    /// The frames an Execute with `max_rows` (0: no limit) returns.
    fn execute(&mut self, max_rows: u32) -> BytesMut {
        let mut out = BytesMut::new();
        if self.done {
            // Executing again returns no more rows, as for an exhausted portal.
            protocol::write_complete(&mut out, "SELECT 0");
            return out;
        }
        let limit = u64::from(max_rows);
        let mut rows = 0u64;
        let mut used = 0;
        let rest = self.rest.clone();
        for f in protocol::frames(&rest) {
            if limit > 0 && rows == limit && matches!(f[0], b'D' | b'C') {
                // As a server: `max_rows` rows, then suspended, even when no row is left
                // (the next Execute then completes with none).
                out.extend_from_slice(&empty(b's'));
                self.rest = self.rest.slice(used..);
                self.suspended = true;
                return out;
            }
            match f[0] {
                b'D' => rows += 1,
                // A portal fetched in parts reports the rows of the last part, as
                // PostgreSQL does.
                b'C' if self.suspended => {
                    write_tag_with_count(&mut out, f, rows);
                    used += f.len();
                    continue;
                }
                _ => {}
            }
            out.extend_from_slice(f);
            used += f.len();
        }
        self.rest = Bytes::new();
        self.done = true;
        out
    }
}

impl VirtualPortal {
    /// The description: RowDescription, or NoData.
    pub(super) fn description(&self) -> &Bytes {
        &self.description
    }

    /// Takes up to `n` rows (None: all) with the notices between them, as a cursor's FETCH
    /// or MOVE; and how many.
    pub(super) fn take(&mut self, n: Option<u64>) -> (Bytes, u64) {
        let mut taken = 0;
        let mut used = 0;
        let rest = self.rest.clone();
        if !self.past_end {
            for f in protocol::frames(&rest) {
                if !matches!(f[0], b'D' | b'N') || (f[0] == b'D' && n.is_some_and(|n| taken == n)) {
                    break;
                }
                taken += u64::from(f[0] == b'D');
                used += f.len();
            }
        }
        self.rest = rest.slice(used..);
        // Fewer rows than asked for: the cursor went past the last one.
        self.at += taken;
        self.past_end |= n.is_none_or(|n| taken < n);
        // The tag at the end counts only the rows an Execute returns.
        self.suspended = true;
        (rest.slice(..used), taken)
    }

    /// Where each row's frame starts and ends in `all` (found once).
    fn rows(&mut self) -> &[(usize, usize)] {
        self.rows.get_or_insert_with(|| {
            let mut at = 0;
            let mut v = Vec::new();
            for f in protocol::frames(&self.all) {
                if f[0] == b'D' {
                    v.push((at, at + f.len()));
                }
                at += f.len();
            }
            v
        })
    }

    /// Whether a move ends at or before the cursor's row: what PostgreSQL refuses a NO
    /// SCROLL cursor (any move is allowed that goes forward by one row at least).
    pub(super) fn moves_back(&mut self, to: Scroll) -> bool {
        let (at, n) = self.position();
        to.target(at, n).is_none_or(|target| target <= at)
    }

    /// The cursor's row (n + 1 past the last) and how many rows there are.
    fn position(&mut self) -> (i64, i64) {
        let n = self.rows().len() as i64;
        (if self.past_end { n + 1 } else { self.at as i64 }, n)
    }

    /// Moves a cursor as PostgreSQL's FETCH and MOVE do in any direction (`take` moves
    /// forward): the rows it passes, in the order it passes them, and how many.
    pub(super) fn scroll(&mut self, to: Scroll) -> (BytesMut, u64) {
        let (mut at, n) = self.position();
        let rows = self.rows.as_deref().unwrap_or_default();
        let mut out = BytesMut::new();
        let mut count = 0u64;
        let all = &self.all;
        let mut emit = |at: i64| {
            let (s, e) = rows[at as usize - 1];
            out.extend_from_slice(&all[s..e]);
        };
        match (to, to.target(at, n)) {
            (Scroll::Backward(k), _) => {
                while k.is_none_or(|k| count < k) {
                    if at <= 1 {
                        at = 0;
                        break;
                    }
                    at -= 1;
                    emit(at);
                    count += 1;
                }
            }
            (_, target) => {
                let target = target.unwrap_or(0);
                at = target.clamp(0, n + 1);
                if (1..=n).contains(&target) {
                    emit(at);
                    count += 1;
                }
            }
        }
        self.past_end = at > n;
        self.at = at.min(n) as u64;
        // A later forward FETCH or Execute goes on after the cursor's row.
        let from = (self.at as usize)
            .checked_sub(1)
            .and_then(|i| rows.get(i))
            .map_or(0, |r| r.1);
        self.rest = self.all.slice(from..);
        self.suspended = true;
        (out, count)
    }
}

/// A cursor's move that is not forward by a count (see [`VirtualPortal::scroll`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scroll {
    /// BACKWARD n (None: ALL), PRIOR.
    Backward(Option<u64>),
    /// ABSOLUTE n, FIRST, LAST: from the end when negative.
    Absolute(i64),
    /// RELATIVE n (0: the current row again).
    Relative(i64),
}

impl Scroll {
    /// The row a move to one row lands on (ABSOLUTE, RELATIVE) from row `at` of `n`, as
    /// PostgreSQL numbers them (0 before the first, n + 1 after the last, or beyond);
    /// None for BACKWARD, which passes rows.
    fn target(self, at: i64, n: i64) -> Option<i64> {
        match self {
            Scroll::Backward(_) => None,
            Scroll::Absolute(k) if k < 0 => Some(n.saturating_add(k).saturating_add(1)),
            Scroll::Absolute(k) => Some(k),
            Scroll::Relative(k) => Some(at.saturating_add(k)),
        }
    }
}

/// The RowDescription that starts `out`, split off (NoData when it does not start with
/// one): a merged result's description, held apart from its rows.
pub(super) fn take_description(out: &mut BytesMut) -> Bytes {
    if out.first() != Some(&b'T') {
        return empty(b'n');
    }
    let n = protocol::frames(out).next().map_or(out.len(), <[u8]>::len);
    out.split_to(n).freeze()
}

pub(super) fn empty(tag: u8) -> Bytes {
    crate::exec::empty_frame(tag)
}

/// A CommandComplete with its row count (the tag's last word) replaced by `rows`.
fn write_tag_with_count(out: &mut BytesMut, frame: &[u8], rows: u64) {
    let tag = frame
        .get(5..frame.len().saturating_sub(1))
        .unwrap_or_default();
    let tag = String::from_utf8_lossy(tag);
    let head = match tag.rsplit_once(' ') {
        Some((head, n)) if n.bytes().all(|b| b.is_ascii_digit()) => head,
        _ => {
            out.extend_from_slice(frame);
            return;
        }
    };
    protocol::write_complete(out, &format!("{head} {rows}"));
}

/// The portals a session's client has with pgshard (few at a time: a list).
#[derive(Default)]
pub(super) struct VirtualPortals(Vec<(Bytes, VirtualPortal)>);

impl VirtualPortals {
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Holds `rows` (DataRows and CommandComplete) as portal `name`, replacing any of
    /// that name.
    pub(super) fn insert(&mut self, name: &[u8], description: Bytes, rows: Bytes, hold: Hold) {
        self.remove(name);
        self.0.push((
            Bytes::copy_from_slice(name),
            VirtualPortal {
                description,
                all: rows.clone(),
                rows: None,
                rest: rows,
                at: 0,
                past_end: false,
                forward_only: false,
                suspended: false,
                done: false,
                hold,
            },
        ));
    }

    /// The transaction ended (committed, when not known): its portals are gone, not
    /// cursors declared WITH HOLD.
    pub(super) fn clear(&mut self) {
        self.end_transaction(true);
    }

    /// The transaction ended: after a rollback, cursors it declared WITH HOLD go too.
    pub(super) fn end_transaction(&mut self, committed: bool) {
        self.0.retain_mut(|(_, p)| match p.hold {
            Hold::No => false,
            Hold::IfCommitted if committed => {
                p.hold = Hold::Yes;
                true
            }
            Hold::IfCommitted => false,
            Hold::Yes => true,
        });
    }

    /// Whether only cursors that outlive transactions are held (a session between
    /// transactions may then move to a new configuration: their rows need no shard).
    pub(super) fn only_held(&self) -> bool {
        self.0.iter().all(|(_, p)| p.hold == Hold::Yes)
    }

    /// `CLOSE ALL`.
    pub(super) fn clear_all(&mut self) {
        self.0.clear();
    }

    /// The unnamed portal is gone (a simple Query or a Bind of it replaces it).
    pub(super) fn remove(&mut self, name: &[u8]) -> bool {
        let before = self.0.len();
        self.0.retain(|(n, _)| n != name);
        self.0.len() != before
    }

    pub(super) fn get_mut(&mut self, name: &[u8]) -> Option<&mut VirtualPortal> {
        self.0.iter_mut().find(|(n, _)| n == name).map(|(_, p)| p)
    }
}

/// The portal name and row limit of an Execute.
pub(super) fn parse_execute(frame: &[u8]) -> Result<(&[u8], u32), SessionError> {
    let body = frame.get(5..).unwrap_or_default();
    let malformed = || crate::protocol::ProtocolError::Malformed {
        what: "Execute",
        detail: "truncated".into(),
    };
    let nul = memchr::memchr(0, body).ok_or_else(malformed)?;
    let n = body
        .get(nul + 1..nul + 5)
        .ok_or_else(malformed)?
        .try_into()
        .expect("four bytes");
    Ok((&body[..nul], u32::from_be_bytes(n).min(i32::MAX as u32)))
}

impl Session {
    /// Answers the client's Describe, Execute or Close of a portal pgshard holds; false
    /// when the frame is for something else (a Bind replacing such a portal drops it).
    pub(super) fn answer_from_portal(&mut self, frame: &Bytes) -> Result<bool, SessionError> {
        let reply = match frame[0] {
            b'D' | b'C' => {
                let (kind, name) = protocol::parse_target(frame, "Describe")?;
                if kind != b'P' {
                    return Ok(false);
                }
                if frame[0] == b'C' {
                    if !self.route.portals.remove(name) {
                        return Ok(false);
                    }
                    empty(b'3')
                } else {
                    match self.route.portals.get_mut(name) {
                        Some(p) => p.description.clone(),
                        None => return Ok(false),
                    }
                }
            }
            b'E' => {
                let (name, max_rows) = parse_execute(frame)?;
                if !self.route.portals.0.iter().any(|(n, _)| n == name) {
                    return Ok(false);
                }
                if self.status == b'E' {
                    self.local_error(super::route::aborted());
                    return Ok(true);
                }
                let p = self.route.portals.get_mut(name).expect("checked");
                p.execute(max_rows).freeze()
            }
            b'B' => {
                let b = protocol::parse_bind(frame)?;
                self.route.portals.remove(b.portal);
                return Ok(false);
            }
            _ => return Ok(false),
        };
        self.relay.push(Pending::Synth {
            frame: reply,
            undo: None,
        });
        self.relay.drain_local(&mut self.cout);
        Ok(true)
    }

    /// A Bind's result held as its portal: BindComplete now, the rows at Execute.
    pub(super) fn hold_portal(&mut self, description: Bytes, rows: Bytes) {
        let portal = std::mem::take(&mut self.route.bind_portal);
        self.route
            .portals
            .insert(&portal, description, rows, Hold::No);
        self.relay.push(Pending::Synth {
            frame: empty(b'2'),
            undo: None,
        });
        self.relay.drain_local(&mut self.cout);
    }

    /// Portal `name`, whose rows went to the client as they came (`stream.rs`): a later
    /// Execute of it returns none, and a Describe its description, as a server's
    /// exhausted portal.
    pub(super) fn hold_exhausted_portal(&mut self, name: &[u8], description: Bytes) {
        self.route
            .portals
            .insert(name, description, Bytes::new(), Hold::No);
        if let Some(p) = self.route.portals.get_mut(name) {
            p.done = true;
        }
    }

    /// An error for the client in place of a Bind's result: as PostgreSQL, the rest of
    /// the batch is skipped.
    pub(super) fn bind_failed(&mut self, frames: Bytes) {
        self.relay.push(Pending::Synth {
            frame: frames,
            undo: None,
        });
        self.relay.drain_local(&mut self.cout);
        self.batch_failed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize) -> Bytes {
        let mut b = BytesMut::new();
        for i in 0..n {
            let v = i.to_string();
            let mut body = vec![0, 1];
            body.extend_from_slice(&(v.len() as i32).to_be_bytes());
            body.extend_from_slice(v.as_bytes());
            protocol::write_msg(&mut b, b'D', &body);
        }
        protocol::write_complete(&mut b, &format!("SELECT {n}"));
        b.freeze()
    }

    fn tags(b: &[u8]) -> Vec<String> {
        protocol::frames(b)
            .map(|f| match f[0] {
                b'C' => String::from_utf8_lossy(&f[5..f.len() - 1]).into_owned(),
                t => (t as char).to_string(),
            })
            .collect()
    }

    fn portal(n: usize) -> VirtualPortal {
        let mut p = VirtualPortals::default();
        p.insert(b"p", empty(b'n'), rows(n), Hold::No);
        p.0.pop().expect("inserted").1
    }

    #[test]
    fn scrolls_empty_cursors_and_huge_counts() {
        let mut p = portal(0);
        assert_eq!(p.scroll(Scroll::Absolute(-1)).1, 0);
        assert_eq!(p.scroll(Scroll::Relative(i64::MAX)).1, 0);
        assert_eq!(p.scroll(Scroll::Backward(None)).1, 0);
        assert_eq!(p.take(Some(1)).1, 0);
        let mut p = portal(3);
        assert_eq!(p.scroll(Scroll::Relative(i64::MAX)).1, 0);
        assert!(p.moves_back(Scroll::Absolute(i64::MIN)));
        assert_eq!(p.scroll(Scroll::Backward(Some(2))).1, 2);
        assert_eq!(p.take(None).1, 1);
        assert_eq!(p.scroll(Scroll::Relative(i64::MIN)).1, 0);
        assert_eq!(p.take(Some(5)).1, 3);
    }

    #[test]
    fn executes_in_parts_as_a_server() {
        let mut p = portal(5);
        assert_eq!(tags(&p.execute(2)), ["D", "D", "s"]);
        assert_eq!(tags(&p.execute(2)), ["D", "D", "s"]);
        // The last part's count, as PostgreSQL reports it.
        assert_eq!(tags(&p.execute(2)), ["D", "SELECT 1"]);
        assert_eq!(tags(&p.execute(2)), ["SELECT 0"]);
        // Exactly the rows left: suspended, then complete with none.
        let mut p = portal(2);
        assert_eq!(tags(&p.execute(2)), ["D", "D", "s"]);
        assert_eq!(tags(&p.execute(2)), ["SELECT 0"]);
        // No limit: all, with the original tag.
        let mut p = portal(3);
        assert_eq!(tags(&p.execute(0)), ["D", "D", "D", "SELECT 3"]);
        let mut p = portal(3);
        assert_eq!(tags(&p.execute(1)), ["D", "s"]);
        assert_eq!(tags(&p.execute(0)), ["D", "D", "SELECT 2"]);
    }

    #[test]
    fn takes_rows_as_fetch_does() {
        let mut p = portal(5);
        assert_eq!(p.take(Some(2)).1, 2);
        assert_eq!(tags(&p.execute(2)), ["D", "D", "s"]);
        let (rows, n) = p.take(None);
        assert_eq!((tags(&rows), n), (vec!["D".to_string()], 1));
        assert_eq!(p.take(Some(3)).1, 0);
        assert_eq!(tags(&p.execute(2)), ["SELECT 0"]);
    }

    #[test]
    fn portals_by_name() {
        let mut ps = VirtualPortals::default();
        ps.insert(b"C_1", empty(b'n'), rows(1), Hold::No);
        ps.insert(b"", empty(b'n'), rows(2), Hold::No);
        ps.insert(b"C_1", empty(b'n'), rows(3), Hold::IfCommitted);
        ps.insert(b"other", empty(b'n'), rows(3), Hold::No);
        ps.insert(b"gone", empty(b'n'), rows(3), Hold::IfCommitted);
        ps.end_transaction(false);
        assert_eq!(ps.0.len(), 0, "a rolled back WITH HOLD cursor is gone");
        ps.insert(b"C_1", empty(b'n'), rows(3), Hold::IfCommitted);
        assert!(!ps.only_held());
        ps.clear();
        assert_eq!(ps.0.len(), 1, "held past the transaction");
        assert!(ps.only_held());
        ps.end_transaction(false);
        assert_eq!(ps.0.len(), 1, "and past later ones");
        ps.insert(b"", empty(b'n'), rows(2), Hold::No);
        assert_eq!(ps.0.len(), 2);
        assert_eq!(tags(&ps.get_mut(b"C_1").unwrap().execute(0)).len(), 4);
        assert!(ps.remove(b""));
        assert!(!ps.remove(b""));
    }
}
