//! Bulk imports: CSV and JSON Lines exports dropped in a folder.
//!
//! An entity is a family of files named after it: `accounts.csv`, `accounts-2026-11-22.jsonl`,
//! `accounts_02.csv` all belong to entity `accounts`, read plain name first, then in name
//! order. Each record has an id column (`idColumn`, default `id`), optionally a modified column
//! (`modifiedColumn`, default `modified_at`, RFC 3339) and a tombstone column (`deletedColumn`,
//! default `_deleted`) whose true value (`true`, `1`, `yes`) means the record was deleted.
//!
//! Incremental by file and by record: the cursor is the latest modified time synced, and the
//! files read whole since then with their length, times and inode (`ImportCursor`). A file
//! the cursor read as it is now, or last written before its time, cannot hold a change and is
//! not opened; in the other files, records modified before the time are skipped. An export
//! whose records all share one modified time is so read once, not by every sync after it. Only
//! a file that has settled (not written for a few seconds) is remembered: file times are kept
//! to a clock tick, and a second write within the tick of the first would not show.
//!
//! A page token is the file, the byte offset of the next record and the file's stamp, so a
//! resumed sync seeks instead of re-reading; a file written again meanwhile is read from its
//! start, and one still being written is followed by its offset.
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

/// How long a file must have gone unwritten before its stamp is trusted. File systems keep
/// times to a clock tick (a few milliseconds here, two seconds on FAT, a second on many network
/// shares): a file written again within the tick of an earlier write keeps that write's time,
/// so a file read so soon after a write may change without its stamp changing.
const SETTLED: std::time::Duration = std::time::Duration::from_secs(5);

/// Files a cursor remembers at most (the most recently written): a folder of many exports
/// keeps a cursor of a few kilobytes, and the files it forgets are read again, as they would
/// be without a stamp, never missed.
const REMEMBERED_FILES: usize = 256;

/// How a file was when it was read: its length, its last-write and last-change times and its
/// inode. A file whose stamp is what a cursor remembers has not been written since it was read
/// whole. The change time catches a file copied in with its old write time kept (`cp -p`,
/// `rsync -t`); the inode, one replaced by another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    /// Nanoseconds since the Unix epoch, to the file system's tick.
    modified_ns: u128,
    changed_ns: u128,
    inode: u64,
}

impl FileStamp {
    /// The file's stamp, if it can be trusted: the file was last written at least [`SETTLED`]
    /// ago. A file still being written (or unreadable) has none, and is never remembered.
    fn settled(path: &Path) -> Option<Self> {
        let metadata = std::fs::metadata(path).ok()?;
        let modified = metadata.modified().ok()?;
        let settled_at = std::time::SystemTime::now().checked_sub(SETTLED)?;
        if modified > settled_at {
            return None;
        }
        let since_epoch = modified.duration_since(std::time::UNIX_EPOCH).ok()?;
        #[cfg(unix)]
        let (changed_ns, inode) = {
            use std::os::unix::fs::MetadataExt;
            let changed =
                i128::from(metadata.ctime()) * 1_000_000_000 + i128::from(metadata.ctime_nsec());
            (u128::try_from(changed).ok()?, metadata.ino())
        };
        #[cfg(not(unix))]
        let (changed_ns, inode) = (0, 0);
        Some(Self {
            len: metadata.len(),
            modified_ns: since_epoch.as_nanos(),
            changed_ns,
            inode,
        })
    }

    /// Whether the file was last written before `time`, so it cannot hold a change after it.
    fn written_before(&self, time: DateTime<Utc>) -> bool {
        time.timestamp_nanos_opt()
            .and_then(|ns| u128::try_from(ns).ok())
            .is_some_and(|ns| self.modified_ns < ns)
    }

    /// `length,modified,changed,inode`: how page tokens spell it.
    fn to_text(self) -> String {
        format!(
            "{},{},{},{}",
            self.len, self.modified_ns, self.changed_ns, self.inode
        )
    }

    fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(',').map(str::parse::<u128>);
        let mut next = || parts.next()?.ok();
        let stamp = Self {
            len: u64::try_from(next()?).ok()?,
            modified_ns: next()?,
            changed_ns: next()?,
            inode: u64::try_from(next()?).ok()?,
        };
        parts.next().is_none().then_some(stamp)
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
/// Spelled as lines: the time (RFC 3339 to the millisecond; empty when no record had one), then
/// one line per file read whole, `length modified changed inode name` (a name with a line break
/// is not remembered). A cursor of earlier versions is the time's line alone.
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
            let mut parts = line.splitn(5, ' ');
            let mut number = || parts.next().and_then(|n| n.parse::<u128>().ok());
            let (Some(len), Some(modified_ns), Some(changed_ns), Some(inode)) =
                (number(), number(), number(), number())
            else {
                return Err(foreign());
            };
            let (Ok(len), Ok(inode), Some(name)) =
                (u64::try_from(len), u64::try_from(inode), parts.next())
            else {
                return Err(foreign());
            };
            let stamp = FileStamp {
                len,
                modified_ns,
                changed_ns,
                inode,
            };
            read.insert(name.to_string(), stamp);
        }
        Ok(Self { time, read })
    }

    /// The time of the latest of `records` that has one, to the millisecond the cursor's text
    /// keeps.
    fn latest(records: &[Record]) -> Option<DateTime<Utc>> {
        use chrono::SubsecRound;
        records
            .iter()
            .filter_map(|r| r.modified_at)
            .max()
            .map(|t| t.trunc_subsecs(3))
    }

    /// Whether nothing of the file can be newer than the cursor: it was read whole as it is
    /// now (`stamp`), or it was last written before the cursor's time.
    fn covers(&self, name: &str, stamp: Option<FileStamp>) -> bool {
        stamp.is_some_and(|now| {
            self.read.get(name) == Some(&now)
                || self.time.is_some_and(|time| now.written_before(time))
        })
    }

    /// This cursor and a later one together: the later time, and the files either read (the
    /// later stamp where both read one).
    fn and_then(mut self, later: Self) -> Self {
        self.time = self.time.max(later.time);
        self.read.extend(later.read);
        self.pruned()
    }

    /// Without the files its time skips anyway, and without the least recently written
    /// beyond [`REMEMBERED_FILES`].
    fn pruned(mut self) -> Self {
        if let Some(time) = self.time {
            self.read.retain(|_, stamp| !stamp.written_before(time));
        }
        if self.read.len() > REMEMBERED_FILES {
            let mut newest_first: Vec<_> = std::mem::take(&mut self.read).into_iter().collect();
            newest_first.sort_by_key(|(_, s)| std::cmp::Reverse(s.modified_ns));
            newest_first.truncate(REMEMBERED_FILES);
            self.read = newest_first.into_iter().collect();
        }
        self
    }

    /// The cursor's text; `None` when it says nothing.
    fn to_text(&self) -> Option<String> {
        use std::fmt::Write;
        if self.time.is_none() && self.read.is_empty() {
            return None;
        }
        let mut text = self
            .time
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_default();
        for (name, s) in &self.read {
            let _ = write!(
                text,
                "\n{} {} {} {} {name}",
                s.len, s.modified_ns, s.changed_ns, s.inode
            );
        }
        Some(text)
    }
}

/// Where a page stops in an entity's files: the byte offset of the file's next record, the
/// file's stamp when it was begun (`-` if it had not settled) and its name, spelled
/// `offset<TAB>stamp<TAB>name`; earlier versions wrote `name<TAB>offset`. A file written
/// again since it was begun is read again from its start, since the offset means nothing in
/// the new text; one that had not settled is followed by its offset, as a file still being
/// appended to must be.
struct PageToken<'a> {
    name: &'a str,
    offset: u64,
    stamp: Option<FileStamp>,
}

impl<'a> PageToken<'a> {
    fn parse(token: &'a str) -> Result<Self, ProviderError> {
        let mut parts = token.splitn(3, '\t');
        if let (Some(offset), Some(stamp), Some(name)) = (parts.next(), parts.next(), parts.next())
            && let Ok(offset) = offset.parse()
            && let Some(stamp) = match stamp {
                "-" => Some(None),
                stamp => FileStamp::parse(stamp).map(Some),
            }
        {
            return Ok(Self {
                name,
                offset,
                stamp,
            });
        }
        let (name, offset) = token
            .rsplit_once('\t')
            .and_then(|(name, offset)| Some((name, offset.parse().ok()?)))
            .ok_or_else(|| {
                ProviderError::new(ErrorCode::ValidationError, "unreadable page token")
            })?;
        Ok(Self {
            name,
            offset,
            stamp: None,
        })
    }

    fn to_text(&self) -> String {
        let stamp = self
            .stamp
            .map_or_else(|| "-".to_string(), FileStamp::to_text);
        format!("{}\t{stamp}\t{}", self.offset, self.name)
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
                let now = FileStamp::settled(&files[index].0);
                match token.stamp {
                    Some(then) if Some(then) != now => (index, 0, now),
                    None if token.offset == 0 => (index, 0, now),
                    // Begun before it settled, or by a version that kept no stamps.
                    stamp => (index, token.offset, stamp),
                }
            }
            None => (0, 0, files.first().and_then(|(p, _)| FileStamp::settled(p))),
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
                    && let Some(stamp) = begun.filter(|b| Some(*b) == FileStamp::settled(path))
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
                    begun = files.get(index).and_then(|(p, _)| FileStamp::settled(p));
                    page.next_page = files.get(index).map(|(p, _)| {
                        PageToken {
                            name: file_name(p),
                            offset: 0,
                            stamp: begun,
                        }
                        .to_text()
                    });
                }
            }
        }
        read_whole.time = ImportCursor::latest(&page.records);
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

    /// Writes `text` to `path` as a file last written a minute ago: one that has settled.
    fn write_settled(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
        let a_minute_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        set_written(path, a_minute_ago);
    }

    fn set_written(path: &Path, at: std::time::SystemTime) {
        File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(at)
            .unwrap();
    }

    /// The change time `metadata` says, as a stamp keeps it.
    fn stamp_of(metadata: &std::fs::Metadata) -> u128 {
        use std::os::unix::fs::MetadataExt;
        (metadata.ctime() * 1_000_000_000 + metadata.ctime_nsec()) as u128
    }

    fn csv_rows(ids: &[&str]) -> String {
        ids.iter()
            .fold(String::from("id,modified_at\n"), |text, id| {
                text + &format!("{id},2026-01-05T00:00:00Z\n")
            })
    }

    #[tokio::test]
    async fn an_export_read_whole_is_not_read_again_until_it_is_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let accounts = dir.path().join("accounts.csv");
        write_settled(&accounts, &csv_rows(&["a1", "a2", "a3"]));
        let mut conn = conn(dir.path());

        let (ids, cursor) = sync(&mut conn, "accounts", 2, None).await;
        assert_eq!(ids, ["a1", "a2", "a3"]);
        let (ids, cursor) = sync(&mut conn, "accounts", 2, cursor).await;
        assert!(
            ids.is_empty(),
            "every record shares the cursor's time: {ids:?}"
        );

        // A cursor of earlier versions, the time alone, reads the records at that time again.
        let time = Some("2026-01-05T00:00:00.000Z".to_string());
        let (ids, _) = sync(&mut conn, "accounts", 2, time).await;
        assert_eq!(ids, ["a1", "a2", "a3"]);

        write_settled(&dir.path().join("accounts-2.csv"), &csv_rows(&["a4"]));
        let (ids, cursor) = sync(&mut conn, "accounts", 2, cursor).await;
        assert_eq!(ids, ["a4"], "only the new export is read");

        write_settled(&accounts, &csv_rows(&["a1", "a2", "a3", "a5"]));
        let (ids, cursor) = sync(&mut conn, "accounts", 2, cursor).await;
        assert_eq!(
            ids,
            ["a1", "a2", "a3", "a5"],
            "an export written again is read again"
        );
        let (ids, cursor) = sync(&mut conn, "accounts", 2, cursor).await;
        assert!(ids.is_empty(), "{ids:?}");

        // Copied in with its old write time kept, and as long as before: its change time says
        // (written again until the clock has ticked, which times are kept to).
        let second = dir.path().join("accounts-2.csv");
        let before = std::fs::metadata(&second).unwrap();
        let written = before.modified().unwrap();
        while FileStamp::settled(&second).is_some_and(|s| s.changed_ns == stamp_of(&before)) {
            std::fs::write(&second, csv_rows(&["a6"])).unwrap();
            set_written(&second, written);
        }
        let (ids, _) = sync(&mut conn, "accounts", 2, cursor).await;
        assert_eq!(ids, ["a6"]);
    }

    #[tokio::test]
    async fn an_export_still_being_written_is_read_until_it_settles() {
        let dir = tempfile::tempdir().unwrap();
        let accounts = dir.path().join("accounts.csv");
        std::fs::write(&accounts, csv_rows(&["a1"])).unwrap();
        let mut conn = conn(dir.path());

        let (ids, cursor) = sync(&mut conn, "accounts", 10, None).await;
        assert_eq!(ids, ["a1"]);
        let (ids, cursor) = sync(&mut conn, "accounts", 10, cursor).await;
        assert_eq!(
            ids,
            ["a1"],
            "just written: a second write may not have changed its stamp"
        );

        set_written(&accounts, std::time::SystemTime::now() - SETTLED * 2);
        let (ids, cursor) = sync(&mut conn, "accounts", 10, cursor).await;
        assert_eq!(ids, ["a1"]);
        let (ids, _) = sync(&mut conn, "accounts", 10, cursor).await;
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
        write_settled(&path, &lines(&["a1", "a2", "a3", "a4"]));
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

        // A file still being written is followed by its offset: it is being appended to.
        let first = BulkImport
            .fetch_page(&mut conn, &request("accounts", 2))
            .await
            .unwrap();
        std::fs::write(&path, lines(&["b1", "b2", "b3", "b4"])).unwrap();
        resumed.page_token = first.next_page;
        let page = BulkImport.fetch_page(&mut conn, &resumed).await.unwrap();
        let ids: Vec<_> = page.records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["b3", "b4"]);

        // A token of earlier versions, the file and the offset, is followed too.
        let offset = token.split('\t').next().unwrap();
        resumed.page_token = Some(format!("accounts.jsonl\t{offset}"));
        let page = BulkImport.fetch_page(&mut conn, &resumed).await.unwrap();
        assert_eq!(page.records[0].id, "b3");
    }

    #[test]
    fn cursors_combine_into_the_later_time_and_the_files_it_does_not_skip() {
        let second = 1_000_000_000u128;
        let stamp = |len, modified_s: u128| FileStamp {
            len,
            modified_ns: modified_s * second,
            changed_ns: modified_s * second,
            inode: 7,
        };
        let (early, late) = (stamp(10, 1_767_225_600), stamp(20, 1_767_312_000));
        let text = "2025-12-31T12:00:00.000Z\n\
                    20 1767312000000000000 1767312000000000000 7 new export.csv\n\
                    10 1767225600000000000 1767225600000000000 7 old.csv";
        let cursor = ImportCursor::parse(text).unwrap();
        assert_eq!(cursor.read["new export.csv"], late);
        assert_eq!(cursor.to_text().as_deref(), Some(text));
        assert!(cursor.covers("old.csv", Some(early)));
        let rewritten = FileStamp { len: 11, ..early };
        assert!(!cursor.covers("old.csv", Some(rewritten)), "written again");
        assert!(!cursor.covers("other.csv", Some(late)));
        assert!(!cursor.covers("old.csv", None), "not settled");

        let later = ImportCursor::parse("2026-01-01T12:00:00.000Z").unwrap();
        let combined = cursor.and_then(later);
        assert_eq!(
            combined.to_text().unwrap(),
            "2026-01-01T12:00:00.000Z\n\
             20 1767312000000000000 1767312000000000000 7 new export.csv",
            "a file written before the time needs no entry"
        );
        assert!(
            combined.covers("old.csv", Some(rewritten)),
            "the time skips it"
        );
        assert_eq!(
            BulkImport.cursor_time("\n20 1 1 7 x.csv"),
            None,
            "no record had a time"
        );
        let foreign = ImportCursor::parse("not-a-cursor").unwrap_err();
        assert!(foreign.resync, "{foreign:?}");
    }

    #[test]
    fn a_cursor_remembers_the_most_recently_written_files() {
        let mut many = ImportCursor::default();
        for i in 0..REMEMBERED_FILES as u128 + 44 {
            let stamp = FileStamp {
                len: 1,
                modified_ns: 1_000 + i,
                changed_ns: 1_000 + i,
                inode: 1,
            };
            many.read.insert(format!("accounts-{i:03}.csv"), stamp);
        }
        let kept = many.pruned().read;
        assert_eq!(kept.len(), REMEMBERED_FILES);
        assert!(!kept.contains_key("accounts-043.csv"));
        assert!(kept.contains_key("accounts-044.csv"));
    }
}
