//! Bulk imports: CSV and JSON Lines exports dropped in a folder.
//!
//! An entity is a family of files named after it: `accounts.csv`, `accounts-2026-11-22.jsonl`,
//! `accounts_02.csv` all belong to entity `accounts`, read plain name first, then in name
//! order. Each record has an id column (`idColumn`, default `id`), optionally a modified column
//! (`modifiedColumn`, default `modified_at`, RFC 3339) and a tombstone column (`deletedColumn`,
//! default `_deleted`) whose true value (`true`, `1`, `yes`) means the record was deleted.
//!
//! Incremental by file and by record: the cursor is the latest modified time synced, and the
//! files read whole since then with their length and last-write time (`ImportCursor`). A
//! file the cursor read as it is now, or last written before its time, cannot hold a change
//! and is not opened; in the other files, records modified before the time are skipped. An
//! export whose records all share one modified time is so read once, not by every sync after
//! it. A page token is the file and the byte offset of the next record, so a resumed sync
//! seeks instead of re-reading, unless the file was written again meanwhile.
//!
//! Connection settings: `path` (the folder), and the three column names above.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::{Connection, ErrorCode, FetchRequest, Page, Provider, ProviderError, Pull, Record};

#[derive(Default)]
pub struct BulkImport;

impl BulkImport {
    pub fn new() -> Self {
        Self
    }
}

struct Columns {
    id: String,
    modified: String,
    deleted: String,
}

impl Columns {
    fn of(conn: &Connection) -> Self {
        Self {
            id: conn.setting("idColumn").unwrap_or("id").to_string(),
            modified: conn
                .setting("modifiedColumn")
                .unwrap_or("modified_at")
                .to_string(),
            deleted: conn
                .setting("deletedColumn")
                .unwrap_or("_deleted")
                .to_string(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Format {
    Csv,
    JsonLines,
}

fn io_error(path: &Path, e: impl std::fmt::Display) -> ProviderError {
    ProviderError::new(
        ErrorCode::ServiceUnavailable,
        format!("{}: {e}", path.display()),
    )
}

/// The entity's files, in name order, with their format.
fn entity_files(folder: &Path, entity: &str) -> Result<Vec<(PathBuf, Format)>, ProviderError> {
    let entries = std::fs::read_dir(folder).map_err(|e| {
        let code = if e.kind() == std::io::ErrorKind::NotFound {
            ErrorCode::NotFound
        } else {
            ErrorCode::ServiceUnavailable
        };
        ProviderError::new(code, format!("import folder {}: {e}", folder.display()))
    })?;
    let mut files: Vec<(PathBuf, Format)> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter_map(|path| {
            let name = path.file_name()?.to_str()?;
            let (stem, format) = if let Some(stem) = name.strip_suffix(".csv") {
                (stem, Format::Csv)
            } else if let Some(stem) = name.strip_suffix(".jsonl") {
                (stem, Format::JsonLines)
            } else {
                return None;
            };
            let belongs = stem == entity
                || stem
                    .strip_prefix(entity)
                    .is_some_and(|rest| rest.starts_with('-') || rest.starts_with('_'));
            belongs.then_some((path, format))
        })
        .collect();
    // The plain `accounts.csv` first, then the dated or numbered drops in name order.
    files.sort_by(|(a, _), (b, _)| {
        let key = |p: &PathBuf| {
            (
                p.file_stem().and_then(|s| s.to_str()) != Some(entity),
                p.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    Ok(files)
}

fn truthy(value: &Value) -> bool {
    match value {
        Value::Bool(b) => *b,
        Value::String(s) => matches!(
            s.trim().to_ascii_lowercase().as_str(),
            "true" | "1" | "yes" | "y"
        ),
        Value::Number(n) => n.as_i64() == Some(1),
        _ => false,
    }
}

fn to_record(mut fields: Map<String, Value>, columns: &Columns) -> Result<Record, String> {
    let id = match fields.get(&columns.id) {
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ => return Err(format!("a record has no `{}`", columns.id)),
    };
    let modified_at = match fields.get(&columns.modified) {
        Some(Value::String(s)) if !s.is_empty() => Some(
            DateTime::parse_from_rfc3339(s)
                .map_err(|e| {
                    format!(
                        "record {id}: `{}` is not an RFC 3339 time ({e})",
                        columns.modified
                    )
                })?
                .with_timezone(&Utc),
        ),
        _ => None,
    };
    let deleted = fields.remove(&columns.deleted).is_some_and(|v| truthy(&v));
    Ok(Record {
        id,
        modified_at,
        deleted,
        fields,
    })
}

/// Records read from one file (each, or why it could not be read), and the byte offset after
/// the last one, or `None` at the end of the file.
type FileChunk = (Vec<Result<Record, String>>, Option<u64>);

/// Reads up to `limit` records of `path` from byte `offset`.
fn read_records(
    path: &Path,
    format: Format,
    offset: u64,
    limit: usize,
    columns: &Columns,
) -> Result<FileChunk, ProviderError> {
    let file = File::open(path).map_err(|e| io_error(path, e))?;
    let mut records = Vec::new();
    match format {
        Format::JsonLines => {
            let mut reader = BufReader::new(file);
            reader
                .seek(SeekFrom::Start(offset))
                .map_err(|e| io_error(path, e))?;
            let mut position = offset;
            let mut line = String::new();
            while records.len() < limit {
                line.clear();
                let read = reader.read_line(&mut line).map_err(|e| io_error(path, e))?;
                if read == 0 {
                    return Ok((records, None));
                }
                position += read as u64;
                if line.trim().is_empty() {
                    continue;
                }
                records.push(match serde_json::from_str::<Value>(&line) {
                    Ok(Value::Object(fields)) => to_record(fields, columns),
                    Ok(_) => Err(format!(
                        "{} at byte {}: a line is not a JSON object",
                        path.display(),
                        position - read as u64
                    )),
                    Err(e) => Err(format!(
                        "{} at byte {}: {e}",
                        path.display(),
                        position - read as u64
                    )),
                });
            }
            let at_end = reader.fill_buf().map_err(|e| io_error(path, e))?.is_empty();
            Ok((records, (!at_end).then_some(position)))
        }
        Format::Csv => {
            let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(file);
            let headers = reader.headers().map_err(|e| io_error(path, e))?.clone();
            if offset > 0 {
                let mut position = csv::Position::new();
                position.set_byte(offset);
                reader.seek(position).map_err(|e| io_error(path, e))?;
            }
            let mut row = csv::StringRecord::new();
            while records.len() < limit {
                match reader.read_record(&mut row) {
                    Ok(false) => return Ok((records, None)),
                    Ok(true) => {
                        let fields: Map<String, Value> = headers
                            .iter()
                            .zip(row.iter())
                            .map(|(h, v)| {
                                let value = if v.is_empty() {
                                    Value::Null
                                } else {
                                    Value::String(v.to_string())
                                };
                                (h.to_string(), value)
                            })
                            .collect();
                        records.push(to_record(fields, columns));
                    }
                    Err(e) => records.push(Err(format!("{}: {e}", path.display()))),
                }
            }
            let next = reader.position().byte();
            let more = reader
                .read_record(&mut row)
                .map_err(|e| io_error(path, e))?;
            Ok((records, more.then_some(next)))
        }
    }
}

impl Provider for BulkImport {
    fn name(&self) -> &'static str {
        "bulk_import"
    }
}

/// How a file was when it was read: its length and its last-write time. A file whose stamp
/// is what a cursor remembers has not been written since it was read whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    /// Nanoseconds since the Unix epoch.
    modified_ns: u128,
}

impl FileStamp {
    /// The file's stamp now; `None` when it cannot be read (or predates the epoch), and the
    /// file is then never remembered as read.
    fn of(path: &Path) -> Option<Self> {
        let metadata = std::fs::metadata(path).ok()?;
        let modified = metadata.modified().ok()?;
        let since_epoch = modified.duration_since(std::time::UNIX_EPOCH).ok()?;
        Some(Self {
            len: metadata.len(),
            modified_ns: since_epoch.as_nanos(),
        })
    }

    /// Whether the file was last written before `time`, so it cannot hold a change after it.
    fn written_before(&self, time: DateTime<Utc>) -> bool {
        time.timestamp_nanos_opt()
            .and_then(|ns| u128::try_from(ns).ok())
            .is_some_and(|ns| self.modified_ns < ns)
    }
}

/// What an import cursor says: the latest modified time synced, and the files read whole
/// since that time, as they were then.
///
/// Records are read inclusive of the time (another export may bring more records modified at
/// that very instant), so the time alone would have every later sync read again an export
/// whose records all share it; the files read whole are skipped until they are written again.
/// A file written before the time needs no entry: the time alone skips it.
///
/// Spelled as lines: the time (RFC 3339; empty when no record had one), then one line per file
/// read whole, `length modified-nanoseconds name`. A cursor of earlier versions is the time's
/// line alone.
#[derive(Debug, Default, PartialEq)]
struct ImportCursor {
    time: Option<DateTime<Utc>>,
    read: BTreeMap<String, FileStamp>,
}

impl ImportCursor {
    /// Reads a cursor this adapter wrote; any other text asks for the entity to be read again
    /// from the beginning.
    fn parse(text: &str) -> Result<Self, ProviderError> {
        let foreign =
            || ProviderError::resync_required(format!("`{text}` is not an import cursor"));
        let mut lines = text.split('\n');
        let time = match lines.next().unwrap_or_default() {
            "" => None,
            time => Some(
                DateTime::parse_from_rfc3339(time)
                    .map_err(|_| foreign())?
                    .with_timezone(&Utc),
            ),
        };
        let mut read = BTreeMap::new();
        for line in lines {
            let mut parts = line.splitn(3, ' ');
            let (Some(len), Some(modified_ns), Some(name)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err(foreign());
            };
            let stamp = FileStamp {
                len: len.parse().map_err(|_| foreign())?,
                modified_ns: modified_ns.parse().map_err(|_| foreign())?,
            };
            read.insert(name.to_string(), stamp);
        }
        Ok(Self { time, read })
    }

    /// Whether the file called `name`, whose stamp is now `stamp`, was read whole as it is.
    fn has_read(&self, name: &str, stamp: Option<FileStamp>) -> bool {
        stamp.is_some_and(|now| self.read.get(name) == Some(&now))
    }

    /// Whether nothing of the file can be newer than the cursor: it was read whole as it is,
    /// or it was last written before the cursor's time.
    fn covers(&self, name: &str, stamp: Option<FileStamp>) -> bool {
        self.has_read(name, stamp)
            || self
                .time
                .zip(stamp)
                .is_some_and(|(time, stamp)| stamp.written_before(time))
    }

    /// This cursor and a later one together: the later time, and the files either read (the
    /// later stamp where both read one), less those the time now skips.
    fn and_then(mut self, later: Self) -> Self {
        self.time = self.time.max(later.time);
        self.read.extend(later.read);
        self.pruned()
    }

    /// Without the files its time skips anyway.
    fn pruned(mut self) -> Self {
        if let Some(time) = self.time {
            self.read.retain(|_, stamp| !stamp.written_before(time));
        }
        self
    }

    /// The cursor's text; `None` when it says nothing.
    fn to_text(&self) -> Option<String> {
        if self.time.is_none() && self.read.is_empty() {
            return None;
        }
        let mut text = self
            .time
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_default();
        for (name, stamp) in &self.read {
            text.push_str(&format!("\n{} {} {name}", stamp.len, stamp.modified_ns));
        }
        Some(text)
    }
}

/// Where a page stops in an entity's files: the file, the byte offset of its next record, and
/// the file's stamp when it was begun, spelled `name<TAB>offset<TAB>length<TAB>nanoseconds`
/// (earlier versions wrote the first two alone). A file written again since it was begun is
/// read again from its start: the offset means nothing in the new text.
struct PageToken<'a> {
    name: &'a str,
    offset: u64,
    stamp: Option<FileStamp>,
}

impl<'a> PageToken<'a> {
    fn parse(token: &'a str) -> Result<Self, ProviderError> {
        let unreadable = || ProviderError::new(ErrorCode::ValidationError, "unreadable page token");
        let mut parts = token.split('\t');
        let name = parts.next().ok_or_else(unreadable)?;
        let offset = parts
            .next()
            .ok_or_else(unreadable)?
            .parse()
            .map_err(|_| unreadable())?;
        let stamp = match (parts.next(), parts.next()) {
            (Some(len), Some(modified_ns)) => Some(FileStamp {
                len: len.parse().map_err(|_| unreadable())?,
                modified_ns: modified_ns.parse().map_err(|_| unreadable())?,
            }),
            _ => None,
        };
        Ok(Self {
            name,
            offset,
            stamp,
        })
    }

    fn to_text(&self) -> String {
        match self.stamp {
            Some(s) => format!(
                "{}\t{}\t{}\t{}",
                self.name, self.offset, s.len, s.modified_ns
            ),
            None => format!("{}\t{}", self.name, self.offset),
        }
    }
}

fn file_name(path: &Path) -> &str {
    path.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
}

/// Deletions arrive as tombstone records in the exports themselves, so pages carry them.
#[async_trait]
impl Pull for BulkImport {
    async fn fetch_page(
        &self,
        conn: &mut Connection,
        request: &FetchRequest,
    ) -> Result<Page, ProviderError> {
        let folder = PathBuf::from(conn.setting("path").ok_or_else(|| {
            ProviderError::new(
                ErrorCode::ValidationError,
                "the connection has no `path` folder",
            )
        })?);
        let columns = Columns::of(conn);
        let cursor = match &request.cursor {
            Some(text) => ImportCursor::parse(text)?,
            None => ImportCursor::default(),
        };
        let files = entity_files(&folder, &request.entity)?;
        // The file the page begins in, where, and how that file was when it was begun.
        let (mut index, mut offset, mut begun) = match &request.page_token {
            Some(token) => {
                let token = PageToken::parse(token)?;
                let index = files
                    .iter()
                    .position(|(p, _)| file_name(p) == token.name)
                    .ok_or_else(|| {
                        ProviderError::new(
                            ErrorCode::NotFound,
                            format!("import file {} disappeared mid-sync", token.name),
                        )
                    })?;
                let now = FileStamp::of(&files[index].0);
                match token.stamp {
                    Some(then) if Some(then) != now => (index, 0, now),
                    // A file not begun yet, or begun by a version that did not say how it was.
                    None if token.offset == 0 => (index, 0, now),
                    stamp => (index, token.offset, stamp),
                }
            }
            None => (0, 0, files.first().and_then(|(p, _)| FileStamp::of(p))),
        };
        let wanted = request.page_size.max(1);
        let mut page = Page {
            query: Some(format!(
                "{}/{}.{{csv,jsonl}}",
                folder.display(),
                request.entity
            )),
            ..Page::default()
        };
        let mut read_whole = ImportCursor::default();
        while index < files.len() && page.records.len() < wanted {
            let (path, format) = &files[index];
            let name = file_name(path);
            let next = if offset == 0 && cursor.covers(name, begun) {
                None
            } else {
                let (records, next) =
                    read_records(path, *format, offset, wanted - page.records.len(), &columns)?;
                for record in records {
                    match record {
                        Ok(r)
                            if cursor
                                .time
                                .is_some_and(|s| r.modified_at.is_some_and(|m| m < s)) => {}
                        Ok(r) => page.records.push(r),
                        Err(e) => return Err(ProviderError::new(ErrorCode::ValidationError, e)),
                    }
                }
                // Read to its end and not written meanwhile: the next sync may skip it.
                if next.is_none()
                    && let Some(stamp) = begun.filter(|b| Some(*b) == FileStamp::of(path))
                    && !name.contains('\n')
                {
                    read_whole.read.insert(name.to_string(), stamp);
                }
                next
            };
            match next {
                Some(at) => {
                    offset = at;
                    page.next_page = Some(
                        PageToken {
                            name,
                            offset: at,
                            stamp: begun,
                        }
                        .to_text(),
                    );
                }
                None => {
                    index += 1;
                    offset = 0;
                    begun = files.get(index).and_then(|(p, _)| FileStamp::of(p));
                    page.next_page = files.get(index).map(|(p, _)| {
                        PageToken {
                            name: file_name(p),
                            offset: 0,
                            stamp: None,
                        }
                        .to_text()
                    });
                }
            }
        }
        read_whole.time = page.records.iter().filter_map(|r| r.modified_at).max();
        page.cursor = read_whole.pruned().to_text();
        Ok(page)
    }

    fn cursor_time(&self, cursor: &str) -> Option<DateTime<Utc>> {
        ImportCursor::parse(cursor).ok()?.time
    }

    fn newer_cursor(&self, earlier: String, later: String) -> String {
        match (ImportCursor::parse(&earlier), ImportCursor::parse(&later)) {
            (Ok(a), Ok(b)) => a.and_then(b).to_text().unwrap_or(later),
            _ => later,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Credentials;

    fn conn(folder: &Path) -> Connection {
        let mut settings = Map::new();
        settings.insert("path".into(), Value::String(folder.display().to_string()));
        Connection::new("int-1", settings, Credentials::default())
    }

    fn request(entity: &str, page_size: usize) -> FetchRequest {
        FetchRequest {
            entity: entity.into(),
            fields: vec![],
            cursor: None,
            page_token: None,
            filters: vec![],
            page_size,
        }
    }

    async fn all(conn: &mut Connection, mut request: FetchRequest) -> Vec<Record> {
        let mut out = Vec::new();
        loop {
            let page = BulkImport.fetch_page(conn, &request).await.unwrap();
            out.extend(page.records);
            match page.next_page {
                Some(token) => request.page_token = Some(token),
                None => return out,
            }
        }
    }

    #[tokio::test]
    async fn csv_and_json_lines_files_of_an_entity_are_read_in_pages() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("accounts.csv"),
            "id,name,modified_at,_deleted\na1,Acme,2026-01-01T00:00:00Z,\na2,\"Globex, Inc\",2026-01-02T00:00:00Z,\na3,Gone,2026-01-03T00:00:00Z,true\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("accounts-2.jsonl"),
            "{\"id\":\"a4\",\"name\":\"Initech\",\"modified_at\":\"2026-01-04T00:00:00Z\"}\n\n{\"id\":\"a5\",\"name\":\"Umbrella\"}\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("accountsx.csv"), "id\nnot-mine\n").unwrap();
        std::fs::write(dir.path().join("contacts.csv"), "id\nc1\n").unwrap();
        let mut conn = conn(dir.path());

        let records = all(&mut conn, request("accounts", 2)).await;
        let ids: Vec<_> = records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["a1", "a2", "a3", "a4", "a5"]);
        assert_eq!(records[1].fields["name"], "Globex, Inc");
        assert!(records[2].deleted);
        assert!(!records[0].deleted);
        assert_eq!(records[4].modified_at, None);

        let mut since = request("accounts", 10);
        since.cursor = Some("2026-01-03T00:00:00Z".into());
        let ids: Vec<_> = all(&mut conn, since)
            .await
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(
            ids,
            ["a3", "a4", "a5"],
            "inclusive of the cursor; undated records always"
        );
    }

    #[tokio::test]
    async fn a_bad_line_or_a_missing_folder_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("accounts.jsonl"),
            "{\"id\":\"a1\"}\nnot json\n",
        )
        .unwrap();
        let err = BulkImport
            .fetch_page(&mut conn(dir.path()), &request("accounts", 10))
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::ValidationError);
        assert!(
            err.message.contains("accounts.jsonl at byte 12"),
            "{}",
            err.message
        );
        let err = BulkImport
            .fetch_page(
                &mut conn(&dir.path().join("nope")),
                &request("accounts", 10),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::NotFound);
    }

    /// Every page of `entity` from `cursor`, combined as the engine combines them: each page's
    /// cursor with the pages' before it, then with the cursor the sync began from.
    async fn sync(
        conn: &mut Connection,
        entity: &str,
        page_size: usize,
        cursor: Option<String>,
    ) -> (Vec<String>, Option<String>) {
        let mut request = request(entity, page_size);
        request.cursor = cursor.clone();
        let (mut ids, mut pending) = (Vec::new(), None::<String>);
        loop {
            let page = BulkImport.fetch_page(conn, &request).await.unwrap();
            ids.extend(page.records.into_iter().map(|r| r.id));
            if let Some(newer) = page.cursor {
                pending = Some(match pending {
                    Some(earlier) => BulkImport.newer_cursor(earlier, newer),
                    None => newer,
                });
            }
            match page.next_page {
                Some(token) => request.page_token = Some(token),
                None => break,
            }
        }
        let next = match (cursor, pending) {
            (Some(stored), Some(newer)) => Some(BulkImport.newer_cursor(stored, newer)),
            (stored, newer) => newer.or(stored),
        };
        (ids, next)
    }

    #[tokio::test]
    async fn an_export_read_whole_is_not_read_again_until_it_is_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let at = "2026-01-05T00:00:00Z";
        let rows = |ids: &[&str]| {
            ids.iter()
                .fold(String::from("id,modified_at\n"), |text, id| {
                    text + &format!("{id},{at}\n")
                })
        };
        std::fs::write(dir.path().join("accounts.csv"), rows(&["a1", "a2", "a3"])).unwrap();
        let mut conn = conn(dir.path());

        let (ids, cursor) = sync(&mut conn, "accounts", 2, None).await;
        assert_eq!(ids, ["a1", "a2", "a3"]);
        let (ids, cursor) = sync(&mut conn, "accounts", 2, cursor).await;
        assert!(
            ids.is_empty(),
            "every record shares the cursor's time: {ids:?}"
        );

        // A cursor of earlier versions, the time alone, reads the records at that time again.
        let (ids, _) = sync(&mut conn, "accounts", 2, Some(at.to_string())).await;
        assert_eq!(ids, ["a1", "a2", "a3"]);

        std::fs::write(dir.path().join("accounts-2.csv"), rows(&["a4"])).unwrap();
        let (ids, cursor) = sync(&mut conn, "accounts", 2, cursor).await;
        assert_eq!(ids, ["a4"], "only the new export is read");

        std::fs::write(
            dir.path().join("accounts.csv"),
            rows(&["a1", "a2", "a3", "a5"]),
        )
        .unwrap();
        let (ids, cursor) = sync(&mut conn, "accounts", 2, cursor).await;
        assert_eq!(
            ids,
            ["a1", "a2", "a3", "a5"],
            "an export written again is read again"
        );
        let (ids, _) = sync(&mut conn, "accounts", 2, cursor).await;
        assert!(ids.is_empty(), "{ids:?}");
    }

    #[tokio::test]
    async fn a_file_written_again_between_pages_is_read_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounts.jsonl");
        let lines = |ids: &[&str]| {
            ids.iter()
                .map(|id| format!("{{\"id\":\"{id}\"}}\n"))
                .collect::<String>()
        };
        std::fs::write(&path, lines(&["a1", "a2", "a3", "a4"])).unwrap();
        let mut conn = conn(dir.path());
        let first = BulkImport
            .fetch_page(&mut conn, &request("accounts", 2))
            .await
            .unwrap();
        let token = first.next_page.unwrap();

        std::fs::write(&path, lines(&["b1", "b2", "b3"])).unwrap();
        let mut resumed = request("accounts", 2);
        resumed.page_token = Some(token.clone());
        let page = BulkImport.fetch_page(&mut conn, &resumed).await.unwrap();
        let ids: Vec<_> = page.records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["b1", "b2"], "not from the old text's offset");

        // A token of earlier versions, the file and the offset alone, is still followed.
        let mut parts = token.split('\t');
        let (name, offset) = (parts.next().unwrap(), parts.next().unwrap());
        resumed.page_token = Some(format!("{name}\t{offset}"));
        let page = BulkImport.fetch_page(&mut conn, &resumed).await.unwrap();
        assert_eq!(page.records[0].id, "b3");
    }

    #[test]
    fn cursors_combine_into_the_later_time_and_the_files_it_does_not_skip() {
        let second = 1_000_000_000u128;
        let early = FileStamp {
            len: 10,
            modified_ns: 1_767_225_600 * second,
        };
        let late = FileStamp {
            len: 20,
            modified_ns: 1_767_312_000 * second,
        };
        let text = "2025-12-31T12:00:00.000Z\n20 1767312000000000000 new export.csv\n10 1767225600000000000 old.csv";
        let cursor = ImportCursor::parse(text).unwrap();
        assert_eq!(cursor.read["new export.csv"], late);
        assert_eq!(cursor.to_text().as_deref(), Some(text));
        assert!(cursor.covers("old.csv", Some(early)));
        let rewritten = FileStamp { len: 11, ..early };
        assert!(!cursor.covers("old.csv", Some(rewritten)), "written again");
        assert!(!cursor.covers("other.csv", Some(late)));

        let later = ImportCursor::parse("2026-01-01T12:00:00.000Z").unwrap();
        let combined = cursor.and_then(later);
        assert_eq!(
            combined.to_text().unwrap(),
            "2026-01-01T12:00:00.000Z\n20 1767312000000000000 new export.csv",
            "a file written before the time needs no entry"
        );
        assert!(
            combined.covers("old.csv", Some(rewritten)),
            "the time skips it"
        );
        assert_eq!(
            BulkImport.cursor_time("\n20 1767312000000000000 x.csv"),
            None,
            "no record had a time"
        );
        let foreign = ImportCursor::parse("not-a-cursor").unwrap_err();
        assert!(foreign.resync, "{foreign:?}");
    }
}
