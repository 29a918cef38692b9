//! Bulk imports: CSV and JSON Lines exports dropped in a folder.
//!
//! An entity is a family of files named after it: `accounts.csv`, `accounts-2026-11-22.jsonl`,
//! `accounts_02.csv` all belong to entity `accounts`, read plain name first, then in name order. Each record has an id
//! column (`idColumn`, default `id`), optionally a modified column (`modifiedColumn`, default
//! `modified_at`, RFC 3339) and a tombstone column (`deletedColumn`, default `_deleted`) whose
//! true value (`true`, `1`, `yes`) means the record was deleted.
//!
//! Incremental by file and by record: the cursor is the latest modified time synced (RFC 3339);
//! a file last written before it cannot hold a change after it and is not read; in the other
//! files, records modified before it are skipped. A page token is the file and the byte offset of the next record, so a resumed sync
//! seeks instead of re-reading.
//!
//! Connection settings: `path` (the folder), and the three column names above.

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

fn modified_time(path: &Path) -> Option<DateTime<Utc>> {
    std::fs::metadata(path)
        .ok()?
        .modified()
        .ok()
        .map(DateTime::<Utc>::from)
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

/// A cursor's time. Cursors are written by this adapter; one that does not parse is read as
/// "from the beginning" rather than failing every sync.
fn cursor_time(cursor: &str) -> Result<DateTime<Utc>, ProviderError> {
    DateTime::parse_from_rfc3339(cursor)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| ProviderError::resync_required(format!("`{cursor}` is not an import cursor")))
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
        let since = request.cursor.as_deref().map(cursor_time).transpose()?;
        let files = entity_files(&folder, &request.entity)?;
        let (mut index, mut offset) = match &request.page_token {
            Some(token) => {
                let (name, offset) = token.split_once('\t').ok_or_else(|| {
                    ProviderError::new(ErrorCode::ValidationError, "unreadable page token")
                })?;
                let index = files
                    .iter()
                    .position(|(p, _)| p.file_name().and_then(|n| n.to_str()) == Some(name))
                    .ok_or_else(|| {
                        ProviderError::new(
                            ErrorCode::NotFound,
                            format!("import file {name} disappeared mid-sync"),
                        )
                    })?;
                (index, offset.parse::<u64>().unwrap_or(0))
            }
            None => (0, 0),
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
        while index < files.len() && page.records.len() < wanted {
            let (path, format) = &files[index];
            let unchanged = offset == 0
                && since.is_some_and(|since| modified_time(path).is_some_and(|m| m < since));
            let next = if unchanged {
                None
            } else {
                let (records, next) =
                    read_records(path, *format, offset, wanted - page.records.len(), &columns)?;
                for record in records {
                    match record {
                        Ok(r) if since.is_some_and(|s| r.modified_at.is_some_and(|m| m < s)) => {}
                        Ok(r) => page.records.push(r),
                        Err(e) => return Err(ProviderError::new(ErrorCode::ValidationError, e)),
                    }
                }
                next
            };
            match next {
                Some(at) => {
                    offset = at;
                    let name = path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .unwrap_or_default();
                    page.next_page = Some(format!("{name}\t{at}"));
                }
                None => {
                    index += 1;
                    offset = 0;
                    page.next_page = files.get(index).map(|(p, _)| {
                        format!(
                            "{}\t0",
                            p.file_name().and_then(|n| n.to_str()).unwrap_or_default()
                        )
                    });
                }
            }
        }
        page.cursor = page
            .records
            .iter()
            .filter_map(|r| r.modified_at)
            .max()
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
        Ok(page)
    }

    fn cursor_time(&self, cursor: &str) -> Option<DateTime<Utc>> {
        cursor_time(cursor).ok()
    }

    fn newer_cursor(&self, earlier: String, later: String) -> String {
        match (cursor_time(&earlier), cursor_time(&later)) {
            (Ok(a), Ok(b)) if a > b => earlier,
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
}
