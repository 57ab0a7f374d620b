-- apollo-checkpoint index, schema version 3: block hashes changed since the last fold.
--
-- A sparse sync changes a few blocks spread over the whole model. Rewriting their hashes in
-- place in tensors.block_hashes dirties nearly every page of those BLOBs (8k changed blocks of a
-- 2 GiB model touch 3.6k of its 4.1k hash pages: 14 MiB written twice, to the WAL and back, for
-- 250 KiB of hashes). Instead a commit appends the new hashes here, where rows land on the last
-- pages of the table, and readers lay them over block_hashes in seq order (a later row wins).
-- When the log would pass its limit (src/index.rs, `BlockIndex::fold_limit`: one row per 4
-- blocks of the model, at least 1024 and at most 524288 rows) the commit folds it into
-- block_hashes, with its own new hashes, and empties it.
CREATE TABLE block_hash_log (
    seq       INTEGER PRIMARY KEY,               -- append order
    tensor_id INTEGER NOT NULL REFERENCES tensors(id),
    block     INTEGER NOT NULL,                  -- block number within the tensor
    cv        BLOB NOT NULL                      -- 32 bytes, as one entry of block_hashes
) STRICT;
