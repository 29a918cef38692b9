//! Bulk imports: CSV and JSON Lines exports dropped in a folder.
//!
//! An entity is a family of files named after it: `accounts.csv`, `accounts-2026-11-22.jsonl`,
//! `accounts_02.CSV` all belong to entity `accounts` (extensions in any case), read plain name
//! first, then in name order (numbers by value: `accounts_9` before `accounts_10`). An integration may not map two entities one of whose files would
//! be the other's (`orders` and `orders_items`). Each record has an id column (`idColumn`, default `id`), optionally a modified column
//! (`modifiedColumn`, default `modified_at`, RFC 3339) and a tombstone column (`deletedColumn`,
//! default `_deleted`) whose true value (`true`, `1`, `yes`) means the record was deleted.
//!
//! Incremental by file and by record: the cursor is the latest modified time synced, and the
//! files read whole since then with their length, times and inode (`ImportCursor`). A file
//! last written a day or more before the cursor's time (the exporter's clock, or its time zone,
//! may be off) cannot hold a change and is not opened; a record stamped in the future takes
//! the cursor no further than the sync's own time; nor, until
//! the sync opens a file, is a file the cursor read as it is now (a record read again from an
//! earlier file must not have the last word over a later file's). In the files opened, the
//! records modified before the time that an earlier sync read are skipped: all of a file read
//! whole and written anew, the part read of one appended to since, none of a file not read
//! whole (a late export, a backfill of older versions, which the engine orders by their
//! times). An export whose records all share one modified time is so read once, not by every sync after it. Only a file that had settled when it was begun (not
//! written for `settleSeconds`) is remembered: file times are kept to a clock tick, and a second
//! write within the tick of the first would not show.
//!
//! A row that cannot be read (not UTF-8, not JSON, no id, a time that is not RFC 3339, a CSV row
//! with more or fewer fields than its header, which would put values in the wrong columns)
//! fails alone: the page reports it, by file and byte offset, and goes on. The times read from
//! a file that had not settled do not move the cursor on: an export written in id order may
//! still gain rows older than the newest read so far. Nor is such a file's last row read while
//! it may be cut short (no line break after it yet, or a quoted value still open): it waits
//! for a later sync.
//!
//! A page token is the file, the byte offset of the next record and how the file was, so a
//! resumed sync seeks instead of re-reading; a file written anew meanwhile is read from its
//! start, one appended to is followed, and one removed leaves the files after it to be read.
//!
//! Connection settings: `path` (the folder), the three column names above, and `settleSeconds`
//! (default 5, a number or a string of one; more for a share whose times are kept to seconds).
//! A CSV file whose header is not UTF-8 fails alone, until it is written again: none of its
//! rows can be read without it. So does a file that cannot be opened (no permission); one
//! moved away since the folder was listed, or a folder named like an export, holds nothing.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::{
    Connection, ErrorCode, FetchRequest, Page, Provider, ProviderError, Pull, Record, Unreadable,
};

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
            let (stem, format) = format_of(name)?;
            belongs(entity, stem).then_some((path, format))
        })
        // A folder named like an export, or a link to one, holds none.
        .filter(|(path, _)| std::fs::metadata(path).map_or(true, |m| !m.is_dir()))
        .collect();
    files.sort_by(|(a, _), (b, _)| file_order(entity, a).cmp(&file_order(entity, b)));
    Ok(files)
}

/// Whether the CSV row read from byte `from` to `to` may be one cut short: it ends no line, or
/// a quoted field in it is still open (the file ended within it, where a quoted value holds a
/// line break). A row of a file still being written that is waits for a later sync.
fn cut_short(read: &Recorded, from: u64, to: u64) -> bool {
    // A row that cannot be found among the bytes read is not trusted either.
    let (Some(from), Some(to)) = (from.checked_sub(read.from), to.checked_sub(read.from)) else {
        return true;
    };
    let (Ok(from), Ok(to)) = (usize::try_from(from), usize::try_from(to)) else {
        return true;
    };
    let Some(row) = read.bytes.get(from..to) else {
        return true;
    };
    // A quoted value left open runs to the end of what was read: a row with bytes after it is
    // whole, whatever quotes an unquoted value holds (`12" pipe`).
    let last = to == read.bytes.len();
    let quotes = row.iter().filter(|b| **b == b'"').count();
    !(row.ends_with(b"\n") || row.ends_with(b"\r")) || (last && quotes % 2 == 1)
}

/// A file's name without its extension, and its format, by the extension in any case
/// (`accounts.CSV` as well as `accounts.csv`).
fn format_of(name: &str) -> Option<(&str, Format)> {
    let (stem, extension) = name.rsplit_once('.')?;
    if extension.eq_ignore_ascii_case("csv") {
        Some((stem, Format::Csv))
    } else if extension.eq_ignore_ascii_case("jsonl") {
        Some((stem, Format::JsonLines))
    } else {
        None
    }
}

/// Whether a file named `stem` is one of `entity`'s: `accounts`, or `accounts-` or
/// `accounts_` and anything (`accounts-2026-12-01`, `accounts_3`).
fn belongs(entity: &str, stem: &str) -> bool {
    stem == entity
        || stem
            .strip_prefix(entity)
            .is_some_and(|rest| rest.starts_with('-') || rest.starts_with('_'))
}

/// The order an entity's files are read in: the plain `accounts.csv` first, then the dated or
/// numbered drops in name order, numbers by their value (`accounts_9` before `accounts_10`:
/// an exporter numbers its drops without leading zeros as often as with them).
fn file_order<'a>(entity: &str, path: &'a Path) -> (bool, Vec<NamePart<'a>>) {
    let name = path
        .file_name()
        .map(|n| n.as_encoded_bytes())
        .unwrap_or_default();
    (
        path.file_stem().and_then(|s| s.to_str()) != Some(entity),
        name_parts(name),
    )
}

/// A run of a name's digits, compared by value (fewer significant digits first, then digit
/// by digit), or a run of its other bytes, compared byte by byte; digits come before the other
/// bytes, as they do in names whose runs differ in kind after a `-` or `_`.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum NamePart<'a> {
    Digits {
        significant: usize,
        digits: &'a [u8],
        zeros: usize,
    },
    Other(&'a [u8]),
}

fn name_parts(name: &[u8]) -> Vec<NamePart<'_>> {
    let mut parts = Vec::new();
    let mut rest = name;
    while let Some(first) = rest.first() {
        let digit = first.is_ascii_digit();
        let run = rest
            .iter()
            .position(|b| b.is_ascii_digit() != digit)
            .unwrap_or(rest.len());
        let (part, after) = rest.split_at(run);
        parts.push(if digit {
            let zeros = part.iter().take_while(|b| **b == b'0').count();
            let digits = &part[zeros..];
            NamePart::Digits {
                significant: digits.len(),
                digits,
                zeros,
            }
        } else {
            NamePart::Other(part)
        });
        rest = after;
    }
    parts
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

/// The record a row's `fields` make, or why they make none; `at` says where the row is.
fn to_record(
    mut fields: Map<String, Value>,
    columns: &Columns,
    at: &str,
) -> Result<Record, Unreadable> {
    let id = match fields.get(&columns.id) {
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ => return Err(unreadable(None, format!("{at}: no `{}`", columns.id))),
    };
    let modified_at = match fields.get(&columns.modified) {
        Some(Value::String(s)) if !s.is_empty() => Some(
            DateTime::parse_from_rfc3339(s)
                .map_err(|e| {
                    unreadable(
                        Some(&id),
                        format!("{at}: `{}` is not an RFC 3339 time ({e})", columns.modified),
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
        listed_until: None,
    })
}

fn unreadable(record_id: Option<&str>, message: String) -> Unreadable {
    Unreadable {
        record_id: record_id.map(str::to_string),
        message,
    }
}

/// Records read from one file (each, or why it could not be read, with the byte offset it
/// begins at), and the byte offset after
/// the last one, or `None` at the end of the file, with the hash of the file's text up to that
/// offset when the hash of the text before the first was given.
type FileChunk = (
    Vec<(u64, Result<Record, Unreadable>)>,
    Option<(u64, Option<PrefixHash>)>,
);

/// A file read through this keeps the bytes it gave since it was last moved, so that a page
/// hashes exactly the text its records were parsed from, not the file as it is afterwards.
struct Recorded {
    file: File,
    /// Where the kept bytes begin.
    from: u64,
    bytes: Vec<u8>,
}

impl std::io::Read for Recorded {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
        self.bytes.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

impl Seek for Recorded {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let at = self.file.seek(to)?;
        // Asking where it is (`stream_position`) moves nothing.
        if to != SeekFrom::Current(0) {
            self.from = at;
            self.bytes.clear();
        }
        Ok(at)
    }
}

impl Recorded {
    /// `before`, the hash of the text before the kept bytes, extended over them up to `to`.
    fn hash_to(&self, before: Option<PrefixHash>, to: u64) -> Option<PrefixHash> {
        let kept = usize::try_from(to.checked_sub(self.from)?).ok()?;
        Some(before?.over(self.bytes.get(..kept)?))
    }
}

/// Reads up to `limit` records of `path` from byte `offset`, the text before which hashes to
/// `before`. Of a file still being written (not `settled`), a last line with no line break
/// yet is left for a later sync: it may be a row cut short, which would read as a failure, or
/// worse, as a row with its last value cut (`tr` for `true`).
fn read_records(
    path: &Path,
    format: Format,
    (offset, before): (u64, Option<PrefixHash>),
    limit: usize,
    columns: &Columns,
    settled: bool,
) -> Result<FileChunk, ProviderError> {
    let file = match File::open(path) {
        Ok(file) => file,
        // Moved away since the folder was listed (an exporter's own archiving), or a link to
        // nothing: nothing to read.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), None)),
        // Another's file, say, dropped without read permission: it fails alone, and the
        // entity's other files are read. Granting it changes the file's stamp, so it is read
        // then. Any other failure (a share's I/O error) may pass: the page fails, and is tried
        // again.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let message = format!(
                "{}: the file cannot be opened ({e}); it is passed over",
                path.display()
            );
            return Ok((vec![(0, Err(unreadable(None, message)))], None));
        }
        Err(e) => return Err(io_error(path, e)),
    };
    let file = Recorded {
        file,
        from: 0,
        bytes: Vec::new(),
    };
    let mut records = Vec::new();
    match format {
        Format::JsonLines => {
            let mut reader = BufReader::new(file);
            reader
                .seek(SeekFrom::Start(offset))
                .map_err(|e| io_error(path, e))?;
            let mut position = offset;
            let mut line = Vec::new();
            while records.len() < limit {
                line.clear();
                // By bytes: a line that is not UTF-8 fails alone, as a CSV row does, and the
                // lines after it are read.
                let read = reader
                    .read_until(b'\n', &mut line)
                    .map_err(|e| io_error(path, e))?;
                // A line with no line break is the file's last: in a file still being
                // written, maybe one cut short.
                if read == 0 || (!settled && !line.ends_with(b"\n")) {
                    return Ok((records, None));
                }
                let start = position;
                position += read as u64;
                let at = format!("{} at byte {start}", path.display());
                let Ok(line) = std::str::from_utf8(&line) else {
                    records.push((
                        start,
                        Err(unreadable(None, format!("{at}: a line is not UTF-8 text"))),
                    ));
                    continue;
                };
                // An editor's byte order mark before the first line is not part of it.
                let text = match start {
                    0 => line.trim_start_matches('\u{feff}'),
                    _ => line,
                };
                if text.trim().is_empty() {
                    continue;
                }
                let record = match serde_json::from_str::<Value>(text) {
                    Ok(Value::Object(fields)) => to_record(fields, columns, &at),
                    Ok(_) => Err(unreadable(
                        None,
                        format!("{at}: a line is not a JSON object"),
                    )),
                    Err(e) => Err(unreadable(None, format!("{at}: {e}"))),
                };
                records.push((start, record));
            }
            let at_end = reader.fill_buf().map_err(|e| io_error(path, e))?.is_empty();
            let hash = reader.get_ref().hash_to(before, position);
            Ok((records, (!at_end).then_some((position, hash))))
        }
        Format::Csv => {
            let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(file);
            let headers = match reader.headers() {
                Ok(headers) => headers.clone(),
                // No row of the file can be read without its header: the file fails, alone,
                // until it is written again.
                Err(e) if matches!(e.kind(), csv::ErrorKind::Utf8 { .. }) => {
                    let message = format!(
                        "{}: the header is not UTF-8 ({e}); the file is passed over until it is written again",
                        path.display()
                    );
                    return Ok((vec![(0, Err(unreadable(None, message)))], None));
                }
                Err(e) => return Err(io_error(path, e)),
            };
            if offset > 0 {
                let mut position = csv::Position::new();
                position.set_byte(offset);
                reader.seek(position).map_err(|e| io_error(path, e))?;
            }
            let id_column = headers.iter().position(|h| h == columns.id);
            let mut row = csv::StringRecord::new();
            while records.len() < limit {
                // By byte, as for JSON Lines: a page that resumes mid-file seeks to a byte
                // offset, and the reader's line count starts over there.
                let began = reader.position().byte();
                let at = format!("{} at byte {began}", path.display());
                let read = reader.read_record(&mut row);
                if !matches!(read, Ok(false))
                    && !settled
                    && cut_short(reader.get_ref(), began, reader.position().byte())
                {
                    return Ok((records, None));
                }
                match read {
                    Ok(false) => return Ok((records, None)),
                    // A comma too many or too few shifts every value after it into the wrong
                    // column: the row is not guessed at.
                    Ok(true) if row.len() != headers.len() => {
                        let id = id_column
                            .and_then(|i| row.get(i))
                            .filter(|id| !id.is_empty());
                        records.push((
                            began,
                            Err(unreadable(
                                id,
                                format!(
                                    "{at}: {} fields where the header has {}",
                                    row.len(),
                                    headers.len()
                                ),
                            )),
                        ));
                    }
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
                        records.push((began, to_record(fields, columns, &at)));
                    }
                    Err(e) => records.push((began, Err(unreadable(None, format!("{at}: {e}"))))),
                }
            }
            let next = reader.position().byte();
            // A record that cannot be read is the next page's to report, as its own.
            let more = !matches!(reader.read_record(&mut row), Ok(false));
            let hash = reader.get_ref().hash_to(before, next);
            Ok((records, more.then_some((next, hash))))
        }
    }
}

impl Provider for BulkImport {
    fn name(&self) -> &'static str {
        "bulk_import"
    }

    /// Files are an entity's by their names, so one entity's name with a separator and more
    /// (`orders_items`) would also name files of another (`orders`).
    fn check_entities(&self, entities: &[&str]) -> Result<(), String> {
        for entity in entities {
            if let Some(other) = entities
                .iter()
                .find(|other| *other != entity && belongs(entity, other))
            {
                return Err(format!(
                    "`{other}` files would be read as `{entity}` files too (an entity's files \
                     are `{entity}.csv` or `.jsonl`, and `{entity}-*` or `{entity}_*`): give \
                     one entity, and its files, a name the other's does not begin"
                ));
            }
        }
        Ok(())
    }

    fn check_connection(&self, settings: &mut Map<String, Value>) -> Result<(), String> {
        if settings
            .get("path")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err("connection.path must name the folder exports are dropped in".into());
        }
        for name in ["idColumn", "modifiedColumn", "deletedColumn"] {
            // `null` is the default column.
            if settings
                .get(name)
                .is_some_and(|v| !v.is_null() && v.as_str().is_none_or(str::is_empty))
            {
                return Err(format!("connection.{name} must name a column"));
            }
        }
        if settings.contains_key("settleSeconds") && settle_seconds(settings).is_none() {
            return Err("connection.settleSeconds must be a whole number of seconds".into());
        }
        Ok(())
    }
}

/// `settleSeconds`, written as a number or as a string of one.
fn settle_seconds(settings: &Map<String, Value>) -> Option<u64> {
    match settings.get("settleSeconds")? {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u32::MAX.into())
                .map(|f| f as u64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// How long, by default, a file must have gone unwritten before a sync trusts its stamp
/// (`settleSeconds`). File systems keep times to a clock tick (a few milliseconds here, two
/// seconds on FAT, a second on many network shares): a file written again within the tick of
/// an earlier write keeps that write's times, so a file read so soon after a write may change
/// without its stamp changing.
const SETTLE_SECONDS: u64 = 5;

/// Files a cursor remembers at most (the most recently written): a folder of many exports
/// keeps a cursor of a few kilobytes, and the files it forgets are read again, as they would
/// be without a stamp, never missed.
const REMEMBERED_FILES: usize = 256;

/// How far the exporting system's clock (or a time zone it gets wrong) may run ahead of the
/// file server's: a file is skipped by its times only when it was written that long before the
/// cursor's time, which comes from the records.
const CLOCK_ALLOWANCE: chrono::Duration = chrono::Duration::days(1);

/// How a file is: its length, its last-write and last-change times and its inode. A file
/// whose stamp is what a cursor remembers has not been written since it was read whole. The
/// change time catches a file copied in with its old write time kept (`cp -p`, `rsync -t`);
/// the inode, one replaced by another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    /// Nanoseconds since the Unix epoch, to the file system's tick.
    modified_ns: u128,
    changed_ns: u128,
    inode: u64,
}

impl FileStamp {
    /// The file's stamp now; `None` when it cannot be read (or predates the epoch).
    fn of(path: &Path) -> Option<Self> {
        let metadata = std::fs::metadata(path).ok()?;
        let modified = metadata.modified().ok()?;
        let since_epoch = modified.duration_since(std::time::UNIX_EPOCH).ok()?;
        #[cfg(unix)]
        let (changed_ns, inode) = {
            use std::os::unix::fs::MetadataExt;
            let changed =
                i128::from(metadata.ctime()) * 1_000_000_000 + i128::from(metadata.ctime_nsec());
            (u128::try_from(changed).ok()?, metadata.ino())
        };
        #[cfg(not(unix))]
        let (changed_ns, inode) = (since_epoch.as_nanos(), 0);
        Some(Self {
            len: metadata.len(),
            modified_ns: since_epoch.as_nanos(),
            changed_ns,
            inode,
        })
    }

    /// `length,modified,changed,inode`: how cursors and page tokens spell a stamp.
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

    /// Whether the file was last written before `time`, so it cannot hold a change after it.
    /// Its change time too: a file copied in with its old write time kept came after.
    fn written_before(&self, time: DateTime<Utc>) -> bool {
        time.timestamp_nanos_opt()
            .and_then(|ns| u128::try_from(ns).ok())
            .is_some_and(|ns| self.modified_ns.max(self.changed_ns) < ns)
    }
}

/// A file as a sync began reading it: its stamp, and whether the stamp could be trusted then
/// (the file had gone unwritten for the settling time). Only a file begun settled, and whose
/// stamp is the same once it has been read to its end, is remembered as read whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Begun {
    stamp: FileStamp,
    settled: bool,
}

impl Begun {
    fn now(path: &Path, settle: std::time::Duration) -> Option<Self> {
        let stamp = FileStamp::of(path)?;
        let last_touched = std::time::UNIX_EPOCH
            + std::time::Duration::from_nanos(
                u64::try_from(stamp.modified_ns.max(stamp.changed_ns)).ok()?,
            );
        let settled = last_touched
            .checked_add(settle)
            .is_some_and(|t| t <= std::time::SystemTime::now());
        Some(Self { stamp, settled })
    }

    /// The stamp as [`FileStamp::to_text`] spells it, then `,1` if settled or `,0`: how page
    /// tokens spell it.
    fn to_text(self) -> String {
        format!("{},{}", self.stamp.to_text(), u8::from(self.settled))
    }

    fn parse(text: &str) -> Option<Self> {
        let (stamp, settled) = text.rsplit_once(',')?;
        let settled = match settled {
            "0" => false,
            "1" => true,
            _ => return None,
        };
        Some(Self {
            stamp: FileStamp::parse(stamp)?,
            settled,
        })
    }
}

/// FNV-1a (64 bits) of a file's bytes from its start: what a page token keeps of the text
/// before its offset, extended page by page over the bytes each page read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PrefixHash(u64);

impl PrefixHash {
    const EMPTY: Self = Self(0xcbf2_9ce4_8422_2325);

    /// This hash extended over `bytes`.
    fn over(self, bytes: &[u8]) -> Self {
        let mut hash = self.0;
        for byte in bytes {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Self(hash)
    }

    /// This hash extended over `path`'s bytes `from..to`; `None` if they cannot all be read.
    fn extended(mut self, path: &Path, from: u64, to: u64) -> Option<Self> {
        use std::io::Read;
        let mut file = File::open(path).ok()?;
        file.seek(SeekFrom::Start(from)).ok()?;
        let read = std::io::copy(&mut file.take(to.checked_sub(from)?), &mut self).ok()?;
        (read == to - from).then_some(self)
    }
}

/// Hashing as a sink, so a file's bytes are streamed into it.
impl std::io::Write for PrefixHash {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        *self = self.over(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
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
/// one line per file read whole, `length,modified,changed,inode name` (a name with a line break
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
            let (stamp, name) = line.split_once(' ').ok_or_else(foreign)?;
            read.insert(
                name.to_string(),
                FileStamp::parse(stamp).ok_or_else(foreign)?,
            );
        }
        Ok(Self { time, read })
    }

    /// `time` to the millisecond the cursor's text keeps.
    fn to_cursor_time(time: DateTime<Utc>) -> DateTime<Utc> {
        use chrono::SubsecRound;
        time.trunc_subsecs(3)
    }

    /// Whether the file called `name`, as it is now (`stamp`), was read whole. A stamp the
    /// cursor remembers was settled when it was read, so any write since has changed it.
    fn has_read(&self, name: &str, stamp: Option<FileStamp>) -> bool {
        stamp.is_some_and(|now| self.read.get(name) == Some(&now))
    }

    /// How far into the file called `name`, as it is now (`stamp`), an earlier sync read it:
    /// the rows before that offset which are older than the cursor's time are skipped, as read
    /// then. A file the cursor did not read whole has no row read (a late export, a backfill:
    /// its rows may be older than the cursor's time and still new); one appended to since it
    /// was read whole (the same file, longer) was read up to its length then (an exporter that
    /// paused may go on with older rows); any other was read through (a file written anew).
    fn read_before(&self, name: &str, stamp: Option<FileStamp>) -> u64 {
        match (self.read.get(name), stamp) {
            (None, _) => 0,
            (Some(then), Some(now)) if now.inode == then.inode && now.len > then.len => then.len,
            (Some(_), _) => u64::MAX,
        }
    }

    /// Whether the file was last written before the cursor's time (by the server's clock, and
    /// [`CLOCK_ALLOWANCE`] before it), so it cannot hold a change after it.
    fn predates(&self, stamp: Option<FileStamp>) -> bool {
        self.skips_before()
            .zip(stamp)
            .is_some_and(|(time, stamp)| stamp.written_before(time))
    }

    /// Files last written before this time are skipped by it alone.
    fn skips_before(&self) -> Option<DateTime<Utc>> {
        self.time.map(|time| time - CLOCK_ALLOWANCE)
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
        if let Some(time) = self.skips_before() {
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
        for (name, stamp) in &self.read {
            let _ = write!(text, "\n{} {name}", stamp.to_text());
        }
        Some(text)
    }
}

/// Where a page stops in an entity's files: the byte offset of the file's next record, the
/// file as it was begun, the hash of its bytes before the offset and its name, spelled
/// `offset<TAB>begun<TAB>prefix<TAB>name` (`-` for what is not known); earlier versions wrote
/// `name<TAB>offset`. A resumed page follows the offset into a file as it was, or appended to
/// (its stamp changed, its text up to the offset the same), and reads a file written anew
/// from its start: the offset means nothing in the new text, and its first records may be
/// older than the ones already read. A file the same by its stamp is not hashed again (that
/// would read a large export's text once a page): one written anew within its clock tick of
/// the write before, between two pages, is followed; not having settled, it is not remembered,
/// and the next sync reads it again.
struct PageToken<'a> {
    name: &'a str,
    offset: u64,
    begun: Option<Begun>,
    prefix: Option<PrefixHash>,
}

impl<'a> PageToken<'a> {
    fn parse(token: &'a str) -> Result<Self, ProviderError> {
        let mut parts = token.splitn(4, '\t');
        if let (Some(offset), Some(begun), Some(prefix), Some(name)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
            && let Ok(offset) = offset.parse()
            && let Some(begun) = match begun {
                "-" => Some(None),
                begun => Begun::parse(begun).map(Some),
            }
            && let Some(prefix) = match prefix {
                "-" => Some(None),
                prefix => u64::from_str_radix(prefix, 16)
                    .ok()
                    .map(|h| Some(PrefixHash(h))),
            }
        {
            return Ok(Self {
                name,
                offset,
                begun,
                prefix,
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
            begun: None,
            prefix: None,
        })
    }

    fn to_text(&self) -> String {
        let begun = self.begun.map_or_else(|| "-".to_string(), Begun::to_text);
        let prefix = self
            .prefix
            .map_or_else(|| "-".to_string(), |h| format!("{:016x}", h.0));
        format!("{}\t{begun}\t{prefix}\t{}", self.offset, self.name)
    }

    /// Where to go on in `path`, the file this token names: the offset, the file as begun and
    /// the hash of its text up to the offset; at the offset if the file is as it was or was
    /// appended to, else from its start.
    fn resume(&self, path: &Path, settle: std::time::Duration) -> Resumed {
        let from_start = || begin(Some(path), settle);
        if self.offset == 0 {
            return from_start();
        }
        let Some(then) = self.begun else {
            // Written by a version that kept no stamps: followed, as it was then.
            return (self.offset, None, None);
        };
        let now = FileStamp::of(path);
        if now == Some(then.stamp) {
            return (self.offset, Some(then), self.prefix);
        }
        let appended = now.is_some_and(|now| now.inode == then.stamp.inode)
            && self.prefix.is_some()
            && PrefixHash::EMPTY.extended(path, 0, self.offset) == self.prefix;
        if appended {
            // What was read is the file's text as it is now: the file is begun anew, with
            // the same offset (a later page need not hash its text again).
            (self.offset, Begun::now(path, settle), self.prefix)
        } else {
            from_start()
        }
    }
}

/// Where a page goes on in a file: the offset, the file as begun, and the hash of its text
/// up to the offset.
type Resumed = (u64, Option<Begun>, Option<PrefixHash>);

/// A file begun at its start (nothing when there is no file).
fn begin(path: Option<&Path>, settle: std::time::Duration) -> Resumed {
    let begun = path.and_then(|path| Begun::now(path, settle));
    (0, begun, Some(PrefixHash::EMPTY))
}

/// Where a page begins in an entity's `files`: the file's index, and where in it. The first
/// page begins at the first file; a later one where its token says, or, the token's file
/// having been removed, at the file after it in read order (what it held is gone).
fn start(
    folder: &Path,
    entity: &str,
    files: &[(PathBuf, Format)],
    token: Option<&str>,
    settle: std::time::Duration,
) -> Result<(usize, Resumed), ProviderError> {
    let Some(token) = token else {
        return Ok((0, begin(files.first().map(|(p, _)| p.as_path()), settle)));
    };
    let token = PageToken::parse(token)?;
    if let Some(index) = files.iter().position(|(p, _)| file_name(p) == token.name) {
        return Ok((index, token.resume(&files[index].0, settle)));
    }
    let removed = folder.join(token.name);
    let index = files
        .iter()
        .position(|(p, _)| file_order(entity, p) > file_order(entity, &removed))
        .unwrap_or(files.len());
    Ok((
        index,
        begin(files.get(index).map(|(p, _)| p.as_path()), settle),
    ))
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
        let mut cursor = match &request.cursor {
            Some(text) => ImportCursor::parse(text)?,
            None => ImportCursor::default(),
        };
        // A cursor a future-dated record took past now before its time was capped skips
        // nothing it should.
        cursor.time = cursor.time.map(|time| time.min(Utc::now()));
        let files = entity_files(&folder, &request.entity)?;
        let settle = std::time::Duration::from_secs(
            settle_seconds(&conn.settings).unwrap_or(SETTLE_SECONDS),
        );
        let (mut index, (mut offset, mut begun, mut prefix)) = start(
            &folder,
            &request.entity,
            &files,
            request.page_token.as_deref(),
            settle,
        )?;
        // Files are skipped by their stamps only until the sync opens one: a record read from
        // an earlier file must not have the last word over the same record in a later one (its
        // tombstone, say). A page that follows a token comes after one that opened a file.
        let mut opened = request.page_token.is_some();
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
        // The latest time read from a file that had settled. A file still being written may
        // yet gain rows older than its newest (an export written in id order): its times do
        // not move the cursor on, or the next sync would skip those rows.
        let mut latest: Option<DateTime<Utc>> = None;
        // Rows that could not be read count towards the page too: a file of them is reported
        // a page at a time, not all at once.
        while index < files.len() && page.records.len() + page.unreadable.len() < wanted {
            let (path, format) = &files[index];
            let name = file_name(path);
            let stamp = begun.map(|b| b.stamp);
            let skipped = offset == 0
                && (cursor.predates(stamp) || (!opened && cursor.has_read(name, stamp)));
            let next = if skipped {
                None
            } else {
                opened = true;
                let settled = begun.is_some_and(|b| b.settled);
                let (records, next) = read_records(
                    path,
                    *format,
                    (offset, prefix),
                    wanted - page.records.len() - page.unreadable.len(),
                    &columns,
                    settled,
                )?;
                let read_before = cursor.read_before(name, stamp);
                for (start, record) in records {
                    match record {
                        Ok(r)
                            if start < read_before
                                && cursor
                                    .time
                                    .is_some_and(|s| r.modified_at.is_some_and(|m| m < s)) => {}
                        Ok(r) => {
                            if settled {
                                latest = latest.max(r.modified_at);
                            }
                            page.records.push(r);
                        }
                        Err(unread) => page.unreadable.push(unread),
                    }
                }
                // Read to its end, begun settled and not written since: the next sync may
                // skip it.
                if next.is_none()
                    && let Some(b) = begun.filter(|b| b.settled)
                    && FileStamp::of(path) == Some(b.stamp)
                    && !name.contains('\n')
                {
                    read_whole.read.insert(name.to_string(), b.stamp);
                }
                next
            };
            match next {
                Some((at, hash)) => {
                    offset = at;
                    prefix = hash;
                    page.next_page = Some(
                        PageToken {
                            name,
                            offset,
                            begun,
                            prefix,
                        }
                        .to_text(),
                    );
                }
                None => {
                    index += 1;
                    (offset, begun, prefix) =
                        begin(files.get(index).map(|(p, _)| p.as_path()), settle);
                    page.next_page = files.get(index).map(|(p, _)| {
                        PageToken {
                            name: file_name(p),
                            offset,
                            begun,
                            prefix,
                        }
                        .to_text()
                    });
                }
            }
        }
        // A record stamped in the future (a typo, a clock far ahead) does not take the cursor
        // past now: every later export would be skipped as older.
        read_whole.time = latest
            .map(|latest| latest.min(Utc::now()))
            .map(ImportCursor::to_cursor_time);
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

    /// Exports are versions as of when they were written: a folder may hold several versions of
    /// a record, and any may be read after a newer one (a rewritten export, a backfill).
    fn serves_older_versions(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Credentials;

    #[test]
    fn entities_whose_files_would_mix_are_refused_and_extensions_match_in_any_case() {
        let import = BulkImport::new();
        let refused = import
            .check_entities(&["orders", "orders_items"])
            .unwrap_err();
        assert!(
            refused.contains("orders_items") && refused.contains("a name"),
            "{refused}"
        );
        assert!(import.check_entities(&["orders", "order_items"]).is_ok());
        assert!(matches!(
            format_of("accounts.CSV"),
            Some(("accounts", Format::Csv))
        ));
        assert!(matches!(
            format_of("accounts-2.JsonL"),
            Some(("accounts-2", Format::JsonLines))
        ));
        assert!(format_of("accounts.csv.tmp").is_none());
    }

    /// A connection to `folder` whose files settle at once: a test's file is trusted as soon
    /// as it is written.
    fn conn(folder: &Path) -> Connection {
        settling(folder, 0)
    }

    fn settling(folder: &Path, seconds: u64) -> Connection {
        let mut settings = Map::new();
        settings.insert("path".into(), Value::String(folder.display().to_string()));
        settings.insert("settleSeconds".into(), Value::String(seconds.to_string()));
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
            cursor_read_at: None,
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
            ["a1", "a2", "a3", "a4", "a5"],
            "a cursor that read no file whole skips no row by its time"
        );
    }

    #[tokio::test]
    async fn a_row_that_cannot_be_read_is_reported_alone_and_a_missing_folder_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("accounts.jsonl"),
            "\u{feff}{\"id\":\"a1\"}\nnot json\n{\"name\":\"no id\"}\n{\"id\":\"a4\",\"modified_at\":\"2026-01-01\"}\n{\"id\":\"a5\"}\n",
        )
        .unwrap();
        let page = BulkImport
            .fetch_page(&mut conn(dir.path()), &request("accounts", 10))
            .await
            .unwrap();
        let ids: Vec<_> = page.records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            ["a1", "a5"],
            "a byte order mark is not part of the first line"
        );
        let unread: Vec<_> = page
            .unreadable
            .iter()
            .map(|u| (u.record_id.as_deref(), u.message.as_str()))
            .collect();
        assert_eq!(unread.len(), 3, "{unread:?}");
        assert!(
            unread[0].1.contains("accounts.jsonl at byte 15"),
            "{unread:?}"
        );
        assert!(unread[1].1.ends_with("no `id`"), "{unread:?}");
        assert_eq!(unread[2].0, Some("a4"));
        assert!(unread[2].1.contains("not an RFC 3339 time"), "{unread:?}");

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

    fn csv_rows(ids: &[&str]) -> String {
        ids.iter()
            .fold(String::from("id,modified_at\n"), |text, id| {
                text + &format!("{id},2026-01-05T00:00:00Z\n")
            })
    }

    fn json_lines(ids: &[&str]) -> String {
        ids.iter()
            .map(|id| format!("{{\"id\":\"{id}\"}}\n"))
            .collect()
    }

    #[tokio::test]
    async fn an_export_read_whole_is_not_read_again_until_it_is_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let accounts = dir.path().join("accounts.csv");
        std::fs::write(&accounts, csv_rows(&["a1", "a2", "a3"])).unwrap();
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

        let second = dir.path().join("accounts-2.csv");
        std::fs::write(&second, csv_rows(&["a4"])).unwrap();
        let (ids, cursor) = sync(&mut conn, "accounts", 2, cursor).await;
        assert_eq!(ids, ["a4"], "only the new export is read");

        std::fs::write(&accounts, csv_rows(&["a1", "a2", "a3", "a5"])).unwrap();
        let (ids, cursor) = sync(&mut conn, "accounts", 2, cursor).await;
        assert_eq!(
            ids,
            ["a1", "a2", "a3", "a5", "a4"],
            "an export written again is read again, and the ones after it"
        );
        let (ids, cursor) = sync(&mut conn, "accounts", 2, cursor).await;
        assert!(ids.is_empty(), "{ids:?}");

        // Copied in as long as before and with its old write time kept: its change time says
        // (written again until the clock has ticked, which the times are kept to).
        let before = FileStamp::of(&second).unwrap();
        let written = std::fs::metadata(&second).unwrap().modified().unwrap();
        while FileStamp::of(&second).unwrap().changed_ns == before.changed_ns {
            std::fs::write(&second, csv_rows(&["a6"])).unwrap();
            File::options()
                .write(true)
                .open(&second)
                .unwrap()
                .set_modified(written)
                .unwrap();
        }
        let (ids, _) = sync(&mut conn, "accounts", 2, cursor).await;
        assert_eq!(ids, ["a6"]);
    }

    #[tokio::test]
    async fn a_late_export_of_rows_older_than_the_cursor_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("accounts-2026-01-02.csv"),
            "id,modified_at\na2,2026-01-02T00:00:00Z\n",
        )
        .unwrap();
        let mut conn = conn(dir.path());
        let (ids, cursor) = sync(&mut conn, "accounts", 10, None).await;
        assert_eq!(ids, ["a2"]);

        // The export of the day before arrives a day late.
        std::fs::write(
            dir.path().join("accounts-2026-01-01.csv"),
            "id,modified_at\na1,2026-01-01T00:00:00Z\n",
        )
        .unwrap();
        let (ids, _) = sync(&mut conn, "accounts", 10, cursor).await;
        assert_eq!(
            ids,
            ["a1", "a2"],
            "and the export after it again, whose row is at the cursor's time"
        );
    }

    #[tokio::test]
    async fn rows_appended_to_an_export_after_a_pause_are_read_though_older_than_the_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let accounts = dir.path().join("accounts.csv");
        std::fs::write(
            &accounts,
            "id,modified_at\na1,2026-01-02T00:00:00Z\na2,2026-01-03T00:00:00Z\n",
        )
        .unwrap();
        let mut conn = conn(dir.path());
        let (ids, cursor) = sync(&mut conn, "accounts", 10, None).await;
        assert_eq!(ids, ["a1", "a2"]);

        // An exporter writing in id order goes on after a pause, with an older row.
        use std::io::Write;
        File::options()
            .append(true)
            .open(&accounts)
            .unwrap()
            .write_all(b"a3,2026-01-01T00:00:00Z\n")
            .unwrap();
        let (ids, _) = sync(&mut conn, "accounts", 10, cursor).await;
        assert_eq!(
            ids,
            ["a2", "a3"],
            "the rows read before are still skipped by time; a2 is at the cursor's time"
        );
    }

    #[tokio::test]
    async fn files_that_cannot_be_opened_are_passed_over_and_the_others_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("accounts.csv"), "id\na1\n").unwrap();
        std::os::unix::fs::symlink(
            dir.path().join("gone.csv"),
            dir.path().join("accounts_2.csv"),
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("accounts_3.csv")).unwrap();
        std::fs::write(dir.path().join("accounts_4.csv"), "id\na4\n").unwrap();
        let mut conn = conn(dir.path());

        let ids: Vec<String> = all(&mut conn, request("accounts", 10))
            .await
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["a1", "a4"]);
    }

    #[tokio::test]
    async fn numbered_drops_are_read_in_the_order_of_their_numbers() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            ("accounts_10.csv", "id,_deleted\nx,true\n"),
            ("accounts_9.csv", "id,_deleted\nx,\n"),
            ("accounts_02.csv", "id,_deleted\nb,\n"),
            ("accounts.csv", "id,_deleted\na,\n"),
        ] {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let mut conn = conn(dir.path());

        let records = all(&mut conn, request("accounts", 10)).await;
        let read: Vec<(&str, bool)> = records.iter().map(|r| (r.id.as_str(), r.deleted)).collect();
        assert_eq!(
            read,
            [("a", false), ("b", false), ("x", false), ("x", true)],
            "drop 10 comes after drop 9, so its tombstone has the last word"
        );
    }

    #[tokio::test]
    async fn exports_stamped_ahead_of_the_file_servers_clock_are_still_opened() {
        let dir = tempfile::tempdir().unwrap();
        let at = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let now = Utc::now();
        // An exporter that writes its local time as UTC, an hour ahead of the file server.
        let ahead = |minutes: i64| at(now + chrono::Duration::minutes(60 + minutes));
        std::fs::write(
            dir.path().join("accounts.csv"),
            format!("id,modified_at\na1,{}\n", ahead(0)),
        )
        .unwrap();
        let mut conn = conn(dir.path());
        let (ids, cursor) = sync(&mut conn, "accounts", 10, None).await;
        assert_eq!(ids, ["a1"]);

        std::fs::write(
            dir.path().join("accounts-2.csv"),
            format!("id,modified_at\na2,{}\n", ahead(15)),
        )
        .unwrap();
        let (ids, _) = sync(&mut conn, "accounts", 10, cursor).await;
        assert_eq!(ids, ["a2"], "the next export is opened");
    }

    #[tokio::test]
    async fn a_record_stamped_decades_ahead_takes_the_cursor_no_further_than_now() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("accounts.csv"),
            "id,modified_at\na1,2062-01-05T00:00:00Z\n",
        )
        .unwrap();
        let mut conn = conn(dir.path());
        let (_, cursor) = sync(&mut conn, "accounts", 10, None).await;
        let time = BulkImport.cursor_time(cursor.as_deref().unwrap()).unwrap();
        assert!(time <= Utc::now(), "{time}");

        let soon = (Utc::now() + chrono::Duration::seconds(5))
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        std::fs::write(
            dir.path().join("accounts-2.csv"),
            format!("id,modified_at\na2,{soon}\n"),
        )
        .unwrap();
        let (ids, _) = sync(&mut conn, "accounts", 10, cursor).await;
        assert!(ids.contains(&"a2".to_string()), "{ids:?}");

        // A cursor that went past now before its time was capped skips no export either.
        let poisoned = Some("2062-01-05T00:00:00.000Z".to_string());
        let (ids, _) = sync(&mut conn, "accounts", 10, poisoned).await;
        assert!(ids.contains(&"a2".to_string()), "{ids:?}");
    }

    #[tokio::test]
    async fn a_record_read_again_has_not_the_last_word_over_a_later_export() {
        let dir = tempfile::tempdir().unwrap();
        let accounts = dir.path().join("accounts.csv");
        std::fs::write(
            &accounts,
            "id,modified_at,_deleted\na1,2026-01-05T00:00:00Z,\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("accounts-2.csv"),
            "id,modified_at,_deleted\na1,2026-01-05T00:00:00Z,true\n",
        )
        .unwrap();
        let mut conn = conn(dir.path());
        let (_, cursor) = sync(&mut conn, "accounts", 10, None).await;

        std::fs::write(
            &accounts,
            "id,modified_at,_deleted\na1,2026-01-05T00:00:00Z,\na5,2026-01-05T00:00:00Z,\n",
        )
        .unwrap();
        let mut request = request("accounts", 10);
        request.cursor = cursor;
        let page = BulkImport.fetch_page(&mut conn, &request).await.unwrap();
        let read: Vec<_> = page
            .records
            .iter()
            .map(|r| (r.id.as_str(), r.deleted))
            .collect();
        assert_eq!(read, [("a1", false), ("a5", false), ("a1", true)]);
    }

    #[tokio::test]
    async fn a_json_line_that_is_not_utf8_fails_alone_and_the_lines_after_it_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = json_lines(&["c1"]).into_bytes();
        text.extend_from_slice(b"{\"id\":\"c2\",\"name\":\"M\xfcller\"}\n");
        text.extend_from_slice(json_lines(&["c3"]).as_bytes());
        std::fs::write(dir.path().join("contacts.jsonl"), text).unwrap();
        let mut conn = conn(dir.path());
        let page = BulkImport
            .fetch_page(&mut conn, &request("contacts", 10))
            .await
            .unwrap();
        let ids: Vec<_> = page.records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["c1", "c3"]);
        assert_eq!(page.unreadable.len(), 1);
        let message = &page.unreadable[0].message;
        assert!(
            message.contains("contacts.jsonl at byte 12") && message.contains("not UTF-8"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn a_csv_row_that_cannot_be_read_or_has_a_field_too_many_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = csv_rows(&["a1", "a2"]).into_bytes();
        text.extend_from_slice(b"a3,\xff\xfe\n");
        text.extend_from_slice(b"a4,Acme, Inc,2026-01-01T00:00:00Z\n");
        text.extend_from_slice(&csv_rows(&["a5"]).into_bytes()[csv_rows(&[]).len()..]);
        std::fs::write(dir.path().join("accounts.csv"), text).unwrap();
        let mut conn = conn(dir.path());
        let page = BulkImport
            .fetch_page(&mut conn, &request("accounts", 10))
            .await
            .unwrap();
        let ids: Vec<_> = page.records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["a1", "a2", "a5"]);
        let unread: Vec<_> = page
            .unreadable
            .iter()
            .map(|u| (u.record_id.as_deref(), u.message.as_str()))
            .collect();
        assert!(
            unread[0].1.contains("accounts.csv at byte 63"),
            "{unread:?}"
        );
        assert_eq!(unread[1].0, Some("a4"));
        assert!(
            unread[1].1.contains("4 fields where the header has 2"),
            "{unread:?}"
        );
        assert_eq!(unread.len(), 2);

        // Rows that cannot be read fill a page as rows that can do.
        let bad: String = (0..5).map(|i| format!("b{i},x,y\n")).collect();
        std::fs::write(
            dir.path().join("accounts.csv"),
            format!("id,modified_at\n{bad}"),
        )
        .unwrap();
        let page = BulkImport
            .fetch_page(&mut conn, &request("accounts", 2))
            .await
            .unwrap();
        assert_eq!((page.records.len(), page.unreadable.len()), (0, 2));
        assert!(page.next_page.is_some(), "the rest on later pages");
    }

    #[tokio::test]
    async fn a_file_removed_mid_sync_leaves_the_files_after_it_to_be_read() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("accounts.csv");
        std::fs::write(&first, csv_rows(&["a1", "a2", "a3"])).unwrap();
        std::fs::write(dir.path().join("accounts-2.csv"), csv_rows(&["b1"])).unwrap();
        let mut conn = conn(dir.path());
        let token = first_token(&mut conn).await;
        std::fs::remove_file(&first).unwrap();
        assert_eq!(resumed(&mut conn, token).await, ["b1"]);
    }

    #[tokio::test]
    async fn an_export_copied_in_with_an_old_write_time_is_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("accounts.csv"), csv_rows(&["a1"])).unwrap();
        let mut conn = conn(dir.path());
        let (_, cursor) = sync(&mut conn, "accounts", 10, None).await;

        let copied = dir.path().join("accounts-2.csv");
        std::fs::write(&copied, "id\na9\n").unwrap();
        let long_ago = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        File::options()
            .write(true)
            .open(&copied)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        let (ids, _) = sync(&mut conn, "accounts", 10, cursor).await;
        assert_eq!(
            ids,
            ["a9"],
            "written (2023) before the cursor's time, copied in after it"
        );
    }

    #[tokio::test]
    async fn an_export_still_being_written_is_read_until_it_settles() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("accounts.csv"), csv_rows(&["a1"])).unwrap();
        let mut unsettled = settling(dir.path(), 3600);

        let (ids, cursor) = sync(&mut unsettled, "accounts", 10, None).await;
        assert_eq!(ids, ["a1"]);
        let (ids, cursor) = sync(&mut unsettled, "accounts", 10, cursor).await;
        assert_eq!(
            ids,
            ["a1"],
            "a write may follow within its clock tick, unseen"
        );

        let mut settled = conn(dir.path());
        let (ids, cursor) = sync(&mut settled, "accounts", 10, cursor).await;
        assert_eq!(ids, ["a1"]);
        let (ids, _) = sync(&mut settled, "accounts", 10, cursor).await;
        assert!(ids.is_empty(), "{ids:?}");
    }

    #[tokio::test]
    async fn a_row_cut_short_in_an_export_still_being_written_waits_for_its_line_break() {
        let dir = tempfile::tempdir().unwrap();
        let lines = dir.path().join("accounts.jsonl");
        std::fs::write(&lines, "{\"id\":\"a1\"}\n{\"id\":\"a").unwrap();
        std::fs::write(
            dir.path().join("contacts.csv"),
            "id,_deleted,note\nc0,false,12\" pipe\nc1,false,x\nc2,false,\"first line\n",
        )
        .unwrap();
        let mut unsettled = settling(dir.path(), 3600);
        let mut request = request("accounts", 10);
        let page = BulkImport
            .fetch_page(&mut unsettled, &request)
            .await
            .unwrap();
        let ids: Vec<&str> = page.records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["a1"]);
        assert!(page.unreadable.is_empty(), "{:?}", page.unreadable);
        // Neither a note cut short inside its quotes, nor a tombstone whose `true` is half
        // written, is read.
        request.entity = "contacts".into();
        let page = BulkImport
            .fetch_page(&mut unsettled, &request)
            .await
            .unwrap();
        let ids: Vec<&str> = page.records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            ["c0", "c1"],
            "a quote in an unquoted value holds nothing back"
        );
        std::fs::write(dir.path().join("leads.csv"), "id,_deleted\nl1,false\nl2,tr").unwrap();
        request.entity = "leads".into();
        let page = BulkImport
            .fetch_page(&mut unsettled, &request)
            .await
            .unwrap();
        let ids: Vec<&str> = page.records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["l1"]);

        // Once the file has settled, its last line is what the exporter meant.
        std::fs::write(&lines, "{\"id\":\"a1\"}\n{\"id\":\"a2\"}").unwrap();
        let (ids, _) = sync(&mut conn(dir.path()), "accounts", 10, None).await;
        assert_eq!(ids, ["a1", "a2"]);
    }

    #[tokio::test]
    async fn rows_added_to_an_export_still_being_written_are_read_whatever_their_times() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("accounts.csv");
        // An exporter writing in id order: a later row may be older than an earlier one.
        std::fs::write(&file, "id,modified_at\na1,2026-01-05T00:00:00Z\n").unwrap();
        let mut unsettled = settling(dir.path(), 3600);
        let (ids, cursor) = sync(&mut unsettled, "accounts", 10, None).await;
        assert_eq!(ids, ["a1"]);

        let mut text = std::fs::read_to_string(&file).unwrap();
        text.push_str("a2,2026-01-02T00:00:00Z\n");
        std::fs::write(&file, text).unwrap();
        let (ids, _) = sync(&mut unsettled, "accounts", 10, cursor).await;
        assert_eq!(
            ids,
            ["a1", "a2"],
            "the unsettled file did not move the cursor on"
        );
    }

    /// The token of the page after the entity's first.
    async fn first_token(conn: &mut Connection) -> String {
        let page = BulkImport
            .fetch_page(conn, &request("accounts", 2))
            .await
            .unwrap();
        page.next_page.unwrap()
    }

    /// The records of the page that `token` begins.
    async fn resumed(conn: &mut Connection, token: String) -> Vec<String> {
        let mut request = request("accounts", 2);
        request.page_token = Some(token);
        let page = BulkImport.fetch_page(conn, &request).await.unwrap();
        page.records.into_iter().map(|r| r.id).collect()
    }

    #[tokio::test]
    async fn a_resumed_page_follows_a_file_appended_to_and_reads_one_written_anew_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounts.jsonl");
        let mut conn = conn(dir.path());
        std::fs::write(&path, json_lines(&["a1", "a2", "a3"])).unwrap();
        let token = first_token(&mut conn).await;
        let mut file = File::options().append(true).open(&path).unwrap();
        std::io::Write::write_all(&mut file, json_lines(&["a4"]).as_bytes()).unwrap();
        assert_eq!(resumed(&mut conn, token).await, ["a3", "a4"]);

        // Written anew in place, as long up to the offset but for its first record.
        std::fs::write(&path, json_lines(&["b1", "b2", "b3", "b4"])).unwrap();
        let token = first_token(&mut conn).await;
        std::fs::write(&path, json_lines(&["x1", "b2", "b3", "b4", "b5"])).unwrap();
        assert_eq!(resumed(&mut conn, token).await, ["x1", "b2"]);

        // Replaced by another file, as long, line for line: another inode.
        let token = first_token(&mut conn).await;
        let replacement = dir.path().join("replacement.tmp");
        std::fs::write(&replacement, json_lines(&["c1", "c2", "c3", "c4"])).unwrap();
        std::fs::rename(&replacement, &path).unwrap();
        assert_eq!(resumed(&mut conn, token.clone()).await, ["c1", "c2"]);

        // A CSV export appended to, its header included in the text its token hashes.
        let csv = dir.path().join("accounts.csv");
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&csv, csv_rows(&["d1", "d2", "d3"])).unwrap();
        let csv_token = first_token(&mut conn).await;
        let mut file = File::options().append(true).open(&csv).unwrap();
        std::io::Write::write_all(&mut file, b"d4,2026-01-05T00:00:00Z\n").unwrap();
        assert_eq!(resumed(&mut conn, csv_token).await, ["d3", "d4"]);
        std::fs::remove_file(&csv).unwrap();
        std::fs::write(&path, json_lines(&["c1", "c2", "c3", "c4"])).unwrap();

        // A token of earlier versions, the file and the offset, is followed.
        let offset = token.split('\t').next().unwrap();
        let legacy = format!("accounts.jsonl\t{offset}");
        assert_eq!(resumed(&mut conn, legacy).await, ["c3", "c4"]);
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
                    20,1767312000000000000,1767312000000000000,7 new export.csv\n\
                    10,1767225600000000000,1767225600000000000,7 old.csv";
        let cursor = ImportCursor::parse(text).unwrap();
        assert_eq!(cursor.read["new export.csv"], late);
        assert_eq!(cursor.to_text().as_deref(), Some(text));
        assert!(cursor.has_read("old.csv", Some(early)));
        let rewritten = FileStamp { len: 11, ..early };
        assert!(
            !cursor.has_read("old.csv", Some(rewritten)),
            "written again"
        );
        assert!(!cursor.has_read("other.csv", Some(late)));
        assert!(!cursor.predates(Some(early)));

        // A day past the old file's time: its clock may have been that far behind.
        let later = ImportCursor::parse("2026-01-02T12:00:00.000Z").unwrap();
        let combined = cursor.and_then(later);
        assert_eq!(
            combined.to_text().unwrap(),
            "2026-01-02T12:00:00.000Z\n\
             20,1767312000000000000,1767312000000000000,7 new export.csv",
            "a file written a day before the time needs no entry"
        );
        assert!(combined.predates(Some(rewritten)), "the time skips it");
        let within_a_day = ImportCursor::parse("2026-01-01T12:00:00.000Z").unwrap();
        assert!(!within_a_day.predates(Some(rewritten)));
        assert_eq!(
            BulkImport.cursor_time("\n20,1,1,7 x.csv"),
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
