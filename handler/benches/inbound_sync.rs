//! Inbound sync throughput and memory, end to end: a loopback Salesforce, the release
//! `handler` binary invoked as the Functions host invokes it, and the embedded store.
//!
//!     cargo bench -p handler --bench inbound_sync            # everything
//!     cargo bench -p handler --bench inbound_sync -- 10k     # the 10,000-record figures only
//!     cargo bench -p handler --bench inbound_sync -- 100k    # the 100,000-record figure only
//!     HANDLER_BIN=dist/func-sync/handler cargo bench ...     # another build: the packaged one
//!     BENCH_RUNS=1 HANDLER_BIN=./callgrind-handler cargo bench ... -- 10k
//!
//! The last counts instructions, which repeat from run to run where times vary by a third:
//! `callgrind-handler` is a script that runs `exec valgrind --tool=callgrind
//! --callgrind-out-file=cg.%p target/release/handler "$@"`, and the handler, stopped with
//! SIGTERM, leaves its counts for `callgrind_annotate`.
//!
//! Prints:
//! * a full sync of 10,000 records (5,000 accounts, 5,000 contacts; split-name mapping,
//!   deduplication on email): wall time and records/s, median of five runs;
//! * a re-run with nothing changed: wall time (and that it wrote nothing);
//! * the handler's peak RSS, and the CPU time it spent on each (a consumption plan bills it),
//!   with the kernel's part of that time and the page faults;
//! * the same 10,000 records fetched, parsed and written to the store with no engine around
//!   them (no mapping, dedup, content checks or checkpoints), right after each full sync and
//!   its re-run, and the ratio of the two: the median of the runs' ratios, and their range
//!   (measured apart, the engine's runs first and the baseline's after, the two medians put
//!   the ratio anywhere from 1.5 to 2.2 on the same build, as the machine's other work came
//!   and went);
//! * the loopback Salesforce's own time per page, read over HTTP with nothing done with it;
//! * a full sync of 100,000 records: wall time and the handler's peak RSS;
//! * a full sync of 10,000 records from each of the other providers' loopback fakes (Dynamics
//!   365 rows, OneDrive items, Zoom meetings, Google Drive files, Gong calls): wall time, the
//!   handler's peak RSS and the provider requests made.
//!
//! Where the time goes. Profiled with `perf record -F 3999 --call-graph dwarf,16384` on a build
//! that keeps its symbols (`CARGO_PROFILE_RELEASE_STRIP=none
//! CARGO_PROFILE_RELEASE_DEBUG=line-tables-only`), running this benchmark with `-- 10k`, and
//! each run's samples put in stages by `stages.py` (beside this file: each sample taken while a
//! job ran, on any of the handler's threads, goes to the innermost stage on its stack; frames
//! that only free are left to their caller, but for the page freed on a blocking thread), the
//! five runs averaged. Milliseconds of CPU per run under the profiler, which slows a run by a
//! quarter (the benchmark printed 104 and 36 ms without it); a stage's figure is good to a few
//! milliseconds.
//!
//! | stage                                                        | full sync | re-run |
//! |--------------------------------------------------------------|----------:|-------:|
//! | HTTP read and JSON parse into records                        |        16 |     12 |
//! | mapping (field transforms)                                   |         6 |      6 |
//! | fingerprints of the page's shards (SQL, decoding)            |         3 |     19 |
//! | match keys and whole shards read (SQL, decoding)             |         2 |      1 |
//! | content hash                                                 |         3 |      0 |
//! | record hash                                                  |         1 |      1 |
//! | match keys of records and shards                             |         1 |      0 |
//! | serialisation for the store                                  |        10 |      0 |
//! | landing (merge, links, names)                                |        14 |      0 |
//! | change detection                                             |         1 |      2 |
//! | counting                                                     |         2 |      0 |
//! | job bookkeeping (claim, history, checkpoints, events, token) |         2 |      1 |
//! | store write: rows (b-tree inserts, match keys)               |        32 |      0 |
//! | store write: commit (the log's writes)                       |        11 |      0 |
//! | WAL checkpoint (its own thread)                              |        15 |      0 |
//! | freeing page data (on a blocking thread)                     |         7 |      0 |
//! | the rest (runtime, kernel)                                   |         8 |      6 |
//! | total                                                        |       134 |     49 |
//!
//! The store's three rows are 58 of a full sync's 134 ms; the engine's own work around the
//! records (mapping to counting, the bookkeeping, freeing) 52; reading the pages 16. A re-run is
//! mostly its pages read and their shards' fingerprints.
//!
//! A page is written while it lands: its records land in parts of 250, and each part's changed
//! shards go to the store's writer (its own thread, one transaction a page) while the next part
//! lands. Timestamps taken at each step of a full sync (2,000 contacts a page) show where a
//! page's 13-15 ms go: its match-key lookups 2 ms; landing, hashing and encoding 7-9 ms on the
//! sync's thread while the writer, on the other core, inserts each part about half a millisecond
//! behind; the commit of what is left 1-2 ms (the next page mapped meanwhile); the checkpoint and
//! the next page's fingerprints 1-2 ms. Before the parts, the write began only once the whole
//! page had landed: 3-7% more wall time for 10,000 records (alternating runs, medians 0.086-0.095
//! s against 0.080-0.088 s), the same for 100,000 (1.07 s).
//!
//! Preparing page N+1 during N's write, with its reads corrected by the shards N is writing
//! and the rows encoded on the writer's thread, was measured against an earlier engine (one
//! that wrote a page only once it had landed): 10-15% less wall time (100,000 records in
//! 1.39-1.45 s against 1.62-1.72 s, alternating runs), but a peak RSS of 52-57 MiB against
//! 42-45, since two pages of shards are then alive at once; it is not in the engine. Writing the
//! page before's checkpoint alongside the next page, checkpoints every few megabytes rather than
//! every page, or a lower priority for the checkpoint thread changed nothing measurable.
//!
//! The limit is the CPU, not the order of the work. A full sync costs the handler 100-110 ms of CPU
//! on its threads for 80-88 ms of wall time, and the loopback Salesforce in this process 6 more,
//! so while a page lands both cores are busy: the sync's thread, the writer, the thread that
//! copies the log into the database, and the fetch of the next page. Measured against this engine,
//! alternating runs, with no gain: hashing a page's records and shards on two threads (the second
//! thread finds no idle core); the next-page overlap again (6% less wall time, 4 MiB more memory, a
//! slower re-run); a sync in a process that has synced before (no faster than the first);
//! checkpoints deferred until writes pause (the sync's own CPU 10% lower, but the sync after it
//! pays the copies: the two together cost the same); a page left to commit and checkpoint while
//! the next one reads (on a second, read-only connection, its answers corrected by what the page
//! before landed) and lands its first part (the checkpoint then waits for a core, 2-5 ms instead
//! of 1-2, and the full sync is no faster); that read-only connection alone (the re-run 8% slower:
//! its cache starts cold; 2 MiB more); SQLite's cache at 250 KB or 16 MB, spilling it early, or
//! pages of 8 or 16 KB; the writer committing every 200, 600 or 1,000 rows rather than once a
//! page, so that the log is written while the page lands rather than after (full syncs of
//! 0.085-0.108 s against 0.089-0.101 s over six rounds, within the noise: a profile's timeline
//! shows both cores busy while a page lands, and one of them while its commit writes the log,
//! but the commit's work moved into the landing waits there for a core); opening the handler's
//! port only once the HTTP client is built (its first sync no faster). Nor can hiding a page's
//! reads behind the write of the page before reach the target: with a full sync's reads left
//! out altogether (the fingerprints and match keys of every page), three alternating rounds
//! printed ratios of 1.64-1.67 against 1.72-1.81, full syncs of 0.093-0.106 s against
//! 0.091-0.111 s. A profile's timeline (1 ms buckets) shows why: the store's writer is busy for
//! about 70% of a full sync, and its waits at each page's start are shared with the checkpoint
//! thread and the next page's fetch, which keep the other core busy. A ratio of 1.5 needs about
//! a quarter less CPU per record.
//!
//! Nor did these, four alternating rounds each against the same build (a round's median full
//! sync varies from 0.071 to 0.099 s on this machine): SQLite compiled with the options its
//! documentation recommends for speed (`LIBSQLITE3_FLAGS`: multi-thread mode, no API armor,
//! shared cache, memory management or STAT4, `alloca`; full syncs of 0.085-0.093 s against
//! 0.085-0.099 s, and the baseline, on the same store, gains as much); the content and record
//! hashes taken eight bytes at a time rather than FNV-1a's one, as the most a faster hash could
//! give (0.077-0.085 s against 0.071-0.086 s; their 44 M instructions a full sync are in the
//! profile's landing, but not in its wall time); the HTTP client's trusted roots read from
//! `SSL_CERT_FILE` alone rather than from it and every file of `SSL_CERT_DIR` as well (19 M
//! instructions, loaded while the first sync starts; two rounds, no difference).
//!
//! What the store's writes add, measured by leaving parts of them out (alternating runs, the
//! same machine, a full sync at 0.083-0.085 s): with no rows inserted at all (the documents
//! still encoded), 0.055 s and 60 ms of CPU, where the baseline without its writes takes 0.023
//! s; with no match keys inserted, 0.076 s; with no checkpoints, 0.079 s. Each of the writer's
//! milliseconds shows in the wall time: a page's lookups, the commit of its last part and the
//! checkpoint wait for one another, about 5 ms a page on one core. Neither a thread of the
//! store's own for every statement (in place of the runtime's blocking pool, which hands a
//! page's work to a different thread each time) nor madvise's lazy free in place of returning
//! pages (`MIMALLOC_PURGE_DECOMMITS=0`: 20% fewer faults, 100,000 records at 74 MiB) changed
//! the time.
//!
//! A third of that CPU is the kernel's (this benchmark prints it: 30-40 of a full sync's
//! 100-110 ms, with 11,500 page faults, and 10-16 of a re-run's 40 ms). Much of it is page
//! faults on memory mimalloc returned to the system 2 ms after it was freed and a later page
//! then touched again. Returning it after 100 ms instead halves the faults and takes 14% off the
//! full sync, but a 100,000-record sync then peaks at 68 MiB (20 ms: 53 MiB), over the memory
//! target; it stays at 2 ms. Freeing page data on the sync's own thread rather than a blocking
//! one changed neither, nor did it again with mimalloc 3, where collecting what other threads
//! freed is a tenth of landing's samples (three alternating rounds: full syncs of 0.077-0.081 s
//! either way). Never returning
//! memory at all leaves 8,200 faults (a fresh process touching its heap for the first time, up to
//! a peak of 56 MiB) and no faster sync. The no-engine baseline runs in this warm process: about
//! 900 faults, and 52-54 ms of this process's CPU a run, the loopback Salesforce's included.
//!
//! On a slower 2-core machine (AMD EPYC under KVM, where a page fault costs the kernel about 6 µs),
//! the kernel's part is larger still: 70-90 of a full sync's 210 ms with 11,700 page faults. The
//! same fault profile (`perf record -e page-faults`) says which allocations take memory the
//! allocator must get back from the system each page: a shard's room for four links where it has
//! one (576 bytes a shard, and as much again for each fingerprint read, JSON arrays not saying
//! their length), a record's field map copied into its shard's data rather than moved (its maps
//! then freed only after the page), a BTreeMap of match keys (544 bytes for one key), the page's
//! table of shards, the records' maps as parsed and the HTTP body. With the first three gone,
//! alternating runs: faults 11,700 -> 8,600 a full sync and 5,600 -> 2,700 a re-run, the handler's
//! CPU 212 -> 148-174 ms and 88 -> 56-68 ms, a full sync 0.159 -> 0.114-0.133 s, a re-run
//! 0.074-0.080 -> 0.046-0.060 s, 100,000 records in 1.08-1.15 s at 40 MiB; the no-engine baseline,
//! 0.053-0.073 s on this machine, leaves the ratio at 2.1-2.5. Measured there and not kept: `lto =
//! "fat"` with one codegen unit (2% fewer instructions for twice the release build time); the HTTP
//! body read into a buffer kept from page to page (100-400 fewer faults, within the noise); the
//! page's table of shards kept, emptied, for a later page (550 fewer faults, no less CPU, 1.5 MiB
//! more); mimalloc keeping more empty pages (`page_full_retain` 8 or 32: up to 2,000 fewer faults,
//! no less CPU, 3-5 MiB more) or reclaiming them across threads; purge delays of 0, 10, 25 and 50
//! ms (at 25 ms and more, 100,000 records peak at 50-52 MiB).
//!
//! Since most of those faults are a sync's first touch of memory, not memory touched again after
//! it was returned, these were measured there too, against the same build in alternating runs,
//! and are not kept: transparent huge pages for mimalloc's memory (faults 8,600 -> 3,500, the
//! kernel's time the same, for it then clears 2 MiB at a time; a peak of 77 MiB); a second sync
//! in a process that has synced before (another tenant, the same records: 5,900 faults, and no
//! faster); purge delays of 10 and 20 ms (900 fewer faults, no faster); one worker thread (fewer
//! faults, slower); SQLite reading through `mmap` (no change); a rollback journal instead of the
//! write-ahead log (a sync 10-25% slower: it syncs the file at every commit). Of a full sync's
//! CPU, a quarter is SQLite's I/O (writing the log's frames, the checkpoint copying them into the
//! database, reading pages back). A contact's row is a 660-byte document (its links,
//! timestamps, content hash and match keys) and a 250-byte fingerprint, where the no-engine
//! baseline writes a 150-byte document; but the bytes are not what costs. With the fingerprint
//! column left empty (the fingerprints read from the documents instead) a full sync took the
//! same time and CPU, and with the synced shards' documents left empty too, 3-9% less. The cost
//! is per row: its b-tree inserts (the table, its key, the index by type, a contact's match
//! key) and its share of the commit's log writes and of the checkpoint, together 40% of a full
//! sync's CPU (`perf --call-graph dwarf`), and a fifth more is allocating and page faults on
//! the sync's own threads. mimalloc's `arena_purge_mult` at 1 or 100, `minimal_purge_size` of
//! 1 MiB and `page_reclaim_on_free` changed none of it (at 100: 1,500 fewer faults, 12 MiB
//! more), nor did pages of 1,000 records (1,500 fewer faults, more commits), nor the shards
//! without their index by type (one b-tree insert a row fewer).
//!
//! What a job costs besides its records, from a sync of none (a fresh handler, five runs):
//! 5.0-6.6 ms, where the baseline's token and two empty queries take 0.7-0.8 ms. Traced with
//! `strace -f -ttt`, it is the job's own small commits (its claim on the integration, its
//! history record begun and finished, a checkpoint for each entity), the new access token
//! written to the secrets file, the events appended and, in a fresh process, the write-ahead
//! log created (the log and its directory synced) and the wait for the HTTP client's trusted
//! roots (2 ms to load where both `SSL_CERT_FILE` and `SSL_CERT_DIR` are set, 0.7 ms with one),
//! which the first provider request meets if it comes within 2 ms of the port opening: about
//! 5% of a 10,000-record sync, not the gap. A purge delay of 100 ms, measured again against
//! this engine in alternating rounds: full syncs of 0.077-0.078 s against 0.081-0.083 s, 6,600-
//! 7,000 faults against 8,700, but 100,000 records at 55.9 MiB against 40.8 (never purging:
//! 73.4 MiB); it stays at 2 ms.
//!
//! A complete listing (Zoom's meetings, Gong's users) is compared with the entity's shards a
//! thousand fingerprints at a time: read whole in one query they took a 10,000-meeting sync to
//! 46 MiB, now 26-27 MiB.
//!
//! Instructions, from callgrind (`BENCH_RUNS=1`, a full sync and its re-run, the whole handler
//! process), say where that CPU goes and repeat to a fraction of a percent: 855 M in all. They
//! were 920 M before the store wrote a shard's document and fingerprint by hand
//! (`store/document.rs`) rather than through serde's generic path, which scanned every key for
//! characters to escape and wrote the links into a value of their own: encoding rows 117 M ->
//! 49 M, the handler's CPU per full sync 128-140 ms -> 120-128 ms in alternating runs, the wall
//! time within the noise (the store's writer, not the encoding, then sets the pace). Before
//! that, 916 M (937 M before the records' fields moved into their shards, -7 M, the match keys
//! became a list, -6 M, and batch reads put their answers in place, -5 M; writing a page while
//! it lands moved work, it did not remove any). At 955 M, on the earlier machine, they were
//! the SQLite statements 264 M (the match-key inserts 41 M), reading and parsing Salesforce's pages
//! 128 M, encoding rows 115 M, mapping 70 M, landing 58 M (its record hashes 15 M), change
//! detection 49 M (its content hashes 30 M) and the re-run's record hashes 15 M. JSON string
//! escaping, in every serialization, is the largest single function (65 M); but a writer of our own
//! for the fingerprints' texts, checking eight bytes at a time for characters to escape, measured
//! no gain: their cost is FNV-1a's multiply per byte, which the stored fingerprints fix. They were
//! 1,158 M before lookups by a page of ids or keys joined the JSON array of them rather than
//! building a temporary b-tree of it (-56 M), the primary keys led with the column that tells keys
//! apart instead of the tenant, which every comparison found equal (-68 M), the match keys lost
//! their second index by shard (-29 M), Salesforce's pages were checked as UTF-8 once rather than
//! string by string (-17 M), a new shard took the match keys its record was looked up by (-11 M),
//! the last timestamp's text was kept (-10 M) and a page's rows went to the writer in batches
//! rather than one by one (-10 M).
//!
//! Before that they were 1,365 M; then the page maps were hashed with foldhash (-46 M),
//! query records were read without their `attributes` (-50 M), a new shard's row stopped
//! looking up old index keys (-34 M), a row's
//! links were serialized once for the document and the fingerprint (-25 M), Salesforce's
//! timestamps and the etags were written without `format!` (-24 M), field mappings stopped
//! collecting their outputs (-11 M), shard ids were scanned by byte (-10 M) and the match-key
//! insert was prepared once per batch (-9 M).
//!
//! Before landing moved records' data into the shards it creates (and made room for them at once)
//! and timestamps were written without chrono's formatter, the same profile put 16 ms in landing
//! and 21 ms in serialisation. Before the next page was mapped while this one was written, the next
//! entity's first page fetched ahead and SQLite allocated through mimalloc (without the lock its
//! memory statistics took), a full sync took 0.145 s. Before the store read and wrote in batches
//! without copies, the content hash streamed, unchanged records were told from fingerprints and
//! mimalloc was the allocator, a profile of a 100,000-record sync put 33% of the CPU in the SQLite
//! write path (a read lock taken per shard, a copy of every shard to encode), 13% in freeing page
//! data, 9% in HTTP and JSON (every record read into a document, then copied out), 7% each in the
//! content hash (which built its text in memory) and landing (which copied every stored shard's
//! data), and 31% of all samples inside glibc's malloc and free; a re-run decoded and landed every
//! stored shard. The shards table had no rowids, which put whole documents in its b-tree's interior
//! pages: finding one shard read parts of others by `pread`, 15 reads a lookup. The loopback
//! Salesforce, which projected a query's 5,000 rows before answering, took 10-15 ms over the first
//! page of each entity; it now serves a page in about 1 ms, a few percent of what the engine spends
//! on it.

#[path = "../../tests/api/fake_dynamics.rs"]
#[allow(dead_code)]
mod fake_dynamics;
#[path = "../../tests/api/fake_entra.rs"]
#[allow(dead_code)]
mod fake_entra;
#[path = "../../tests/api/fake_gong.rs"]
#[allow(dead_code)]
mod fake_gong;
#[path = "../../tests/api/fake_google_drive.rs"]
#[allow(dead_code)]
mod fake_google_drive;
#[path = "../../tests/api/fake_graph.rs"]
#[allow(dead_code)]
mod fake_graph;
#[path = "../../tests/api/fake_salesforce.rs"]
#[allow(dead_code)]
mod fake_salesforce;
#[path = "../../tests/api/fake_zoom.rs"]
#[allow(dead_code)]
mod fake_zoom;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{Map, Value, json};

use adapters::{Connection, Credentials, FetchRequest, Pull, salesforce::Salesforce};
use fake_dynamics::FakeDynamics;
use fake_gong::FakeGong;
use fake_google_drive::FakeGoogleDrive;
use fake_graph::FakeGraph;
use fake_salesforce::{FakeSalesforce, ORG_ID};
use fake_zoom::FakeZoom;
use handler::model::Shard;
use handler::secrets::{FileSecrets, Secret, SecretStore, credential_secret_name};
use handler::store::{ShardStore, SqliteStore, Upsert};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn populate(fake: &FakeSalesforce, per_entity: usize) {
    let base = Utc::now() - chrono::Duration::days(1);
    let at = |i: usize| base + chrono::Duration::milliseconds(i as i64);
    fake.load(
        "Account",
        (0..per_entity).map(|i| {
            (json!({"Id": format!("001{i:015}"), "Name": format!("Account {i}"), "Industry": "Technology"}), at(i))
        }),
    );
    // Every hundredth contact repeats the previous one's email: a duplicate to merge.
    fake.load(
        "Contact",
        (0..per_entity).map(|i| {
            let email = format!("person{}@acme.test", if i % 100 == 99 { i - 1 } else { i });
            (json!({"Id": format!("003{i:015}"), "Name": format!("Mary Ann Person{i}"), "Email": email}), at(i))
        }),
    );
}

fn integration(fake: &FakeSalesforce) -> Shard {
    serde_json::from_value(json!({
        "id": "int-bench", "tenantId": "t1", "shardTypeId": "c_integration", "name": "Bench",
        "structuredData": {
            "providerName": "salesforce",
            "syncFrequency": {"type": "manual"},
            "connection": {"loginHost": fake.url, "organizationId": ORG_ID},
            "entityMappings": [
                {"externalEntity": "Account", "shardTypeId": "c_company", "nameField": "name",
                 "fieldMappings": [{"source": "Name", "target": "name", "required": true},
                                   {"source": "Industry", "target": "industry"}]},
                {"externalEntity": "Contact", "shardTypeId": "c_contact", "nameField": "full_name",
                 "fieldMappings": [{"source": "Name", "targets": ["first_name", "last_name"], "transform": "split"},
                                   {"source": "Name", "target": "full_name"},
                                   {"source": "Email", "target": "email", "required": true}],
                 "deduplication": {"rules": [{"field": "email", "matching": "exact"}], "merge": "merge_fields"}}
            ]
        }
    }))
    .unwrap()
}

async fn prepare(dir: &Path, integration: Shard, credentials: Value) {
    SqliteStore::open(&dir.join("store.db"))
        .unwrap()
        .upsert(&integration)
        .await
        .unwrap();
    FileSecrets::new(&dir.join("secrets.json"))
        .set(
            &credential_secret_name("t1", "int-bench"),
            Secret::new(credentials.to_string()),
        )
        .await
        .unwrap();
}

/// A OneDrive integration syncing a drive of `items` files from a loopback Graph.
async fn onedrive(items: usize, dir: &Path) -> FakeGraph {
    let graph = FakeGraph::start().await;
    graph.load_items("b!bench", items);
    let integration = serde_json::from_value(json!({
        "id": "int-bench", "tenantId": "t1", "shardTypeId": "c_integration", "name": "Bench",
        "structuredData": {
            "providerName": "onedrive",
            "syncFrequency": {"type": "manual"},
            "connection": {"tokenUrl": graph.token_url(), "apiBaseUrl": graph.api_base(), "driveId": "b!bench"},
            "entityMappings": [
                {"externalEntity": "driveItem", "shardTypeId": "c_document", "nameField": "name",
                 "fieldMappings": [{"source": "name", "target": "name", "required": true},
                                   {"source": "size", "target": "size", "type": "integer"},
                                   {"source": "file.mimeType", "target": "mime_type"},
                                   {"source": "parentReference.id", "target": "folder"}]}
            ]
        }
    }))
    .unwrap();
    prepare(dir, integration, graph.credentials()).await;
    graph
}

/// A Zoom integration syncing `meetings` scheduled meetings from a loopback Zoom.
async fn zoom(meetings: usize, dir: &Path) -> FakeZoom {
    let zoom = FakeZoom::start().await;
    zoom.load_meetings(meetings);
    let integration = serde_json::from_value(json!({
        "id": "int-bench", "tenantId": "t1", "shardTypeId": "c_integration", "name": "Bench",
        "structuredData": {
            "providerName": "zoom",
            "syncFrequency": {"type": "manual"},
            "connection": {"tokenUrl": zoom.token_url(), "apiBaseUrl": zoom.api_base()},
            "entityMappings": [
                {"externalEntity": "meetings", "shardTypeId": "c_meeting", "nameField": "topic",
                 "fieldMappings": [{"source": "topic", "target": "topic", "required": true},
                                   {"source": "start_time", "target": "starts_at", "type": "datetime"},
                                   {"source": "join_url", "target": "url"}]}
            ]
        }
    }))
    .unwrap();
    prepare(dir, integration, zoom.credentials()).await;
    zoom
}

/// A Google Drive integration syncing `files` files of My Drive from a loopback Drive.
async fn google_drive(files: usize, dir: &Path) -> FakeGoogleDrive {
    let drive = FakeGoogleDrive::start().await;
    drive.load_files(files);
    let integration = serde_json::from_value(json!({
        "id": "int-bench", "tenantId": "t1", "shardTypeId": "c_integration", "name": "Bench",
        "structuredData": {
            "providerName": "google_drive",
            "syncFrequency": {"type": "manual"},
            "connection": {"tokenUrl": drive.token_url(), "apiBaseUrl": drive.api_base()},
            "entityMappings": [
                {"externalEntity": "files", "shardTypeId": "c_document", "nameField": "name",
                 "fieldMappings": [{"source": "name", "target": "name", "required": true},
                                   {"source": "mimeType", "target": "mime_type"},
                                   {"source": "webViewLink", "target": "url"}]}
            ]
        }
    }))
    .unwrap();
    prepare(dir, integration, drive.credentials()).await;
    drive
}

/// A Gong integration syncing `calls` calls of the last day from a loopback Gong.
async fn gong(calls: usize, dir: &Path) -> FakeGong {
    let gong = FakeGong::start().await;
    gong.load_calls(calls, Utc::now() - chrono::Duration::days(1));
    let integration = serde_json::from_value(json!({
        "id": "int-bench", "tenantId": "t1", "shardTypeId": "c_integration", "name": "Bench",
        "structuredData": {
            "providerName": "gong",
            "syncFrequency": {"type": "manual"},
            "connection": {"tokenUrl": gong.token_url(), "apiBaseUrl": gong.api_base()},
            "entityMappings": [
                {"externalEntity": "calls", "shardTypeId": "c_call", "nameField": "title",
                 "fieldMappings": [{"source": "title", "target": "title", "required": true},
                                   {"source": "started", "target": "started_at", "type": "datetime"},
                                   {"source": "duration", "target": "seconds", "type": "integer"}]}
            ]
        }
    }))
    .unwrap();
    prepare(dir, integration, gong.key_credentials()).await;
    gong
}

/// Prints one provider's figures.
fn report(provider: &str, what: &str, elapsed: Duration, stats: &Value, rss: f64, requests: usize) {
    println!(
        "{provider}: full sync of {} {what}: {:.3} s, {:.0} records/s, handler peak RSS {rss:.1} MiB, {requests} provider requests",
        stats["recordsFetched"],
        elapsed.as_secs_f64(),
        stats["recordsFetched"].as_f64().unwrap() / elapsed.as_secs_f64(),
    );
}

/// A Dynamics 365 integration syncing `rows` contacts from a loopback Dataverse.
async fn dynamics(rows: usize, dir: &Path) -> FakeDynamics {
    let fake = FakeDynamics::start().await;
    fake.load(
        "contacts",
        (0..rows).map(|i| {
            json!({"contactid": format!("00000000-0000-4000-8000-{i:012}"),
                   "fullname": format!("Mary Ann Person{i}"),
                   "emailaddress1": format!("person{i}@contoso.test")})
        }),
    );
    let integration = serde_json::from_value(json!({
        "id": "int-bench", "tenantId": "t1", "shardTypeId": "c_integration", "name": "Bench",
        "structuredData": {
            "providerName": "dynamics365",
            "syncFrequency": {"type": "manual"},
            "connection": {"environmentUrl": fake.url, "tokenUrl": fake.token_url()},
            "entityMappings": [
                {"externalEntity": "contacts", "shardTypeId": "c_contact", "nameField": "full_name",
                 "fieldMappings": [{"source": "fullname", "targets": ["first_name", "last_name"], "transform": "split"},
                                   {"source": "fullname", "target": "full_name"},
                                   {"source": "emailaddress1", "target": "email", "required": true}]}
            ]
        }
    }))
    .unwrap();
    prepare(dir, integration, fake.credentials()).await;
    fake
}

struct Handler {
    child: Child,
    port: u16,
}

impl Handler {
    fn start(dir: &Path) -> Self {
        let port = free_port();
        // `HANDLER_BIN` measures another build of the handler: the packaged static one.
        let binary = std::env::var("HANDLER_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_handler").to_string());
        let child = Command::new(binary)
            .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
            .env("FUNC_SYNC_DATA_DIR", dir)
            .env("SYNC_MAX_RECORDS", "10000000")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            std::thread::sleep(Duration::from_millis(5));
        }
        Self { child, port }
    }

    /// Runs one sync job as the host would deliver it; returns the wall time.
    fn sync(&self, job_id: &str, job_type: &str) -> Duration {
        let job = json!({"integrationId": "int-bench", "tenantId": "t1", "jobType": job_type,
                         "provider": "salesforce", "jobId": job_id, "scheduledAt": Utc::now()});
        let quoted = |s: &str| Value::String(Value::String(s.to_string()).to_string());
        let envelope = json!({
            "Data": {"message": quoted(&job.to_string())},
            "Metadata": {"DeliveryCount": "1", "MessageId": quoted(job_id)}
        })
        .to_string();
        let started = Instant::now();
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            stream,
            "POST /SyncInboundScheduled HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{envelope}",
            envelope.len()
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let elapsed = started.elapsed();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        elapsed
    }

    /// What the handler has used so far, on all its threads.
    fn usage(&self) -> Usage {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // The fields after the command name, which is in parentheses: minflt is the 8th, utime
        // and stime the 12th and 13th (in ticks of 10 ms).
        let fields: Vec<f64> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0.0))
            .collect();
        Usage {
            cpu_ms: (fields[11] + fields[12]) * 10.0,
            kernel_ms: fields[12] * 10.0,
            page_faults: fields[7],
        }
    }

    fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: f64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap();
        kib / 1024.0
    }
}

/// CPU time (the kernel counts it in ticks of 10 ms, so a figure needs several runs), the
/// kernel's part of it, and page faults: memory the process touched for the first time or again
/// after its allocator gave it back.
#[derive(Clone, Copy, Default)]
struct Usage {
    cpu_ms: f64,
    kernel_ms: f64,
    page_faults: f64,
}

impl std::ops::Sub for Usage {
    type Output = Usage;
    fn sub(self, before: Usage) -> Usage {
        Usage {
            cpu_ms: self.cpu_ms - before.cpu_ms,
            kernel_ms: self.kernel_ms - before.kernel_ms,
            page_faults: self.page_faults - before.page_faults,
        }
    }
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, other: Usage) {
        self.cpu_ms += other.cpu_ms;
        self.kernel_ms += other.kernel_ms;
        self.page_faults += other.page_faults;
    }
}

impl Drop for Handler {
    /// Stops the handler as the host does, with SIGTERM, so that a profiler wrapped around it
    /// writes its report; kills it if it has not stopped after a while.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn last_stats(dir: &Path, job_id: &str) -> Value {
    let store = SqliteStore::open(&dir.join("store.db")).unwrap();
    let history = store
        .query(&handler::store::ShardQuery::of_type("c_integrationSync").in_tenant("t1"))
        .await
        .unwrap();
    let record = history
        .into_iter()
        .map(|v| v.value.structured_data)
        .find(|r| r["jobId"] == job_id)
        .unwrap();
    assert_ne!(record["status"], "failed", "{record}");
    record["stats"].clone()
}

/// The loopback Salesforce alone: the same queries read over HTTP with nothing done with the
/// answers. Returns the wall time and the pages served.
async fn fake_alone(fake: &FakeSalesforce) -> (Duration, usize) {
    let http = reqwest::Client::new();
    let credentials = fake.credentials();
    let token: Value = http
        .post(format!("{}/services/oauth2/token", fake.url))
        .form(&[
            ("grant_type", "refresh_token"),
            (
                "refresh_token",
                credentials["refresh_token"].as_str().unwrap(),
            ),
            ("client_id", credentials["client_id"].as_str().unwrap()),
            (
                "client_secret",
                credentials["client_secret"].as_str().unwrap(),
            ),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let bearer = format!("Bearer {}", token["access_token"].as_str().unwrap());
    let started = Instant::now();
    let mut pages = 0;
    for entity in ["Account", "Contact"] {
        let mut url = format!(
            "{}/services/data/v62.0/query?q=SELECT Id, Name, Industry, Email, SystemModstamp FROM {entity} ORDER BY SystemModstamp ASC, Id ASC",
            fake.url
        );
        loop {
            let body = http
                .get(&url)
                .header("Authorization", &bearer)
                .header("Sforce-Query-Options", "batchSize=2000")
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            pages += 1;
            // Only where the next batch is: the records are left unread.
            let tail = std::str::from_utf8(&body[..body.len().min(300)]).unwrap();
            match tail.split_once("\"nextRecordsUrl\":\"") {
                Some((_, rest)) => url = format!("{}{}", fake.url, rest.split('"').next().unwrap()),
                None => break,
            }
        }
    }
    (started.elapsed(), pages)
}

/// Fetch, parse and write the same records with nothing else: the floor for the engine.
async fn baseline(fake: &FakeSalesforce, dir: &Path) -> (Duration, u64) {
    let store = SqliteStore::open(&dir.join("baseline.db")).unwrap();
    let salesforce = Salesforce::new();
    let mut settings = Map::new();
    settings.insert("loginHost".into(), json!(fake.url));
    let credentials = Credentials::new(fake.credentials().as_object().unwrap().clone());
    let mut conn = Connection::new("int-baseline", settings, credentials);
    let started = Instant::now();
    let mut written = 0;
    for entity in ["Account", "Contact"] {
        let mut request = FetchRequest {
            entity: entity.into(),
            fields: vec!["Name".into(), "Industry".into(), "Email".into()],
            cursor: None,
            page_token: None,
            filters: vec![],
            page_size: 2000,
            cursor_read_at: None,
        };
        loop {
            let page = salesforce.fetch_page(&mut conn, &request).await.unwrap();
            let shards: Vec<Shard> = page
                .records
                .into_iter()
                .map(|r| Shard {
                    id: r.id,
                    tenant_id: "t1".into(),
                    shard_type_id: entity.into(),
                    name: String::new(),
                    structured_data: Value::Object(r.fields),
                    relationships: vec![],
                    external_relationships: vec![],
                    created_at: None,
                    created_by: None,
                    updated_at: None,
                    deleted_at: None,
                    content_hash: None,
                    dedup_keys: Default::default(),
                    ttl: None,
                    extra: Map::new(),
                })
                .collect();
            written += shards.len() as u64;
            store.upsert_many(&Upsert::every(&shards)).await.unwrap();
            match page.next_page {
                Some(next) => request.page_token = Some(next),
                None => break,
            }
        }
    }
    (started.elapsed(), written)
}

/// Runs of each 10,000-record figure; the median is printed. One run on a small machine
/// varies by a third with what else it is doing.
const RUNS: usize = 5;

/// The runs of each 10,000-record figure: `BENCH_RUNS`, or [`RUNS`].
fn runs() -> usize {
    std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(RUNS)
}

/// The median of `times`, which are left sorted.
fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// A full sync of 10,000 Salesforce records, a re-run, the no-engine baseline and the
/// loopback Salesforce's own time.
async fn salesforce_10k() {
    let fake = FakeSalesforce::start().await;
    populate(&fake, 5_000);
    let mut fulls = Vec::new();
    let mut reruns = Vec::new();
    let mut rss: f64 = 0.0;
    let (mut full_use, mut rerun_use) = (Usage::default(), Usage::default());
    let mut floors = Vec::new();
    let mut ratios = Vec::new();
    let mut written = 0;
    let runs = runs();
    for run in 0..runs {
        let dir = tempfile::tempdir().unwrap();
        prepare(dir.path(), integration(&fake), fake.credentials()).await;
        let handler = Handler::start(dir.path());
        let before = handler.usage();
        fulls.push(handler.sync("bench-full", "full_sync"));
        full_use += handler.usage() - before;
        let stats = last_stats(dir.path(), "bench-full").await;
        if run == 0 {
            println!(
                "full sync of {} records (split names, dedup on email) into the embedded store \
                 (created {}, updated {}), median of {runs} runs:",
                stats["recordsFetched"], stats["shardsCreated"], stats["shardsUpdated"]
            );
        }
        let before = handler.usage();
        reruns.push(handler.sync("bench-rerun", "full_sync"));
        rerun_use += handler.usage() - before;
        let stats = last_stats(dir.path(), "bench-rerun").await;
        let writes =
            stats["shardsCreated"].as_u64().unwrap() + stats["shardsUpdated"].as_u64().unwrap();
        assert_eq!(writes, 0, "a re-run with nothing changed writes nothing");
        rss = rss.max(handler.peak_rss_mib());
        drop(handler);

        // The baseline right after the engine, so that each ratio compares runs made moments
        // apart: a run on a shared machine varies by a third with what else it is doing.
        let baseline_dir = tempfile::tempdir().unwrap();
        let (floor, count) = baseline(&fake, baseline_dir.path()).await;
        written = count;
        ratios.push(fulls[run].as_secs_f64() / floor.as_secs_f64());
        floors.push(floor);
    }
    let full = median(&mut fulls);
    println!(
        "  {:.3} s, {:.0} records/s  (fastest {:.3} s)",
        full.as_secs_f64(),
        10_000.0 / full.as_secs_f64(),
        fulls[0].as_secs_f64()
    );
    let rerun = median(&mut reruns);
    println!(
        "re-run with nothing changed: {:.3} s (fastest {:.3} s), 0 shard writes",
        rerun.as_secs_f64(),
        reruns[0].as_secs_f64()
    );
    println!("  handler peak RSS: {rss:.1} MiB");
    let n = runs as f64;
    println!(
        "  handler CPU time, all threads: {:.0} ms per full sync, {:.0} ms per re-run (mean of {runs})",
        full_use.cpu_ms / n,
        rerun_use.cpu_ms / n
    );
    println!(
        "  of which in the kernel: {:.0} ms and {:.0} ms; page faults: {:.0} and {:.0}",
        full_use.kernel_ms / n,
        rerun_use.kernel_ms / n,
        full_use.page_faults / n,
        rerun_use.page_faults / n
    );

    let floor = median(&mut floors);
    ratios.sort_by(f64::total_cmp);
    println!(
        "same records fetched, parsed and written with no engine: {:.3} s ({written} records); \
         engine/baseline = {:.2} (median of the {runs} runs' ratios, {:.2}-{:.2})",
        floor.as_secs_f64(),
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1]
    );
    let (serving, pages) = fake_alone(&fake).await;
    println!(
        "the loopback Salesforce alone: {pages} pages served in {:.3} s ({:.1} ms per page)",
        serving.as_secs_f64(),
        serving.as_secs_f64() * 1000.0 / pages as f64
    );
}

/// A full sync of 100,000 Salesforce records: time and peak memory.
async fn salesforce_100k() {
    let big = FakeSalesforce::start().await;
    populate(&big, 50_000);
    let mut bigs = Vec::new();
    let mut rss: f64 = 0.0;
    for _ in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        prepare(dir.path(), integration(&big), big.credentials()).await;
        let handler = Handler::start(dir.path());
        bigs.push(handler.sync("bench-100k", "full_sync"));
        let stats = last_stats(dir.path(), "bench-100k").await;
        assert_eq!(stats["recordsFetched"], 100_000);
        rss = rss.max(handler.peak_rss_mib());
    }
    let elapsed = median(&mut bigs);
    println!(
        "full sync of 100000 records: {:.2} s, {:.0} records/s, handler peak RSS {rss:.1} MiB (median of 3 runs; highest RSS)",
        elapsed.as_secs_f64(),
        100_000.0 / elapsed.as_secs_f64(),
    );
}

#[tokio::main]
async fn main() {
    // `-- 10k` runs the 10,000-record figures only, `-- 100k` the 100,000-record one only
    // (what a profiler is pointed at).
    let only = |part: &str| std::env::args().any(|a| a == part);
    let (only_10k, only_100k) = (only("10k"), only("100k"));
    if !only_100k {
        salesforce_10k().await;
    }
    if !only_10k {
        salesforce_100k().await;
    }
    if only_10k || only_100k {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dataverse = dynamics(10_000, dir.path()).await;
    let handler = Handler::start(dir.path());
    let elapsed = handler.sync("bench-dynamics", "full_sync");
    let stats = last_stats(dir.path(), "bench-dynamics").await;
    let rss = handler.peak_rss_mib();
    report(
        "Dynamics 365",
        "rows",
        elapsed,
        &stats,
        rss,
        dataverse.requests().len(),
    );
    drop(handler);

    let dir = tempfile::tempdir().unwrap();
    let graph = onedrive(10_000, dir.path()).await;
    let handler = Handler::start(dir.path());
    let elapsed = handler.sync("bench-onedrive", "full_sync");
    let stats = last_stats(dir.path(), "bench-onedrive").await;
    let rss = handler.peak_rss_mib();
    report(
        "OneDrive",
        "drive items",
        elapsed,
        &stats,
        rss,
        graph.requests().len(),
    );
    drop(handler);

    let dir = tempfile::tempdir().unwrap();
    let meetings = zoom(10_000, dir.path()).await;
    let handler = Handler::start(dir.path());
    let elapsed = handler.sync("bench-zoom", "full_sync");
    let stats = last_stats(dir.path(), "bench-zoom").await;
    let rss = handler.peak_rss_mib();
    report(
        "Zoom",
        "meetings",
        elapsed,
        &stats,
        rss,
        meetings.requests().len(),
    );
    drop(handler);

    let dir = tempfile::tempdir().unwrap();
    let files = google_drive(10_000, dir.path()).await;
    let handler = Handler::start(dir.path());
    let elapsed = handler.sync("bench-drive", "full_sync");
    let stats = last_stats(dir.path(), "bench-drive").await;
    let rss = handler.peak_rss_mib();
    report(
        "Google Drive",
        "files",
        elapsed,
        &stats,
        rss,
        files.requests().len(),
    );
    drop(handler);

    let dir = tempfile::tempdir().unwrap();
    let calls = gong(10_000, dir.path()).await;
    let handler = Handler::start(dir.path());
    let elapsed = handler.sync("bench-gong", "full_sync");
    let stats = last_stats(dir.path(), "bench-gong").await;
    let rss = handler.peak_rss_mib();
    report(
        "Gong",
        "calls",
        elapsed,
        &stats,
        rss,
        calls.requests().len(),
    );
}
