"""Where a sync's CPU goes, stage by stage, from `perf script` text of handler runs.

    perf script -i h.<pid>.data -F comm,tid,time,ip,sym > h.<pid>.txt   # for each run
    python3 handler/benches/stages.py 3999 h.*.txt                        # -F of the record

Each sample taken while a job ran (from the first sample inside `run_job` to the last), on
any of the handler's threads, is put in the innermost stage on its stack; frames that only
free are left to their caller, but for the page freed on a blocking thread once it is written.
Where a run held two jobs (a full sync, then its re-run) they are split where the process was
idle longest, and printed as two columns. Milliseconds of CPU per run.
"""

import collections
import re
import sys

# Checked from the innermost frame outwards; the first frame that matches a stage decides.
STAGES = [
    ("HTTP read and JSON parse into records", [r"adapters::salesforce", r"spawn_fetch", r"hyper::", r"reqwest::"]),
    ("mapping (field transforms)", [r"plan::transform_page", r"plan::synced_shard_id", r"mapping::transform", r"FieldMapping::"]),
    ("fingerprints of the page's shards (SQL, decoding)", [r"sqlite::.*fingerprints", r"EntityRun::fingerprints"]),
    ("match keys and whole shards read (SQL, decoding)", [r"sqlite::\{impl#5\}::(query|get_many)::", r"key_lookups", r"ShardVisitor"]),
    ("content hash", [r"plan::content_hash"]),
    ("record hash", [r"plan::record_hash"]),
    ("match keys of records and shards", [r"DedupRules::keys", r"DedupRule::key"]),
    ("serialisation for the store", [r"store::sqlite::encode", r"store::document::"]),
    ("landing (merge, links, names)", [r"Landing::land", r"plan::land_page", r"Landing::finish", r"Landing::new"]),
    ("change detection", [r"plan::changes", r"plan::unchanged", r"pipeline::fingerprinted"]),
    ("counting", [r"plan::tally"]),
    ("job bookkeeping (claim, history, checkpoints, events, token)", [r"sqlite::\{impl#5\}::(replace|get|create|upsert)::", r"update_integration", r"inbound::save", r"events::file", r"secrets::file"]),
    ("store write: rows (b-tree inserts, match keys)", [r"sqlite::write_all", r"sqlite::.*writer", r"StreamedUpserts"]),
    ("WAL checkpoint (its own thread)", [r"walCheckpoint", r"sqlite::.*Checkpointer"]),
]
COMMIT = "store write: commit (the log's writes)"
FREEING = "freeing page data (on a blocking thread)"
REST = "the rest (runtime, kernel)"
COMPILED = [(name, [re.compile(p) for p in patterns]) for name, patterns in STAGES]
ORDER = [name for name, _ in STAGES[:-1]] + [COMMIT, STAGES[-1][0], FREEING, REST]


def samples(path):
    """(header fields, frames innermost first) of each sample."""
    head, frames = None, []
    with open(path) as text:
        for line in text:
            if not line.strip():
                if head is not None:
                    yield head, frames
                head, frames = None, []
            elif line[0] not in "\t ":
                head = line.split()
            else:
                parts = line.strip().split(None, 1)
                frames.append(parts[1] if len(parts) > 1 else "")
    if head is not None:
        yield head, frames


def stage(frames):
    # The writer's transaction statements are its commit: the log's frames written.
    if any("writer::{closure" in f for f in frames) and any("execute_batch" in f for f in frames):
        return COMMIT
    for frame in frames:
        for name, patterns in COMPILED:
            if any(p.search(frame) for p in patterns):
                return name
    if any("drop_in_place" in f for f in frames) and any("BlockingTask" in f for f in frames):
        return FREEING
    return REST


def jobs(items, split):
    inside = [i for i, (_, frames) in enumerate(items) if any("run_job" in f for f in frames)]
    span = items[inside[0]:inside[-1] + 1]
    if not split:
        return [span]
    times = [float(head[-1].rstrip(":")) for head, _ in span]
    cut = max(range(1, len(times)), key=lambda i: times[i] - times[i - 1])
    return [span[:cut], span[cut:]]


def main(args):
    split = args[:1] == ["split"]
    if split:
        args = args[1:]
    frequency, paths = float(args[0]), args[1:]
    columns = []
    for path in paths:
        for j, job in enumerate(jobs(list(samples(path)), split)):
            while len(columns) <= j:
                columns.append(collections.Counter())
            for _, frames in job:
                columns[j][stage(frames)] += 1
    ms = 1000.0 / frequency / len(paths)
    width = max(map(len, ORDER))
    for name in ORDER + ["total"]:
        counts = [sum(c.values()) if name == "total" else c[name] for c in columns]
        print(f"| {name:<{width}} | " + " | ".join(f"{n * ms:5.0f}" for n in counts) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
