// Starts @vercel/cosmosdb-server on plain HTTP for the Cosmos DB tests, with three of its
// quirks mended so that the official Rust SDK can talk to it:
//   1. the account metadata advertises https:// locations even without TLS;
//   2. partition key range ids (and parents) are numbers, the SDK wants strings;
//   3. reading a missing document crashes the handler (500) instead of answering 404;
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

const { createHttpServer } = require("@vercel/cosmosdb-server");
const port = Number(process.argv[2] || 8081);
createHttpServer({ keepAlive: true }).listen(port, "127.0.0.1", () => console.log(`cosmosdb-server on http://127.0.0.1:${port}`));
