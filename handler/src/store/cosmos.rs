//! [`ShardStore`] on Azure Cosmos DB (NoSQL), with the official `azure_data_cosmos` client.
//!
//! Shards live in one container partitioned by `/tenantId`. Point reads and writes address an
//! item by (tenant, id), which is all a sync needs for synced shards (their ids are derived);
//! writes guarded by an etag use `If-Match`; queries are parameterized Cosmos SQL, scoped to a
//! tenant's partition when the tenant is known. The client retries throttling (429) and
//! transient failures itself; what is still failing after that surfaces as
//! [`StoreError::Unavailable`], which the engine retries and never drops.

use async_trait::async_trait;
use azure_core::http::StatusCode;
use azure_data_cosmos::models::{ContainerProperties, ItemResponse, TimeToLive};
use azure_data_cosmos::options::{BatchReplaceOptions, ItemWriteOptions, Precondition};
use azure_data_cosmos::{
    ContainerClient, CosmosClient, CosmosError, FeedScope, Query, TransactionalBatch,
};
use futures_util::TryStreamExt;
use serde_json::Value;

use super::{
    IdRange, Op, ShardFingerprint, ShardQuery, ShardStore, StoreError, Upsert, Versioned, Written,
};
use crate::model::Shard;
use crate::model::shard::ExternalRelationship;

pub struct CosmosStore {
    container: ContainerClient,
}

/// Ids per `get_many` query: keeps the query text well under Cosmos DB's size limit.
const GET_MANY_CHUNK: usize = 1000;
/// Operations per transactional batch: Cosmos DB's limit.
const BATCH_OPERATIONS: usize = 100;
/// Serialized documents per transactional batch, under Cosmos DB's 2 MB request limit with
/// room for the batch's own framing.
const BATCH_BYTES: usize = 1_800_000;
/// Batches (or, after a refused batch, single writes) in flight at once.
const WRITE_CONCURRENCY: usize = 8;

fn store_error(e: CosmosError) -> StoreError {
    let status = e.status();
    if status.is_conflict() {
        StoreError::Conflict
    } else if status.is_precondition_failed() {
        StoreError::PreconditionFailed
    } else if status.is_bad_request() || status.status_code() == StatusCode::PayloadTooLarge {
        StoreError::Refused(format!("Cosmos DB: {e}"))
    } else {
        StoreError::Unavailable(format!("Cosmos DB: {e}"))
    }
}

/// Splits writes into transactional batches: one partition (tenant) each, at most
/// [`BATCH_OPERATIONS`] operations and [`BATCH_BYTES`] of documents. A document too large
/// for any batch goes alone, and its single write gets the store's own verdict.
fn batches<'a, 'b>(writes: &'b [Upsert<'a>]) -> Result<Vec<Vec<&'b Upsert<'a>>>, StoreError> {
    let mut by_tenant: Vec<(&str, Vec<Vec<&Upsert<'a>>>, usize)> = Vec::new();
    for write in writes {
        let shard = write.shard;
        let mut size = ByteCount(0);
        serde_json::to_writer(&mut size, shard).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let size = size.0;
        let slot = match by_tenant.iter().position(|(t, _, _)| *t == shard.tenant_id) {
            Some(i) => i,
            None => {
                by_tenant.push((&shard.tenant_id, vec![Vec::new()], 0));
                by_tenant.len() - 1
            }
        };
        let (_, groups, bytes) = &mut by_tenant[slot];
        let current = groups.last().expect("a tenant starts with a batch");
        if !current.is_empty() && (current.len() == BATCH_OPERATIONS || *bytes + size > BATCH_BYTES)
        {
            groups.push(Vec::new());
            *bytes = 0;
        }
        *bytes += size;
        groups.last_mut().expect("just pushed").push(write);
    }
    Ok(by_tenant.into_iter().flat_map(|(_, g, _)| g).collect())
}

/// Counts the bytes a document serializes to, without keeping them.
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a batch whose operations answered `statuses` means, if it failed. The operation that
/// failed it is the one not answering 424 "failed dependency", which the others answer,
/// wherever it stands in the batch. Its refusal is [`StoreError::Refused`], and a guarded
/// write of a shard changed or gone since it was read [`StoreError::PreconditionFailed`], for
/// the caller to write the batch shard by shard; throttling and outages stay retryable, so
/// that a throttled batch is sent again as one request rather than as a hundred.
fn batch_failure(statuses: impl IntoIterator<Item = u16>) -> Option<StoreError> {
    let failed: Vec<u16> = statuses.into_iter().filter(|s| *s >= 300).collect();
    let status = *failed.iter().find(|s| **s != 424).or(failed.first())?;
    Some(match status {
        408 | 429 | 449 | 500.. => {
            StoreError::Unavailable(format!("Cosmos DB: a batch operation answered {status}"))
        }
        404 | 412 => StoreError::PreconditionFailed,
        _ => StoreError::Refused(format!("Cosmos DB: a batch operation answered {status}")),
    })
}

/// The etag a write answered with.
fn etag_of(response: &ItemResponse) -> String {
    response
        .headers()
        .etag()
        .map(|e| e.to_string())
        .unwrap_or_default()
}

/// The properties Cosmos DB adds to every item: not the document's, and not written back.
/// Any other field, whatever its name, is the document's (a shard's own `_ownerTeam`).
const SYSTEM_PROPERTIES: [&str; 6] = ["_rid", "_self", "_etag", "_attachments", "_ts", "_lsn"];

/// Reads a shard from an item, dropping Cosmos's system properties.
fn shard_from(mut item: Value) -> Result<Versioned<Shard>, StoreError> {
    let etag = item
        .get("_etag")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if let Value::Object(fields) = &mut item {
        fields.retain(|k, _| !SYSTEM_PROPERTIES.contains(&k.as_str()));
    }
    let value = serde_json::from_value(item).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(Versioned { value, etag })
}

/// Whether the store may create its database and container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provisioning {
    /// Create them if they are missing (account keys may; the local emulators).
    Create,
    /// They must exist: through Entra, data-plane roles cannot create them, so a missing one is
    /// named instead of failing on a permission error.
    Existing,
}

impl CosmosStore {
    /// The shards container `container` of database `database`: created (partitioned by
    /// `/tenantId`) if it does not exist yet and `provisioning` allows, else checked.
    pub async fn open(
        client: &CosmosClient,
        database: &str,
        container: &str,
        provisioning: Provisioning,
    ) -> Result<Self, StoreError> {
        let db = client.database_client(database);
        if provisioning == Provisioning::Create {
            match client.create_database(database, None).await {
                Ok(_) => {}
                Err(e) if e.status().is_conflict() => {}
                Err(e) => return Err(store_error(e)),
            }
            // Time to live on, with no default: only documents with a `ttl` expire.
            let properties = ContainerProperties::new(container.to_string(), "/tenantId".into())
                .with_default_ttl(TimeToLive::NoDefault);
            match db.create_container(properties, None).await {
                Ok(_) => {}
                Err(e) if e.status().is_conflict() => {}
                Err(e) => return Err(store_error(e)),
            }
        } else if let Err(e) = db.read(None).await {
            return Err(if e.status().is_not_found() {
                StoreError::NotProvisioned(format!(
                    "database `{database}` does not exist; provision it (infra/) or set COSMOS_DATABASE"
                ))
            } else {
                store_error(e)
            });
        }
        let container = match db.container_client(container, None).await {
            Ok(client) => client,
            Err(e) if e.status().is_not_found() => {
                return Err(StoreError::NotProvisioned(format!(
                    "container `{container}` of database `{database}` does not exist; provision it (partition key /tenantId) or set COSMOS_CONTAINER"
                )));
            }
            Err(e) => return Err(store_error(e)),
        };
        Ok(Self { container })
    }

    /// Writes one batch of one tenant's shards atomically: a guarded write replaces its shard
    /// only if it has the etag it was read at.
    async fn write_batch(&self, batch: &[&Upsert<'_>]) -> Result<(), StoreError> {
        let tenant = batch
            .first()
            .map(|w| w.shard.tenant_id.clone())
            .unwrap_or_default();
        let mut operations = TransactionalBatch::new(tenant);
        for write in batch {
            operations = match write.if_match {
                Some(etag) => operations.replace_item(
                    write.shard.id.clone(),
                    write.shard,
                    Some(
                        BatchReplaceOptions::default()
                            .with_precondition(Precondition::if_match(etag.to_string())),
                    ),
                ),
                None => operations.upsert_item(write.shard, None),
            }
            .map_err(store_error)?;
        }
        let response = self
            .container
            .execute_transactional_batch(operations, None)
            .await
            .map_err(store_error)?;
        let results = response.into_model().map_err(store_error)?;
        let statuses = results
            .results()
            .iter()
            .map(|r| if r.is_success() { 200 } else { r.status_code() });
        match batch_failure(statuses) {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// Writes a batch's shards one by one: those Cosmos DB refuses, and those changed since
    /// they were read, are left.
    async fn write_singly(&self, batch: &[&Upsert<'_>]) -> Result<Written, StoreError> {
        let mut written = Written::default();
        for write in batch {
            let shard = write.shard;
            match self.write_one(write).await {
                Ok(_) => {}
                Err(StoreError::Refused(reason)) => {
                    tracing::warn!(shard = %shard.id, %reason, "Cosmos DB refused a shard");
                    written.refused.push(shard.id.clone());
                }
                Err(StoreError::PreconditionFailed) => written.raced.push(shard.id.clone()),
                Err(e) => return Err(e),
            }
        }
        Ok(written)
    }

    /// The fingerprints a query in the tenant's partition projects, in the order it answers,
    /// up to the first whose id is not `wanted`.
    async fn fingerprints_of(
        &self,
        tenant_id: &str,
        query: Query,
        wanted: impl Fn(&str) -> bool,
    ) -> Result<Vec<(String, ShardFingerprint)>, StoreError> {
        let mut items = self
            .container
            .query_items::<Projected>(
                query,
                FeedScope::Partition(tenant_id.to_string().into()),
                None,
            )
            .await
            .map_err(store_error)?;
        let mut found = Vec::new();
        while let Some(item) = items.try_next().await.map_err(store_error)? {
            if !wanted(&item.id) {
                break;
            }
            found.push(item.into_fingerprint());
        }
        Ok(found)
    }

    async fn collect(
        &self,
        query: Query,
        scope: FeedScope,
    ) -> Result<Vec<Versioned<Shard>>, StoreError> {
        let mut items = self
            .container
            .query_items::<Value>(query, scope, None)
            .await
            .map_err(store_error)?;
        let mut out = Vec::new();
        while let Some(item) = items.try_next().await.map_err(store_error)? {
            out.push(shard_from(item)?);
        }
        Ok(out)
    }
}

/// The Cosmos SQL for a [`ShardQuery`], and its parameters. Paths are validated identifiers,
/// so they are written into the text; every value is a parameter.
pub fn cosmos_sql(query: &ShardQuery, with_order: bool) -> (String, Vec<(String, Value)>) {
    let mut params: Vec<(String, Value)> =
        vec![("@type".into(), Value::String(query.shard_type_id.clone()))];
    let top = match (with_order, query.limit) {
        (true, Some(limit)) => format!("TOP {limit} "),
        _ => String::new(),
    };
    let mut sql = format!("SELECT {top}* FROM c WHERE c.shardTypeId = @type");
    if let Some(tenant) = &query.tenant_id {
        sql.push_str(" AND c.tenantId = @tenant");
        params.push(("@tenant".into(), Value::String(tenant.clone())));
    }
    if !query.include_deleted {
        sql.push_str(" AND (NOT IS_DEFINED(c.deletedAt) OR IS_NULL(c.deletedAt))");
    }
    if let Some(element) = &query.element {
        sql.push_str(&format!(
            " AND EXISTS(SELECT VALUE r FROM r IN c.{} WHERE ARRAY_CONTAINS(@element, r.{}))",
            element.array.as_str(),
            element.field.as_str()
        ));
        params.push(("@element".into(), Value::from(element.values.clone())));
    }
    for (i, filter) in query.filters.iter().enumerate() {
        let name = format!("@p{i}");
        let path = format!("c.{}", filter.path.as_str());
        let condition = match (filter.op, &filter.value) {
            (Op::Eq, Value::Null) => format!("(NOT IS_DEFINED({path}) OR IS_NULL({path}))"),
            (Op::Eq, _) => format!("{path} = {name}"),
            (Op::Le, _) => format!("{path} <= {name}"),
            (Op::Ge, _) => format!("{path} >= {name}"),
            (Op::In, _) => format!("ARRAY_CONTAINS({name}, {path})"),
        };
        sql.push_str(" AND ");
        sql.push_str(&condition);
        if !filter.value.is_null() {
            params.push((name, filter.value.clone()));
        }
    }
    if let (true, Some(order)) = (with_order, &query.order_by) {
        let direction = if order.descending { "DESC" } else { "ASC" };
        sql.push_str(&format!(" ORDER BY c.{} {direction}", order.path.as_str()));
    }
    (sql, params)
}

/// A query of `sql` with its `params`.
fn parameterized(sql: String, params: Vec<(String, Value)>) -> Result<Query, StoreError> {
    params
        .into_iter()
        .try_fold(Query::from(sql), |query, (name, value)| {
            query.with_parameter(name, value).map_err(store_error)
        })
}

/// A shard's fingerprint as a query projects it.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Projected {
    id: String,
    #[serde(default)]
    updated_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default)]
    deleted_at: Option<Value>,
    #[serde(default, rename = "external_relationships")]
    links: Vec<ExternalRelationship>,
}

impl Projected {
    fn into_fingerprint(self) -> (String, ShardFingerprint) {
        let fingerprint = ShardFingerprint {
            updated_at: self.updated_at,
            deleted: self.deleted_at.is_some_and(|d| !d.is_null()),
            links: self.links,
        };
        (self.id, fingerprint)
    }
}

/// The Cosmos SQL for [`ShardStore::fingerprints_by_prefix`], and its parameters: a range of
/// ids rather than `STARTSWITH`, which the index serves in order.
fn prefix_sql(
    tenant_id: &str,
    shard_type_id: &str,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
) -> (String, Vec<(String, Value)>) {
    let range = IdRange::of(prefix, after);
    let mut sql = format!(
        "SELECT TOP {limit} c.id, c.updatedAt, c.deletedAt, c.external_relationships FROM c \
         WHERE c.shardTypeId = @type AND c.tenantId = @tenant AND c.id {} @from",
        range.from_op
    );
    let mut params = vec![
        (
            "@type".to_string(),
            Value::String(shard_type_id.to_string()),
        ),
        ("@tenant".to_string(), Value::String(tenant_id.to_string())),
        ("@from".to_string(), Value::String(range.from)),
    ];
    if let Some(end) = range.end {
        sql.push_str(" AND c.id < @end");
        params.push(("@end".to_string(), Value::String(end)));
    }
    sql.push_str(" AND (NOT IS_DEFINED(c.deletedAt) OR IS_NULL(c.deletedAt)) ORDER BY c.id ASC");
    (sql, params)
}

/// Orders and truncates on this side: a cross-partition `ORDER BY` is not needed for the
/// engine's cross-tenant queries, which are bounded (due integrations).
fn order_and_limit(mut shards: Vec<Versioned<Shard>>, query: &ShardQuery) -> Vec<Versioned<Shard>> {
    if let Some(order) = &query.order_by {
        let key = |s: &Versioned<Shard>| {
            let doc = serde_json::to_value(&s.value).unwrap_or(Value::Null);
            order
                .path
                .as_str()
                .split('.')
                .fold(doc, |v, segment| {
                    v.get(segment).cloned().unwrap_or(Value::Null)
                })
                .to_string()
        };
        shards.sort_by_cached_key(key);
        if order.descending {
            shards.reverse();
        }
    }
    if let Some(limit) = query.limit {
        shards.truncate(limit);
    }
    shards
}

#[async_trait]
impl ShardStore for CosmosStore {
    async fn get(&self, tenant_id: &str, id: &str) -> Result<Option<Versioned<Shard>>, StoreError> {
        match self
            .container
            .read_item(tenant_id.to_string(), id, None)
            .await
        {
            Ok(response) => {
                let item: Value = response.into_model().map_err(store_error)?;
                shard_from(item).map(Some)
            }
            Err(e) if e.status().is_not_found() => Ok(None),
            Err(e) => Err(store_error(e)),
        }
    }

    async fn create(&self, shard: &Shard) -> Result<String, StoreError> {
        let response = self
            .container
            .create_item(shard.tenant_id.clone(), &shard.id, shard, None)
            .await
            .map_err(store_error)?;
        Ok(etag_of(&response))
    }

    async fn upsert(&self, shard: &Shard) -> Result<String, StoreError> {
        let response = self
            .container
            .upsert_item(shard.tenant_id.clone(), &shard.id, shard, None)
            .await
            .map_err(store_error)?;
        Ok(etag_of(&response))
    }

    async fn replace(&self, shard: &Shard, if_match: &str) -> Result<String, StoreError> {
        let options = ItemWriteOptions::default()
            .with_precondition(Precondition::if_match(if_match.to_string()));
        let response = self
            .container
            .replace_item(shard.tenant_id.clone(), &shard.id, shard, Some(options))
            .await
            .map_err(|e| {
                if e.status().is_not_found() {
                    StoreError::PreconditionFailed
                } else {
                    store_error(e)
                }
            })?;
        Ok(etag_of(&response))
    }

    /// One query per thousand ids within the tenant's partition, instead of a read per id: a
    /// page of a sync costs one request to learn which of its shards exist.
    async fn get_many(
        &self,
        tenant_id: &str,
        ids: &[String],
    ) -> Result<Vec<Option<Versioned<Shard>>>, StoreError> {
        let mut found: std::collections::HashMap<String, Versioned<Shard>> =
            std::collections::HashMap::new();
        for chunk in ids.chunks(GET_MANY_CHUNK) {
            let query = Query::from("SELECT * FROM c WHERE ARRAY_CONTAINS(@ids, c.id)")
                .with_parameter("@ids", chunk)
                .map_err(store_error)?;
            for shard in self
                .collect(query, FeedScope::Partition(tenant_id.to_string().into()))
                .await?
            {
                found.insert(shard.value.id.clone(), shard);
            }
        }
        Ok(ids.iter().map(|id| found.remove(id)).collect())
    }

    /// One query per thousand ids, projecting the fingerprint's fields only.
    async fn fingerprints(
        &self,
        tenant_id: &str,
        ids: &[String],
    ) -> Result<Vec<Option<ShardFingerprint>>, StoreError> {
        let mut found = std::collections::HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(GET_MANY_CHUNK) {
            let query = Query::from(
                "SELECT c.id, c.updatedAt, c.deletedAt, c.external_relationships FROM c \
                 WHERE ARRAY_CONTAINS(@ids, c.id)",
            )
            .with_parameter("@ids", chunk)
            .map_err(store_error)?;
            found.extend(self.fingerprints_of(tenant_id, query, |_| true).await?);
        }
        Ok(ids.iter().map(|id| found.remove(id)).collect())
    }

    /// One query in the tenant's partition, over the range of ids the prefix spans.
    async fn fingerprints_by_prefix(
        &self,
        tenant_id: &str,
        shard_type_id: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, ShardFingerprint)>, StoreError> {
        let (sql, params) = prefix_sql(tenant_id, shard_type_id, prefix, after, limit);
        let query = parameterized(sql, params)?;
        // As in the embedded store: the prefix's ids are one run in id order.
        self.fingerprints_of(tenant_id, query, |id| id.starts_with(prefix))
            .await
    }

    /// Writes in transactional batches of up to 100 shards of one tenant: one request per
    /// batch instead of one per shard. A batch is all or nothing, so a batch with a write
    /// Cosmos DB refuses, or one whose shard changed since it was read, is written again shard
    /// by shard, and only that shard is left.
    async fn upsert_many(&self, writes: &[Upsert<'_>]) -> Result<Written, StoreError> {
        let batches = batches(writes)?;
        let mut left = Written::default();
        for wave in batches.chunks(WRITE_CONCURRENCY) {
            let written = futures_util::future::join_all(wave.iter().map(|batch| async move {
                match self.write_batch(batch).await {
                    Ok(()) => Ok(Written::default()),
                    Err(StoreError::Unavailable(e)) => Err(StoreError::Unavailable(e)),
                    Err(StoreError::PreconditionFailed) => {
                        tracing::debug!(shards = batch.len(), "a shard of a batch changed since it was read; writing them one by one");
                        self.write_singly(batch).await
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, shards = batch.len(), "Cosmos DB refused a batch; writing its shards one by one");
                        self.write_singly(batch).await
                    }
                }
            }))
            .await;
            for result in written {
                let written = result?;
                left.refused.extend(written.refused);
                left.raced.extend(written.raced);
            }
        }
        Ok(left)
    }

    async fn query(&self, query: &ShardQuery) -> Result<Vec<Versioned<Shard>>, StoreError> {
        let in_partition = query.tenant_id.is_some();
        let (sql, params) = cosmos_sql(query, in_partition);
        let cosmos_query = parameterized(sql, params)?;
        let scope = match &query.tenant_id {
            Some(tenant) => FeedScope::Partition(tenant.clone().into()),
            None => FeedScope::full_container(),
        };
        let found = self.collect(cosmos_query, scope).await?;
        Ok(if in_partition {
            found
        } else {
            order_and_limit(found, query)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_cosmos_system_properties_are_dropped_from_a_read_shard() {
        let item = serde_json::json!({
            "id": "s1", "tenantId": "t1", "shardTypeId": "c_contact",
            "_rid": "abc==", "_self": "dbs/x", "_etag": "\"0001\"", "_attachments": "a/",
            "_ts": 1_767_225_600, "_ownerTeam": "emea"
        });
        let read = shard_from(item).unwrap();
        assert_eq!(read.etag, "\"0001\"");
        let text = serde_json::to_value(&read.value).unwrap();
        assert_eq!(text["_ownerTeam"], "emea");
        for system in SYSTEM_PROPERTIES {
            assert!(text.get(system).is_none(), "{system}: {text}");
        }
    }

    #[test]
    fn a_batch_fails_by_the_operation_the_others_depended_on() {
        assert!(batch_failure([200, 201, 200]).is_none());
        assert!(matches!(
            batch_failure([424, 424, 429, 424]),
            Some(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            batch_failure([424, 413, 424]),
            Some(StoreError::Refused(_))
        ));
        assert!(matches!(
            batch_failure([424, 424]),
            Some(StoreError::Refused(_))
        ));
        assert!(matches!(
            batch_failure([424, 412, 424]),
            Some(StoreError::PreconditionFailed)
        ));
    }
    use serde_json::json;

    #[test]
    fn queries_are_parameterized() {
        let query = ShardQuery::of_type("c_integration")
            .in_tenant("t1")
            .filter("structuredData.status", Op::Eq, json!("active"))
            .filter("dedupKeys.email_exact", Op::In, json!(["a@x", "b@x"]))
            .with_external_id("001A")
            .order_by("structuredData.nextSyncAt", false)
            .limit(5);
        let (sql, params) = cosmos_sql(&query, true);
        assert_eq!(
            sql,
            "SELECT TOP 5 * FROM c WHERE c.shardTypeId = @type AND c.tenantId = @tenant \
             AND (NOT IS_DEFINED(c.deletedAt) OR IS_NULL(c.deletedAt)) \
             AND EXISTS(SELECT VALUE r FROM r IN c.external_relationships WHERE ARRAY_CONTAINS(@element, r.externalId)) \
             AND c.structuredData.status = @p0 AND ARRAY_CONTAINS(@p1, c.dedupKeys.email_exact) \
             ORDER BY c.structuredData.nextSyncAt ASC"
        );
        let names: Vec<_> = params.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["@type", "@tenant", "@element", "@p0", "@p1"]);
    }

    #[test]
    fn a_page_of_an_entitys_fingerprints_is_a_range_of_ids_in_order() {
        let (sql, params) = prefix_sql("t1", "c_meeting", "int-1~Meeting~", None, 1000);
        assert_eq!(
            sql,
            "SELECT TOP 1000 c.id, c.updatedAt, c.deletedAt, c.external_relationships FROM c \
             WHERE c.shardTypeId = @type AND c.tenantId = @tenant AND c.id >= @from \
             AND c.id < @end AND (NOT IS_DEFINED(c.deletedAt) OR IS_NULL(c.deletedAt)) \
             ORDER BY c.id ASC"
        );
        assert_eq!(params[2].1, "int-1~Meeting~");
        assert_eq!(params[3].1, "int-1~Meeting\u{7f}");
        let after = Some("int-1~Meeting~7");
        let (sql, params) = prefix_sql("t1", "c_meeting", "int-1~Meeting~", after, 2);
        assert!(sql.contains("c.id > @from"), "{sql}");
        assert_eq!(params[2].1, "int-1~Meeting~7");
    }

    #[test]
    fn system_properties_are_not_part_of_the_shard() {
        let item = json!({"id": "a", "tenantId": "t1", "shardTypeId": "c_x", "_etag": "\"0001\"",
                          "_rid": "abc", "_ts": 1, "custom": 1});
        let shard = shard_from(item).unwrap();
        assert_eq!(shard.etag, "\"0001\"");
        assert!(shard.value.extra.contains_key("custom"));
        assert!(!shard.value.extra.keys().any(|k| k.starts_with('_')));
    }
}
