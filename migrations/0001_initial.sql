-- apollo-checkpoint index, schema version 1.
--
-- Applied in order by src/index.rs (embedded with include_str!); the number of applied
-- migrations is PRAGMA user_version. A database whose user_version is higher than the
-- binary knows is refused, never downgraded.

-- Key/value facts about the whole index:
--   model_id     32 hex chars, chosen at init, names this model in journals and deltas
--   block_size   decimal bytes per block, fixed at init
--   hash_scheme  'blake3-subtree-cv-v1' (see src/blockhash.rs)
--   created_at   unix milliseconds
--   last_sync    JSON object: stats of the most recent sync run, changed or not
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
) STRICT;

-- One row per safetensors file of the model, with what identifies its bytes on disk when
-- apollo-checkpoint last wrote or indexed it. Any difference means the file was changed behind
-- our back and is not trusted until `verify --repair`.
CREATE TABLE files (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,   -- relative to the model directory
    size        INTEGER NOT NULL,       -- bytes
    mtime_ns    INTEGER NOT NULL,       -- nanoseconds since the Unix epoch
    inode       INTEGER NOT NULL,
    header_len  INTEGER NOT NULL,       -- N, the JSON header length
    header_hash BLOB NOT NULL           -- 32 bytes: BLAKE3 of the file's first 8 + N bytes
) STRICT;

-- One row per tensor. block_hashes holds one 32-byte BLAKE3 chaining value per block of
-- block_size bytes counted from the tensor's first byte (the last block may be partial), in
-- block order: ceil(data_len / block_size) * 32 bytes. One BLOB per tensor, not one row per
-- block: a 54 GB model has 13 M blocks. Updated in place with incremental BLOB I/O, so a sync
-- rewrites only the pages holding changed hashes.
CREATE TABLE tensors (
    id           INTEGER PRIMARY KEY,
    name         TEXT NOT NULL UNIQUE,
    file_id      INTEGER NOT NULL REFERENCES files(id),
    data_offset  INTEGER NOT NULL,      -- absolute byte offset of the tensor in its file
    data_len     INTEGER NOT NULL,      -- bytes
    dtype        TEXT NOT NULL,         -- safetensors name: BF16, F32, ...
    shape        TEXT NOT NULL,         -- JSON array of dimensions
    block_hashes BLOB NOT NULL
) STRICT;
CREATE INDEX tensors_by_file ON tensors(file_id, data_offset);

-- One row per generation. Generation 0 is the state indexed by `init`; each sync that changed
-- something adds the next number; `verify --repair` adds a 'reindex' generation when it found
-- the files changed behind the index.
CREATE TABLE generations (
    generation     INTEGER PRIMARY KEY,
    kind           TEXT NOT NULL,       -- 'init' | 'sync' | 'reindex'
    created_at     INTEGER NOT NULL,    -- unix milliseconds
    source         TEXT NOT NULL,       -- where the weights came from
    tensors        INTEGER NOT NULL,    -- tensors compared
    bytes_compared INTEGER NOT NULL,
    blocks_changed INTEGER NOT NULL,
    bytes_changed  INTEGER NOT NULL,
    seconds        REAL NOT NULL
) STRICT;

-- The byte ranges each generation changed, per file, kept for export-delta. ranges is a
-- sequence of (u64 little-endian offset, u64 little-endian length) pairs, sorted by offset,
-- merged (no two touch or overlap); offsets are absolute in the file.
CREATE TABLE generation_ranges (
    generation INTEGER NOT NULL REFERENCES generations(generation),
    file       TEXT NOT NULL,
    ranges     BLOB NOT NULL,
    PRIMARY KEY (generation, file)
) STRICT;
