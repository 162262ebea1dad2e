//! SQL cursors over several shards. `DECLARE name CURSOR FOR query` whose query needs
//! several shards would otherwise run on each shard as a cursor of its own, and a FETCH
//! would read one of them: one shard's rows. Instead pgshard runs the query merged (inside
//! the transaction, whose shards join it) and holds its rows as the cursor, answering
//! FETCH, MOVE and CLOSE of it, and Describe of its portal (psycopg's server-side cursors,
//! Django's `.iterator()`, SQLAlchemy's `stream_results`), in every direction
//! (`PRIOR`, `ABSOLUTE n`, `BACKWARD ALL`, psycopg's `scroll()`) unless it was declared
//! `NO SCROLL`.

use super::portal::{Hold, Scroll, empty, take_description};
use super::{Session, SessionError};
use crate::protocol::{self, PgError};
use crate::router::analyze::Cursor;
use bytes::BytesMut;

/// A cursor statement.
#[derive(Debug, PartialEq)]
enum Command {
    Fetch(Direction),
    Move(Direction),
    Close,
    CloseAll,
    /// A direction pgshard does not read.
    Other,
}

/// Where a FETCH or MOVE goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// n rows forward (None: ALL).
    Forward(Option<u64>),
    Scroll(Scroll),
}

/// A FETCH or MOVE direction, as PostgreSQL's grammar has it (`words` lowercased, the
/// cursor's name and FROM/IN taken off).
fn direction(words: &[&str]) -> Option<Direction> {
    use Direction::Forward;
    let count = |n: &str| n.parse::<i64>().ok();
    // A signed count forward (FORWARD n, n) or backward (BACKWARD n): 0 is the current
    // row again.
    let signed = |n: i64| match n {
        0 => Direction::Scroll(Scroll::Relative(0)),
        n if n > 0 => Forward(Some(n as u64)),
        n => Direction::Scroll(Scroll::Backward(Some(n.unsigned_abs()))),
    };
    Some(match words {
        [] | ["next"] | ["forward"] => Forward(Some(1)),
        ["all"] | ["forward", "all"] => Forward(None),
        ["prior"] | ["backward"] => Direction::Scroll(Scroll::Backward(Some(1))),
        ["backward", "all"] => Direction::Scroll(Scroll::Backward(None)),
        ["first"] => Direction::Scroll(Scroll::Absolute(1)),
        ["last"] => Direction::Scroll(Scroll::Absolute(-1)),
        ["absolute", n] => Direction::Scroll(Scroll::Absolute(count(n)?)),
        ["relative", n] => Direction::Scroll(Scroll::Relative(count(n)?)),
        ["backward", n] => signed(count(n)?.checked_neg()?),
        [n] | ["forward", n] => signed(count(n)?),
        _ => return None,
    })
}

/// Words and quoted identifiers (unquoted, with their quotes' escapes undone).
fn tokens(sql: &str) -> Option<Vec<(String, bool)>> {
    let mut out = Vec::new();
    let mut chars = sql.trim().trim_end_matches(';').chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '"' {
            chars.next();
            let mut s = String::new();
            loop {
                match chars.next()? {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        s.push('"');
                    }
                    '"' => break,
                    c => s.push(c),
                }
            }
            out.push((s, true));
        } else {
            let mut s = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() || c == '"' {
                    break;
                }
                s.push(c);
                chars.next();
            }
            out.push((s, false));
        }
    }
    Some(out)
}

/// A FETCH, MOVE or CLOSE statement and the cursor it names (as PostgreSQL resolves it).
fn parse_command(sql: &str) -> Option<(Command, String)> {
    let t = tokens(sql)?;
    let ((verb, false), rest) = t.split_first()? else {
        return None;
    };
    let verb = verb.to_ascii_lowercase();
    if !matches!(verb.as_str(), "fetch" | "move" | "close") {
        return None;
    }
    let ((name, quoted), middle) = rest.split_last()?;
    let name = if *quoted {
        name.clone()
    } else {
        name.to_lowercase()
    };
    let mut words: Vec<String> = middle
        .iter()
        .map(|(w, q)| if *q { "\"".into() } else { w.to_lowercase() })
        .collect();
    if verb == "close" {
        return match (words.is_empty(), name.as_str(), quoted) {
            (true, "all", false) => Some((Command::CloseAll, String::new())),
            (true, _, _) => Some((Command::Close, name)),
            _ => None,
        };
    }
    if matches!(words.last().map(String::as_str), Some("from" | "in")) {
        words.pop();
    }
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    Some((
        match (direction(&words), verb.as_str()) {
            (Some(d), "fetch") => Command::Fetch(d),
            (Some(d), _) => Command::Move(d),
            (None, _) => Command::Other,
        },
        name,
    ))
}

impl Session {
    /// Why a DECLARE over several shards cannot run outside a transaction, if it cannot.
    pub(super) fn cursor_refused(&self, c: &Cursor) -> Option<PgError> {
        (self.status == b'I' && !c.hold).then(|| {
            PgError::new(
                "25P01",
                "DECLARE CURSOR can only be used in transaction blocks",
            )
        })
    }

    /// The merged rows of a DECLARE's query (RowDescription, rows, CommandComplete) held
    /// as its cursor; what the client gets for the DECLARE (or the error in `merged`).
    pub(super) fn declare_cursor(&mut self, c: &Cursor, mut merged: BytesMut) -> BytesMut {
        if protocol::has_error(&merged) {
            return merged;
        }
        let description = take_description(&mut merged);
        let hold = match (c.hold, self.status) {
            (false, _) => Hold::No,
            (true, b'I') => Hold::Yes,
            (true, _) => Hold::IfCommitted,
        };
        self.route
            .portals
            .insert(c.name.as_bytes(), description, merged.freeze(), hold);
        if let Some(p) = self.route.portals.get_mut(c.name.as_bytes()) {
            p.forward_only = c.no_scroll;
        }
        let mut out = BytesMut::new();
        protocol::write_complete(&mut out, "DECLARE CURSOR");
        out
    }

    /// The answer to a cursor statement on a cursor pgshard holds (`described`: a FETCH
    /// starts with the RowDescription, as in a simple Query). None when the statement is
    /// not one, or names a cursor pgshard does not hold; `CLOSE ALL` forgets them all and
    /// goes on to the server.
    pub(super) fn cursor_answer(
        &mut self,
        sql: &str,
        described: bool,
    ) -> Option<Result<BytesMut, PgError>> {
        let (cmd, name) = parse_command(sql)?;
        self.answer_command(cmd, &name, described)
    }

    /// [`Session::cursor_answer`] of a statement already read.
    fn answer_command(
        &mut self,
        cmd: Command,
        name: &str,
        described: bool,
    ) -> Option<Result<BytesMut, PgError>> {
        if cmd == Command::CloseAll {
            self.route.portals.clear_all();
            return None;
        }
        let p = self.route.portals.get_mut(name.as_bytes())?;
        let mut out = BytesMut::new();
        if let Command::Fetch(Direction::Scroll(s)) | Command::Move(Direction::Scroll(s)) = cmd
            && p.forward_only
            && p.moves_back(s)
        {
            return Some(Err(PgError::new("55000", "cursor can only scan forward")
                .with_hint(
                    "Declare it with SCROLL option to enable backward scan.",
                )));
        }
        let mut moved = |d: Direction| match d {
            Direction::Forward(n) => {
                let (rows, k) = p.take(n);
                (BytesMut::from(&rows[..]), k)
            }
            Direction::Scroll(s) => p.scroll(s),
        };
        match cmd {
            Command::Fetch(d) => {
                let (rows, k) = moved(d);
                if described {
                    out.extend_from_slice(p.description());
                }
                out.extend_from_slice(&rows);
                protocol::write_complete(&mut out, &format!("FETCH {k}"));
            }
            Command::Move(d) => {
                let k = moved(d).1;
                protocol::write_complete(&mut out, &format!("MOVE {k}"))
            }
            Command::Close => {
                self.route.portals.remove(name.as_bytes());
                protocol::write_complete(&mut out, "CLOSE CURSOR");
            }
            Command::CloseAll | Command::Other => {
                return Some(Err(PgError::new(
                    "0A000",
                    format!(
                        "cursor \"{name}\" reads several shards: pgshard holds its rows and does not read this FETCH or MOVE"
                    ),
                )));
            }
        }
        Some(Ok(out))
    }

    /// A simple Query that is a FETCH, MOVE or CLOSE of a cursor pgshard holds: answered
    /// here (true).
    pub(super) async fn cursor_query(&mut self, sql: &str) -> Result<bool, SessionError> {
        // Answers in order: whatever the client sent before comes back first.
        if parse_command(sql).is_some() {
            self.settle().await?;
        }
        let answer = match self.cursor_answer(sql, true) {
            None => return Ok(false),
            Some(_) if self.status == b'E' => Err(super::route::aborted()),
            Some(a) => a,
        };
        match answer {
            Ok(out) => {
                self.relay.drain_local(&mut self.cout);
                self.cout.extend_from_slice(&out);
                protocol::write_ready(&mut self.cout, self.status);
            }
            Err(e) => self.answer_error(e),
        }
        Ok(true)
    }

    /// A Bind of a FETCH, MOVE or CLOSE of a cursor pgshard holds (`text`, the statement
    /// bound): its answer held as the Bind's portal (true). Rows are held as text: a
    /// FETCH asking for binary results is refused.
    pub(super) async fn cursor_bind(
        &mut self,
        text: &str,
        bind_rest: &[u8],
    ) -> Result<bool, SessionError> {
        let binary = crate::exec::scatter::result_formats(bind_rest)
            .iter()
            .any(|b| *b);
        let Some((cmd, name)) = parse_command(text).filter(|(c, name)| {
            *c != Command::CloseAll && self.route.portals.get_mut(name.as_bytes()).is_some()
        }) else {
            return Ok(false);
        };
        if !self.answer_held().await? {
            return Ok(true);
        }
        let description = match cmd {
            Command::Fetch(_) => self
                .route
                .portals
                .get_mut(name.as_bytes())
                .map(|p| p.description().clone()),
            _ => None,
        }
        .unwrap_or_else(|| empty(b'n'));
        if binary && description[0] == b'T' {
            self.local_error(PgError::new(
                "0A000",
                "this cursor reads several shards and pgshard holds its rows as text: FETCH them in text format",
            ));
            return Ok(true);
        }
        if self.status == b'E' {
            self.local_error(super::route::aborted());
            return Ok(true);
        }
        match self.answer_command(cmd, &name, false) {
            Some(Ok(out)) => self.hold_portal(description, out.freeze()),
            Some(Err(e)) => {
                if self.status == b'T' {
                    self.status = b'E';
                }
                self.local_error(e)
            }
            None => return Ok(false),
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cursor_statements() {
        use Direction::{Forward, Scroll as S};
        let p = |s: &str| parse_command(s);
        let fetch = |d: Direction, name: &str| Some((Command::Fetch(d), name.to_string()));
        assert_eq!(
            p("FETCH FORWARD 7 FROM \"sc\""),
            fetch(Forward(Some(7)), "sc")
        );
        assert_eq!(p("fetch all in C1;"), fetch(Forward(None), "c1"));
        assert_eq!(p("FETCH c"), fetch(Forward(Some(1)), "c"));
        assert_eq!(
            p("FETCH NEXT FROM \"My \"\"x\"\"\""),
            fetch(Forward(Some(1)), "My \"x\"")
        );
        assert_eq!(
            p("MOVE FORWARD 4 \"__asyncpg_portal_1__\""),
            Some((
                Command::Move(Forward(Some(4))),
                "__asyncpg_portal_1__".into()
            ))
        );
        assert_eq!(
            p("MOVE -2 FROM c"),
            Some((Command::Move(S(Scroll::Backward(Some(2)))), "c".into()))
        );
        assert_eq!(
            p("FETCH BACKWARD 2 c"),
            fetch(S(Scroll::Backward(Some(2))), "c")
        );
        assert_eq!(p("FETCH BACKWARD -2 c"), fetch(Forward(Some(2)), "c"));
        assert_eq!(
            p("FETCH BACKWARD ALL c"),
            fetch(S(Scroll::Backward(None)), "c")
        );
        assert_eq!(p("FETCH PRIOR c"), fetch(S(Scroll::Backward(Some(1))), "c"));
        assert_eq!(p("FETCH FORWARD 0 c"), fetch(S(Scroll::Relative(0)), "c"));
        assert_eq!(p("FETCH LAST c"), fetch(S(Scroll::Absolute(-1)), "c"));
        assert_eq!(
            p("FETCH RELATIVE -3 c"),
            fetch(S(Scroll::Relative(-3)), "c")
        );
        assert_eq!(
            p("MOVE ABSOLUTE 3 FROM c"),
            Some((Command::Move(S(Scroll::Absolute(3))), "c".into()))
        );
        assert_eq!(p("FETCH SIDEWAYS c"), Some((Command::Other, "c".into())));
        assert_eq!(p("CLOSE \"sc\""), Some((Command::Close, "sc".into())));
        assert_eq!(p("CLOSE ALL"), Some((Command::CloseAll, String::new())));
        assert_eq!(p("SELECT 1"), None);
        assert_eq!(p("FETCH \"unterminated"), None);
    }
}
