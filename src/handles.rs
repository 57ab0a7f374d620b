//! Manifests of live weights written by `scripts/vllm_export_hook.py`, and `diagnose`.
//!
//! A manifest is JSON, one per rank, never a pickle:
//!
//! ```text
//! { "format": "apollo-checkpoint-handles", "version": 1, "meta": {...},
//!   "tensors": [ { "name", "dtype" (safetensors name), "shape", "strides", "nbytes", "device",
//!                  "device_uuid", "ipc_handle" (128 hex digits), "offset", "allocation_bytes",
//!                  "pid" (or null if unknown), "layout" (optional) } ] }
//! ```
//!
//! `layout` carries the facts that map a packed or sharded parameter back to HF tensors (read
//! from the engine's modules, never hard-coded): `tp_rank`, `tp_size`, `shard_dim` (null, 0 or 1)
//! and, for packed parameters, `packed` (the packed module's name in the parameter name, e.g.
//! `qkv_proj`) with `parts`: `[{ "name": "q_proj", "rows", "local_rows", "first_row" }]`. Without
//! it a parameter is taken as whole and unsharded, with its name mapped by [`layout::hf_name`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::layout::{self, LayoutError, LayoutMap, LiveParam, PackedPart};
use crate::model::{ModelLayout, dtype_name, parse_dtype};

/// Errors reading manifests.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandlesError {
    /// An OS error.
    #[error("{path}: {source}")]
    Io {
        /// The manifest.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Not a manifest this version understands.
    #[error(
        "{path}: not a handles manifest apollo-checkpoint understands ({what}); write it with scripts/vllm_export_hook.py"
    )]
    Format {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The layout facts do not add up.
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

/// Layout facts of one parameter.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct LayoutFacts {
    /// Tensor-parallel rank.
    #[serde(default)]
    pub tp_rank: u64,
    /// Tensor-parallel size.
    #[serde(default = "one")]
    pub tp_size: u64,
    /// Sharded dimension.
    #[serde(default)]
    pub shard_dim: Option<usize>,
    /// The packed module's name inside the parameter name.
    #[serde(default)]
    pub packed: Option<String>,
    /// The packed parts.
    #[serde(default)]
    pub parts: Vec<PartFacts>,
}

fn one() -> u64 {
    1
}

impl Default for LayoutFacts {
    /// A whole, unsharded parameter.
    fn default() -> Self {
        LayoutFacts {
            tp_rank: 0,
            tp_size: 1,
            shard_dim: None,
            packed: None,
            parts: Vec::new(),
        }
    }
}

/// One packed part.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct PartFacts {
    /// The part's module name (replaces `packed` in the parameter name).
    pub name: String,
    /// Rows of the whole HF tensor.
    pub rows: u64,
    /// Rows on this rank.
    pub local_rows: u64,
    /// First HF row on this rank.
    pub first_row: u64,
}

/// One tensor of a manifest.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct ManifestTensor {
    /// Engine name.
    pub name: String,
    /// safetensors dtype name.
    pub dtype: String,
    /// Shape on this rank.
    pub shape: Vec<u64>,
    /// Bytes.
    pub nbytes: u64,
    /// CUDA device ordinal.
    pub device: u32,
    /// Device UUID.
    pub device_uuid: String,
    /// 64-byte IPC handle, hex.
    pub ipc_handle: String,
    /// Byte offset in the allocation.
    pub offset: u64,
    /// Owning process (absent in manifests converted from the prototype's handles file).
    #[serde(default)]
    pub pid: Option<u32>,
    /// Layout facts.
    #[serde(default)]
    pub layout: Option<LayoutFacts>,
}

#[derive(Deserialize)]
struct Manifest {
    format: String,
    version: u32,
    tensors: Vec<ManifestTensor>,
}

/// Reads and checks manifests (all ranks of one engine).
pub fn read_manifests(paths: &[PathBuf]) -> Result<Vec<ManifestTensor>, HandlesError> {
    let mut out = Vec::new();
    for path in paths {
        let text = std::fs::read(path).map_err(|source| HandlesError::Io {
            path: path.clone(),
            source,
        })?;
        let bad = |what: String| HandlesError::Format {
            path: path.clone(),
            what,
        };
        let m: Manifest = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        if m.format != "apollo-checkpoint-handles" || m.version != 1 {
            return Err(bad(format!("format {:?} version {}", m.format, m.version)));
        }
        for t in &m.tensors {
            let handle_ok =
                t.ipc_handle.len() == 128 && t.ipc_handle.bytes().all(|b| b.is_ascii_hexdigit());
            if !handle_ok {
                return Err(bad(format!(
                    "tensor {}: ipc_handle is not 64 bytes of hex",
                    t.name
                )));
            }
            if parse_dtype(&t.dtype).is_none() {
                return Err(bad(format!(
                    "tensor {}: unknown dtype {:?}",
                    t.name, t.dtype
                )));
            }
        }
        out.extend(m.tensors);
    }
    Ok(out)
}

/// The live parameters the manifests describe, with HF names.
pub fn live_params(tensors: &[ManifestTensor]) -> Vec<LiveParam> {
    tensors
        .iter()
        .map(|t| {
            let facts = t.layout.clone().unwrap_or_default();
            let parts = match &facts.packed {
                Some(packed) => facts
                    .parts
                    .iter()
                    .map(|p| PackedPart {
                        hf_name: layout::hf_name(&t.name.replacen(packed.as_str(), &p.name, 1)),
                        rows: p.rows,
                        local_rows: p.local_rows,
                        first_row: p.first_row,
                    })
                    .collect(),
                None => Vec::new(),
            };
            LiveParam {
                name: t.name.clone(),
                dtype: parse_dtype(&t.dtype).expect("checked by read_manifests"),
                shape: t.shape.clone(),
                tp_rank: facts.tp_rank,
                tp_size: facts.tp_size,
                shard_dim: facts.shard_dim,
                parts,
                hf_name: layout::hf_name(&t.name),
            }
        })
        .collect()
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
    /// Engine parameters and the ranks they came from.
    pub live_params: usize,
}

/// Compares the HF view of the live weights with the model files.
pub fn diagnose(model: &ModelLayout, map: &LayoutMap, params: usize) -> Diagnosis {
    let disk: BTreeMap<&str, &crate::model::TensorEntry> = model
        .tensors
        .iter()
        .map(|t| (t.entry.name.as_str(), &t.entry))
        .collect();
    let mut d = Diagnosis {
        live_params: params,
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
    d
}

/// Reads manifests and builds their layout map; the map's parameter `i` is manifest tensor `i`.
pub fn layout_from_manifests(
    paths: &[PathBuf],
) -> Result<(LayoutMap, Vec<ManifestTensor>), HandlesError> {
    let tensors = read_manifests(paths)?;
    let params = live_params(&tensors);
    Ok((LayoutMap::build(&params)?, tensors))
}

/// The manifest files of a path: the file itself, or every `*.json` in a directory.
pub fn manifest_paths(path: &Path) -> Result<Vec<PathBuf>, HandlesError> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|source| HandlesError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    v.sort();
    Ok(v)
}
