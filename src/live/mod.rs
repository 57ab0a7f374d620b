//! The live GPU source: weights another process holds on its GPUs, described by the manifests
//! the export hook writes ([`handles`]), named as the model files name them ([`names`],
//! [`experts`]), mapped from vLLM's packed and sharded layout to HF tensors ([`params`],
//! [`layout`]) and read through CUDA IPC handles ([`cuda`]). [`open`] does all of it for
//! `sync --handles`; [`open_live`] and [`diagnose`] serve `diagnose`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

pub mod cuda;
pub mod experts;
pub mod gpu;
pub mod handles;
pub mod layout;
pub mod names;
pub mod params;
pub mod source;

use handles::{
    HandlesError, ManifestTensor, Manifests, check_complete_set, check_same_model, manifest_paths,
    read_all, read_config,
};
use layout::LayoutMap;
use names::{NameResolver, Resolved, Unmatched};
use params::{live_params, mapper};
use source::LayoutSource;

use crate::checkpoint::Error;
use crate::io::RealIo;
use crate::model::{ModelLayout, dtype_name};

/// Opens the live weights of `handles` (a manifest, or a folder of them) as a source of the
/// model in `model_dir`: the manifests checked to be one complete set of this model's engine,
/// every live parameter matched to a tensor of the files, every allocation opened on its GPU
/// (in a context of `contexts`), where the tool takes at most `budget` of memory per GPU.
pub fn open(
    handles: &Path,
    model_dir: &Path,
    budget: gpu::GpuBudget,
    contexts: &cuda::GpuContexts,
) -> Result<LayoutSource<cuda::CudaIpcReader>, Error> {
    let start = std::time::Instant::now();
    let model = ModelLayout::open(model_dir, &RealIo::new())?;
    let live = open_live(handles, model_dir, &model)?;
    drop(model);
    live.require_all_matched()?;
    tracing::debug!(
        seconds = start.elapsed().as_secs_f64(),
        "model files and manifests read, names matched"
    );
    let reader = cuda::CudaIpcReader::open(&live.tensors, budget, contexts)?;
    Ok(LayoutSource::new(live.map, reader).opened_in(start.elapsed().as_secs_f64()))
}

/// The live weights of one engine as HF tensors of the model files: what `sync --handles` and
/// `diagnose` read.
#[derive(Clone, Debug)]
pub struct LiveView {
    /// The HF tensors and where their bytes are.
    pub map: LayoutMap,
    /// The tensors a reader opens (`map`'s parameter indices point here).
    pub tensors: Vec<ManifestTensor>,
    /// Manifests read.
    pub manifests: usize,
    /// Engine parameters in the manifests (all ranks, before experts are split).
    pub live_params: usize,
    /// Engine parameters no tensor of the files matches.
    pub unmatched: Vec<Unmatched>,
    /// Where the files decided against the layout facts.
    pub notes: Vec<String>,
}

impl LiveView {
    /// Refuses a view with live parameters no tensor of the files matches: a sync would leave
    /// them out (and the tensors they should update stale).
    pub fn require_all_matched(&self) -> Result<(), HandlesError> {
        if self.unmatched.is_empty() {
            Ok(())
        } else {
            Err(HandlesError::Unmatched {
                unmatched: self.unmatched.clone(),
            })
        }
    }
}

/// Everything `sync --handles` and `diagnose` need from a manifest path (a file or a folder
/// of manifests, one per rank) for the model in `model_dir`: the manifests checked to be one
/// complete set of one export of this model, and their HF view.
pub fn open_live(
    handles: &Path,
    model_dir: &Path,
    model: &ModelLayout,
) -> Result<LiveView, HandlesError> {
    let paths = manifest_paths(handles)?;
    if paths.is_empty() {
        return Err(HandlesError::Format {
            path: handles.to_path_buf(),
            what: "no *.json manifests in this folder".into(),
        });
    }
    let manifests = read_all(&paths)?;
    check_complete_set(&manifests, handles)?;
    check_same_model(&manifests, model_dir)?;
    let live = live_params(&manifests, Some(model))?;
    let mut map = LayoutMap::build(&live.params)?;
    for (from, to) in tied(&manifests, model)? {
        map.alias(&from, &to);
    }
    Ok(LiveView {
        map,
        tensors: live.tensors,
        manifests: paths.len(),
        live_params: manifests.tensors.len(),
        unmatched: live.unmatched,
        notes: live.notes,
    })
}

/// Tensors of the files that hold another tensor's weights (tied embeddings), as (HF name of
/// the live tensor, HF name of the tied copy): the pairs the export hook found sharing one
/// parameter (`meta.tied`: engine alias → engine name), and `lm_head.weight` → the embedding
/// when the model's config.json says `tie_word_embeddings: true`. Only pairs the files hold
/// both of.
fn tied(manifests: &Manifests, model: &ModelLayout) -> Result<Vec<(String, String)>, HandlesError> {
    let resolver = NameResolver::new(
        model.tensors.iter().map(|t| t.entry.name.clone()),
        mapper(manifests),
    );
    let held = |engine: &str| match resolver.resolve(engine) {
        Resolved::Held(n) => Some(n),
        _ => None,
    };
    let mut out = Vec::new();
    for (_, meta) in &manifests.metas {
        if let Some(t) = meta.get("tied").and_then(serde_json::Value::as_object) {
            for (alias, target) in t {
                if let (Some(a), Some(tg)) = (held(alias), target.as_str().and_then(held)) {
                    out.push((tg, a));
                }
            }
        }
    }
    let config = read_config(&model.dir)?;
    let tie = config.as_ref().and_then(|c| {
        c.get("text_config")
            .and_then(|t| t.get("tie_word_embeddings"))
            .or_else(|| c.get("tie_word_embeddings"))
            .and_then(serde_json::Value::as_bool)
    });
    if tie == Some(true) {
        let only = |suffix: &str| {
            let v: Vec<&String> = model
                .tensors
                .iter()
                .map(|t| &t.entry.name)
                .filter(|n| n.ends_with(suffix))
                .collect();
            (v.len() == 1).then(|| v[0].clone())
        };
        if let (Some(e), Some(h)) = (only("embed_tokens.weight"), only("lm_head.weight")) {
            out.push((e, h));
        }
    }
    Ok(out)
}

/// What `diagnose` found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Diagnosis {
    /// HF tensors in both, with the same dtype and shape.
    pub matched: Vec<String>,
    /// HF tensors the live weights have but the files do not (they would not be synced).
    pub live_only: Vec<String>,
    /// Tensors the files have but the live weights do not (left untouched, e.g. `mtp.*`).
    pub disk_only: Vec<String>,
    /// Tensors in both whose dtype or shape differ, with both.
    pub mismatched: Vec<String>,
    /// The engine parameters behind `live_only`: the names tried and the closest names the
    /// files hold.
    pub unmatched: Vec<Unmatched>,
    /// Where the files decided against the layout facts (a fused tensor the facts split).
    pub notes: Vec<String>,
    /// Engine parameters in the manifests (all ranks).
    pub live_params: usize,
    /// Manifests read.
    pub manifests: usize,
    /// True when every live tensor matches a tensor of the files in dtype and shape: a sync
    /// would take them all. `diagnose` exits 1 otherwise.
    pub ok: bool,
}

/// Compares the HF view of the live weights with the model files.
pub fn diagnose(model: &ModelLayout, live: &LiveView) -> Diagnosis {
    let map = &live.map;
    let disk: BTreeMap<&str, &crate::model::TensorEntry> = model
        .tensors
        .iter()
        .map(|t| (t.entry.name.as_str(), &t.entry))
        .collect();
    let mut d = Diagnosis {
        live_params: live.live_params,
        manifests: live.manifests,
        unmatched: live.unmatched.clone(),
        notes: live.notes.clone(),
        ..Diagnosis::default()
    };
    for (name, t) in &map.tensors {
        match disk.get(name.as_str()) {
            None => d.live_only.push(name.clone()),
            Some(e) if e.dtype != t.dtype || e.shape != t.shape => d.mismatched.push(format!(
                "{name}: {} {:?} in the files, {} {:?} live",
                dtype_name(e.dtype),
                e.shape,
                dtype_name(t.dtype),
                t.shape
            )),
            Some(_) => d.matched.push(name.clone()),
        }
    }
    d.disk_only = disk
        .keys()
        .filter(|n| !map.tensors.contains_key(**n))
        .map(|n| (*n).to_string())
        .collect();
    d.ok = d.live_only.is_empty() && d.mismatched.is_empty() && d.unmatched.is_empty();
    d
}
