//! `rollback`: restore the files to an earlier generation from the retained undo data, as a new
//! generation written through the write transaction.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use rayon::prelude::*;

use super::compose::{self, Composer, Piece};
use super::sync::{BLOCKS_PER_CHUNK, CHUNKS_PER_BATCH};
use super::txn::{Mode, NewHashes, WriteTxn};
use super::{Checkpoint, Error, RollbackReport, seconds_since};
use crate::blockhash;
use crate::index::{GenerationKind, unix_ms};
use crate::io::OpenMode;
use crate::journal::{
    GenerationInfo, Journal, JournalError, JournalFile, JournalHeader, JournalKind, JournalState,
    UNDO_DIR,
};
use crate::record::{self, Record, apply_xor, hash_prefix};

impl Checkpoint {
    /// Restores the files to generation `to` (default: the one before the current) from the
    /// retained undo data. The rollback is journaled like a sync and recorded as a new generation.
    pub fn rollback(&self, to: Option<u64>) -> Result<RollbackReport, Error> {
        let start = Instant::now();
        let _lock = self.begin_write()?;
        self.refuse_if_journal_pending()?;
        let index = self.require_index()?;
        let layout = index.block_layout()?;
        let current = index.generation()?.unwrap_or(0);
        let to = to.unwrap_or(current.saturating_sub(1));
        if to >= current {
            return Err(Error::RollbackTarget { to, current });
        }
        let model = self.open_model_for_write()?;
        self.check_trusted(&index, &model)?;
        // The undo data of every generation after `to`, newest first.
        let undo: HashMap<u64, PathBuf> = self
            .undo_files()?
            .into_iter()
            .map(|(g, p, _)| (g, p))
            .collect();
        let earliest = (0..=current)
            .rev()
            .take_while(|g| *g == current || undo.contains_key(&(g + 1)))
            .last()
            .unwrap_or(current);
        let mut journals = Vec::new();
        for g in (to + 1..=current).rev() {
            let kind = index.generation_record(g)?.map(|r| r.kind);
            let why = if kind == Some(GenerationKind::Reindex) {
                "it re-indexed files changed by another program, so there is nothing to undo"
                    .to_string()
            } else {
                "it was pruned by the retention limits".to_string()
            };
            let missing = || Error::NoUndo {
                to,
                missing: g,
                why: why.clone(),
                earliest,
            };
            let path = undo.get(&g).ok_or_else(missing)?;
            match Journal::open(self.io.as_ref(), path)? {
                JournalState::Committed(j) if j.header.target_generation == g => journals.push(j),
                _ => return Err(missing()),
            }
        }
        // Compose the XORs of every block, by (file, offset), in bounded memory.
        let mut names: Vec<String> = Vec::new();
        let mut composer = Composer::new(&self.state_dir, compose::MEMORY_BYTES);
        let spill_err = |source| Error::Io {
            path: self.state_dir.clone(),
            source,
        };
        for j in &journals {
            // This journal's file table in the rollback's: ids by first appearance.
            let ids: Vec<u32> = j
                .header
                .files
                .iter()
                .map(|f| {
                    let at = names.iter().position(|n| *n == f.name).unwrap_or_else(|| {
                        names.push(f.name.clone());
                        names.len() - 1
                    });
                    at as u32
                })
                .collect();
            j.for_each_batch(64 << 20, |batch| {
                for r in batch {
                    composer
                        .push(Piece {
                            file: ids[r.file as usize],
                            offset: r.offset,
                            tensor_offset: r.tensor_offset,
                            len: r.len,
                            payload: r.payload,
                        })
                        .map_err(spill_err)?;
                }
                Ok::<_, Error>(())
            })?;
        }
        drop(journals);
        // One rollback journal: the current bytes as old, current ⊕ composed as new.
        let mut files = Vec::new();
        let mut handles = Vec::new();
        for name in &names {
            let f = model
                .files
                .iter()
                .find(|f| &f.name == name)
                .ok_or_else(|| Error::ForeignJournal {
                    path: self.state_dir.join(UNDO_DIR),
                    what: format!("the undo data names {name}, which is not a file of the model"),
                })?;
            files.push(JournalFile {
                name: name.clone(),
                size: f.stat.size,
            });
            let p = self.model_dir.join(name);
            handles.push(self.io.open(&p, OpenMode::Read).map_err(Self::io_err(&p))?);
        }
        // The files will hold that generation's weights again: its tags say what they are.
        let restored_tags = index
            .generation_record(to)?
            .map(|g| g.tags)
            .unwrap_or_default();
        let header = JournalHeader {
            kind: JournalKind::Rollback,
            block_size: layout.block_size as u32,
            model_id: index.model_id()?,
            base_generation: current,
            target_generation: current + 1,
            created_ms: unix_ms() as u64,
            files,
            info: GenerationInfo {
                source: format!("rollback from generation {current} to generation {to}"),
                tensors: model.tensors.len() as u64,
                bytes_compared: 0,
                restored_generation: Some(to),
                tags: restored_tags.clone(),
            },
        };
        let mut composed = composer.finish().map_err(spill_err)?;
        let mut txn = WriteTxn::begin(self, &header)?;
        let (mut blocks_changed, mut bytes_changed) = (0u64, 0u64);
        loop {
            let batch: Vec<Piece> = composed
                .by_ref()
                .take(BLOCKS_PER_CHUNK * CHUNKS_PER_BATCH)
                .collect::<std::io::Result<_>>()
                .map_err(spill_err)?;
            if batch.is_empty() {
                break;
            }
            {
                let encoded: Vec<Option<Vec<u8>>> = batch
                    .par_iter()
                    .map(|piece| {
                        let Piece {
                            file,
                            offset,
                            tensor_offset,
                            len,
                            payload,
                        } = piece;
                        let file = *file as usize;
                        let h = &handles[file];
                        let mut block = vec![0u8; *len as usize];
                        h.read_at(*offset, &mut block)
                            .map_err(Self::io_err(h.path()))?;
                        let rel = offset - tensor_offset;
                        let old = blockhash::subtree_cv(rel, &block);
                        apply_xor(payload, &mut block).ok_or_else(|| JournalError::Corrupt {
                            path: self.state_dir.join(UNDO_DIR),
                            what: "malformed payload".into(),
                        })?;
                        let new = blockhash::subtree_cv(rel, &block);
                        if new == old {
                            return Ok(None);
                        }
                        let mut out = Vec::new();
                        Record {
                            tag: record::JOURNAL,
                            file: file as u32,
                            tensor_offset: *tensor_offset,
                            offset: *offset,
                            len: *len,
                            old: hash_prefix(&old),
                            new: hash_prefix(&new),
                            payload: payload.clone(),
                        }
                        .encode(&mut out);
                        Ok(Some(out))
                    })
                    .collect::<Result<_, Error>>()?;
                for (Piece { len, .. }, e) in batch.iter().zip(encoded) {
                    if let Some(e) = e {
                        txn.stage(&e, 1)?;
                        blocks_changed += 1;
                        bytes_changed += u64::from(*len);
                    }
                }
            }
        }
        let (committed, journal_bytes) = txn.commit()?;
        drop(handles);
        drop(index);
        let done = committed
            .finish(Mode::Write, None, NewHashes::ReadBack, start)?
            .report;
        Ok(RollbackReport {
            from_generation: current,
            restored_generation: to,
            restored_tags,
            generation: done.generation,
            blocks_changed,
            bytes_changed,
            journal_bytes,
            seconds: seconds_since(start),
        })
    }
}
