//! `c_syncListing`: one page of a complete listing, kept until the listing ends.
//!
//! Some providers report no deletions: a record they no longer list is gone (Zoom's meetings,
//! Gong's users). A sync that lists such an entity from the start compares what it listed with
//! the shards it synced before, and soft-deletes the rest. A long listing is read by several
//! jobs, though: one stops at the record limit or the provider's quota and a later job goes on
//! from its checkpoint, or a job dies and its message comes again. So each page's external ids
//! are stored before the checkpoint that counts the page, and the job that reads the last page
//! reads them all back: the comparison then covers the whole listing, whichever jobs read it.
//!
//! Pages are numbered from 0 in the order they were listed, and a listing's page `n` always
//! overwrites page `n` of any listing before it, so a checkpoint that counts `n` pages names
//! exactly the documents `0..n` of its own listing. Documents outlive an abandoned listing by
//! [`LISTING_TTL_SECONDS`] at most.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::Shard;
use super::shard::types;

/// How long a page of a listing is kept after it was written: far longer than a listing takes,
/// even one resumed after a day's quota.
pub const LISTING_TTL_SECONDS: i64 = 7 * 24 * 3600;

/// The external ids one page of a complete listing returned (deletions left out).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListedPage {
    pub integration_id: String,
    pub entity: String,
    /// Its place in the listing, from 0.
    pub page: u64,
    pub ids: Vec<String>,
}

impl ListedPage {
    /// The id of page `page` of a listing whose records sync to shards with ids beginning with
    /// `synced` (`integration~entity~`, escaped as those ids are). Not a synced shard's id:
    /// those never begin with `listing~`.
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

    /// The page a shard keeps, if it is page `page` of the listing of `entity`: a document
    /// that is not (an older format, another listing's) is no page of this one.
    pub fn from_shard(
        shard: &Shard,
        integration_id: &str,
        entity: &str,
        page: u64,
    ) -> Option<ListedPage> {
        let listed: ListedPage = shard.data().ok()?;
        (shard.shard_type_id == types::SYNC_LISTING
            && listed.integration_id == integration_id
            && listed.entity == entity
            && listed.page == page)
            .then_some(listed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page() -> ListedPage {
        ListedPage {
            integration_id: "int-zoom".into(),
            entity: "meetings".into(),
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
            ListedPage::from_shard(&shard, "int-zoom", "meetings", 3),
            Some(page())
        );
    }

    #[test]
    fn a_shard_of_another_page_or_listing_is_not_taken_for_this_one() {
        let shard = page().to_shard("listing~int-zoom~meetings~3".into(), "t1", Utc::now());
        assert_eq!(
            ListedPage::from_shard(&shard, "int-zoom", "meetings", 2),
            None
        );
        assert_eq!(
            ListedPage::from_shard(&shard, "int-gong", "meetings", 3),
            None
        );
        assert_eq!(ListedPage::from_shard(&shard, "int-zoom", "users", 3), None);
        let mut other = shard.clone();
        other.structured_data = serde_json::json!({"ids": ["81"]});
        assert_eq!(
            ListedPage::from_shard(&other, "int-zoom", "meetings", 3),
            None
        );
    }
}
