-- apollo-checkpoint index, schema version 6: summaries of the block hashes.
--
-- One row per tensor whose summaries are known. cvs holds one 32-byte BLAKE3 chaining value per
-- run of 16 blocks (64 KiB at 4 KiB blocks; fewer blocks where that would pass 16 MiB:
-- src/blockhash.rs, BlockLayout::summary_size), counted from the tensor's first block, in order:
-- the parent-node merge of those blocks' hashes, which equals the chaining value of their bytes
-- hashed as one subtree; ceil(data_len / summary_size) * 32 bytes. A table of its own, not a
-- column of tensors: SQLite reaches a column stored after block_hashes only by walking that
-- BLOB's overflow pages.
--
-- No row means "not known": every tensor right after this migration, and every tensor whose
-- block hashes a commit changed without recomputing its summaries (rollback, recovery,
-- apply-delta); `verify --repair` removes rows that disagree with the block hashes. A sync from
-- live weights compares the summaries first and reads block hashes only where a summary differs;
-- it writes every summary it changed (all of a tensor's, when they were not known) in the same
-- transaction as the block hashes. `init` and `verify --repair` write them with the block hashes.
CREATE TABLE summaries (
    tensor_id INTEGER PRIMARY KEY REFERENCES tensors(id),
    cvs       BLOB NOT NULL
) STRICT;
