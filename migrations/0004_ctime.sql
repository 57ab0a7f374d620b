-- apollo-checkpoint index, schema version 4: each file's ctime.
--
-- size, mtime and inode do not catch an in-place edit whose writer set the mtime back (`touch
-- -d`, `cp --preserve`, a tool restoring timestamps): the next sync trusted the file and said
-- "no change" while it differed. The kernel sets ctime on every write and metadata change, and
-- nobody can set it back. 0 means "not recorded yet" (an index from before this column): the
-- next write through apollo-checkpoint records it, and until then it is not compared.
ALTER TABLE files ADD COLUMN ctime_ns INTEGER NOT NULL DEFAULT 0; -- nanoseconds since the epoch
