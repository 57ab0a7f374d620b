//! The undo data (retired journals in `<state>/undo/`, pruned to the retention limits and the
//! export backlog) and the marker of a write whose model pages were left to the page cache
//! (`<state>/unflushed.json`; see [`crate::journal`], "Unflushed writes").

use std::path::PathBuf;

use rayon::prelude::*;

use super::{Checkpoint, DEFAULT_BACKLOG_FACTOR, DEFAULT_RETAIN_GENERATIONS, Error, write_atomic};
use crate::index::{BlockIndex, INDEX_DB, MetaKey};
use crate::io::OpenMode;
use crate::journal::{JournalFile, UNDO_DIR, UNFLUSHED_FILE, Unflushed};

/// What the name of undo data pruned but not yet removed ends with.
const DISCARD_SUFFIX: &str = ".apj.discard";

/// The name undo data at `path` (`<generation>.apj`) takes when pruned with its removal deferred.
fn discard_path(path: &std::path::Path) -> PathBuf {
    let mut name = path.file_stem().unwrap_or_default().to_os_string();
    name.push(DISCARD_SUFFIX);
    path.with_file_name(name)
}

/// File name of the undo data of `generation`.
pub(crate) fn undo_name(generation: u64) -> String {
    format!("{generation:020}.apj")
}

impl Checkpoint {
    pub(crate) fn unflushed_path(&self) -> PathBuf {
        self.state_dir.join(UNFLUSHED_FILE)
    }

    /// The marker of writes left to the page cache by the last journaled write, if any.
    pub(crate) fn unflushed(&self) -> Result<Option<Unflushed>, Error> {
        let path = self.unflushed_path();
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| Error::ForeignJournal {
                        path: path.clone(),
                        what: format!("not a marker this version understands ({e})"),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Self::io_err(&path)(e)),
        }
    }

    /// Whether writes of the last journaled write may have been lost by a reboot since, so
    /// the files must not be read before `recover` (or the next writer) rolls them forward.
    pub(crate) fn unflushed_after_reboot(&self) -> Result<bool, Error> {
        Ok(self.unflushed()?.is_some_and(|u| !self.same_boot(&u)))
    }

    /// Fsyncs the named model files.
    pub(crate) fn fsync_unflushed(&self, files: &[String]) -> Result<(), Error> {
        files.par_iter().try_for_each(|f| {
            let p = &self.model_dir.join(f);
            self.io
                .open(p, OpenMode::ReadWrite)
                .and_then(|f| f.sync())
                .map_err(Self::io_err(p))
        })
    }

    /// Makes the index's commits durable before the marker that can redo them goes: the last
    /// journaled write left them unsynced (see [`BlockIndex::defer_durability`]). A checkpoint
    /// syncs the WAL and copies it back; frames a reader kept it from copying are fsynced here.
    pub(crate) fn make_index_durable(&self) -> Result<(), Error> {
        let Some(index) = self.open_index()? else {
            return Ok(());
        };
        if index.checkpoint()? {
            let wal = self.state_dir.join(format!("{INDEX_DB}-wal"));
            self.io
                .open(&wal, OpenMode::ReadWrite)
                .and_then(|f| f.sync())
                .map_err(Self::io_err(&wal))?;
        }
        Ok(())
    }

    /// Makes the move of journals into the undo data durable (both directories synced).
    pub(crate) fn sync_retired(&self) -> Result<(), Error> {
        let undo = self.state_dir.join(UNDO_DIR);
        match self.io.sync_dir(&undo) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Self::io_err(&undo)(e));
            }
            _ => {}
        }
        self.io
            .sync_dir(&self.state_dir)
            .map_err(Self::io_err(&self.state_dir))
    }

    /// Removes `unflushed.json` durably, if it is there.
    pub(crate) fn clear_unflushed(&self) -> Result<(), Error> {
        let path = self.unflushed_path();
        if !path.exists() {
            return Ok(());
        }
        self.io.remove_file(&path).map_err(Self::io_err(&path))?;
        self.io
            .sync_dir(&self.state_dir)
            .map_err(Self::io_err(&self.state_dir))
    }

    /// Makes `unflushed.json` durable for `generation`, before its journal is retired.
    pub(crate) fn mark_unflushed(
        &self,
        generation: u64,
        files: &[JournalFile],
    ) -> Result<(), Error> {
        let marker = Unflushed {
            generation,
            boot_id: self.io.boot_id(),
            files: files.iter().map(|f| f.name.clone()).collect(),
        };
        let bytes = serde_json::to_vec(&marker).expect("plain data serializes");
        write_atomic(self.io.as_ref(), &self.unflushed_path(), &bytes)
    }

    /// Whether the writes `u` names were made in this boot (an unknown boot never is).
    pub(crate) fn same_boot(&self, u: &Unflushed) -> bool {
        !u.boot_id.is_empty() && u.boot_id == self.io.boot_id()
    }

    /// Moves the journal of `generation` to the undo data and prunes the undo data to the
    /// retention limits. `unflushed`: the files it wrote were left to the page cache, and
    /// `unflushed.json` (already durable) names them: the journal is kept whatever the limits
    /// until they are flushed, and the move is not synced (the next writer's flush syncs it
    /// before it removes the marker; until then a crash that lost the move finds the journal
    /// pending and rolls it forward, which is what the marker asks for too).
    pub(crate) fn retire(
        &self,
        index: &BlockIndex,
        generation: u64,
        unflushed: bool,
    ) -> Result<(), Error> {
        let lap = std::time::Instant::now();
        let undo = self.state_dir.join(UNDO_DIR);
        self.io.create_dir_all(&undo).map_err(Self::io_err(&undo))?;
        let target = undo.join(undo_name(generation));
        if target.exists() {
            self.io
                .remove_file(&target)
                .map_err(Self::io_err(&target))?;
        }
        self.io
            .rename(&self.journal_path(), &target)
            .map_err(Self::io_err(&target))?;
        if !unflushed {
            self.sync_retired()?;
        }
        let moved = lap.elapsed().as_secs_f64();
        let lap = std::time::Instant::now();
        let keep_gens = index
            .meta_u64(MetaKey::RetainGenerations)?
            .unwrap_or(DEFAULT_RETAIN_GENERATIONS);
        let keep_bytes = index.meta_u64(MetaKey::RetainBytes)?.unwrap_or(u64::MAX);
        // Once anything was exported, undo data not yet exported is kept for export-delta too,
        // up to the backlog limit; beyond it, export ships those generations' blocks whole.
        let exported = index.exported_through()?;
        let backlog_limit = index
            .meta_u64(MetaKey::ExportBacklogBytes)?
            .unwrap_or_else(|| keep_bytes.saturating_mul(DEFAULT_BACKLOG_FACTOR));
        let mut kept = self.undo_files()?;
        let mut removed = false;
        let mut total: u64 = kept.iter().map(|(_, _, len)| len).sum();
        let unexported = |g: u64| exported.is_some_and(|e| g > e);
        let mut backlog: u64 = kept.iter().filter(|k| unexported(k.0)).map(|k| k.2).sum();
        while let Some(&(g, _, len)) = kept.first() {
            let over = kept.len() as u64 > keep_gens || total > keep_bytes;
            let needed = unflushed && g == generation;
            if !over || needed || (unexported(g) && backlog <= backlog_limit) {
                break;
            }
            let (_, path, _) = kept.remove(0);
            if self.defer_undo_removal {
                let discard = discard_path(&path);
                self.io
                    .rename(&path, &discard)
                    .map_err(Self::io_err(&discard))?;
            } else {
                self.io.remove_file(&path).map_err(Self::io_err(&path))?;
            }
            total -= len;
            if unexported(g) {
                backlog -= len;
            }
            removed = true;
        }
        if removed {
            self.io.sync_dir(&undo).map_err(Self::io_err(&undo))?;
        }
        tracing::debug!(
            move_seconds = moved,
            prune_seconds = lap.elapsed().as_secs_f64(),
            removed,
            "journal retired to the undo data"
        );
        Ok(())
    }

    /// Removes the undo data a write left to be discarded (see
    /// [`Checkpoint::with_deferred_undo_removal`]), also any a killed process left: (files,
    /// bytes). Needs no lock: nothing reads these files, and a file another process removed
    /// first is skipped.
    pub fn remove_discarded(&self) -> Result<(u64, u64), Error> {
        let undo = self.state_dir.join(UNDO_DIR);
        let entries = match std::fs::read_dir(&undo) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
            Err(e) => return Err(Self::io_err(&undo)(e)),
        };
        let (mut files, mut bytes) = (0, 0);
        for e in entries {
            let e = e.map_err(Self::io_err(&undo))?;
            if !e.file_name().to_string_lossy().ends_with(DISCARD_SUFFIX) {
                continue;
            }
            let path = e.path();
            let len = e.metadata().map_or(0, |m| m.len());
            match self.io.remove_file(&path) {
                Ok(()) => {
                    files += 1;
                    bytes += len;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Self::io_err(&path)(e)),
            }
        }
        Ok((files, bytes))
    }

    /// Undo files, oldest first: (generation, path, bytes).
    pub(crate) fn undo_files(&self) -> Result<Vec<(u64, PathBuf, u64)>, Error> {
        let undo = self.state_dir.join(UNDO_DIR);
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&undo) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Self::io_err(&undo)(e)),
        };
        for e in entries {
            let e = e.map_err(Self::io_err(&undo))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(g) = name
                .strip_suffix(".apj")
                .and_then(|g| g.parse::<u64>().ok())
            {
                let len = e.metadata().map_err(Self::io_err(&e.path()))?.len();
                out.push((g, e.path(), len));
            }
        }
        out.sort_unstable();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undo_names_sort_by_generation() {
        assert!(undo_name(9) < undo_name(10));
        assert_eq!(undo_name(7), "00000000000000000007.apj");
        assert_eq!(
            discard_path(std::path::Path::new("/s/undo/00000000000000000007.apj")),
            std::path::Path::new("/s/undo/00000000000000000007.apj.discard")
        );
    }
}
