//! One interface to both databases. The store's SQL is written once, with `?N` parameters,
//! and runs on SQLite or on PostgreSQL (where `?N` becomes `$N`); where the dialects differ a
//! caller asks [`Db::is_pg`]. Values cross as Rust types both drivers know: `i64`, `bool`,
//! `String`/`&str`, `Vec<u8>`/`&[u8]`, their `Option`s, and the stored vocabularies
//! (`states.rs`). PostgreSQL columns are `BIGINT`, `BOOLEAN`, `TEXT` and `BYTEA` to match.

use super::StoreError;
use std::cell::RefCell;
use std::collections::HashMap;

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

/// A PostgreSQL connection and the statements prepared on it (each once per connection).
pub struct PgConn {
    /// `None` only while it is dropped.
    client: Option<postgres::Client>,
    statements: HashMap<String, postgres::Statement>,
    /// A write in this transaction made work for other replicas (see [`Db::wake`]).
    pub(super) wake: bool,
    /// Audit rows this transaction appends, written just before it commits (see
    /// `audit::append_pending`).
    pub(super) audit: Vec<super::audit::Pending>,
}

impl PgConn {
    pub(super) fn new(client: postgres::Client) -> PgConn {
        PgConn {
            client: Some(client),
            statements: HashMap::new(),
            wake: false,
            audit: Vec::new(),
        }
    }

    pub(super) fn client(&mut self) -> &mut postgres::Client {
        self.client
            .as_mut()
            .expect("a connection has its client until dropped")
    }

    fn prepare(&mut self, sql: &str) -> Result<postgres::Statement, StoreError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let statement = self.client().prepare(&dollar_params(sql))?;
        self.statements.insert(sql.to_string(), statement.clone());
        Ok(statement)
    }
}

impl Drop for PgConn {
    /// The blocking client says goodbye to the server on drop, which must not happen on an
    /// async runtime's thread: there it goes to a thread of its own.
    fn drop(&mut self) {
        if let Some(client) = self.client.take()
            && tokio::runtime::Handle::try_current().is_ok()
        {
            let _ = std::thread::Builder::new()
                .name("reflex-pg-close".into())
                .spawn(move || drop(client));
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
            c.borrow_mut().wake = true;
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

    /// Runs statements without parameters, separated by `;`, in one round trip.
    pub fn batch(&self, sql: &str) -> Result<(), StoreError> {
        match self {
            Db::Lite(c) => Ok(c.execute_batch(sql)?),
            Db::Pg(c) => Ok(c.borrow_mut().client().batch_execute(sql)?),
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
                let statement = c.prepare(sql)?;
                Ok(c.client().execute(&statement, &pg_params(params))?)
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
            Db::Pg(_) => self.row(&format!("{sql} RETURNING id"), params, |r| r.get(0)),
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
                let mut c = c.borrow_mut();
                let statement = c.prepare(sql)?;
                match c.client().query_opt(&statement, &pg_params(params))? {
                    Some(r) => Ok(Some(f(&Row::Pg(&r))?)),
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
                let mut c = c.borrow_mut();
                let statement = c.prepare(sql)?;
                for r in c.client().query(&statement, &pg_params(params))? {
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
