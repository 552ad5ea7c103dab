//! The catalog on PostgreSQL: one connection (the synchronous `postgres` client, plain TCP or
//! a Unix socket, no TLS), the same SQL text as on SQLite.
//!
//! | what | how |
//! |---|---|
//! | types | the migrations' INTEGER is PostgreSQL's 32-bit INTEGER, BIGINT is 64-bit; parameters are narrowed to the column's type with a range check ([`Value`]'s `ToSql`) |
//! | migrations | each in its own transaction that first takes the advisory lock `SCHEMA_LOCK`: concurrent openers wait, then see the migration applied |
//! | a connection closed while idle (server restart, terminated backend) | after [`IDLE_CHECK`] idle, checked with one round trip before the next statement and replaced: the caller notices nothing |
//! | a connection lost during a statement or transaction | [`CatalogError::ConnectionLost`]: it may or may not have been applied; the next call reconnects |
//! | a server that does not answer | connect timeout 10 s and TCP keepalives (15 s idle, 5 s × 3 probes) unless the URL sets them |

use std::error::Error as StdError;
use std::time::{Duration, Instant};

use postgres::error::Severity;
use postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};
use postgres::{Client, Config, NoTls};

use crate::backend::{Backend, Exec, Row, Value};
use crate::{CatalogError, Result};

/// What a migrating opener runs first in each migration's transaction: an advisory lock
/// held until the transaction ends. The key is "cairn" in ASCII (0x636169726e).
const SCHEMA_LOCK: &str = "SELECT pg_advisory_xact_lock(426836062830)";

/// How long a connection may sit idle before it is checked (one round trip) ahead of the
/// next statement: a server restart or a terminated backend is then noticed and the
/// connection replaced. Within this time of the last statement a connection is trusted,
/// and its loss is reported as [`CatalogError::ConnectionLost`].
pub const IDLE_CHECK: Duration = Duration::from_secs(1);

/// How long that check waits for the server's answer.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

type BoxError = Box<dyn StdError + Sync + Send>;

impl ToSql for Value {
    fn to_sql(&self, ty: &Type, out: &mut bytes::BytesMut) -> Result<IsNull, BoxError> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(v) => match *ty {
                Type::INT8 => v.to_sql_checked(ty, out),
                Type::INT4 => i32::try_from(*v)?.to_sql_checked(ty, out),
                Type::INT2 => i16::try_from(*v)?.to_sql_checked(ty, out),
                Type::BOOL => (*v != 0).to_sql_checked(ty, out),
                _ => Err(format!("an integer given for a {ty} parameter").into()),
            },
            Value::Text(v) => v.as_str().to_sql_checked(ty, out),
        }
    }

    /// Every type: each value checks the parameter's type in `to_sql`.
    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

impl<'a> FromSql<'a> for Value {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        Ok(match *ty {
            Type::INT8 => Value::Int(i64::from_sql(ty, raw)?),
            Type::INT4 => Value::Int(i32::from_sql(ty, raw)?.into()),
            Type::INT2 => Value::Int(i16::from_sql(ty, raw)?.into()),
            Type::BOOL => Value::Int(bool::from_sql(ty, raw)?.into()),
            _ if <&str as FromSql>::accepts(ty) => Value::Text(<&str>::from_sql(ty, raw)?.into()),
            _ => return Err(format!("a {ty} column, where integers and text are stored").into()),
        })
    }

    fn from_sql_null(_: &Type) -> Result<Self, BoxError> {
        Ok(Value::Null)
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// The error of a failed statement. A FATAL or PANIC error ends the session (the server
/// is shutting down, the backend was terminated): the connection is lost.
fn statement_error(e: postgres::Error) -> CatalogError {
    let Some(db) = e.as_db_error() else {
        return CatalogError::Postgres {
            code: String::new(),
            message: e.to_string(),
        };
    };
    let message = match db.detail() {
        Some(d) => format!("{} ({d})", db.message()),
        None => db.message().to_string(),
    };
    match db.parsed_severity() {
        Some(Severity::Fatal | Severity::Panic) => CatalogError::ConnectionLost { message },
        _ => CatalogError::Postgres {
            code: db.code().code().to_string(),
            message,
        },
    }
}

fn params(args: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    args.iter().map(|a| a as &(dyn ToSql + Sync)).collect()
}

fn rows(rows: Vec<postgres::Row>) -> Result<Vec<Row>> {
    rows.iter()
        .map(|r| {
            (0..r.len())
                .map(|i| {
                    r.try_get::<_, Value>(i).map_err(|e| CatalogError::Decode {
                        what: format!("column {i} ({})", r.columns()[i].name()),
                        message: e.source().map_or(e.to_string(), |s| s.to_string()),
                    })
                })
                .collect::<Result<_>>()
                .map(Row)
        })
        .collect()
}

/// A PostgreSQL database, reached at a `postgresql://` URL.
pub(crate) struct Postgres {
    config: Config,
    /// `None` after the connection was lost: the next call connects again.
    client: Option<Client>,
    /// `HOST:PORT/DB`, for messages (never the password).
    place: String,
    /// When the connection was last used (see [`IDLE_CHECK`]).
    used: Instant,
}

impl Postgres {
    /// Connects to `url` (`postgresql://USER[:PASSWORD]@HOST[:PORT]/DB[?param=value]`, the
    /// libpq URL syntax).
    pub(crate) fn connect(url: &str) -> Result<Self> {
        let mut config: Config = url
            .parse()
            .map_err(|e: postgres::Error| CatalogError::BadUrl(format!("{}: {e}", redact(url))))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        // The client's defaults (2 h idle) would let a vanished server hang a statement for
        // hours; these notice it within about 30 s.
        if config.get_keepalives_idle() == Duration::from_secs(2 * 3600) {
            config.keepalives_idle(Duration::from_secs(15));
            config.keepalives_interval(Duration::from_secs(5));
            config.keepalives_retries(3);
        }
        // Notices (CREATE TABLE IF NOT EXISTS's "already exists, skipping") would go to the
        // client's log at info level: the catalog's own business.
        config.notice_callback(|_| {});
        if config.get_application_name().is_none() {
            config.application_name("cairn");
        }
        let place = {
            let host = match config.get_hosts().first() {
                Some(postgres::config::Host::Tcp(h)) => h.clone(),
                Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
                None => "localhost".into(),
            };
            let port = config.get_ports().first().copied().unwrap_or(5432);
            format!(
                "{host}:{port}/{}",
                config.get_dbname().unwrap_or("(default)")
            )
        };
        let mut pg = Self {
            config,
            client: None,
            place,
            used: Instant::now(),
        };
        pg.live()?;
        Ok(pg)
    }

    /// The connection, checked: one the server closed while we were idle is replaced.
    fn live(&mut self) -> Result<&mut Client> {
        if let Some(c) = &mut self.client
            && (c.is_closed()
                || (self.used.elapsed() >= IDLE_CHECK && c.is_valid(CHECK_TIMEOUT).is_err()))
        {
            self.client = None;
        }
        if self.client.is_none() {
            let c = self
                .config
                .connect(NoTls)
                .map_err(|e| CatalogError::Postgres {
                    code: e.code().map(|c| c.code().to_string()).unwrap_or_default(),
                    message: format!(
                        "cannot connect to {}: {}",
                        self.place,
                        e.source().map_or(e.to_string(), |s| s.to_string())
                    ),
                })?;
            self.client = Some(c);
        }
        self.client
            .as_mut()
            .ok_or_else(|| CatalogError::ConnectionLost {
                message: "no connection".into(),
            })
    }

    /// `err` as the caller sees it: when the connection ended under the statement, it is
    /// dropped (the next call reconnects) and the error is `ConnectionLost`.
    fn failed(&mut self, err: CatalogError) -> CatalogError {
        let closed = self.client.as_ref().is_none_or(Client::is_closed);
        let message = match err {
            CatalogError::ConnectionLost { message } => message,
            CatalogError::Postgres { message, .. } if closed => message,
            other if closed => other.to_string(),
            other => return other,
        };
        self.client = None;
        CatalogError::ConnectionLost {
            message: format!("{}: {message}", self.place),
        }
    }

    fn run<T>(&mut self, op: impl FnOnce(&mut Client) -> Result<T>) -> Result<T> {
        let c = self.live()?;
        let out = op(c).map_err(|e| self.failed(e));
        self.used = Instant::now();
        out
    }
}

/// `url` without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl Exec for Postgres {
    fn execute(&mut self, sql: &str, args: &[Value]) -> Result<u64> {
        self.run(|c| c.execute(sql, &params(args)).map_err(statement_error))
    }

    fn query(&mut self, sql: &str, args: &[Value]) -> Result<Vec<Row>> {
        self.run(|c| rows(c.query(sql, &params(args)).map_err(statement_error)?))
    }

    fn batch(&mut self, sql: &str) -> Result<()> {
        self.run(|c| c.batch_execute(sql).map_err(statement_error))
    }
}

impl Exec for postgres::Transaction<'_> {
    fn execute(&mut self, sql: &str, args: &[Value]) -> Result<u64> {
        postgres::Transaction::execute(self, sql, &params(args)).map_err(statement_error)
    }

    fn query(&mut self, sql: &str, args: &[Value]) -> Result<Vec<Row>> {
        rows(postgres::Transaction::query(self, sql, &params(args)).map_err(statement_error)?)
    }

    fn batch(&mut self, sql: &str) -> Result<()> {
        self.batch_execute(sql).map_err(statement_error)
    }
}

impl Backend for Postgres {
    fn transaction(&mut self, work: &mut dyn FnMut(&mut dyn Exec) -> Result<()>) -> Result<()> {
        self.run(|c| {
            let mut tx = c.transaction().map_err(statement_error)?;
            work(&mut tx)?;
            // Dropping `tx` on an error above rolls it back.
            tx.commit().map_err(statement_error)
        })
    }

    fn schema_lock(&self) -> Option<&'static str> {
        Some(SCHEMA_LOCK)
    }

    fn shared(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        format!("PostgreSQL {}", self.place)
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn a_password_never_reaches_a_message() {
        assert_eq!(
            redact("postgresql://cairn:s3cret@db:5432/catalog"),
            "postgresql://cairn:***@db:5432/catalog"
        );
        assert_eq!(
            redact("postgresql://cairn@db/catalog"),
            "postgresql://cairn@db/catalog"
        );
        assert_eq!(redact("nonsense"), "nonsense");
    }
}
