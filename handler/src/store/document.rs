//! A shard's document and fingerprint as the embedded store writes them, written by hand.
//!
//! The embedded store encodes every shard a sync writes, on the sync's own thread, while the
//! store's writer inserts the shards encoded before. Through serde's generic path that was an
//! eighth of a full sync's instructions: every key of every object scanned for characters to
//! escape and written in four calls, every string scanned a byte at a time, the links written
//! into a value of their own before being copied into the document and the fingerprint. Here the
//! keys, known in advance, are literals, strings are scanned sixteen bytes at a time and copied
//! whole when nothing in them needs escaping (almost always), and the links are written once,
//! straight into the fingerprint, and copied from there into the document.
//!
//! The document is exactly the text `Shard`'s own serialization writes, and the fingerprint
//! what the store's `StoredFingerprint` reads (the tests hold both), so anything that reads
//! them with serde reads these.

use serde_json::Value;

use crate::model::Shard;
use crate::model::shard::ExternalRelationship;
use crate::model::timestamp;

/// A shard's two texts: its document, and its fingerprint (`{"updatedAt":…,"links":[…]}`).
pub(super) struct Texts {
    pub doc: String,
    pub fingerprint: String,
}

/// Room for a typical document, so that writing one does not grow its buffer again and again.
const DOCUMENT_CAPACITY: usize = 1024;

/// Writes `shard`'s document and fingerprint.
pub(super) fn write(shard: &Shard) -> serde_json::Result<Texts> {
    // Every field by name: a field added to `Shard` does not compile until it is written here
    // too.
    let Shard {
        id,
        tenant_id,
        shard_type_id,
        name,
        structured_data,
        relationships,
        external_relationships,
        created_at,
        created_by,
        updated_at,
        deleted_at,
        content_hash,
        dedup_keys,
        ttl,
        extra,
    } = shard;

    let mut fingerprint = Vec::with_capacity(64 + 256 * external_relationships.len());
    fingerprint.extend_from_slice(b"{\"updatedAt\":");
    match updated_at {
        Some(at) => timestamp::push_json(&mut fingerprint, at)?,
        None => fingerprint.extend_from_slice(b"null"),
    }
    fingerprint.extend_from_slice(b",\"links\":");
    let links_start = fingerprint.len();
    fingerprint.push(b'[');
    for (i, link) in external_relationships.iter().enumerate() {
        if i > 0 {
            fingerprint.push(b',');
        }
        push_link(&mut fingerprint, link)?;
    }
    fingerprint.push(b']');
    let links = links_start..fingerprint.len();
    fingerprint.push(b'}');

    let mut doc = Vec::with_capacity(DOCUMENT_CAPACITY);
    doc.extend_from_slice(b"{\"id\":");
    push_str(&mut doc, id)?;
    doc.extend_from_slice(b",\"tenantId\":");
    push_str(&mut doc, tenant_id)?;
    doc.extend_from_slice(b",\"shardTypeId\":");
    push_str(&mut doc, shard_type_id)?;
    doc.extend_from_slice(b",\"name\":");
    push_str(&mut doc, name)?;
    doc.extend_from_slice(b",\"structuredData\":");
    push_value(&mut doc, structured_data)?;
    if !relationships.is_empty() {
        doc.extend_from_slice(b",\"relationships\":");
        serde_json::to_writer(&mut doc, relationships)?;
    }
    if !external_relationships.is_empty() {
        doc.extend_from_slice(b",\"external_relationships\":");
        doc.extend_from_slice(&fingerprint[links]);
    }
    push_stamp(&mut doc, b",\"createdAt\":", created_at)?;
    if let Some(by) = created_by {
        doc.extend_from_slice(b",\"createdBy\":");
        push_str(&mut doc, by)?;
    }
    push_stamp(&mut doc, b",\"updatedAt\":", updated_at)?;
    push_stamp(&mut doc, b",\"deletedAt\":", deleted_at)?;
    if let Some(hash) = content_hash {
        doc.extend_from_slice(b",\"contentHash\":");
        push_str(&mut doc, hash)?;
    }
    if !dedup_keys.is_empty() {
        doc.extend_from_slice(b",\"dedupKeys\":");
        push_object(&mut doc, dedup_keys.iter(), |out, key| push_str(out, key))?;
    }
    if let Some(ttl) = ttl {
        doc.extend_from_slice(b",\"ttl\":");
        serde_json::to_writer(&mut doc, ttl)?;
    }
    for (key, value) in extra {
        doc.push(b',');
        push_str(&mut doc, key)?;
        doc.push(b':');
        push_value(&mut doc, value)?;
    }
    doc.push(b'}');

    Ok(Texts {
        doc: into_string(doc)?,
        fingerprint: into_string(fingerprint)?,
    })
}

/// Writes `key` and the time `at`, if there is one.
fn push_stamp(
    out: &mut Vec<u8>,
    key: &[u8],
    at: &Option<chrono::DateTime<chrono::Utc>>,
) -> serde_json::Result<()> {
    if let Some(at) = at {
        out.extend_from_slice(key);
        timestamp::push_json(out, at)?;
    }
    Ok(())
}

/// The text of a buffer this module wrote: JSON written from UTF-8 strings, so UTF-8 itself.
fn into_string(text: Vec<u8>) -> serde_json::Result<String> {
    String::from_utf8(text).map_err(<serde_json::Error as serde::ser::Error>::custom)
}

/// Writes one link as its derived `Serialize` does.
fn push_link(out: &mut Vec<u8>, link: &ExternalRelationship) -> serde_json::Result<()> {
    let ExternalRelationship {
        integration_id,
        external_id,
        sync_status,
        last_synced_at,
        sync_direction,
        version,
        field_hashes,
        record_hash,
        record_modified_at,
        listed_until,
    } = link;
    out.extend_from_slice(b"{\"integrationId\":");
    push_str(out, integration_id)?;
    out.extend_from_slice(b",\"externalId\":");
    push_str(out, external_id)?;
    out.extend_from_slice(b",\"syncStatus\":\"");
    out.extend_from_slice(sync_status.as_str().as_bytes());
    out.push(b'"');
    push_stamp(out, b",\"lastSyncedAt\":", last_synced_at)?;
    out.extend_from_slice(b",\"syncDirection\":\"");
    out.extend_from_slice(sync_direction.as_str().as_bytes());
    out.push(b'"');
    if let Some(version) = version {
        out.extend_from_slice(b",\"version\":");
        push_str(out, version)?;
    }
    if !field_hashes.is_empty() {
        out.extend_from_slice(b",\"fieldHashes\":");
        push_object(out, field_hashes, |out, hash| push_str(out, hash))?;
    }
    if let Some(hash) = record_hash {
        out.extend_from_slice(b",\"recordHash\":");
        push_str(out, hash)?;
    }
    push_stamp(out, b",\"recordModifiedAt\":", record_modified_at)?;
    push_stamp(out, b",\"listedUntil\":", listed_until)?;
    out.push(b'}');
    Ok(())
}

/// Writes a JSON object of `entries`, in their order, each value with `push`.
fn push_object<'a, V: 'a>(
    out: &mut Vec<u8>,
    entries: impl IntoIterator<Item = (&'a String, &'a V)>,
    push: impl Fn(&mut Vec<u8>, &V) -> serde_json::Result<()>,
) -> serde_json::Result<()> {
    out.push(b'{');
    for (i, (key, value)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_str(out, key)?;
        out.push(b':');
        push(out, value)?;
    }
    out.push(b'}');
    Ok(())
}

/// Writes a JSON value as serde_json does, its strings through [`push_str`].
fn push_value(out: &mut Vec<u8>, value: &Value) -> serde_json::Result<()> {
    match value {
        Value::String(s) => push_str(out, s),
        Value::Object(map) => push_object(out, map, push_value),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                push_value(out, item)?;
            }
            out.push(b']');
            Ok(())
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => serde_json::to_writer(out, value),
    }
}

/// Writes a JSON string: copied whole between quotes when nothing in it needs escaping, and
/// through serde_json otherwise, so that an escaped string is spelled exactly as it spells it.
fn push_str(out: &mut Vec<u8>, s: &str) -> serde_json::Result<()> {
    if needs_escaping(s.as_bytes()) {
        return serde_json::to_writer(out, s);
    }
    out.reserve(s.len() + 2);
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
    Ok(())
}

/// Whether `bytes` hold a character JSON strings escape: a control character, `"` or `\`.
/// Sixteen bytes at a time without a branch per byte, which the compiler turns into a few
/// vector instructions.
fn needs_escaping(bytes: &[u8]) -> bool {
    let escaped = |b: u8| b < 0x20 || b == b'"' || b == b'\\';
    let mut chunks = bytes.chunks_exact(16);
    for chunk in &mut chunks {
        if chunk.iter().fold(false, |any, &b| any | escaped(b)) {
            return true;
        }
    }
    chunks.remainder().iter().any(|&b| escaped(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::shard::{Relationship, RelationshipStatus, SyncDirection};
    use chrono::{TimeZone, Utc};
    use serde_json::json;

    fn link() -> ExternalRelationship {
        ExternalRelationship {
            integration_id: "int-1".into(),
            external_id: "003000000000000001".into(),
            sync_status: RelationshipStatus::Synced,
            last_synced_at: Some(Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap()),
            sync_direction: SyncDirection::Inbound,
            version: None,
            field_hashes: Default::default(),
            record_hash: Some("38e50222947cf95d".into()),
            record_modified_at: Some(Utc.with_ymd_and_hms(2026, 1, 1, 23, 59, 58).unwrap()),
            listed_until: Some(Utc.with_ymd_and_hms(2026, 2, 3, 9, 30, 0).unwrap()),
        }
    }

    fn contact() -> Shard {
        serde_json::from_value(json!({
            "id": "int-1~Contact~003000000000000001", "tenantId": "t1", "shardTypeId": "c_contact",
            "name": "Mary Ann Person1",
            "structuredData": {"email": "person1@acme.test", "first_name": "Mary Ann"},
            "createdAt": "2026-01-02T03:04:05.260991422Z", "createdBy": "system",
            "updatedAt": "2026-01-02T03:04:05.260991422Z", "contentHash": "5c4ddf733788b318",
            "dedupKeys": {"email_exact": "person1@acme.test"}
        }))
        .map(|mut shard: Shard| {
            shard.external_relationships = vec![link()];
            shard
        })
        .unwrap()
    }

    /// The fingerprint as the store's reader expects it.
    fn fingerprint_of(shard: &Shard) -> Value {
        json!({"updatedAt": shard.updated_at.map(|at| json!(at)), "links": shard.external_relationships})
    }

    fn assert_written_as_serde_writes(shard: &Shard) {
        let texts = write(shard).unwrap();
        assert_eq!(texts.doc, serde_json::to_string(shard).unwrap());
        let fingerprint: Value = serde_json::from_str(&texts.fingerprint).unwrap();
        assert_eq!(fingerprint, fingerprint_of(shard));
    }

    #[test]
    fn a_synced_contact_is_the_text_serde_writes() {
        assert_written_as_serde_writes(&contact());
    }

    #[test]
    fn strings_that_need_escaping_are_escaped_as_serde_escapes_them() {
        let mut shard = contact();
        shard.name =
            "Ann \"the\" O\\Brien\n\t\u{1}é 😀 and a name longer than sixteen bytes \"".into();
        shard.structured_data = json!({
            "quote\"key": "tab\there", "nested": {"list": [1, -2.5, true, null, "x\u{7f}y", [], {}]},
            "long": "a".repeat(40) + "\\", "unicode": "Zoë Ångström",
        });
        shard.id = "id\u{1f}".into();
        assert_written_as_serde_writes(&shard);
    }

    #[test]
    fn every_optional_part_is_written_where_serde_writes_it() {
        let mut shard = contact();
        shard.relationships = vec![Relationship {
            kind: "derived_from".into(),
            target_id: "s0".into(),
            target_type: "c_note".into(),
        }];
        let mut two_way = link();
        two_way.sync_status = RelationshipStatus::Deleted;
        two_way.sync_direction = SyncDirection::Bidirectional;
        two_way.version = Some("W/\"12\"".into());
        two_way.field_hashes = [
            ("email".to_string(), "aa".to_string()),
            ("name".into(), "bb".into()),
        ]
        .into_iter()
        .collect();
        two_way.last_synced_at = None;
        two_way.record_modified_at = None;
        shard.external_relationships.push(two_way);
        shard.deleted_at = Some(Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap());
        shard.ttl = Some(86_400);
        shard.extra.insert("_ts".into(), json!(1_767_000_000));
        shard
            .extra
            .insert("owner".into(), json!({"id": "u1", "roles": ["a", "b"]}));
        assert_written_as_serde_writes(&shard);
    }

    #[test]
    fn a_shard_with_nothing_optional_has_an_empty_list_of_links() {
        let shard = Shard {
            id: "s1".into(),
            tenant_id: "t1".into(),
            shard_type_id: "c_note".into(),
            ..Shard::default()
        };
        assert_written_as_serde_writes(&shard);
        assert_eq!(
            write(&shard).unwrap().fingerprint,
            r#"{"updatedAt":null,"links":[]}"#
        );
    }

    #[test]
    fn a_time_only_chrono_spells_is_written_as_chrono_writes_it() {
        let mut shard = contact();
        shard.updated_at = Some(Utc.with_ymd_and_hms(12_000, 1, 1, 0, 0, 0).unwrap());
        assert_written_as_serde_writes(&shard);
    }
}
