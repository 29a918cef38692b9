//! The external ids a complete listing returned, held by the job that reads its last page to
//! tell which synced shards the provider no longer lists.
//!
//! A listing is as long as the entity (every Zoom meeting, every Gong user), so this is the one
//! thing a sync keeps that grows with the entity rather than the page. It keeps a 64-bit hash
//! of each id, not the id: 8 bytes a record where a set of strings took 60 to 90 (the string,
//! its allocation and the set's slot), so a million meetings cost 8 MB, not 70.
//!
//! A hash can stand for the id because the set is only asked whether an id is in it, and only
//! to decide that a shard's record is gone. Two ids with one hash could make a record that is
//! gone look listed, and its shard would stay until a later listing; with 64 bits the chance
//! that a gone record meets one of a million listed ones is about one in eighteen million
//! million. A listed record is never taken for gone: its own hash is there.
//!
//! The hashes are seeded per set and never stored: what the jobs before stored are the ids,
//! hashed again when read back.

use std::hash::BuildHasher;

/// The hashed external ids of a listing, added page by page and then asked about.
pub(crate) struct ListedIds {
    seed: foldhash::quality::RandomState,
    /// Sorted and without repeats up to `sorted`; appended after it.
    hashes: Vec<u64>,
    sorted: usize,
}

impl ListedIds {
    pub fn new() -> Self {
        Self {
            seed: foldhash::quality::RandomState::default(),
            hashes: Vec::new(),
            sorted: 0,
        }
    }

    pub fn extend<I>(&mut self, ids: I)
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let seed = &self.seed;
        self.hashes
            .extend(ids.into_iter().map(|id| seed.hash_one(id.as_ref())));
    }

    /// Sorts what was added since the last call, so that [`ListedIds::contains`] searches.
    /// A page's ids come in at a time and the question comes at the end, so one sort at the
    /// end costs less than keeping a set in order.
    pub fn seal(&mut self) {
        if self.sorted < self.hashes.len() {
            self.hashes.sort_unstable();
            self.hashes.dedup();
            self.hashes.shrink_to_fit();
            self.sorted = self.hashes.len();
        }
    }

    /// Whether `id` was listed. Only what was added before the last [`ListedIds::seal`] is
    /// seen.
    pub fn contains(&self, id: &str) -> bool {
        self.hashes[..self.sorted]
            .binary_search(&self.seed.hash_one(id))
            .is_ok()
    }

    /// The ids held (an id listed twice counts once, once sealed).
    pub(crate) fn len(&self) -> usize {
        self.hashes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_added_on_any_page_is_found_and_one_never_added_is_not() {
        let mut listed = ListedIds::new();
        listed.extend(["81", "82"]);
        listed.extend(vec!["90".to_string(), "81".to_string()]);
        listed.seal();
        assert!(listed.contains("81"));
        assert!(listed.contains("82"));
        assert!(listed.contains("90"));
        assert!(!listed.contains("83"));
        assert!(!listed.contains(""));
        assert_eq!(listed.len(), 3, "an id listed twice is held once");
    }

    #[test]
    fn ids_added_after_the_seal_are_found_once_sealed_again() {
        let mut listed = ListedIds::new();
        listed.extend(["a"]);
        listed.seal();
        listed.extend(["b"]);
        assert!(!listed.contains("b"));
        listed.seal();
        assert!(listed.contains("a") && listed.contains("b"));
    }

    #[test]
    fn a_large_listing_costs_eight_bytes_a_record() {
        let mut listed = ListedIds::new();
        for page in 0..50 {
            listed.extend((0..2000).map(|i| format!("meeting-{page}-{i:05}-with-a-long-id")));
        }
        listed.seal();
        assert_eq!(listed.len(), 100_000);
        assert_eq!(listed.hashes.capacity() * size_of::<u64>(), 800_000);
        assert!(listed.contains("meeting-49-01999-with-a-long-id"));
        assert!(!listed.contains("meeting-50-00000-with-a-long-id"));
    }

    #[test]
    fn no_two_of_a_million_similar_ids_share_a_hash() {
        let mut listed = ListedIds::new();
        listed.extend((0..1_000_000u32).map(|i| i.to_string()));
        listed.seal();
        assert_eq!(listed.len(), 1_000_000);
    }
}
