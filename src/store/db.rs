//! One interface to both databases. The store's SQL is written once, with `?N` parameters,
//! and runs on SQLite or on PostgreSQL (where `?N` becomes `$N`); where the dialects differ a
//! caller asks [`Db::is_pg`]. Values cross as Rust types both drivers know: `i64`, `bool`,
//! `String`/`&str`, `Vec<u8>`/`&[u8]`, their `Option`s, and the stored vocabularies
//! (`states.rs`). PostgreSQL columns are `BIGINT`, `BOOLEAN`, `TEXT` and `BYTEA` to match.

use super::StoreError;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

/// A value bound to a statement: anything both drivers can send.
pub trait Param: rusqlite::ToSql + postgres::types::ToSql + Sync {}
impl<T: rusqlite::ToSql + postgres::types::ToSql + Sync + ?Sized> Param for T {}

/// A column value both drivers can read.
pub trait Column: rusqlite::types::FromSql + for<'a> postgres::types::FromSql<'a> {}
impl<T: rusqlite::types::FromSql + for<'a> postgres::types::FromSql<'a>> Column for T {}

/// A result row of either database.
pub enum Row<'r> {
    /// SQLite.
    Lite(&'r rusqlite::Row<'r>),
    /// PostgreSQL.
    Pg(&'r postgres::Row),
}

impl Row<'_> {
    /// Column `i` (0-based).
    pub fn get<T: Column>(&self, i: usize) -> Result<T, StoreError> {
        match self {
            Row::Lite(r) => Ok(r.get(i)?),
            Row::Pg(r) => Ok(r.try_get(i)?),
        }
    }
}

/// What a read sent ahead ([`Db::prefetch_on`]) depends on, or what a write ([`Db::later_on`])
/// may change: named parts of the data, or anything. A read's answer stands after a write
/// unless they name a part in common or either is [`Keys::Any`]; a read that names no part
/// (an insert's own `RETURNING`, a sequence, a lock) stands after every write.
#[derive(Clone, Debug, Default)]
pub enum Keys {
    /// Anything: what [`Db::prefetch`] and [`Db::later`] assume.
    #[default]
    Any,
    /// These parts only (none: nothing).
    Only(Vec<String>),
}

/// A read sent ahead, by its text and parameters.
type ReadKey = (Arc<str>, Vec<Encoded>);

/// The answer of a read sent ahead, and where it stands among the writes.
struct Answer {
    rows: Vec<postgres::Row>,
    depends: Keys,
    /// Writes queued before the read was ([`PgConn::writes`] then).
    after: u64,
}

/// A count read in this transaction ([`Db::count`]): unlike other answers, taken by every
/// asker.
struct Count {
    value: i64,
    depends: Keys,
    after: u64,
}

/// A PostgreSQL connection and the statements prepared on it (each once per connection).
///
/// The client is tokio-postgres on a runtime of the connection's own (as the blocking
/// `postgres` crate does it), so that statements can be pipelined: those whose answer nothing
/// waits for ([`Db::later`]) are sent with the next statement that is waited for, and their
/// answers read in the same round trip.
pub struct PgConn {
    /// `None` only while it is dropped.
    client: Option<(tokio_postgres::Client, tokio::runtime::Runtime)>,
    statements: HashMap<String, tokio_postgres::Statement>,
    /// Sent with the next statement waited for (see [`Db::later`]): with its text when it is
    /// a read sent ahead ([`Db::prefetch`]), and what it depends on (a read) or may change (a
    /// write), numbered by the writes queued before it.
    queued: Vec<Queued>,
    /// Answers of reads sent ahead, each taken once, as long as no write since changed what
    /// it depends on; cleared with the transaction.
    prefetched: HashMap<ReadKey, Vec<Answer>>,
    /// Counts read in this transaction, sent ahead ([`Db::prefetch_count`]) or not, each
    /// standing for every asker while nothing it depends on is written; cleared with the
    /// transaction.
    counts: HashMap<ReadKey, Count>,
    /// Runs this transaction recorded that the breaker counts, in order (see
    /// `breaker::count`); cleared with the answers.
    pub(super) counted: Vec<super::breaker::Counted>,
    /// The time of the batch this connection runs, by the store's clock (set by the writer).
    pub(super) batch_ms: Option<i64>,
    /// The writes of this transaction so far, for telling whether an answer still stands.
    writes: Writes,
    /// The writes before the batch's reads were sent ahead ([`PgConn::sent_ahead`]), and
    /// whether any were.
    ahead_at: u64,
    ahead_sent: bool,
    /// A queued statement failed: the transaction is lost, whatever the statement that
    /// flushed it (the writer fails the whole batch).
    pub(super) later_failed: bool,
    /// Round trips and statements on this connection (see [`PgConn::traffic`]).
    trips: u64,
    sent: u64,
    /// A write in this transaction made work for other replicas (see [`Db::wake`]).
    pub(super) wake: Wake,
    /// Audit rows this transaction appends, written just before it commits (see
    /// `audit::append_pending`).
    pub(super) audit: Vec<super::audit::Pending>,
    /// The audit chain this connection tries first (see `audit::append_pending`).
    pub(super) audit_chain: i64,
}

/// Whether a transaction notifies the other replicas when it commits (see [`Db::wake`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum Wake {
    #[default]
    No,
    /// If a run is pending then ([`Db::wake_if_queued`]).
    IfQueued,
    Yes,
}

/// The writes of a transaction, numbered in the order they were sent: how many, when each
/// part ([`Keys`]) was last written, when the last write of anything was, and the last write
/// at all.
#[derive(Default)]
struct Writes {
    count: u64,
    written: HashMap<String, u64>,
    anything: u64,
    last: u64,
}

impl Writes {
    /// Counts a write that may change `keys`.
    fn wrote(&mut self, keys: &Keys) {
        match keys {
            Keys::Only(parts) if parts.is_empty() => {}
            Keys::Only(parts) => {
                self.count += 1;
                self.last = self.count;
                for part in parts {
                    self.written.insert(part.clone(), self.count);
                }
            }
            Keys::Any => {
                self.count += 1;
                self.last = self.count;
                self.anything = self.count;
            }
        }
    }

    /// Whether an answer read after the first `after` writes, depending on `depends`, still
    /// stands.
    fn stand(&self, depends: &Keys, after: u64) -> bool {
        match depends {
            Keys::Any => self.last <= after,
            Keys::Only(parts) => {
                parts.is_empty()
                    || (self.anything <= after
                        && (parts.iter()).all(|p| self.written.get(p).is_none_or(|&w| w <= after)))
            }
        }
    }
}

/// A statement queued to be sent with the next one waited for.
struct Queued {
    statement: tokio_postgres::Statement,
    params: Vec<Encoded>,
    kind: Kind,
    keys: Keys,
    /// Writes queued before it.
    after: u64,
}

/// What a queued statement is: a write, or a read sent ahead, by its text.
enum Kind {
    Write,
    /// Its answer taken once ([`Db::prefetch_on`]).
    Read(Arc<str>),
    /// A count, its answer kept for every asker ([`Db::prefetch_count`]).
    Count(Arc<str>),
}

impl Queued {
    /// Whether it is a read (not a count) of this text sent ahead.
    fn reads(&self, sql: &str) -> bool {
        matches!(&self.kind, Kind::Read(text) if &**text == sql)
    }

    /// Whether it is this count sent ahead.
    fn counts(&self, key: &ReadKey) -> bool {
        matches!(&self.kind, Kind::Count(text) if *text == key.0) && self.params == key.1
    }
}

/// A parameter already encoded for its statement: a queued statement owns its parameters.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Encoded(Option<bytes::Bytes>);

impl postgres::types::ToSql for Encoded {
    fn to_sql(
        &self,
        _: &postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        Ok(match &self.0 {
            Some(b) => {
                out.extend_from_slice(b);
                postgres::types::IsNull::No
            }
            None => postgres::types::IsNull::Yes,
        })
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        // Checked when it was encoded, against the statement's own type.
        true
    }

    postgres::types::to_sql_checked!();
}

impl PgConn {
    /// Connects: the client and the connection's task, on a runtime of its own.
    pub(super) fn connect<T>(config: &tokio_postgres::Config, tls: T) -> Result<PgConn, StoreError>
    where
        T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket> + Send + 'static,
        T::Stream: Send + 'static,
    {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (client, connection) = runtime.block_on(config.connect(tls))?;
        // Driven whenever the runtime runs: while a statement is waited for.
        runtime.spawn(async move {
            let _ = connection.await;
        });
        Ok(PgConn {
            client: Some((client, runtime)),
            statements: HashMap::new(),
            queued: Vec::new(),
            prefetched: HashMap::new(),
            counts: HashMap::new(),
            counted: Vec::new(),
            batch_ms: None,
            writes: Writes::default(),
            ahead_at: 0,
            ahead_sent: false,
            later_failed: false,
            trips: 0,
            sent: 0,
            wake: Wake::No,
            audit: Vec::new(),
            audit_chain: {
                use std::hash::BuildHasher;
                // A chain of its own to try first, at random: connections that append at once
                // seldom try the same one.
                let random = std::collections::hash_map::RandomState::new().hash_one(0_u8);
                (random % super::audit::CHAINS as u64) as i64
            },
        })
    }

    fn parts(&mut self) -> &mut (tokio_postgres::Client, tokio::runtime::Runtime) {
        self.client
            .as_mut()
            .expect("a connection has its client until dropped")
    }

    /// Whether the server closed the connection (or it broke).
    pub(super) fn is_closed(&mut self) -> bool {
        self.parts().0.is_closed()
    }

    /// Round trips and statements so far.
    pub(super) fn traffic(&self) -> (u64, u64) {
        (self.trips, self.sent)
    }

    /// Statements without parameters, in one round trip (with whatever is queued before): a
    /// transaction's start or end, so every answer sent ahead is forgotten.
    pub(super) fn batch_execute(&mut self, sql: &str) -> Result<(), StoreError> {
        self.forget();
        self.flush_with(|c| Box::pin(async move { c.batch_execute(sql).await.map(drop) }))
    }

    fn prepare(&mut self, sql: &str) -> Result<tokio_postgres::Statement, StoreError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        // On its own: what is queued stays queued (a statement is prepared once a connection).
        let text = dollar_params(sql);
        self.trips += 1;
        let (client, runtime) = self.parts();
        let statement = runtime.block_on(client.prepare(&text))?;
        self.statements.insert(sql.to_string(), statement.clone());
        Ok(statement)
    }

    /// Forgets every answer sent ahead and the writes counted: a transaction begins or ends,
    /// or a savepoint was rolled back.
    pub(super) fn forget(&mut self) {
        self.prefetched.clear();
        self.counts.clear();
        self.counted.clear();
        self.writes = Writes::default();
        self.ahead_at = 0;
        self.ahead_sent = false;
    }

    /// Marks the batch's reads sent ahead ([`Db::overtaken`] tells what was written since).
    pub(super) fn sent_ahead(&mut self) {
        self.ahead_at = self.writes.count;
        // Nothing is answered yet: what was sent ahead is still queued.
        self.ahead_sent = self.queued.iter().any(|q| !matches!(q.kind, Kind::Write));
    }

    /// Queues a write that may change `keys`, its parameters encoded now (see [`Db::later`]).
    pub(super) fn queue(
        &mut self,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
        keys: Keys,
    ) -> Result<(), StoreError> {
        let (statement, params) = self.encode(sql, params)?;
        let after = self.writes.count;
        self.writes.wrote(&keys);
        self.queued.push(Queued {
            statement,
            params,
            kind: Kind::Write,
            keys,
            after,
        });
        Ok(())
    }

    /// Writes queued in this transaction so far.
    pub(super) fn written(&self) -> u64 {
        self.writes.count
    }

    /// Queues a read that depends on `depends`, whose answer a later [`PgConn::query`] of the
    /// same text and parameters takes without a round trip (see [`Db::prefetch`]).
    pub(super) fn prefetch(
        &mut self,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
        depends: Keys,
    ) -> Result<(), StoreError> {
        let (statement, params) = self.encode(sql, params)?;
        self.queued.push(Queued {
            statement,
            params,
            kind: Kind::Read(Arc::from(sql)),
            keys: depends,
            after: self.writes.count,
        });
        Ok(())
    }

    /// Queues a count that depends on `depends` unless one of the same text and parameters
    /// is queued or stands already (see [`Db::prefetch_count`]).
    fn prefetch_count(
        &mut self,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
        depends: Keys,
    ) -> Result<(), StoreError> {
        let (statement, params) = self.encode(sql, params)?;
        let key = (Arc::from(sql), params);
        if self.count_queued(&key) || self.standing_count(&key).is_some() {
            return Ok(());
        }
        self.queued.push(Queued {
            statement,
            params: key.1,
            kind: Kind::Count(key.0),
            keys: depends,
            after: self.writes.count,
        });
        Ok(())
    }

    fn count_queued(&self, key: &ReadKey) -> bool {
        self.queued.iter().any(|q| q.counts(key))
    }

    /// A count sent ahead that stands, and the writes it saw.
    fn standing_count(&self, key: &ReadKey) -> Option<(i64, u64)> {
        let c = self.counts.get(key)?;
        self.writes
            .stand(&c.depends, c.after)
            .then_some((c.value, c.after))
    }

    /// A count, and how many of this transaction's writes it saw (see [`Db::count`]).
    fn count(
        &mut self,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
        depends: Keys,
    ) -> Result<(i64, u64), StoreError> {
        let (_, encoded) = self.encode(sql, params)?;
        let key = (Arc::from(sql), encoded);
        if self.count_queued(&key) {
            self.flush_with(|_| Box::pin(async { Ok(()) }))?;
        }
        if let Some(standing) = self.standing_count(&key) {
            return Ok(standing);
        }
        // Asked now, it sees every write queued before it; kept, like one sent ahead.
        let rows = self.query(sql, params)?;
        let value = rows.first().ok_or(StoreError::NoRow)?.try_get(0)?;
        let after = self.writes.count;
        let count = Count {
            value,
            depends,
            after,
        };
        self.counts.insert(key, count);
        Ok((value, after))
    }

    /// Whether a read of this text and parameters was sent ahead and its answer stands (or is
    /// still to come).
    pub(super) fn holds(
        &mut self,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<bool, StoreError> {
        if !self.ahead_sent {
            // Nothing sent ahead in this transaction: no need to encode the parameters to say so.
            return Ok(false);
        }
        let (_, encoded) = self.encode(sql, params)?;
        let queued = (self.queued.iter()).any(|q| q.reads(sql) && q.params == encoded);
        let writes = &self.writes;
        Ok(queued
            || (self.prefetched.get(&(Arc::from(sql), encoded)))
                .is_some_and(|a| a.iter().any(|a| writes.stand(&a.depends, a.after))))
    }

    /// Takes a standing answer of a read sent ahead, dropping those that no longer stand.
    fn take_answer(&mut self, key: ReadKey) -> Option<Vec<postgres::Row>> {
        let answers = self.prefetched.get_mut(&key)?;
        let mut found = None;
        while let Some(a) = answers.pop() {
            if self.writes.stand(&a.depends, a.after) {
                found = Some(a.rows);
                break;
            }
        }
        if answers.is_empty() {
            self.prefetched.remove(&key);
        }
        found
    }

    /// The prepared statement and its parameters, encoded for it.
    fn encode(
        &mut self,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<(tokio_postgres::Statement, Vec<Encoded>), StoreError> {
        let statement = self.prepare(sql)?;
        let mut encoded = Vec::with_capacity(params.len());
        // One buffer for all of them: each parameter is a slice of it.
        let mut buf = bytes::BytesMut::with_capacity(32 * params.len());
        for (p, ty) in params.iter().zip(statement.params()) {
            let null = p
                .to_sql_checked(ty, &mut buf)
                .map_err(|e| StoreError::Config(format!("encoding a parameter of `{sql}`: {e}")))?;
            let value = buf.split().freeze();
            encoded.push(Encoded(match null {
                postgres::types::IsNull::Yes => None,
                postgres::types::IsNull::No => Some(value),
            }));
        }
        Ok((statement, encoded))
    }

    /// Runs a statement and returns its rows, in one round trip with the queued ones.
    pub(super) fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Vec<postgres::Row>, StoreError> {
        let ahead = |q: &Queued| q.reads(sql);
        if !self.prefetched.is_empty() || self.queued.iter().any(ahead) {
            let (_, encoded) = self.encode(sql, params)?;
            let queued = (self.queued.iter()).any(|q| ahead(q) && q.params == encoded);
            if queued {
                // Sent ahead and not yet answered: sent now, with everything queued.
                self.flush_with(|_| Box::pin(async { Ok(()) }))?;
            }
            if let Some(rows) = self.take_answer((Arc::from(sql), encoded)) {
                return Ok(rows);
            }
            if queued {
                // It ran, and a write queued after it made its answer stale: never run twice.
                return Err(StoreError::Config(format!(
                    "the answer of `{sql}`, sent ahead, was overtaken by a write"
                )));
            }
        }
        let statement = self.prepare(sql)?;
        self.flush_with(|c| Box::pin(async move { c.query(&statement, params).await }))
    }

    /// Sends the queued statements, then `last`, without waiting between them (one round
    /// trip), and waits for every answer. The first error is returned; one from a queued
    /// statement marks the transaction lost ([`PgConn::later_failed`]).
    fn flush_with<'a, T: 'a>(
        &'a mut self,
        last: impl FnOnce(
            &'a tokio_postgres::Client,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, postgres::Error>> + 'a>,
        >,
    ) -> Result<T, StoreError> {
        let queued = std::mem::take(&mut self.queued);
        self.trips += 1;
        self.sent += queued.len() as u64 + 1;
        let (client, runtime) = self
            .client
            .as_ref()
            .expect("a connection has its client until dropped");
        type Reply<'f> = std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Vec<postgres::Row>, postgres::Error>> + 'f>,
        >;
        let mut earlier: Vec<Option<Reply<'_>>> = queued
            .iter()
            .map(|q| {
                let (s, p) = (&q.statement, &q.params);
                Some(if !matches!(q.kind, Kind::Write) {
                    let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = p
                        .iter()
                        .map(|e| e as &(dyn postgres::types::ToSql + Sync))
                        .collect();
                    Box::pin(async move { client.query(s, &refs).await }) as Reply<'_>
                } else {
                    Box::pin(
                        async move { client.execute_raw(s, p.iter()).await.map(|_| Vec::new()) },
                    )
                })
            })
            .collect();
        let mut answers: Vec<Option<Vec<postgres::Row>>> = Vec::new();
        answers.resize_with(queued.len(), || None);
        let mut last = Some(last(client));
        let mut first_error = None;
        let mut result = None;
        // Each future sends its request when first polled: polled in order, they go out in
        // order, before any answer is awaited.
        runtime.block_on(std::future::poll_fn(|cx| {
            use std::task::Poll;
            for (i, slot) in earlier.iter_mut().enumerate() {
                if let Some(f) = slot
                    && let Poll::Ready(r) = f.as_mut().poll(cx)
                {
                    *slot = None;
                    match r {
                        Ok(rows) => answers[i] = Some(rows),
                        Err(e) => {
                            first_error.get_or_insert(e);
                        }
                    }
                }
            }
            if let Some(f) = &mut last
                && let Poll::Ready(r) = f.as_mut().poll(cx)
            {
                last = None;
                result = Some(r);
            }
            if last.is_none() && earlier.iter().all(Option::is_none) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }));
        drop(earlier);
        if let Some(e) = first_error {
            self.later_failed = true;
            return Err(e.into());
        }
        // Every read's answer is kept; whether it still stands is asked when it is taken.
        for (q, rows) in queued.into_iter().zip(answers) {
            let Some(rows) = rows else { continue };
            match q.kind {
                Kind::Write => {}
                Kind::Read(sql) => {
                    (self.prefetched.entry((sql, q.params)).or_default()).push(Answer {
                        rows,
                        depends: q.keys,
                        after: q.after,
                    })
                }
                // One that cannot be read as a count is asked again, and fails then.
                Kind::Count(sql) => {
                    if let Some(Ok(value)) = rows.first().map(|r| r.try_get(0)) {
                        let (depends, after) = (q.keys, q.after);
                        let count = Count {
                            value,
                            depends,
                            after,
                        };
                        self.counts.insert((sql, q.params), count);
                    }
                }
            }
        }
        Ok(result.expect("the last statement was answered")?)
    }
}

impl Drop for PgConn {
    /// The runtime must not be dropped on an async runtime's thread (nor the client say
    /// goodbye there): there they go to a thread of their own.
    fn drop(&mut self) {
        if let Some(parts) = self.client.take()
            && tokio::runtime::Handle::try_current().is_ok()
        {
            let _ = std::thread::Builder::new()
                .name("reflex-pg-close".into())
                .spawn(move || drop(parts));
        }
    }
}

/// `?1` becomes `$1`: the store writes SQLite's numbered parameters, PostgreSQL wants its own.
/// Text in quotes is left alone.
pub(super) fn dollar_params(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quoted = false;
    let mut chars = sql.chars().peekable();
    while let Some(ch) = chars.next() {
        match ch {
            '\'' => quoted = !quoted,
            '?' if !quoted && chars.peek().is_some_and(char::is_ascii_digit) => {
                out.push('$');
                continue;
            }
            _ => {}
        }
        out.push(ch);
    }
    out
}

/// A connection inside a transaction, of either database.
pub enum Db<'c> {
    /// SQLite.
    Lite(&'c rusqlite::Connection),
    /// PostgreSQL.
    Pg(RefCell<&'c mut PgConn>),
}

impl Db<'_> {
    /// Whether this is PostgreSQL (for the few statements that differ).
    pub fn is_pg(&self) -> bool {
        matches!(self, Db::Pg(_))
    }

    /// Says that this write gives other replicas something to do: a run to claim, room on a
    /// target, a kill switch changed. On PostgreSQL they are notified when it commits; on
    /// SQLite there are none.
    pub fn wake(&self) {
        if let Db::Pg(c) = self {
            c.borrow_mut().wake = Wake::Yes;
        }
    }

    /// Says that this write made room (a run's end frees a slot on its target, the run of its
    /// alert, its playbook's concurrency): other replicas are notified when it commits if a
    /// run waits in the queue then. With none waiting nobody has anything to claim, and
    /// PostgreSQL's `NOTIFY` costs one lock that every notifying commit of the cluster waits
    /// for in turn.
    pub fn wake_if_queued(&self) {
        if let Db::Pg(c) = self {
            let mut c = c.borrow_mut();
            if c.wake == Wake::No {
                c.wake = Wake::IfQueued;
            }
        }
    }

    /// How many audit rows wait to be appended at commit (PostgreSQL; 0 on SQLite, which
    /// appends at once): a failed write drops those it added with [`Db::drop_audit_after`].
    pub fn audit_mark(&self) -> usize {
        match self {
            Db::Lite(_) => 0,
            Db::Pg(c) => c.borrow().audit.len(),
        }
    }

    /// Drops the waiting audit rows after the first `mark`.
    pub fn drop_audit_after(&self, mark: usize) {
        if let Db::Pg(c) = self {
            c.borrow_mut().audit.truncate(mark);
        }
    }

    /// Whether a statement sent with [`Db::later`] failed (the transaction is lost).
    pub fn later_failed(&self) -> bool {
        match self {
            Db::Lite(_) => false,
            Db::Pg(c) => c.borrow().later_failed,
        }
    }

    /// The transaction is good again after a statement sent with [`Db::later`] failed: rolled
    /// back to a savepoint from before it.
    pub fn recovered(&self) {
        if let Db::Pg(c) = self {
            c.borrow_mut().later_failed = false;
        }
    }

    /// Runs statements without parameters, separated by `;`, in one round trip.
    pub fn batch(&self, sql: &str) -> Result<(), StoreError> {
        match self {
            Db::Lite(c) => Ok(c.execute_batch(sql)?),
            Db::Pg(c) => c.borrow_mut().batch_execute(sql),
        }
    }

    /// Runs a statement whose answer nothing waits for: on PostgreSQL it is sent with the next
    /// statement that is waited for (at the latest the `COMMIT`), in the same round trip; an
    /// error then fails the whole transaction. On SQLite it runs now.
    pub fn later(&self, sql: &str, params: &[&dyn Param]) -> Result<(), StoreError> {
        self.later_on(sql, params, Keys::Any)
    }

    /// As [`Db::later`], for a write that changes only `keys`: answers sent ahead that
    /// depend on nothing of it stand after it.
    pub fn later_on(&self, sql: &str, params: &[&dyn Param], keys: Keys) -> Result<(), StoreError> {
        match self {
            Db::Lite(_) => self.exec(sql, params).map(drop),
            Db::Pg(c) => c.borrow_mut().queue(sql, &pg_params(params), keys),
        }
    }

    /// Sends a read ahead (PostgreSQL): queued like [`Db::later`], its answer kept for the
    /// first [`Db::row`] or [`Db::rows`] of the same text and parameters, as long as no
    /// statement that may write comes between. The reads a decision may need go out together,
    /// in one round trip. Nothing on SQLite (the read runs when it is asked).
    pub fn prefetch(&self, sql: &str, params: &[&dyn Param]) -> Result<(), StoreError> {
        self.prefetch_on(sql, params, Keys::Any)
    }

    /// As [`Db::prefetch`], for a read that depends on `depends` only: its answer stands
    /// after writes of other parts ([`Db::later_on`]).
    pub fn prefetch_on(
        &self,
        sql: &str,
        params: &[&dyn Param],
        depends: Keys,
    ) -> Result<(), StoreError> {
        self.on_pg(|c| c.prefetch(sql, &pg_params(params), depends))
    }

    /// Sends a count ahead (PostgreSQL), once a transaction: unlike [`Db::prefetch_on`]'s,
    /// its answer is kept for every [`Db::count`] of the same text and parameters while
    /// nothing it depends on is written. Nothing on SQLite.
    pub fn prefetch_count(
        &self,
        sql: &str,
        params: &[&dyn Param],
        depends: Keys,
    ) -> Result<(), StoreError> {
        self.on_pg(|c| c.prefetch_count(sql, &pg_params(params), depends))
    }

    /// Runs `f` on PostgreSQL's connection; nothing on SQLite.
    fn on_pg(
        &self,
        f: impl FnOnce(&mut PgConn) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        match self {
            Db::Lite(_) => Ok(()),
            Db::Pg(c) => f(&mut c.borrow_mut()),
        }
    }

    /// A count (one row, one `bigint`) and how many of this transaction's writes it saw
    /// ([`PgConn::written`] then). On PostgreSQL a count is read once a transaction (sent
    /// ahead, or now) and kept while nothing in `depends` is written: it may have been read
    /// before some writes, which the caller folds in (those that change the count without
    /// being what it depends on). On SQLite it is asked every time: it saw every write.
    pub fn count(
        &self,
        sql: &str,
        params: &[&dyn Param],
        depends: Keys,
    ) -> Result<(i64, u64), StoreError> {
        match self {
            Db::Lite(_) => Ok((self.one(sql, params, |r| r.get(0))?, 0)),
            Db::Pg(c) => c.borrow_mut().count(sql, &pg_params(params), depends),
        }
    }

    /// The time of the batch this runs in (PostgreSQL, where the writer sets it; `None` on
    /// SQLite).
    pub fn batch_ms(&self) -> Option<i64> {
        match self {
            Db::Lite(_) => None,
            Db::Pg(c) => c.borrow().batch_ms,
        }
    }

    /// Whether this read was sent ahead and its answer stands (PostgreSQL; never on SQLite).
    pub fn sent_ahead(&self, sql: &str, params: &[&dyn Param]) -> Result<bool, StoreError> {
        match self {
            Db::Lite(_) => Ok(false),
            Db::Pg(c) => c.borrow_mut().holds(sql, &pg_params(params)),
        }
    }

    /// Whether a write since the batch's reads were sent ahead changed what `depends` names
    /// (PostgreSQL; never on SQLite).
    pub fn overtaken(&self, depends: &Keys) -> bool {
        match self {
            Db::Lite(_) => false,
            Db::Pg(c) => {
                let c = c.borrow();
                !c.writes.stand(depends, c.ahead_at)
            }
        }
    }

    /// Forgets the answers sent ahead (a savepoint rolled back: what they saw may be undone).
    pub fn forget_answers(&self) {
        if let Db::Pg(c) = self {
            c.borrow_mut().forget();
        }
    }

    /// Runs a statement; returns the rows it changed.
    pub fn exec(&self, sql: &str, params: &[&dyn Param]) -> Result<u64, StoreError> {
        match self {
            Db::Lite(c) => {
                Ok(lite_statement(c, sql)?.execute(rusqlite::params_from_iter(params))? as u64)
            }
            Db::Pg(c) => {
                let mut c = c.borrow_mut();
                c.writes.wrote(&Keys::Any);
                let statement = c.prepare(sql)?;
                let params = pg_params(params);
                c.flush_with(|client| {
                    Box::pin(async move { client.execute(&statement, &params).await })
                })
            }
        }
    }

    /// Runs an `INSERT` into a table keyed by `id`; returns the new row's id, or `None` when it
    /// inserted nothing (`ON CONFLICT DO NOTHING`). On SQLite the id comes from the connection:
    /// `RETURNING` would stage the row in a temporary table on every insert.
    pub fn insert(&self, sql: &str, params: &[&dyn Param]) -> Result<Option<i64>, StoreError> {
        match self {
            Db::Lite(c) => {
                let inserted =
                    lite_statement(c, sql)?.execute(rusqlite::params_from_iter(params))?;
                Ok((inserted > 0).then(|| c.last_insert_rowid()))
            }
            Db::Pg(c) => {
                c.borrow_mut().writes.wrote(&Keys::Any);
                self.row(&format!("{sql} RETURNING id"), params, |r| r.get(0))
            }
        }
    }

    /// The first row of a query, if any, through `f`.
    pub fn row<T>(
        &self,
        sql: &str,
        params: &[&dyn Param],
        f: impl FnOnce(&Row) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        match self {
            Db::Lite(c) => {
                let mut statement = lite_statement(c, sql)?;
                let mut rows = statement.query(rusqlite::params_from_iter(params))?;
                match rows.next()? {
                    Some(r) => Ok(Some(f(&Row::Lite(r))?)),
                    None => Ok(None),
                }
            }
            Db::Pg(c) => {
                let rows = c.borrow_mut().query(sql, &pg_params(params))?;
                match rows.first() {
                    Some(r) => Ok(Some(f(&Row::Pg(r))?)),
                    None => Ok(None),
                }
            }
        }
    }

    /// The one row a query returns, through `f`; no row is an error.
    pub fn one<T>(
        &self,
        sql: &str,
        params: &[&dyn Param],
        f: impl FnOnce(&Row) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.row(sql, params, f)?.ok_or(StoreError::NoRow)
    }

    /// Every row of a query, each through `f`.
    pub fn rows<T>(
        &self,
        sql: &str,
        params: &[&dyn Param],
        mut f: impl FnMut(&Row) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        match self {
            Db::Lite(c) => {
                let mut statement = lite_statement(c, sql)?;
                let mut rows = statement.query(rusqlite::params_from_iter(params))?;
                while let Some(r) = rows.next()? {
                    out.push(f(&Row::Lite(r))?);
                }
            }
            Db::Pg(c) => {
                for r in c.borrow_mut().query(sql, &pg_params(params))? {
                    out.push(f(&Row::Pg(&r))?);
                }
            }
        }
        Ok(out)
    }
}

/// A statement from the connection's cache (prepared once per connection).
fn lite_statement<'c>(
    c: &'c rusqlite::Connection,
    sql: &str,
) -> rusqlite::Result<rusqlite::CachedStatement<'c>> {
    #[cfg(test)]
    RAN.with_borrow_mut(|ran| {
        if !ran.contains(sql) {
            ran.insert(sql.to_string());
        }
    });
    c.prepare_cached(sql)
}

#[cfg(test)]
thread_local! {
    /// The SQLite statements this thread ran: on a store's writer thread, those of its one
    /// connection (a test asks the connection how often each was compiled).
    pub(super) static RAN: RefCell<std::collections::HashSet<String>> = RefCell::default();
}

fn pg_params<'a>(params: &'a [&'a dyn Param]) -> Vec<&'a (dyn postgres::types::ToSql + Sync)> {
    params
        .iter()
        .map(|p| *p as &(dyn postgres::types::ToSql + Sync))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::dollar_params;

    #[test]
    fn numbered_parameters_become_dollars_outside_quotes() {
        assert_eq!(
            dollar_params("SELECT ?1, '?2', x FROM t WHERE a = ?12 AND b = '?'"),
            "SELECT $1, '?2', x FROM t WHERE a = $12 AND b = '?'"
        );
        // A bare `?` is not a numbered parameter.
        assert_eq!(dollar_params("a ? b"), "a ? b");
    }
}
