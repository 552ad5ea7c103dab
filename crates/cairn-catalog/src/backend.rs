//! The databases behind the catalog, through one small interface: [`Backend`] (statements,
//! queries, transactions) over SQLite ([`Sqlite`], this module) and PostgreSQL
//! ([`crate::pg::Postgres`]). The catalog's queries are written once, in portable SQL.
//!
//! Contracts of every backend:
//! - **Parameters are `$1..$N`** and their values are [`Value`]s: integers, text, NULL. A
//!   boolean is written as the integer 0 or 1 (the schema's INTEGER flag columns); an
//!   integer is narrowed to the column's type (PostgreSQL INTEGER) or refused if it does not
//!   fit, never truncated.
//! - **Rows come back typed**: every integer column (SQLite INTEGER; PostgreSQL SMALLINT,
//!   INTEGER, BIGINT, BOOLEAN) reads as [`Value::Int`], text as [`Value::Text`]; any other
//!   type is a [`CatalogError::Decode`] naming the column.
//! - **A transaction is all or nothing**: [`Backend::transaction`] commits when the work
//!   returns `Ok` and rolls back otherwise, returning the work's error.
//! - **Migrating openers are serialized**: [`Backend::schema_lock`], run first in a
//!   migration's transaction, is held until it ends (SQLite: the transaction's own write
//!   lock), so two processes opening one database at once apply each migration once.
//! - **Connection loss** (PostgreSQL only): a connection found closed before a statement (it
//!   is checked after a second idle) is replaced transparently; one lost during a statement is [`CatalogError::ConnectionLost`]
//!   (it may or may not have been applied) and the next call reconnects. Nothing is
//!   re-sent behind the caller's back.

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, TransactionBehavior};

use crate::{CatalogError, Result};

/// A parameter or a column value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Value {
    Null,
    Int(i64),
    Text(String),
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Int(v.into())
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_string())
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Text(v.clone())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// The parameters of a statement: `args![a, b]` is `&[Value::from(a), Value::from(b)]`.
macro_rules! args {
    ($($v:expr),* $(,)?) => {
        &[$($crate::backend::Value::from($v)),*] as &[$crate::backend::Value]
    };
}
pub(crate) use args;

/// One row of a query's answer.
#[derive(Debug)]
pub(crate) struct Row(pub(crate) Vec<Value>);

fn decode(i: usize, want: &str, got: &Value) -> CatalogError {
    CatalogError::Decode {
        what: format!("column {i}"),
        message: format!("expected {want}, found {got:?}"),
    }
}

impl Row {
    fn at(&self, i: usize) -> Result<&Value> {
        self.0.get(i).ok_or_else(|| CatalogError::Decode {
            what: format!("column {i}"),
            message: format!("the row has {} columns", self.0.len()),
        })
    }

    pub(crate) fn opt_int(&self, i: usize) -> Result<Option<i64>> {
        match self.at(i)? {
            Value::Int(v) => Ok(Some(*v)),
            Value::Null => Ok(None),
            v => Err(decode(i, "an integer", v)),
        }
    }

    pub(crate) fn int(&self, i: usize) -> Result<i64> {
        self.opt_int(i)?
            .ok_or_else(|| decode(i, "an integer", &Value::Null))
    }

    /// A flag stored as an integer (0 is false).
    pub(crate) fn flag(&self, i: usize) -> Result<bool> {
        Ok(self.int(i)? != 0)
    }

    pub(crate) fn opt_text(&self, i: usize) -> Result<Option<&str>> {
        match self.at(i)? {
            Value::Text(v) => Ok(Some(v)),
            Value::Null => Ok(None),
            v => Err(decode(i, "text", v)),
        }
    }

    pub(crate) fn text(&self, i: usize) -> Result<&str> {
        self.opt_text(i)?
            .ok_or_else(|| decode(i, "text", &Value::Null))
    }
}

/// Runs statements: a backend outside a transaction, or one transaction.
pub(crate) trait Exec {
    /// Runs one statement; the number of rows it changed.
    fn execute(&mut self, sql: &str, args: &[Value]) -> Result<u64>;
    /// Runs one query; its rows.
    fn query(&mut self, sql: &str, args: &[Value]) -> Result<Vec<Row>>;
    /// Runs statements separated by `;`, without parameters (a migration file).
    fn batch(&mut self, sql: &str) -> Result<()>;

    /// The first row of a query, if any.
    fn query_opt(&mut self, sql: &str, args: &[Value]) -> Result<Option<Row>> {
        Ok(self.query(sql, args)?.into_iter().next())
    }
}

/// A database the catalog runs on (see the module doc for the contracts).
pub(crate) trait Backend: Exec + Send {
    /// Runs `work` in one transaction.
    fn transaction(&mut self, work: &mut dyn FnMut(&mut dyn Exec) -> Result<()>) -> Result<()>;
    /// The statement a migration's transaction runs first: a lock held until it ends, which
    /// other migrating openers wait for. `None` when the transaction itself is that lock.
    fn schema_lock(&self) -> Option<&'static str>;
    /// Whether other processes may work on this database at the same time (a leader lease
    /// then decides which of them is active).
    fn shared(&self) -> bool;
    /// `SQLite` or `PostgreSQL`, and where.
    fn describe(&self) -> String;
}

/// An SQLite database file (or an in-memory one, for tests).
pub(crate) struct Sqlite(pub(crate) Connection);

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Value::Null => ToSqlOutput::Owned(rusqlite::types::Value::Null),
            Value::Int(v) => ToSqlOutput::from(*v),
            Value::Text(v) => ToSqlOutput::from(v.as_str()),
        })
    }
}

fn sqlite_value(i: usize, v: ValueRef<'_>) -> Result<Value> {
    match v {
        ValueRef::Null => Ok(Value::Null),
        ValueRef::Integer(v) => Ok(Value::Int(v)),
        ValueRef::Text(t) => {
            String::from_utf8(t.to_vec())
                .map(Value::Text)
                .map_err(|e| CatalogError::Decode {
                    what: format!("column {i}"),
                    message: e.to_string(),
                })
        }
        ValueRef::Real(_) | ValueRef::Blob(_) => Err(CatalogError::Decode {
            what: format!("column {i}"),
            message: format!(
                "a {:?} value where integers and text are stored",
                v.data_type()
            ),
        }),
    }
}

fn sqlite_execute(c: &Connection, sql: &str, args: &[Value]) -> Result<u64> {
    let n = c
        .prepare_cached(sql)?
        .execute(rusqlite::params_from_iter(args))?;
    Ok(n as u64)
}

fn sqlite_query(c: &Connection, sql: &str, args: &[Value]) -> Result<Vec<Row>> {
    let mut st = c.prepare_cached(sql)?;
    let columns = st.column_count();
    let mut rows = st.query(rusqlite::params_from_iter(args))?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let row = (0..columns)
            .map(|i| sqlite_value(i, r.get_ref(i)?))
            .collect::<Result<_>>()?;
        out.push(Row(row));
    }
    Ok(out)
}

impl Exec for Sqlite {
    fn execute(&mut self, sql: &str, args: &[Value]) -> Result<u64> {
        sqlite_execute(&self.0, sql, args)
    }

    fn query(&mut self, sql: &str, args: &[Value]) -> Result<Vec<Row>> {
        sqlite_query(&self.0, sql, args)
    }

    fn batch(&mut self, sql: &str) -> Result<()> {
        Ok(self.0.execute_batch(sql)?)
    }
}

impl Exec for rusqlite::Transaction<'_> {
    fn execute(&mut self, sql: &str, args: &[Value]) -> Result<u64> {
        sqlite_execute(self, sql, args)
    }

    fn query(&mut self, sql: &str, args: &[Value]) -> Result<Vec<Row>> {
        sqlite_query(self, sql, args)
    }

    fn batch(&mut self, sql: &str) -> Result<()> {
        Ok(self.execute_batch(sql)?)
    }
}

impl Backend for Sqlite {
    fn transaction(&mut self, work: &mut dyn FnMut(&mut dyn Exec) -> Result<()>) -> Result<()> {
        // IMMEDIATE takes the write lock at BEGIN: two processes migrating one file never
        // both read the old schema version (and no write transaction fails half-way on a
        // lock upgrade).
        let mut tx = self
            .0
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        work(&mut tx)?;
        tx.commit()?;
        Ok(())
    }

    fn schema_lock(&self) -> Option<&'static str> {
        // The IMMEDIATE transaction already holds the database's write lock.
        None
    }

    fn shared(&self) -> bool {
        // One server process per catalog file (the CLI only reads it).
        false
    }

    fn describe(&self) -> String {
        match self.0.path() {
            Some(p) if !p.is_empty() => format!("SQLite {p}"),
            _ => "SQLite in memory".into(),
        }
    }
}
