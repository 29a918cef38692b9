//! `c_syncListing`: one page of a complete listing, kept while the listing is read.
//!
//! Some providers report no deletions: a record they no longer list is gone (Zoom's meetings,
//! Gong's users). A sync that lists such an entity from the start compares what it listed with
//! the shards it synced before, and soft-deletes the rest. A long listing is read by several
//! jobs, though: one stops at the record limit or the provider's quota and a later job goes on
//! from its checkpoint, or a job dies and its message comes again. So each page's external ids
//! are stored before the checkpoint that counts the page, and the job that reads the last page
//! reads the pages before it back: the comparison then covers the whole listing, whichever jobs
//! read it.
//!
//! Page `n` of an entity's listing is always the same document, so the pages an entity keeps
//! are as many as its longest listing had. Each listing has an id of its own, which its
//! checkpoint and its pages carry: a page that a later listing (one begun again when its page
//! token expired) wrote over is not taken for a page of the listing an old checkpoint resumes.
//! Nothing reads a page once its listing has ended; it is gone [`LISTING_TTL_SECONDS`] after it
//! was last written.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::Shard;
use super::shard::types;

/// How long a page of a listing is kept after it was written: far longer than a listing takes,
/// even one resumed after a day's quota. A listing resumed later than that finds its first
/// pages gone, and then reconciles nothing.
pub const LISTING_TTL_SECONDS: i64 = 7 * 24 * 3600;

/// A listing under way, as the checkpoint of its entity keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListingProgress {
    /// Which listing: its pages carry it.
    pub id: String,
    /// Its pages stored so far: `0..pages`.
    pub pages: u64,
}

/// The external ids one page of a complete listing returned (deletions left out).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListedPage {
    pub integration_id: String,
    pub entity: String,
    /// The listing's id.
    pub listing: String,
    /// Its place in the listing, from 0.
    pub page: u64,
    pub ids: Vec<String>,
}

impl ListedPage {
    /// The id of page `page` of the listings of the entity whose records sync to shards with
    /// ids beginning with `synced` (`integration~entity~`, escaped as those ids are). A synced
    /// shard's id could only be the same for an integration named `listing`, an entity named
    /// after this one's integration and a record whose id is `<entity>~<page>`.
    pub fn id_for(synced: &str, page: u64) -> String {
        format!("listing~{synced}{page}")
    }

    /// The page as the shard that keeps it, under `id` (see [`ListedPage::id_for`]).
    pub fn to_shard(&self, id: String, tenant_id: &str, now: DateTime<Utc>) -> Shard {
        Shard {
            id,
            tenant_id: tenant_id.to_string(),
            shard_type_id: types::SYNC_LISTING.into(),
            name: format!("{} listing, page {}", self.entity, self.page + 1),
            structured_data: serde_json::to_value(self).unwrap_or_default(),
            created_by: Some("system".into()),
            created_at: Some(now),
            updated_at: Some(now),
            ttl: Some(LISTING_TTL_SECONDS),
            ..Shard::default()
        }
    }

    /// The ids a shard keeps, if it is page `page` of listing `listing` of the entity: a
    /// document that is not (an older format, another listing's) is no page of this one.
    pub fn ids_from(
        shard: &Shard,
        integration_id: &str,
        entity: &str,
        listing: &str,
        page: u64,
    ) -> Option<Vec<String>> {
        let listed: ListedPage = shard.data().ok()?;
        (shard.shard_type_id == types::SYNC_LISTING
            && listed.integration_id == integration_id
            && listed.entity == entity
            && listed.listing == listing
            && listed.page == page)
            .then_some(listed.ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page() -> ListedPage {
        ListedPage {
            integration_id: "int-zoom".into(),
            entity: "meetings".into(),
            listing: "7f3a".into(),
            page: 3,
            ids: vec!["81".into(), "82".into()],
        }
    }

    #[test]
    fn a_page_reads_back_from_its_shard_with_its_ids() {
        let id = ListedPage::id_for("int-zoom~meetings~", 3);
        let shard = page().to_shard(id, "t1", Utc::now());
        assert_eq!(shard.id, "listing~int-zoom~meetings~3");
        assert_eq!(shard.shard_type_id, "c_syncListing");
        assert_eq!(shard.ttl, Some(LISTING_TTL_SECONDS));
        assert_eq!(
            ListedPage::ids_from(&shard, "int-zoom", "meetings", "7f3a", 3),
            Some(vec!["81".to_string(), "82".to_string()])
        );
    }

    #[test]
    fn a_shard_of_another_page_or_listing_is_not_taken_for_this_one() {
        let shard = page().to_shard("listing~int-zoom~meetings~3".into(), "t1", Utc::now());
        let ids = |integration, entity, listing, page| {
            ListedPage::ids_from(&shard, integration, entity, listing, page)
        };
        assert_eq!(ids("int-zoom", "meetings", "7f3a", 2), None);
        assert_eq!(ids("int-zoom", "meetings", "9c01", 3), None);
        assert_eq!(ids("int-gong", "meetings", "7f3a", 3), None);
        assert_eq!(ids("int-zoom", "users", "7f3a", 3), None);
        let mut other = shard.clone();
        other.structured_data = serde_json::json!({"ids": ["81"]});
        assert_eq!(
            ListedPage::ids_from(&other, "int-zoom", "meetings", "7f3a", 3),
            None
        );
    }
}
