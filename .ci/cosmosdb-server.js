// Starts @vercel/cosmosdb-server on plain HTTP for the Cosmos DB tests, with four of its
// quirks mended so that the official Rust SDK can talk to it:
//   1. the account metadata advertises https:// locations even without TLS;
//   2. partition key range ids (and parents) are numbers, the SDK wants strings;
//   3. reading a missing document crashes the handler (500) instead of answering 404;
//   4. its batch handler wants a partition key on every operation, as bulk requests carry
//      them; a transactional batch names its one partition key in the request's header;
//   5. a batch is not atomic: an operation that fails leaves those before it written. A
//      transactional batch's guarded replaces are checked before any operation is applied,
//      so that one whose item changed or is gone fails the batch whole, as Cosmos DB does;
// and it answers with keep-alive, since the SDK pools its connections.
// Usage: node .ci/cosmosdb-server.js PORT
const path = require("path");
const base = path.dirname(require.resolve("@vercel/cosmosdb-server/lib/index.js"));
const handler = (name) => require(path.join(base, "handler", name));

const readMeta = handler("read-meta");
const originalMeta = readMeta.default;
readMeta.default = (...args) =>
  JSON.parse(JSON.stringify(originalMeta(...args)).split("https://").join("http://"));

const ranges = handler("read-partition-key-ranges");
const originalRanges = ranges.default;
ranges.default = async (...args) => {
  const body = await originalRanges(...args);
  for (const range of (body && body.PartitionKeyRanges) || []) {
    range.id = String(range.id);
    range.parents = (range.parents || []).map(String);
  }
  return body;
};

const readDocument = handler("read-document");
const originalRead = readDocument.default;
readDocument.default = (account, req, res, params) => {
  try {
    return originalRead(account, req, res, params);
  } catch (error) {
    res.statusCode = 404;
    return { code: "NotFound", message: "Entity with the specified id does not exist in the system." };
  }
};

const batchDocuments = handler("batch-documents");
const originalBatch = batchDocuments.default;
batchDocuments.default = async (account, req, res, params) => {
  const partitionKey = req.headers["x-ms-documentdb-partitionkey"];
  if (partitionKey !== undefined) {
    const json = require(path.join(base, "json"));
    const body = await json.default(req);
    if (Array.isArray(body)) {
      for (const operation of body) {
        if (operation && operation.partitionKey === undefined) operation.partitionKey = partitionKey;
      }
      const failed = failedPrecondition(account, params, body);
      if (failed !== undefined) {
        return body.map((_, i) => ({ statusCode: i === failed.index ? failed.status : 424, requestCharge: 0 }));
      }
    }
    // The body is read: hand the handler a request that yields it again.
    const replay = require("stream").Readable.from([Buffer.from(JSON.stringify(body))]);
    replay.headers = req.headers;
    replay.method = req.method;
    replay.url = req.url;
    return originalBatch(account, replay, res, params);
  }
  return originalBatch(account, req, res, params);
};

// The first replace of `operations` whose item is gone (404) or has another etag (412).
function failedPrecondition(account, { dbId, collId }, operations) {
  const { parsePartitionKey } = require(path.join(base, "utils", "get-partition-from-header"));
  const collection = account.database(dbId).collection(collId);
  if (!collection.read()) return undefined;
  for (let index = 0; index < operations.length; index += 1) {
    const operation = operations[index];
    if (!operation || operation.operationType !== "Replace" || !operation.ifMatch) continue;
    const id = operation.id || (operation.resourceBody && operation.resourceBody.id);
    const stored = collection.document(id, parsePartitionKey(operation.partitionKey, id)).read();
    if (!stored) return { index, status: 404 };
    if (stored._etag !== operation.ifMatch) return { index, status: 412 };
  }
  return undefined;
}

const { createHttpServer } = require("@vercel/cosmosdb-server");
const port = Number(process.argv[2] || 8081);
createHttpServer({ keepAlive: true }).listen(port, "127.0.0.1", () => console.log(`cosmosdb-server on http://127.0.0.1:${port}`));
