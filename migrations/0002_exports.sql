-- apollo-checkpoint index, schema version 2: exported deltas.
--
-- One row per delta file written by `export-delta`, inserted only after the file and its
-- manifest are durable (so a crash mid-export repeats the export). The largest target_generation
-- is the generation the backup host will hold once it has applied everything exported; undo data
-- of later generations is kept (within the backlog limit, meta key export_backlog_bytes) until an
-- export covers it.
CREATE TABLE exports (
    id                INTEGER PRIMARY KEY,
    base_generation   INTEGER,              -- NULL for a full export
    target_generation INTEGER NOT NULL,
    file              TEXT NOT NULL UNIQUE, -- delta file name in the outbox
    outbox            TEXT NOT NULL,        -- the outbox directory it was written to
    bytes             INTEGER NOT NULL,
    blake3            TEXT NOT NULL,        -- hex BLAKE3 of the whole delta file
    full_blocks       INTEGER NOT NULL,     -- blocks shipped whole because their undo data was gone
    created_at        INTEGER NOT NULL,     -- unix milliseconds
    pruned            INTEGER NOT NULL DEFAULT 0  -- 1 once --prune-through removed the file
) STRICT;
