//! `init`: index the model by hashing every block of its files; also the re-index of
//! `verify --repair` and of a replica (`rebuild`).

use std::time::Instant;

use rayon::prelude::*;

use super::{
    Checkpoint, DEFAULT_RETAIN_FRACTION, DEFAULT_RETAIN_GENERATIONS, Error, InitReport,
    MIN_DEFAULT_RETAIN_BYTES, new_model_id, seconds_since,
};
use crate::blockhash::{self, BlockLayout, Cv};
use crate::index::{BlockIndex, GenerationKind, GenerationRecord, IndexError, MetaKey, unix_ms};
use crate::model::ModelLayout;
use crate::plan;
use crate::source::{SafetensorsSource, WeightSource};

impl Checkpoint {
    /// Builds the index by hashing every block of the model's files.
    pub fn init(&self, block_size: u64) -> Result<InitReport, Error> {
        BlockLayout::new(block_size)?;
        let fresh = !self.state_dir.exists();
        let lock = self.begin_write()?;
        let done = self
            .refuse_if_journal_pending()
            .and_then(|()| self.init_locked(block_size));
        if done.is_err() && fresh {
            // A failed first init leaves nothing behind (not even the lock file): the state
            // directory is this run's own.
            drop(lock);
            let _ = std::fs::remove_dir_all(&self.state_dir);
        }
        done
    }

    /// [`Self::init`] under a lock already held.
    pub(crate) fn init_locked(&self, block_size: u64) -> Result<InitReport, Error> {
        self.init_as(block_size, None, 0, GenerationKind::Init)
    }

    /// Indexes the model as generation `generation` of model `model_id` (a fresh id if `None`),
    /// recording a generation of kind `kind`.
    pub(crate) fn init_as(
        &self,
        block_size: u64,
        model_id: Option<&str>,
        generation: u64,
        kind: GenerationKind,
    ) -> Result<InitReport, Error> {
        let start = Instant::now();
        let layout = BlockLayout::new(block_size)?;
        if self.open_index()?.is_some() {
            return Err(Error::AlreadyInitialized {
                state_dir: self.state_dir.clone(),
            });
        }
        let model = self.open_model_for_write()?;
        let mut index = BlockIndex::open(&self.state_dir)?;
        let model_id = model_id.map_or_else(|| new_model_id(&model), str::to_string);
        let data_bytes = model.data_bytes();
        let blocks = self.rebuild(
            &mut index,
            &model,
            layout,
            |rebuild| {
                rebuild.set_meta(MetaKey::ModelId, &model_id)?;
                rebuild.set_meta(MetaKey::BlockSize, &block_size.to_string())?;
                rebuild.set_meta(MetaKey::HashScheme, blockhash::SCHEME)?;
                rebuild.set_meta(MetaKey::CreatedAt, &unix_ms().to_string())?;
                rebuild.set_meta(
                    MetaKey::RetainGenerations,
                    &DEFAULT_RETAIN_GENERATIONS.to_string(),
                )?;
                rebuild.set_meta(
                    MetaKey::RetainBytes,
                    &(data_bytes / DEFAULT_RETAIN_FRACTION)
                        .max(MIN_DEFAULT_RETAIN_BYTES)
                        .to_string(),
                )
            },
            |bytes| GenerationRecord {
                tags: crate::index::Tags::new(),
                generation,
                kind,
                created_at_ms: unix_ms(),
                source: format!("files:{}", self.model_dir.display()),
                tensors: model.tensors.len() as u64,
                bytes_compared: bytes,
                blocks_changed: 0,
                bytes_changed: 0,
                seconds: seconds_since(start),
            },
            &[],
        )?;
        Ok(InitReport {
            generation,
            files: model.files.len(),
            tensors: model.tensors.len(),
            bytes_hashed: data_bytes,
            blocks,
            block_size,
            seconds: seconds_since(start),
        })
    }

    /// Replaces the index's files and tensors with `model`, hashing every block from the files;
    /// `generation` makes the record of the new generation from the bytes hashed.
    pub(crate) fn rebuild(
        &self,
        index: &mut BlockIndex,
        model: &ModelLayout,
        layout: BlockLayout,
        meta: impl FnOnce(&mut crate::index::Rebuild<'_>) -> Result<(), IndexError>,
        generation: impl FnOnce(u64) -> GenerationRecord,
        ranges: &[(String, Vec<(u64, u64)>)],
    ) -> Result<u64, Error> {
        let source = SafetensorsSource::open(&self.model_dir)?;
        let pb = self.progress_bar(model.data_bytes(), "indexing");
        let mut rebuild = index.begin_rebuild()?;
        meta(&mut rebuild)?;
        let mut file_ids = Vec::with_capacity(model.files.len());
        for f in &model.files {
            file_ids.push(rebuild.add_file(f)?);
        }
        let mut total_blocks = 0;
        for batch in plan::hash_batches(model.tensors.iter().map(|t| t.entry.len), layout) {
            let mut hashes: Vec<Vec<Cv>> = batch
                .clone()
                .map(|i| vec![[0u8; 32]; layout.blocks(model.tensors[i].entry.len) as usize])
                .collect();
            let per_item = (plan::ITEM_BYTES / layout.block_size).max(1) as usize;
            let mut items = Vec::new();
            for (cvs, i) in hashes.iter_mut().zip(batch.clone()) {
                for (k, chunk) in cvs.chunks_mut(per_item).enumerate() {
                    items.push((i, (k * per_item) as u64, chunk));
                }
            }
            items.into_par_iter().try_for_each(|(i, first, out)| {
                source.hash_units(i, layout.block_size, first, out)?;
                let len = model.tensors[i].entry.len;
                pb.inc((out.len() as u64 * layout.block_size).min(len - first * layout.block_size));
                Ok::<_, Error>(())
            })?;
            for (cvs, i) in hashes.iter().zip(batch) {
                let t = &model.tensors[i];
                rebuild.add_tensor(file_ids[t.file], &t.entry, cvs, layout)?;
                total_blocks += cvs.len() as u64;
            }
        }
        pb.finish_and_clear();
        rebuild.commit(&generation(model.data_bytes()), ranges)?;
        Ok(total_blocks)
    }
}
