//! [`ShardStore`] on an embedded SQLite database, for running on one machine.
//!
//! Each shard is one row holding the document's JSON, keyed like a Cosmos item by
//! (tenant, id), beside the few columns read without it: its type, whether it is deleted, when
//! it expires, and its fingerprint (when it was last written and its links, as JSON), which
//! is what a sync reads for every record it is given. WAL journaling with
//! `synchronous=NORMAL` keeps every committed write across a process crash (kill -9); only a
//! power loss can take the last transactions.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params_from_iter, types::Value as SqlValue};
use serde_json::Value;

use super::document;
use super::{
    IdRange, Op, ShardFingerprint, ShardQuery, ShardStore, StoreError, Upsert, Upserts, Versioned,
    Written,
};
use crate::model::Shard;

#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    checkpoints: Arc<Checkpointer>,
}

/// How long the write-ahead log grows (in 4 KiB pages) before the writer checkpoints it itself.
const WRITER_CHECKPOINT_PAGES: u32 = 10_000;

/// Copies the write-ahead log into the database on a thread and connection of its own, so
/// that a sync's writes do not wait for it.
///
/// Left to the connection that writes, SQLite checkpoints in the commit that takes the log
/// past 1,000 pages: one page of a sync in two would wait for 4 MB to be copied and synced.
/// Asked after every batch, this thread does it while the sync goes on (a passive checkpoint
/// waits for no reader or writer); the writer's own checkpoint, at
/// [`WRITER_CHECKPOINT_PAGES`], is the backstop.
struct Checkpointer {
    wake: std::sync::mpsc::SyncSender<()>,
}

impl Checkpointer {
    fn start(path: &Path) -> Self {
        // One request waiting is enough: the checkpoint it starts copies whatever is there.
        let (wake, requests) = std::sync::mpsc::sync_channel::<()>(1);
        let path = path.to_path_buf();
        let spawned = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || {
                let mut conn = None;
                // Ends when the last clone of the store is dropped.
                while requests.recv().is_ok() {
                    if conn.is_none() {
                        // It copies pages from the log without keeping them.
                        conn = Connection::open(&path)
                            .and_then(|c| c.busy_timeout(BUSY_TIMEOUT).map(|()| c))
                            .and_then(|c| c.pragma_update(None, "cache_size", 8).map(|()| c))
                            .inspect_err(
                                |e| tracing::debug!(error = %e, "no checkpoint connection"),
                            )
                            .ok();
                    }
                    if let Some(conn) = &conn
                        && let Err(e) =
                            conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::debug!(error = %e, "checkpoint skipped");
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::debug!(error = %e, "no checkpoint thread: the writer checkpoints");
        }
        Self { wake }
    }

    fn request(&self) {
        let _ = self.wake.try_send(());
    }
}

/// The shards table, after `CREATE TABLE <name>`. A table with rowids: the primary key is an
/// index beside it, so a lookup descends a b-tree of keys and one of integers, never through
/// documents.
///
/// Keys lead with the column that tells them apart (the id; in `shard_keys`, the value): a
/// b-tree descent compares a dozen keys, and a key whose first column is equal in all of them
/// (the tenant) costs each comparison a second, slower step. That was a tenth of a sync's CPU.
const SHARDS_TABLE: &str = "(
    tenant_id     TEXT NOT NULL,
    id            TEXT NOT NULL,
    shard_type_id TEXT NOT NULL,
    deleted       INTEGER NOT NULL,
    etag          TEXT NOT NULL,
    expires       INTEGER,
    fingerprint   TEXT NOT NULL,
    doc           TEXT NOT NULL,
    PRIMARY KEY (id, tenant_id)
)";

const SHARDS_INDEXES: &str =
    "CREATE INDEX IF NOT EXISTS shards_by_type ON shards (shard_type_id, tenant_id);";

/// The match keys table, after `CREATE TABLE <name>`.
const SHARD_KEYS_TABLE: &str = "(
    tenant_id     TEXT NOT NULL,
    shard_type_id TEXT NOT NULL,
    name          TEXT NOT NULL,
    value         TEXT NOT NULL,
    id            TEXT NOT NULL,
    PRIMARY KEY (value, name, shard_type_id, tenant_id, id)
) WITHOUT ROWID";

/// The prefix of the paths whose values [`SqliteStore`] indexes in `shard_keys`: the match keys
/// of deduplication, looked up for every page of a sync. (Cosmos DB indexes every path.)
///
/// A shard's rows in `shard_keys` are exactly the `dedupKeys` of its stored document, so the
/// keys a write replaces are found from the document it replaces ([`FORGET_KEYS`]), and the
/// table needs no second index by shard, which every key would pay for in every write.
const INDEXED_KEYS: &str = "dedupKeys.";

/// How long opening a database waits for another process (an operator command, the runtime)
/// to release it before giving up.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Opens a SQLite database the way every embedded backend wants it: readable by its owner only
/// (it holds contacts' personal data), in WAL mode, waiting for a busy database instead of
/// failing.
///
/// Switching to WAL needs the database to itself, and SQLite does not always wait on its busy
/// handler for that (nor while another process closes the database); since the mode is kept in
/// the file, it is switched only once, and opening retries for as long as the busy timeout.
pub(crate) fn open_database(path: &Path, schema: &str) -> rusqlite::Result<Connection> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    let mut pause = std::time::Duration::from_millis(5);
    let conn = loop {
        match try_open(path, schema) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(200));
            }
            other => break other?,
        }
    };
    // The write-ahead log and its index hold the same data as the database.
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        restrict_to_owner(Path::new(&file)).map_err(|e| {
            rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_PERM),
                Some(format!("{}: {e}", path.display())),
            )
        })?;
    }
    Ok(conn)
}

fn try_open(path: &Path, schema: &str) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = conn.pragma_query_value(None, "journal_mode", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        conn.pragma_update(None, "journal_mode", "WAL")?;
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(schema)?;
    Ok(conn)
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let schema = format!(
            "CREATE TABLE IF NOT EXISTS shards {SHARDS_TABLE};
             {SHARDS_INDEXES}
             CREATE TABLE IF NOT EXISTS shard_keys {SHARD_KEYS_TABLE};"
        );
        let mut conn = open_database(path, &schema).map_err(unavailable)?;
        upgrade(&mut conn).map_err(unavailable)?;
        // The checkpoint thread keeps the log short; the writer checkpoints only if it falls
        // far behind.
        conn.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_PAGES)
            .map_err(unavailable)?;
        let store = Self {
            conn: Arc::new(Mutex::new(conn)),
            checkpoints: Arc::new(Checkpointer::start(path)),
        };
        // Best effort: queries leave expired shards out anyway, and another process may be
        // in a long write right now.
        if let Err(e) = store.purge_expired(chrono::Utc::now()) {
            tracing::debug!(error = %e, "expired shards not purged this time");
        }
        Ok(store)
    }

    /// Deletes the shards whose `ttl` ran out by `now`, as Cosmos DB does in the background.
    /// Queries already leave them out.
    pub fn purge_expired(&self, now: chrono::DateTime<chrono::Utc>) -> Result<usize, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        // A read first, so that opening a store with nothing expired never waits for a lock.
        let any: bool = conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM shards WHERE expires IS NOT NULL AND expires <= ?1)",
                [now.timestamp()],
                |row| row.get(0),
            )
            .map_err(unavailable)?;
        if !any {
            return Ok(0);
        }
        conn.execute(
            "DELETE FROM shard_keys WHERE (tenant_id, shard_type_id, name, value, id) IN
               (SELECT s.tenant_id, s.shard_type_id, k.key, k.value, s.id
                FROM shards AS s, json_each(s.doc, '$.dedupKeys') AS k
                WHERE s.expires IS NOT NULL AND s.expires <= ?1)",
            [now.timestamp()],
        )
        .map_err(unavailable)?;
        conn.execute(
            "DELETE FROM shards WHERE expires IS NOT NULL AND expires <= ?1",
            [now.timestamp()],
        )
        .map_err(unavailable)
    }

    /// Starts the writer of a [`StreamedUpserts`]: a transaction that inserts the batches of
    /// rows it is sent and commits when told to, or writes nothing if its rows stop coming
    /// before that.
    fn writer(&self) -> Writer {
        let (rows, mut batches) = tokio::sync::mpsc::channel::<ToWriter>(BATCHES_IN_FLIGHT);
        let writing = self.with_conn(move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            let mut guards = Guards::default();
            while let Some(message) = batches.blocking_recv() {
                match message {
                    ToWriter::Rows(rows) => {
                        write_all(&tx, rows, &mut guards).map_err(unavailable)?
                    }
                    ToWriter::Commit => {
                        tx.commit().map_err(unavailable)?;
                        let mut raced: Vec<String> = guards.raced.into_iter().collect();
                        raced.sort_unstable();
                        return Ok(raced);
                    }
                }
            }
            Ok(Vec::new())
        });
        (rows, Box::pin(writing))
    }

    /// Runs `f` on a blocking thread, which it is given at once (not when awaited).
    fn with_conn<T, F>(
        &self,
        f: F,
    ) -> impl std::future::Future<Output = Result<T, StoreError>> + use<T, F>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = self.conn.clone();
        let task = tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&mut conn)
        });
        async move {
            task.await
                .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?
        }
    }
}

/// Stores of earlier builds are rebuilt once into the current layout, in one transaction:
/// - shards kept in a `WITHOUT ROWID` table, which puts whole rows, documents and all, in the
///   interior pages of its b-tree too: finding one shard read parts of several others'
///   documents, and a table took four times the space. Nor did they keep fingerprints apart
///   (each is taken from its document), nor, the oldest, expiry times;
/// - keys that began with the tenant (see [`SHARDS_TABLE`]), and match keys that had a second
///   index by shard.
fn upgrade(conn: &mut Connection) -> rusqlite::Result<()> {
    let outdated = |conn: &Connection| -> rusqlite::Result<(bool, bool)> {
        Ok((
            leading_key(conn, "shards")? != "id",
            leading_key(conn, "shard_keys")? != "value",
        ))
    };
    if outdated(conn)? == (false, false) {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    // Another process may have upgraded it while this one waited for the lock.
    let (shards, keys) = outdated(&tx)?;
    if shards {
        let has = |column: &str| -> rusqlite::Result<bool> {
            tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM pragma_table_info('shards') WHERE name = ?1)",
                [column],
                |row| row.get(0),
            )
        };
        let expires = if has("expires")? { "expires" } else { "NULL" };
        let fingerprint = if has("fingerprint")? {
            "fingerprint"
        } else {
            "json_object('updatedAt', json_extract(doc, '$.updatedAt'),
                         'links', json_extract(doc, '$.external_relationships'))"
        };
        tx.execute_batch(&format!(
            "CREATE TABLE shards_upgraded {SHARDS_TABLE};
             INSERT INTO shards_upgraded (tenant_id, id, shard_type_id, deleted, etag, expires, fingerprint, doc)
                 SELECT tenant_id, id, shard_type_id, deleted, etag, {expires}, {fingerprint}, doc
                 FROM shards;
             DROP TABLE shards;
             ALTER TABLE shards_upgraded RENAME TO shards;
             {SHARDS_INDEXES}"
        ))?;
    }
    if keys {
        tx.execute_batch(&format!(
            "CREATE TABLE shard_keys_upgraded {SHARD_KEYS_TABLE};
             INSERT INTO shard_keys_upgraded (tenant_id, shard_type_id, name, value, id)
                 SELECT tenant_id, shard_type_id, name, value, id FROM shard_keys;
             DROP TABLE shard_keys;
             ALTER TABLE shard_keys_upgraded RENAME TO shard_keys;"
        ))?;
    }
    tx.commit()
}

/// The first column of `table`'s primary key.
fn leading_key(conn: &Connection, table: &str) -> rusqlite::Result<String> {
    conn.query_row(
        "SELECT name FROM pragma_table_info(?1) WHERE pk = 1",
        [table],
        |row| row.get(0),
    )
}

fn unavailable(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A fresh etag: unique to this write across processes (a random prefix per process) without
/// asking the system for randomness per write.
fn new_etag() -> String {
    static PREFIX: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| uuid::Uuid::new_v4().simple().to_string()[..16].to_string());
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut etag = String::with_capacity(PREFIX.len() + 16);
    etag.push_str(&PREFIX);
    crate::model::digest::push_hex16(&mut etag, n);
    etag
}

struct Row {
    tenant_id: String,
    id: String,
    shard_type_id: String,
    deleted: bool,
    /// When the shard expires (Unix seconds), if it has a `ttl`.
    expires: Option<i64>,
    doc: String,
    fingerprint: String,
    keys: Vec<(String, String)>,
    /// The etag the stored row must have for this one to replace it, if any.
    if_match: Option<String>,
}

/// The `fingerprint` column: what [`ShardFingerprint`] holds besides `deleted`, in the
/// document's own spelling (so that [`upgrade`] can take it from a document), as
/// [`document::write`] writes it.
#[derive(serde::Deserialize)]
struct StoredFingerprint {
    #[serde(
        rename = "updatedAt",
        default,
        deserialize_with = "crate::model::timestamp::read_opt"
    )]
    updated_at: Option<chrono::DateTime<chrono::Utc>>,
    links: Option<Vec<crate::model::shard::ExternalRelationship>>,
}

/// A shard's id and fingerprint from a row of `id, deleted, fingerprint`.
fn fingerprint_row(row: &rusqlite::Row<'_>) -> Result<(String, ShardFingerprint), StoreError> {
    Ok((row.get(0).map_err(unavailable)?, fingerprint_of(row)?))
}

/// A shard's fingerprint from a row of `id, deleted, fingerprint` (the id read only to name a
/// shard whose fingerprint is unreadable).
fn fingerprint_of(row: &rusqlite::Row<'_>) -> Result<ShardFingerprint, StoreError> {
    let stored: StoredFingerprint = row
        .get_ref(2)
        .map_err(unavailable)?
        .as_str()
        .map_err(|e| e.to_string())
        .and_then(|text| serde_json::from_str(text).map_err(|e| e.to_string()))
        .map_err(|e| {
            let id: String = row.get(0).unwrap_or_default();
            StoreError::Corrupt(format!("shard `{id}`: {e}"))
        })?;
    let mut links = stored.links.unwrap_or_default();
    // Read from JSON, whose arrays do not say their length, one link took room for four; a
    // page's fingerprints are thousands of them.
    links.shrink_to_fit();
    Ok(ShardFingerprint {
        updated_at: stored.updated_at,
        deleted: row.get(1).map_err(unavailable)?,
        links,
    })
}

/// Rows a batch of [`StreamedUpserts`] hands from the encoder to the writer, and how many
/// batches may wait for it: enough that the writer never waits, few enough that a page's
/// documents are not all held at once.
const ROWS_PER_BATCH: usize = 200;
const BATCHES_IN_FLIGHT: usize = 2;

/// What the encoder of [`StreamedUpserts`] hands its writer.
enum ToWriter {
    Rows(Vec<Row>),
    /// Every row is there: commit them.
    Commit,
}

/// A running writer of [`StreamedUpserts`]: where its rows go, and its answer once it stops
/// (the shards it left because they had changed since they were read).
type Writer = (
    tokio::sync::mpsc::Sender<ToWriter>,
    futures_util::future::BoxFuture<'static, Result<Vec<String>, StoreError>>,
);

/// The embedded store's [`Upserts`]: one transaction, whose writer, on a blocking thread,
/// inserts each batch of rows as soon as it is encoded and commits when the write finishes.
///
/// Encoding the documents takes about as long as SQLite takes to write them, and a sync hands
/// over a page's shards in parts as it decides them: the two overlap with each other and with
/// the sync's planning of the next part. A few batches at most wait between encoder and
/// writer, so a page's encoded documents are never all in memory at once. The writer holds
/// the connection from the first shard handed over to the end of the write.
struct StreamedUpserts<'a> {
    store: &'a SqliteStore,
    /// The writer, once it has been handed a shard: where its rows go, and its answer.
    writer: Option<Writer>,
    /// A part could not be written: the write failed as a whole.
    failed: bool,
}

impl StreamedUpserts<'_> {
    /// Stops the writer (it rolls back whatever it wrote) and says why it failed.
    async fn abandon(&mut self, e: Option<StoreError>) -> StoreError {
        self.failed = true;
        let stopped = match self.writer.take() {
            Some((rows, writing)) => {
                drop(rows);
                writing.await.err()
            }
            None => None,
        };
        e.or(stopped)
            .unwrap_or_else(|| StoreError::Unavailable("the shard writer stopped".into()))
    }
}

#[async_trait]
impl Upserts for StreamedUpserts<'_> {
    async fn send(&mut self, writes: &[Upsert<'_>]) -> Result<(), StoreError> {
        if self.failed {
            return Err(StoreError::Unavailable("the write failed earlier".into()));
        }
        for part in writes.chunks(ROWS_PER_BATCH) {
            let rows = match part.iter().map(guarded_row).collect() {
                Ok(rows) => rows,
                // Nothing is written: the caller is told which write failed, and why.
                Err(e) => return Err(self.abandon(Some(e)).await),
            };
            let store = self.store;
            let (writer, _) = self.writer.get_or_insert_with(|| store.writer());
            // Sending fails only when the writer has stopped; it says why.
            if writer.send(ToWriter::Rows(rows)).await.is_err() {
                return Err(self.abandon(None).await);
            }
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<Written, StoreError> {
        if self.failed {
            return Err(StoreError::Unavailable("the write failed earlier".into()));
        }
        let Some((rows, writing)) = self.writer.take() else {
            return Ok(Written::default());
        };
        // A writer that has stopped says why when awaited.
        let _ = rows.send(ToWriter::Commit).await;
        drop(rows);
        let raced = writing.await?;
        self.store.checkpoints.request();
        Ok(Written {
            refused: Vec::new(),
            raced,
        })
    }
}

/// The row of a write of many: the shard encoded, with the etag it must still have.
fn guarded_row(write: &Upsert<'_>) -> Result<Row, StoreError> {
    let mut row = encode(write.shard)?;
    row.if_match = write.if_match.map(str::to_string);
    Ok(row)
}

fn encode(shard: &Shard) -> Result<Row, StoreError> {
    let document::Texts { doc, fingerprint } =
        document::write(shard).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let keys = shard
        .dedup_keys
        .iter()
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    Ok(Row {
        tenant_id: shard.tenant_id.clone(),
        id: shard.id.clone(),
        shard_type_id: shard.shard_type_id.clone(),
        deleted: shard.deleted_at.is_some(),
        // Cosmos DB's per-item `ttl`: seconds from the last write until the item is gone.
        expires: shard
            .ttl
            .filter(|ttl| *ttl > 0)
            .map(|ttl| chrono::Utc::now().timestamp().saturating_add(ttl)),
        doc,
        fingerprint,
        keys,
        if_match: None,
    })
}

/// The statement that deletes the indexed keys of the shard (tenant, id) as it is stored: run
/// before its row is replaced, since the keys are read from its document.
const FORGET_KEYS: &str =
    "DELETE FROM shard_keys WHERE (tenant_id, shard_type_id, name, value, id) IN
    (SELECT s.tenant_id, s.shard_type_id, k.key, k.value, s.id
     FROM shards AS s, json_each(s.doc, '$.dedupKeys') AS k
     WHERE s.tenant_id = ?1 AND s.id = ?2)";

/// [`FORGET_KEYS`] of a shard only while it has the etag `?3`: what a guarded write, which
/// [`UPDATE_IF_MATCH`] then makes, forgets.
const FORGET_KEYS_IF_MATCH: &str =
    "DELETE FROM shard_keys WHERE (tenant_id, shard_type_id, name, value, id) IN
    (SELECT s.tenant_id, s.shard_type_id, k.key, k.value, s.id
     FROM shards AS s, json_each(s.doc, '$.dedupKeys') AS k
     WHERE s.tenant_id = ?1 AND s.id = ?2 AND s.etag = ?3)";

/// Replaces a shard's row only while it has the etag `?7`.
const UPDATE_IF_MATCH: &str = "UPDATE shards SET shard_type_id = ?3, deleted = ?4, etag = ?5, doc = ?6, expires = ?8, fingerprint = ?9
     WHERE tenant_id = ?1 AND id = ?2 AND etag = ?7";

/// Replaces the stored row of `row`'s shard, and its keys, with `row` at `etag`, only while the
/// stored row has the etag `if_match`. Returns whether it did.
fn write_if_match(
    conn: &Connection,
    row: &Row,
    etag: &str,
    if_match: &str,
) -> rusqlite::Result<bool> {
    conn.prepare_cached(FORGET_KEYS_IF_MATCH)?
        .execute(rusqlite::params![row.tenant_id, row.id, if_match])?;
    let updated = conn
        .prepare_cached(UPDATE_IF_MATCH)?
        .execute(rusqlite::params![
            row.tenant_id,
            row.id,
            row.shard_type_id,
            row.deleted,
            etag,
            row.doc,
            if_match,
            row.expires,
            row.fingerprint
        ])?;
    if updated == 1 {
        index_keys(&mut conn.prepare_cached(INDEX_KEY)?, row)?;
    }
    Ok(updated == 1)
}

/// Deletes the indexed keys of the shard `row` is about to replace.
fn forget_keys(conn: &Connection, row: &Row) -> rusqlite::Result<()> {
    conn.prepare_cached(FORGET_KEYS)?
        .execute([&row.tenant_id, &row.id])
        .map(drop)
}

/// The statement that indexes one match key of one shard.
const INDEX_KEY: &str = "INSERT OR IGNORE INTO shard_keys (tenant_id, shard_type_id, name, value, id) VALUES (?1, ?2, ?3, ?4, ?5)";

/// Indexes the keys of one shard (whose old keys are gone) with `insert`, an [`INDEX_KEY`].
fn index_keys(insert: &mut rusqlite::CachedStatement<'_>, row: &Row) -> rusqlite::Result<()> {
    for (name, value) in &row.keys {
        insert.execute(rusqlite::params![
            row.tenant_id,
            row.shard_type_id,
            name,
            value,
            row.id
        ])?;
    }
    Ok(())
}

fn decode(doc: &str, etag: String) -> Result<Versioned<Shard>, StoreError> {
    let value = serde_json::from_str(doc).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(Versioned { value, etag })
}

/// The columns and values of a row's insert, after `INSERT INTO shards` (or `INSERT OR REPLACE`).
const ROW_VALUES: &str = "(tenant_id, id, shard_type_id, deleted, etag, doc, expires, fingerprint) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";

/// Writes one row (`mode` is `INSERT` or `INSERT OR REPLACE`) and its keys, in place of the
/// keys of the row it replaces.
fn write(conn: &Connection, row: &Row, etag: &str, mode: &str) -> rusqlite::Result<usize> {
    forget_keys(conn, row)?;
    let sql = format!("{mode} INTO shards {ROW_VALUES}");
    let written = conn.prepare_cached(&sql)?.execute(rusqlite::params![
        row.tenant_id,
        row.id,
        row.shard_type_id,
        row.deleted,
        etag,
        row.doc,
        row.expires,
        row.fingerprint
    ])?;
    index_keys(&mut conn.prepare_cached(INDEX_KEY)?, row)?;
    Ok(written)
}

/// What the guards of one transaction's rows found so far: a shard handed over again after
/// its guarded write is written as it comes (its etag is the transaction's own now), and one
/// whose guard failed stays unwritten however often it comes.
#[derive(Default)]
struct Guards {
    written: HashSet<String>,
    raced: HashSet<String>,
}

/// Writes a batch of rows, each statement prepared once. A shard is inserted as new first: a
/// shard that has no row has no index keys either, so only one that was there (the insert
/// refused) has its old keys deleted before its row is replaced. A full sync of new records
/// looks up no keys. A row with an etag to match replaces the stored one only if it has it
/// (see [`Guards`]).
fn write_all(conn: &Connection, rows: Vec<Row>, guards: &mut Guards) -> rusqlite::Result<()> {
    let mut create = conn.prepare_cached(&format!("INSERT INTO shards {ROW_VALUES}"))?;
    let mut replace =
        conn.prepare_cached(&format!("INSERT OR REPLACE INTO shards {ROW_VALUES}"))?;
    let mut forget = conn.prepare_cached(FORGET_KEYS)?;
    let mut index_key = conn.prepare_cached(INDEX_KEY)?;
    for row in rows {
        let etag = new_etag();
        if !guards.raced.is_empty() && guards.raced.contains(&row.id) {
            continue;
        }
        if let Some(if_match) = &row.if_match
            && !guards.written.contains(&row.id)
        {
            if write_if_match(conn, &row, &etag, if_match)? {
                guards.written.insert(row.id);
            } else {
                guards.raced.insert(row.id);
            }
            continue;
        }
        let values = rusqlite::params![
            row.tenant_id,
            row.id,
            row.shard_type_id,
            row.deleted,
            etag,
            row.doc,
            row.expires,
            row.fingerprint
        ];
        match create.execute(values) {
            Ok(_) => {}
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                forget.execute([&row.tenant_id, &row.id])?;
                replace.execute(values)?;
            }
            Err(e) => return Err(e),
        }
        index_keys(&mut index_key, &row)?;
    }
    Ok(())
}

fn sql_value(value: &Value) -> SqlValue {
    match value {
        Value::Null => SqlValue::Null,
        Value::Bool(b) => SqlValue::Integer(i64::from(*b)),
        Value::Number(n) => n
            .as_i64()
            .map(SqlValue::Integer)
            .unwrap_or_else(|| SqlValue::Real(n.as_f64().unwrap_or(f64::NAN))),
        Value::String(s) => SqlValue::Text(s.clone()),
        other => SqlValue::Text(other.to_string()),
    }
}

/// The statement and arguments of a query, for shards not expired at `now` (Unix seconds).
fn query_sql(query: &ShardQuery, now: i64) -> Result<(String, Vec<SqlValue>), StoreError> {
    // A lookup by indexed key finds its few shards by their ids: the type's index
    // (`+` keeps SQLite from choosing it) would walk every shard of the type.
    let by_key = query.tenant_id.is_some()
        && query
            .filters
            .iter()
            .any(|f| f.path.as_str().starts_with(INDEXED_KEYS) && matches!(f.op, Op::In | Op::Eq));
    let mut sql = format!(
        "SELECT doc, etag FROM shards WHERE {}shard_type_id = ? AND (expires IS NULL OR expires > ?)",
        if by_key { "+" } else { "" }
    );
    let mut args = vec![
        SqlValue::Text(query.shard_type_id.clone()),
        SqlValue::Integer(now),
    ];
    if let Some(tenant) = &query.tenant_id {
        sql.push_str(" AND tenant_id = ?");
        args.push(SqlValue::Text(tenant.clone()));
    }
    if let Some(element) = &query.element {
        // Field paths are plain identifiers, so they can be spliced in.
        // The values as one JSON array, as for indexed keys below.
        sql.push_str(&format!(
            " AND EXISTS (SELECT 1 FROM json_each(doc, '$.{}') AS element
                          WHERE json_extract(element.value, '$.{}')
                                IN (SELECT value FROM json_each(?)))",
            element.array.as_str(),
            element.field.as_str()
        ));
        args.push(SqlValue::Text(
            serde_json::to_string(&element.values).expect("strings serialize"),
        ));
    }
    if !query.include_deleted {
        sql.push_str(" AND deleted = 0");
    }
    for f in &query.filters {
        let path = f.path.as_str();
        if let (Some(name), Some(tenant), Op::In | Op::Eq) =
            (path.strip_prefix(INDEXED_KEYS), &query.tenant_id, f.op)
        {
            // The keys as one JSON array: a page's thousands of keys make one statement,
            // prepared once, rather than a statement of thousands of parameters per page.
            let values = match &f.value {
                Value::Array(_) => f.value.to_string(),
                one => Value::Array(vec![one.clone()]).to_string(),
            };
            sql.push_str(
                " AND id IN (SELECT k.id FROM json_each(?) AS wanted CROSS JOIN shard_keys AS k
                             WHERE k.tenant_id = ? AND k.shard_type_id = ? AND k.name = ?
                             AND k.value = wanted.value)",
            );
            args.push(SqlValue::Text(values));
            args.push(SqlValue::Text(tenant.clone()));
            args.push(SqlValue::Text(query.shard_type_id.clone()));
            args.push(SqlValue::Text(name.to_string()));
            continue;
        }
        match (f.op, &f.value) {
            (Op::Eq, Value::Null) => {
                sql.push_str(&format!(" AND json_extract(doc, '$.{path}') IS NULL"));
            }
            (Op::In, Value::Array(items)) => {
                let marks = vec!["?"; items.len()].join(", ");
                sql.push_str(&format!(" AND json_extract(doc, '$.{path}') IN ({marks})"));
                args.extend(items.iter().map(sql_value));
            }
            (Op::In, _) => {
                return Err(StoreError::Corrupt(format!("`{path}` IN needs an array")));
            }
            (op, value) => {
                let op = match op {
                    Op::Eq => "=",
                    Op::Le => "<=",
                    _ => ">=",
                };
                sql.push_str(&format!(" AND json_extract(doc, '$.{path}') {op} ?"));
                args.push(sql_value(value));
            }
        }
    }
    if let Some(order) = &query.order_by {
        let direction = if order.descending { "DESC" } else { "ASC" };
        sql.push_str(&format!(
            " ORDER BY json_extract(doc, '$.{}') {direction}, id",
            order.path.as_str()
        ));
    } else {
        // Listings keep one order as shards are rewritten. (`+`: sorted after the
        // lookup, rather than found by walking the tenant's shards in key order.)
        sql.push_str(" ORDER BY +tenant_id, +id");
    }
    if let Some(limit) = query.limit {
        sql.push_str(&format!(" LIMIT {limit}"));
    }
    Ok((sql, args))
}

#[async_trait]
impl ShardStore for SqliteStore {
    async fn get(&self, tenant_id: &str, id: &str) -> Result<Option<Versioned<Shard>>, StoreError> {
        let (tenant_id, id) = (tenant_id.to_string(), id.to_string());
        self.with_conn(move |conn| {
            let row: Option<(String, String)> = conn
                .prepare_cached("SELECT doc, etag FROM shards WHERE tenant_id = ?1 AND id = ?2")
                .map_err(unavailable)?
                .query_row([&tenant_id, &id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                .map_err(unavailable)?;
            row.map(|(doc, etag)| decode(&doc, etag)).transpose()
        })
        .await
    }

    async fn create(&self, shard: &Shard) -> Result<String, StoreError> {
        let row = encode(shard)?;
        self.with_conn(move |conn| {
            let etag = new_etag();
            let tx = conn.transaction().map_err(unavailable)?;
            match write(&tx, &row, &etag, "INSERT").and_then(|_| tx.commit()) {
                Ok(()) => Ok(etag),
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    Err(StoreError::Conflict)
                }
                Err(e) => Err(unavailable(e)),
            }
        })
        .await
    }

    async fn upsert(&self, shard: &Shard) -> Result<String, StoreError> {
        let row = encode(shard)?;
        self.with_conn(move |conn| {
            let etag = new_etag();
            let tx = conn.transaction().map_err(unavailable)?;
            write(&tx, &row, &etag, "INSERT OR REPLACE").map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            Ok(etag)
        })
        .await
    }

    async fn replace(&self, shard: &Shard, if_match: &str) -> Result<String, StoreError> {
        let row = encode(shard)?;
        let if_match = if_match.to_string();
        self.with_conn(move |conn| {
            let etag = new_etag();
            let tx = conn.transaction().map_err(unavailable)?;
            if write_if_match(&tx, &row, &etag, &if_match).map_err(unavailable)? {
                tx.commit().map_err(unavailable)?;
                Ok(etag)
            } else {
                Err(StoreError::PreconditionFailed)
            }
        })
        .await
    }

    /// One statement for all the ids, in one read transaction: a page's shards cost one
    /// lookup of the WAL's read lock instead of one per shard.
    async fn get_many(
        &self,
        tenant_id: &str,
        ids: &[String],
    ) -> Result<Vec<Option<Versioned<Shard>>>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let tenant_id = tenant_id.to_string();
        let wanted = serde_json::to_string(ids).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let asked = ids.len();
        self.with_conn(move |conn| {
            // Each row says where its id is in the list asked (`wanted.key`), so the answer is
            // put in place without the ids copied or looked up again.
            let mut stmt = conn
                .prepare_cached(
                    "SELECT wanted.key, s.doc, s.etag
                     FROM json_each(?2) AS wanted CROSS JOIN shards AS s
                     WHERE s.tenant_id = ?1 AND s.id = wanted.value",
                )
                .map_err(unavailable)?;
            let mut found: Vec<Option<Versioned<Shard>>> = (0..asked).map(|_| None).collect();
            let mut rows = stmt.query([&tenant_id, &wanted]).map_err(unavailable)?;
            while let Some(row) = rows.next().map_err(unavailable)? {
                let at: usize = row.get(0).map_err(unavailable)?;
                let doc = row.get_ref(1).map_err(unavailable)?;
                let doc = doc
                    .as_str()
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                found[at] = Some(decode(doc, row.get(2).map_err(unavailable)?)?);
            }
            Ok(found)
        })
        .await
    }

    /// Read from the fingerprint column, without the documents.
    async fn fingerprints(
        &self,
        tenant_id: &str,
        ids: &[String],
    ) -> Result<Vec<Option<ShardFingerprint>>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let tenant_id = tenant_id.to_string();
        let wanted = serde_json::to_string(ids).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let asked = ids.len();
        self.with_conn(move |conn| {
            // As in `get_many`, each answer is put where its id was asked.
            let mut stmt = conn
                .prepare_cached(
                    "SELECT s.id, s.deleted, s.fingerprint, wanted.key
                     FROM json_each(?2) AS wanted CROSS JOIN shards AS s
                     WHERE s.tenant_id = ?1 AND s.id = wanted.value",
                )
                .map_err(unavailable)?;
            let mut found: Vec<Option<ShardFingerprint>> = (0..asked).map(|_| None).collect();
            let mut rows = stmt.query([&tenant_id, &wanted]).map_err(unavailable)?;
            while let Some(row) = rows.next().map_err(unavailable)? {
                let at: usize = row.get(3).map_err(unavailable)?;
                found[at] = Some(fingerprint_of(row)?);
            }
            Ok(found)
        })
        .await
    }

    /// A range scan of the ids' index, from the prefix (or the id after which the page
    /// starts) to where the prefix ends.
    async fn fingerprints_by_prefix(
        &self,
        tenant_id: &str,
        shard_type_id: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, ShardFingerprint)>, StoreError> {
        let range = IdRange::of(prefix, after);
        let sql = format!(
            "SELECT id, deleted, fingerprint FROM shards
             WHERE id {} ?1 {} AND tenant_id = ?3 AND +shard_type_id = ?4 AND deleted = 0
             AND (expires IS NULL OR expires > ?5)
             ORDER BY id LIMIT ?6",
            range.from_op,
            if range.end.is_some() {
                "AND id < ?2"
            } else {
                "AND ?2 IS NULL"
            }
        );
        let prefix = prefix.to_string();
        let args = (
            range.from,
            range.end,
            tenant_id.to_string(),
            shard_type_id.to_string(),
            chrono::Utc::now().timestamp(),
            i64::try_from(limit).unwrap_or(i64::MAX),
        );
        self.with_conn(move |conn| {
            let mut stmt = conn.prepare_cached(&sql).map_err(unavailable)?;
            let mut rows = stmt.query(args).map_err(unavailable)?;
            let mut found = Vec::new();
            while let Some(row) = rows.next().map_err(unavailable)? {
                let (id, fingerprint) = fingerprint_row(row)?;
                // The ids that begin with the prefix are one run in id order (the end of the
                // range says where it stops, but for a prefix that has no end).
                if !id.starts_with(&prefix) {
                    break;
                }
                found.push((id, fingerprint));
            }
            Ok(found)
        })
        .await
    }

    fn upserts(&self) -> Box<dyn Upserts + '_> {
        Box::new(StreamedUpserts {
            store: self,
            writer: None,
            failed: false,
        })
    }

    async fn upsert_many(&self, writes: &[Upsert<'_>]) -> Result<Written, StoreError> {
        let mut upserts = self.upserts();
        upserts.send(writes).await?;
        upserts.finish().await
    }

    async fn query(&self, query: &ShardQuery) -> Result<Vec<Versioned<Shard>>, StoreError> {
        let (sql, args) = query_sql(query, chrono::Utc::now().timestamp())?;
        self.with_conn(move |conn| {
            let mut stmt = conn.prepare_cached(&sql).map_err(unavailable)?;
            let rows = stmt
                .query_map(params_from_iter(args), |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })
                .map_err(unavailable)?;
            rows.map(|row| {
                let (doc, etag) = row.map_err(unavailable)?;
                decode(&doc, etag)
            })
            .collect()
        })
        .await
    }
}

/// Makes an existing file readable and writable by its owner only; a missing one is left
/// alone. It works by path and never opens the file: closing any descriptor of a SQLite
/// database drops every lock this process holds on it (POSIX locks belong to the process), which
/// would break the connections already open.
pub fn restrict_to_owner(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::dedup::DedupKeys;
    use crate::model::timestamp;
    use chrono::{TimeZone, Utc};
    use serde_json::json;

    /// Writes `shards` whatever is stored, asserting that none was left.
    async fn write_every(store: &SqliteStore, shards: &[Shard]) {
        let left = store.upsert_many(&Upsert::every(shards)).await.unwrap();
        assert!(left.is_empty(), "{left:?}");
    }

    fn shard(tenant: &str, id: &str, data: Value) -> Shard {
        serde_json::from_value(json!({
            "id": id, "tenantId": tenant, "shardTypeId": "c_integration", "name": id,
            "structuredData": data
        }))
        .unwrap()
    }

    /// The match keys of a contact with `email`.
    fn email_key(email: &str) -> DedupKeys {
        [("email_exact".to_string(), email.to_string())].into()
    }

    /// A contact of `tenant` with `email`, its match key.
    fn contact(tenant: &str, id: &str, email: &str) -> Shard {
        let mut s = shard(tenant, id, json!({"email": email}));
        s.shard_type_id = "c_contact".into();
        s.dedup_keys = email_key(email);
        s
    }

    /// How many of `tenant`'s contacts the store finds by the match key `email`.
    async fn found_by_email(store: &SqliteStore, tenant: &str, email: &str) -> usize {
        let query = ShardQuery::of_type("c_contact").in_tenant(tenant).filter(
            "dedupKeys.email_exact",
            Op::In,
            json!([email]),
        );
        store.query(&query).await.unwrap().len()
    }

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("store.db")).unwrap();
        (dir, store)
    }

    #[test]
    fn a_stored_document_is_the_text_the_shard_serializes_to() {
        let full: Shard = serde_json::from_value(json!({
            "id": "int-1~Contact~003", "tenantId": "t1", "shardTypeId": "c_contact",
            "name": "Ann \"A\" Lee", "structuredData": {"email": "ann@x.test", "n": [1, 2.5, null]},
            "relationships": [{"type": "derived_from", "targetId": "s1", "targetType": "c_company"}],
            "external_relationships": [
                {"integrationId": "int-1", "externalId": "003", "syncStatus": "synced",
                 "lastSyncedAt": "2026-12-03T09:05:07.250Z", "syncDirection": "bidirectional",
                 "version": "v7", "fieldHashes": {"email": "ab12"}, "recordHash": "cd34"},
                {"integrationId": "int-2", "externalId": "x/y", "syncStatus": "deleted",
                 "syncDirection": "inbound"}
            ],
            "createdAt": "2026-12-01T00:00:00Z", "createdBy": "system",
            "updatedAt": "2026-12-03T09:05:07.000000001Z", "deletedAt": "2026-12-03T10:00:00Z",
            "contentHash": "0123456789abcdef", "dedupKeys": {"email_exact": "ann@x.test"},
            "ttl": 3600, "owner": {"team": "sales"}, "zeta": 1
        }))
        .unwrap();
        let bare = shard("t1", "a", json!({}));
        for shard in [full, bare] {
            let row = encode(&shard).unwrap();
            assert_eq!(row.doc, serde_json::to_string(&shard).unwrap());
            let fingerprint: Value = serde_json::from_str(&row.fingerprint).unwrap();
            assert_eq!(
                fingerprint,
                json!({
                    "updatedAt": serde_json::to_value(&shard).unwrap()["updatedAt"],
                    "links": serde_json::to_value(&shard.external_relationships).unwrap()
                })
            );
        }
    }

    #[test]
    fn etags_are_the_process_prefix_and_a_count_in_hex() {
        let (first, second) = (new_etag(), new_etag());
        assert_eq!(first.len(), 32);
        assert_eq!(first[..16], second[..16]);
        let count = |etag: &str| u64::from_str_radix(&etag[16..], 16).unwrap();
        assert!(count(&second) > count(&first));
        assert!(
            first[16..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
    }

    #[tokio::test]
    async fn writes_are_guarded_by_etags() {
        let (_dir, store) = store();
        let s = shard("t1", "a", json!({"n": 1}));
        let etag = store.create(&s).await.unwrap();
        assert!(matches!(store.create(&s).await, Err(StoreError::Conflict)));

        let read = store.get("t1", "a").await.unwrap().unwrap();
        assert_eq!(read.etag, etag);
        assert_eq!(read.value, s);

        let mut changed = s.clone();
        changed.structured_data = json!({"n": 2});
        let new_etag = store.replace(&changed, &etag).await.unwrap();
        assert!(matches!(
            store.replace(&changed, &etag).await,
            Err(StoreError::PreconditionFailed)
        ));
        assert_eq!(store.get("t1", "a").await.unwrap().unwrap().etag, new_etag);
        assert!(
            store.get("t2", "a").await.unwrap().is_none(),
            "tenants are separate"
        );
    }

    #[tokio::test]
    async fn queries_filter_order_and_limit() {
        let (_dir, store) = store();
        let t = |m| Utc.with_ymd_and_hms(2026, 1, 1, 10, m, 0).unwrap();
        for (tenant, id, minute, status) in [
            ("t1", "a", 5, "active"),
            ("t1", "b", 1, "active"),
            ("t2", "c", 3, "active"),
            ("t1", "d", 2, "paused"),
            ("t1", "e", 30, "active"),
        ] {
            let data = json!({"nextSyncAt": timestamp::format(&t(minute)), "status": status});
            store.upsert(&shard(tenant, id, data)).await.unwrap();
        }
        let due = ShardQuery::of_type("c_integration")
            .filter("structuredData.status", Op::Eq, json!("active"))
            .filter(
                "structuredData.nextSyncAt",
                Op::Le,
                timestamp::query_value(&t(10)),
            )
            .order_by("structuredData.nextSyncAt", false);
        let ids: Vec<_> = store
            .query(&due)
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.value.id)
            .collect();
        assert_eq!(ids, ["b", "c", "a"]);

        let one_tenant = due.clone().in_tenant("t1").limit(1);
        let ids: Vec<_> = store
            .query(&one_tenant)
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.value.id)
            .collect();
        assert_eq!(ids, ["b"]);
    }

    #[tokio::test]
    async fn shards_are_found_by_external_id() {
        let (_dir, store) = store();
        for (id, external) in [("a", "001A"), ("b", "001B")] {
            let mut s = shard("t1", id, json!({}));
            s.shard_type_id = "c_company".into();
            s.external_relationships = vec![crate::model::shard::ExternalRelationship::synced(
                "int-1",
                external,
                crate::model::shard::SyncDirection::Inbound,
                Utc::now(),
            )];
            store.upsert(&s).await.unwrap();
        }
        let q = ShardQuery::of_type("c_company")
            .in_tenant("t1")
            .with_external_id("001B");
        let found = store.query(&q).await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].value.id, "b");

        let any_of = |external: &[&str]| {
            ShardQuery::of_type("c_company")
                .in_tenant("t1")
                .with_external_ids(external.iter().map(|e| e.to_string()).collect())
        };
        let mut ids: Vec<String> = store
            .query(&any_of(&["001A", "001B", "001Z"]))
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.value.id)
            .collect();
        ids.sort();
        assert_eq!(ids, ["a", "b"]);
        assert!(store.query(&any_of(&["001Z"])).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn indexed_match_keys_follow_their_shards() {
        let (_dir, store) = store();
        let mut s = contact("t1", "a", "ann@x.test");
        store.upsert(&s).await.unwrap();
        assert_eq!(found_by_email(&store, "t1", "ann@x.test").await, 1);
        s.dedup_keys = email_key("ann@y.test");
        store.upsert(&s).await.unwrap();
        assert_eq!(
            found_by_email(&store, "t1", "ann@x.test").await,
            0,
            "old key dropped"
        );
        assert_eq!(found_by_email(&store, "t1", "ann@y.test").await, 1);
        assert_eq!(found_by_email(&store, "t2", "ann@y.test").await, 0);

        // A replacement refused for its etag keeps the keys; one made takes its own.
        let etag = store.get("t1", "a").await.unwrap().unwrap().etag;
        s.dedup_keys = email_key("ann@z.test");
        assert!(matches!(
            store.replace(&s, "stale").await,
            Err(StoreError::PreconditionFailed)
        ));
        assert_eq!(found_by_email(&store, "t1", "ann@y.test").await, 1);
        store.replace(&s, &etag).await.unwrap();
        assert_eq!(found_by_email(&store, "t1", "ann@y.test").await, 0);
        assert_eq!(found_by_email(&store, "t1", "ann@z.test").await, 1);

        // So does a page of writes, beside a shard written for the first time.
        s.dedup_keys = email_key("ann@w.test");
        store
            .upsert_many(&Upsert::every(&[
                s.clone(),
                contact("t1", "b", "bo@x.test"),
            ]))
            .await
            .unwrap();
        assert_eq!(found_by_email(&store, "t1", "ann@z.test").await, 0);
        assert_eq!(found_by_email(&store, "t1", "ann@w.test").await, 1);
        assert_eq!(found_by_email(&store, "t1", "bo@x.test").await, 1);
    }

    #[tokio::test]
    async fn a_lookup_by_more_match_keys_than_a_statement_takes_parameters_finds_its_shards() {
        let (_dir, store) = store();
        store
            .upsert(&contact("t1", "a", "ann@x.test"))
            .await
            .unwrap();
        // SQLite refuses a statement of more than 32,766 parameters.
        let mut keys: Vec<Value> = (0..40_000).map(|i| json!(format!("c{i}@x.test"))).collect();
        keys.push(json!("ann@x.test"));
        let query = ShardQuery::of_type("c_contact").in_tenant("t1").filter(
            "dedupKeys.email_exact",
            Op::In,
            Value::Array(keys),
        );
        let found = store.query(&query).await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].value.id, "a");
    }

    #[tokio::test]
    async fn a_page_of_many_batches_is_written_whole() {
        let (_dir, store) = store();
        let page: Vec<Shard> = (0..ROWS_PER_BATCH * (BATCHES_IN_FLIGHT + 3) + 7)
            .map(|i| shard("t1", &format!("s{i:05}"), json!({"n": i})))
            .collect();
        write_every(&store, &page).await;
        let ids: Vec<String> = page.iter().map(|s| s.id.clone()).collect();
        let read = store.get_many("t1", &ids).await.unwrap();
        assert!(
            read.iter()
                .zip(&page)
                .all(|(read, written)| read.as_ref().map(|r| &r.value) == Some(written)),
            "every shard of the page, as written"
        );
    }

    #[tokio::test]
    async fn a_write_handed_over_in_parts_is_committed_whole_when_it_finishes() {
        let (_dir, store) = store();
        let ann = contact("t1", "a", "ann@x.test");
        let bo = contact("t1", "b", "bo@x.test");
        let mut upserts = store.upserts();
        upserts
            .send(&[Upsert::any(&ann), Upsert::any(&bo)])
            .await
            .unwrap();
        // The second part changes a shard of the first: its last version is the one kept,
        // with the keys of that version only.
        let mut ann_again = contact("t1", "a", "ann@y.test");
        ann_again.name = "Ann".into();
        let cy = contact("t1", "c", "cy@x.test");
        upserts
            .send(&[Upsert::any(&ann_again), Upsert::any(&cy)])
            .await
            .unwrap();
        assert!(upserts.finish().await.unwrap().is_empty());

        assert_eq!(
            store.get("t1", "a").await.unwrap().unwrap().value,
            ann_again
        );
        assert!(store.get("t1", "c").await.unwrap().is_some());
        assert_eq!(found_by_email(&store, "t1", "ann@x.test").await, 0);
        assert_eq!(found_by_email(&store, "t1", "ann@y.test").await, 1);
        assert_eq!(found_by_email(&store, "t1", "bo@x.test").await, 1);
    }

    #[tokio::test]
    async fn a_guarded_write_leaves_a_shard_written_since_it_was_read_however_often_it_comes() {
        let (_dir, store) = store();
        let read = [
            contact("t1", "a", "ann@x.test"),
            contact("t1", "b", "bo@x.test"),
        ];
        write_every(&store, &read).await;
        let etag = |id: &'static str| {
            let store = store.clone();
            async move { store.get("t1", id).await.unwrap().unwrap().etag }
        };
        let (a, b) = (etag("a").await, etag("b").await);
        store
            .upsert(&contact("t1", "b", "bo@elsewhere.test"))
            .await
            .unwrap();

        let (ann, bo) = (
            contact("t1", "a", "ann@new.test"),
            contact("t1", "b", "bo@new.test"),
        );
        let ann_again = contact("t1", "a", "ann@newer.test");
        let guarded = |shard, etag| Upsert {
            shard,
            if_match: Some(etag),
        };
        let mut upserts = store.upserts();
        upserts
            .send(&[guarded(&ann, &a), guarded(&bo, &b)])
            .await
            .unwrap();
        // Handed over again in a later part, as a sync lands a shard twice in one page.
        upserts
            .send(&[guarded(&ann_again, &a), guarded(&bo, &b)])
            .await
            .unwrap();
        let written = upserts.finish().await.unwrap();

        assert_eq!(written.raced, ["b"]);
        assert_eq!(found_by_email(&store, "t1", "ann@newer.test").await, 1);
        assert_eq!(found_by_email(&store, "t1", "ann@new.test").await, 0);
        assert_eq!(found_by_email(&store, "t1", "ann@x.test").await, 0);
        assert_eq!(found_by_email(&store, "t1", "bo@elsewhere.test").await, 1);
        assert_eq!(found_by_email(&store, "t1", "bo@new.test").await, 0);
    }

    #[tokio::test]
    async fn a_write_dropped_before_it_finishes_writes_nothing() {
        let (_dir, store) = store();
        let ann = contact("t1", "a", "ann@x.test");
        let mut upserts = store.upserts();
        upserts.send(&[Upsert::any(&ann)]).await.unwrap();
        drop(upserts);

        assert!(store.get("t1", "a").await.unwrap().is_none());
        assert_eq!(found_by_email(&store, "t1", "ann@x.test").await, 0);
        // The store is free for the next write.
        store.upsert(&ann).await.unwrap();
        assert_eq!(found_by_email(&store, "t1", "ann@x.test").await, 1);
    }

    #[tokio::test]
    async fn pages_of_shards_are_written_read_and_fingerprinted_together() {
        let (_dir, store) = store();
        let contact = |tenant: &str, id: &str, email: &str| {
            let mut s = contact(tenant, id, email);
            s.updated_at = Some(Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap());
            s.external_relationships = vec![crate::model::shard::ExternalRelationship::synced(
                "int-1",
                id,
                crate::model::shard::SyncDirection::Inbound,
                Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap(),
            )];
            s
        };
        let page = [
            contact("t1", "a", "ann@x.test"),
            contact("t1", "b", "bo@x.test"),
            contact("t2", "a", "ann@x.test"),
        ];
        write_every(&store, &page).await;
        let again = [
            contact("t1", "a", "ann@y.test"),
            contact("t2", "a", "ann@x.test"),
        ];
        write_every(&store, &again).await;

        assert_eq!(
            found_by_email(&store, "t1", "ann@x.test").await,
            0,
            "old key dropped"
        );
        assert_eq!(found_by_email(&store, "t1", "ann@y.test").await, 1);
        assert_eq!(found_by_email(&store, "t2", "ann@x.test").await, 1);

        let ids = ["b".to_string(), "missing".to_string(), "a".to_string()];
        let read = store.get_many("t1", &ids).await.unwrap();
        let read_ids: Vec<Option<&str>> = read
            .iter()
            .map(|r| r.as_ref().map(|v| v.value.id.as_str()))
            .collect();
        assert_eq!(read_ids, [Some("b"), None, Some("a")], "in the order asked");
        assert_ne!(
            read[0].as_ref().unwrap().etag,
            read[2].as_ref().unwrap().etag
        );
        assert_eq!(read[2].as_ref().unwrap().value, again[0]);

        let fingerprints = store.fingerprints("t1", &ids).await.unwrap();
        assert_eq!(
            fingerprints,
            read.iter()
                .map(|r| r.as_ref().map(|v| ShardFingerprint::of(&v.value)))
                .collect::<Vec<_>>(),
            "the fingerprint the shard itself gives"
        );
        assert!(fingerprints[0].as_ref().unwrap().updated_at.is_some());
    }

    #[tokio::test]
    async fn an_entitys_live_shards_are_read_in_pages_of_fingerprints_in_id_order() {
        let (_dir, store) = store();
        let mut shards: Vec<Shard> = ["d", "a", "b", "c"]
            .iter()
            .map(|k| contact("t1", &format!("int-1~Contact~{k}"), &format!("{k}@x.test")))
            .collect();
        shards[2].deleted_at = Some(Utc::now());
        shards.push(contact("t2", "int-1~Contact~a", "a@x.test"));
        shards.push(contact("t1", "int-1~Contacts~a", "a@x.test"));
        shards.push(contact("t1", "int-1~Contact", "a@x.test"));
        let mut company = contact("t1", "int-1~Contact~e", "e@x.test");
        company.shard_type_id = "c_company".into();
        shards.push(company);
        write_every(&store, &shards).await;

        let prefix = "int-1~Contact~";
        let mut pages = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = store
                .fingerprints_by_prefix("t1", "c_contact", prefix, after.as_deref(), 2)
                .await
                .unwrap();
            if page.is_empty() {
                break;
            }
            after = page.last().map(|(id, _)| id.clone());
            pages.push(page.into_iter().map(|(id, _)| id).collect::<Vec<_>>());
        }
        assert_eq!(
            pages,
            [
                vec!["int-1~Contact~a", "int-1~Contact~c"],
                vec!["int-1~Contact~d"]
            ],
            "live, of the tenant, the type and the prefix only"
        );
        let first = store
            .fingerprints_by_prefix("t1", "c_contact", prefix, None, 1)
            .await
            .unwrap();
        let read = store.get("t1", "int-1~Contact~a").await.unwrap().unwrap();
        assert_eq!(first[0].1, ShardFingerprint::of(&read.value));

        // A prefix with no end (its last character is the last there is) stops all the same.
        let endless = "z\u{10ffff}";
        let later: Vec<Shard> = ["z\u{10ffff}1", "z\u{10ffff}2", "\u{10ffff}"]
            .iter()
            .map(|id| contact("t1", id, "z@x.test"))
            .collect();
        write_every(&store, &later).await;
        let found = store
            .fingerprints_by_prefix("t1", "c_contact", endless, None, 10)
            .await
            .unwrap();
        let ids: Vec<&str> = found.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["z\u{10ffff}1", "z\u{10ffff}2"]);
    }

    #[tokio::test]
    async fn a_store_of_the_earlier_layout_is_upgraded_with_its_shards_fingerprinted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let mut linked = shard("t1", "a", json!({"name": "Acme"}));
        linked.updated_at = Some(Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap());
        let mut link = crate::model::shard::ExternalRelationship::synced(
            "int-1",
            "001A",
            crate::model::shard::SyncDirection::Inbound,
            Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap(),
        );
        link.record_hash = Some("5f2c".into());
        linked.external_relationships = vec![link];
        let mut bare = shard("t1", "b", json!({}));
        bare.deleted_at = Some(Utc::now());
        let page = [linked, bare];
        {
            // The layout a store of an earlier build has: no rowids, no fingerprints, and (the
            // oldest) no expiry times.
            let old = Connection::open(&path).unwrap();
            old.execute_batch(
                "CREATE TABLE shards (
                     tenant_id TEXT NOT NULL, id TEXT NOT NULL, shard_type_id TEXT NOT NULL,
                     deleted INTEGER NOT NULL, etag TEXT NOT NULL, doc TEXT NOT NULL,
                     PRIMARY KEY (tenant_id, id)
                 ) WITHOUT ROWID;
                 CREATE INDEX shards_by_type ON shards (shard_type_id, tenant_id);",
            )
            .unwrap();
            for s in &page {
                old.execute(
                    "INSERT INTO shards VALUES (?1, ?2, ?3, ?4, 'etag-1', ?5)",
                    rusqlite::params![
                        s.tenant_id,
                        s.id,
                        s.shard_type_id,
                        s.deleted_at.is_some(),
                        serde_json::to_string(s).unwrap()
                    ],
                )
                .unwrap();
            }
        }

        let store = SqliteStore::open(&path).unwrap();
        let ids = ["a".to_string(), "b".to_string(), "c".to_string()];
        assert_eq!(
            store.fingerprints("t1", &ids).await.unwrap(),
            [
                Some(ShardFingerprint::of(&page[0])),
                Some(ShardFingerprint::of(&page[1])),
                None
            ]
        );
        let kept = store.get("t1", "a").await.unwrap().unwrap();
        assert_eq!(
            (kept.value, kept.etag.as_str()),
            (page[0].clone(), "etag-1")
        );
        let mut query = ShardQuery::of_type(&page[0].shard_type_id);
        query.include_deleted = true;
        assert_eq!(store.query(&query).await.unwrap().len(), 2);
        let layout: String = Connection::open(&path)
            .unwrap()
            .query_row(
                "SELECT sql FROM sqlite_master WHERE name = 'shards'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert!(!layout.contains("WITHOUT ROWID"), "{layout}");
        drop(store);
        SqliteStore::open(&path).expect("an upgraded store opens as it is");
    }

    #[tokio::test]
    async fn an_expired_shard_is_purged_with_its_match_keys() {
        let (_dir, store) = store();
        let mut s = contact("t1", "a", "ann@x.test");
        s.ttl = Some(60);
        store
            .upsert_many(&Upsert::every(&[s, contact("t1", "b", "bo@x.test")]))
            .await
            .unwrap();
        let later = Utc::now() + chrono::Duration::minutes(2);
        assert_eq!(store.purge_expired(later).unwrap(), 1);
        let keys: Vec<String> = store
            .conn
            .lock()
            .unwrap()
            .prepare("SELECT value FROM shard_keys")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(keys, ["bo@x.test"]);
    }

    #[tokio::test]
    async fn a_store_keyed_by_tenant_first_is_rebuilt_keyed_by_what_tells_keys_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let mut ann = contact("t1", "a", "ann@x.test");
        ann.ttl = Some(3600);
        {
            // The layout of the build before: keys led by the tenant, and the match keys
            // indexed a second time by shard.
            let old = Connection::open(&path).unwrap();
            old.execute_batch(
                "CREATE TABLE shards (
                     tenant_id TEXT NOT NULL, id TEXT NOT NULL, shard_type_id TEXT NOT NULL,
                     deleted INTEGER NOT NULL, etag TEXT NOT NULL, expires INTEGER,
                     fingerprint TEXT NOT NULL, doc TEXT NOT NULL,
                     PRIMARY KEY (tenant_id, id)
                 );
                 CREATE INDEX shards_by_type ON shards (shard_type_id, tenant_id);
                 CREATE TABLE shard_keys (
                     tenant_id TEXT NOT NULL, shard_type_id TEXT NOT NULL, name TEXT NOT NULL,
                     value TEXT NOT NULL, id TEXT NOT NULL,
                     PRIMARY KEY (tenant_id, shard_type_id, name, value, id)
                 ) WITHOUT ROWID;
                 CREATE INDEX shard_keys_by_shard ON shard_keys (tenant_id, id);",
            )
            .unwrap();
            let row = encode(&ann).unwrap();
            old.execute(
                "INSERT INTO shards VALUES ('t1', 'a', 'c_contact', 0, 'etag-1', ?1, ?2, ?3)",
                rusqlite::params![row.expires, row.fingerprint, row.doc],
            )
            .unwrap();
            old.execute(
                "INSERT INTO shard_keys VALUES ('t1', 'c_contact', 'email_exact', 'ann@x.test', 'a')",
                [],
            )
            .unwrap();
        }

        let store = SqliteStore::open(&path).unwrap();
        {
            let conn = store.conn.lock().unwrap();
            assert_eq!(leading_key(&conn, "shards").unwrap(), "id");
            assert_eq!(leading_key(&conn, "shard_keys").unwrap(), "value");
            let second_index: bool = conn
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'shard_keys_by_shard')",
                    [],
                    |row| row.get(0),
                )
                .unwrap();
            assert!(!second_index, "match keys are indexed once");
            let expires: Option<i64> = conn
                .query_row("SELECT expires FROM shards", [], |row| row.get(0))
                .unwrap();
            assert!(expires.is_some(), "expiry times are kept");
        }
        let kept = store.get("t1", "a").await.unwrap().unwrap();
        assert_eq!((kept.value, kept.etag.as_str()), (ann.clone(), "etag-1"));
        assert_eq!(
            store.fingerprints("t1", &["a".to_string()]).await.unwrap(),
            [Some(ShardFingerprint::of(&ann))]
        );
        assert_eq!(found_by_email(&store, "t1", "ann@x.test").await, 1);
        ann.dedup_keys = email_key("ann@y.test");
        store.upsert(&ann).await.unwrap();
        assert_eq!(found_by_email(&store, "t1", "ann@x.test").await, 0);
        assert_eq!(found_by_email(&store, "t1", "ann@y.test").await, 1);
        drop(store);
        SqliteStore::open(&path).expect("an upgraded store opens as it is");
    }

    #[test]
    fn a_lookup_by_match_key_reads_its_shards_by_id_not_every_shard_of_the_type() {
        let (_dir, store) = store();
        let plan = |query: &ShardQuery| -> String {
            let (sql, args) = query_sql(query, 0).unwrap();
            let conn = store.conn.lock().unwrap();
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            stmt.query_map(params_from_iter(args), |row| row.get::<_, String>(3))
                .unwrap()
                .map(Result::unwrap)
                .collect::<Vec<_>>()
                .join("; ")
        };
        let by_key = ShardQuery::of_type("c_contact").in_tenant("t1").filter(
            "dedupKeys.email_exact",
            Op::In,
            json!(["ann@x.test", "bo@x.test"]),
        );
        let found = plan(&by_key);
        assert!(!found.contains("shards_by_type"), "{found}");
        assert!(found.contains("(id=? AND tenant_id=?)"), "{found}");

        let listing = plan(&ShardQuery::of_type("c_contact").in_tenant("t1"));
        assert!(listing.contains("shards_by_type"), "{listing}");
    }

    #[tokio::test]
    async fn soft_deleted_shards_are_left_out_unless_asked_for() {
        let (_dir, store) = store();
        let mut s = shard("t1", "a", json!({}));
        s.deleted_at = Some(Utc::now());
        store.upsert(&s).await.unwrap();
        let mut q = ShardQuery::of_type("c_integration");
        assert!(store.query(&q).await.unwrap().is_empty());
        q.include_deleted = true;
        assert_eq!(store.query(&q).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn shards_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        SqliteStore::open(&path)
            .unwrap()
            .upsert(&shard("t1", "a", json!({"kept": true})))
            .await
            .unwrap();
        let reopened = SqliteStore::open(&path).unwrap();
        let read = reopened.get("t1", "a").await.unwrap().unwrap();
        assert_eq!(read.value.structured_data, json!({"kept": true}));
    }
}
