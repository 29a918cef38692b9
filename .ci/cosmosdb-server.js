// Starts @vercel/cosmosdb-server on plain HTTP for the Cosmos DB tests, with four of its
// quirks mended so that the official Rust SDK can talk to it:
//   1. the account metadata advertises https:// locations even without TLS;
//   2. partition key range ids (and parents) are numbers, the SDK wants strings;
//   3. reading a missing document crashes the handler (500) instead of answering 404;
//   4. its batch handler wants a partition key on every operation, as bulk requests carry
//      them; a transactional batch names its one partition key in the request's header;
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

const { createHttpServer } = require("@vercel/cosmosdb-server");
const port = Number(process.argv[2] || 8081);
createHttpServer({ keepAlive: true }).listen(port, "127.0.0.1", () => console.log(`cosmosdb-server on http://127.0.0.1:${port}`));
