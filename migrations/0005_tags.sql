-- apollo-checkpoint index, schema version 5: tags of a generation.
--
-- `sync --tag KEY=VALUE` (e.g. step=41200) records what the weights are — a training step, a
-- run id — with the generation they became, for `log`, `status`, `rollback` and the export
-- manifest. A JSON object of strings ({"step": "41200"}); '{}' for none (and for every
-- generation made before this migration).
ALTER TABLE generations ADD COLUMN tags TEXT NOT NULL DEFAULT '{}';
