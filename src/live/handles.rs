//! Manifests of live weights written by `scripts/vllm_export_hook.py`, and `diagnose`.
//!
//! A manifest is JSON, one per rank, never a pickle:
//!
//! ```text
//! { "format": "apollo-checkpoint-handles", "version": 1, "writer": "apollo-checkpoint-hook 0.1.0",
//!   "meta": {...},
//!   "tensors": [ { "name", "dtype" (safetensors name), "shape", "strides", "nbytes", "device",
//!                  "device_uuid", "ipc_handle" (128 hex digits), "offset", "allocation_bytes",
//!                  "pid" (or null if unknown), "layout" (optional) } ] }
//! ```
//!
//! `version` is the manifest format ([`MANIFEST_VERSION`]); `writer` (optional: manifests of
//! older hooks and converted ones lack it) names the package and release that wrote it. They are
//! read first: a manifest of another version is refused (exit 78) naming both releases and what
//! to install, before any other field is looked at.
//!
//! `layout` carries the facts that map a packed or sharded parameter back to HF tensors (read
//! from the engine's modules by the hook, never hard-coded): `tp_rank`, `tp_size`, `shard_dim`
//! (null, 0 or 1) and, for packed parameters, `packed` (the packed module's name in the parameter
//! name, e.g. `qkv_proj`) with either
//! - `parts`: `[{ "name": "q_proj", "rows", "local_rows", "first_row" }]`, one per HF tensor
//!   piece this rank holds (a name may repeat: conv1d's q, k and v pieces all belong to
//!   `conv1d.weight`; an empty name marks padding rows), or
//! - `names` (the HF parts, in packing order) and `pieces`: `[{ "rows", "local_rows",
//!   "first_row" }]`, the engine's own sub-blocks (vLLM's `output_sizes`). With as many pieces as
//!   names they pair up; otherwise consecutive pieces are grouped into each name so that their
//!   rows add up to that HF tensor's rows in the model files (vLLM packs Qwen3.5's
//!   `in_proj_qkvz` as four pieces q, k, v, z for two HF tensors, `in_proj_qkv` and `in_proj_z`;
//!   GDN's `conv1d` is one name with three pieces q, k, v, each sharded on its own).
//!
//! Without `layout` (manifests converted from the prototype's handles file) a parameter is taken
//! as unsharded; if its name holds a packed module of `meta.packed_modules_mapping` (or, absent
//! that, of vLLM's common packings: qkv_proj, gate_up_proj, in_proj_qkvz, in_proj_ba) and the
//! files do not hold it under its own name, it is split into those parts with the rows the
//! model directory's `config.json` gives them ([`rows_by_config`]: head counts and dimensions,
//! the gated query, intermediate sizes, Gated DeltaNet heads), which must equal the parts' rows
//! in the files where the files hold them; where the config does not describe the packing, with
//! the parts' rows in the files.
//!
//! `meta` may carry `config`: the engine's model config (`architectures`, `hidden_size`,
//! `num_hidden_layers`, `vocab_size`, ...). Every key also in the model directory's
//! `config.json` (or its `text_config`) must agree, or the manifests are refused as another
//! model's; all manifests must agree with each other, and hold each tp rank once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::live::experts::ExpertFacts;
use crate::live::layout::LayoutError;
use crate::live::names::Unmatched;
use crate::model::parse_dtype;

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
    /// A manifest of another format version than this binary reads: the hook and the binary
    /// come from different releases.
    #[error(
        "{path}: manifest format version {found}, written by {writer}; this apollo-checkpoint ({binary}) reads version {reads}. {advice}"
    )]
    Version {
        /// The manifest.
        path: PathBuf,
        /// Its `version`.
        found: u32,
        /// Its `writer` (e.g. `apollo-checkpoint-hook 0.2.0`), or what is known without it.
        writer: String,
        /// The version this binary reads ([`MANIFEST_VERSION`]).
        reads: u32,
        /// This binary's name and version.
        binary: String,
        /// What to do.
        advice: String,
    },
    /// The model directory's `config.json` cannot be read as JSON.
    #[error("{path}: {what}; fix the model's config.json or move it away")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The layout facts do not add up.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// An engine name matches two tensors of the files.
    #[error(
        "live parameter {engine} could be any of {} in the model files: the files hold the same weights under two names; keep one copy",
        held.join(" and ")
    )]
    AmbiguousName {
        /// The engine's name.
        engine: String,
        /// The file tensors it could be.
        held: Vec<String>,
    },
    /// Live parameters no tensor of the files matches: a sync would leave them out.
    #[error(
        "{} live parameter(s) match no tensor of the model files: {}{}. Run `apollo-checkpoint diagnose` to see every name",
        unmatched.len(),
        unmatched.iter().take(5).map(ToString::to_string).collect::<Vec<_>>().join("; "),
        if unmatched.len() > 5 { "; ..." } else { "" }
    )]
    Unmatched {
        /// The parameters, with the names tried and the closest names the files hold.
        unmatched: Vec<Unmatched>,
    },
    /// The manifests are not one complete set of one export.
    #[error("{path}: {what}")]
    Set {
        /// The manifests' path (`--handles`).
        path: PathBuf,
        /// What is missing or mixed.
        what: String,
    },
    /// The manifests describe another model than the one in the model directory.
    #[error(
        "{path}: these live weights are not the model in {model_dir}: {what}. Point --handles at the manifests of the engine that serves this model"
    )]
    OtherModel {
        /// The manifest.
        path: PathBuf,
        /// The model directory.
        model_dir: PathBuf,
        /// What differs.
        what: String,
    },
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
    /// The HF parts of a packed parameter, when given with `pieces`.
    #[serde(default)]
    pub names: Vec<String>,
    /// The engine's sub-blocks of a packed parameter, grouped into `names`.
    #[serde(default)]
    pub pieces: Vec<PieceFacts>,
    /// For a fused mixture-of-experts parameter: which experts this rank holds.
    #[serde(default)]
    pub experts: Option<ExpertFacts>,
}

/// One sub-block of a packed parameter (vLLM's `output_sizes` entry) on one rank.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct PieceFacts {
    /// Rows of the whole sub-block (all ranks).
    pub rows: u64,
    /// Rows on this rank.
    pub local_rows: u64,
    /// First row of the sub-block on this rank.
    pub first_row: u64,
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
            names: Vec::new(),
            pieces: Vec::new(),
            experts: None,
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

/// The manifest format this binary reads (`"version"`; `MANIFEST_VERSION` of
/// scripts/vllm_export_hook.py, which a test keeps equal).
pub const MANIFEST_VERSION: u32 = 1;

/// What identifies a manifest, read before the rest so that one of another version is named as
/// such instead of failing on a field it does not have.
#[derive(Deserialize)]
struct ManifestHeader {
    format: String,
    version: u32,
    #[serde(default)]
    writer: Option<String>,
}

/// Checks `header` is a manifest of [`MANIFEST_VERSION`], with what to do when it is not.
fn check_header(path: &Path, header: &ManifestHeader) -> Result<(), HandlesError> {
    if header.format != "apollo-checkpoint-handles" {
        return Err(HandlesError::Format {
            path: path.to_owned(),
            what: format!("its format is {:?}", header.format),
        });
    }
    if header.version == MANIFEST_VERSION {
        return Ok(());
    }
    let ours = env!("CARGO_PKG_VERSION");
    let install = format!(
        "install this release's hook on the vLLM host (`pip install ./scripts` of apollo-checkpoint {ours}, package apollo-checkpoint-hook {ours}) and restart the server"
    );
    let advice = if header.version > MANIFEST_VERSION {
        format!(
            "The hook is newer: install apollo-checkpoint's release that goes with it, or {install}"
        )
    } else {
        format!("The hook is older: {install}")
    };
    Err(HandlesError::Version {
        path: path.to_owned(),
        found: header.version,
        writer: header
            .writer
            .clone()
            .unwrap_or_else(|| "a hook that does not name itself".to_owned()),
        reads: MANIFEST_VERSION,
        binary: format!("apollo-checkpoint {ours}"),
        advice,
    })
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(default)]
    meta: serde_json::Map<String, serde_json::Value>,
    tensors: Vec<ManifestTensor>,
}

/// The manifests of one engine (all its ranks).
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    /// Every tensor of every manifest.
    pub tensors: Vec<ManifestTensor>,
    /// Each manifest's path and `meta`.
    pub metas: Vec<(PathBuf, serde_json::Map<String, serde_json::Value>)>,
}

/// Reads and checks manifests (all ranks of one engine).
pub fn read_all(paths: &[PathBuf]) -> Result<Manifests, HandlesError> {
    let mut out = Manifests::default();
    for path in paths {
        let text = std::fs::read(path).map_err(|source| HandlesError::Io {
            path: path.clone(),
            source,
        })?;
        let bad = |what: String| HandlesError::Format {
            path: path.clone(),
            what,
        };
        let header: ManifestHeader =
            serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        check_header(path, &header)?;
        let m: Manifest = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
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
        let mut meta = m.meta;
        // Manifests that predate `meta.tp_size` (or name no ranks): their tensors' facts say.
        if let Some(f) = m.tensors.iter().find_map(|t| t.layout.as_ref()) {
            for (key, value) in [("tp_rank", f.tp_rank), ("tp_size", f.tp_size)] {
                meta.entry(key).or_insert_with(|| value.into());
            }
        }
        out.tensors.extend(m.tensors);
        out.metas.push((path.clone(), meta));
    }
    Ok(out)
}

/// `model_dir/config.json`, if there is one.
pub(crate) fn read_config(model_dir: &Path) -> Result<Option<serde_json::Value>, HandlesError> {
    let path = model_dir.join("config.json");
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(HandlesError::Io { path, source }),
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| HandlesError::Config {
            path,
            what: format!("not JSON: {e}"),
        })
}

/// Checks that the manifests describe one engine serving the model in `model_dir`: their
/// `meta.config` agree with each other and with `model_dir/config.json` (or its `text_config`)
/// on every key both have.
pub fn check_same_model(manifests: &Manifests, model_dir: &Path) -> Result<(), HandlesError> {
    let other = |path: &Path, what: String| HandlesError::OtherModel {
        path: path.to_path_buf(),
        model_dir: model_dir.to_path_buf(),
        what,
    };
    let configs: Vec<(&PathBuf, &serde_json::Map<String, serde_json::Value>)> = manifests
        .metas
        .iter()
        .filter_map(|(p, m)| m.get("config").and_then(|c| c.as_object()).map(|c| (p, c)))
        .collect();
    if let Some((first_path, first)) = configs.first() {
        for (path, c) in &configs[1..] {
            for (k, v) in *c {
                if first.get(k).is_some_and(|f| f != v) {
                    return Err(other(
                        path,
                        format!(
                            "its {k} is {v} but {} says {}: manifests of two engines?",
                            first_path.display(),
                            first[k]
                        ),
                    ));
                }
            }
        }
        let cfg_path = model_dir.join("config.json");
        let Some(disk) = read_config(model_dir)? else {
            return Ok(());
        };
        let text_config = disk.get("text_config");
        for (k, live) in *first {
            let on_disk = disk.get(k).or_else(|| text_config.and_then(|t| t.get(k)));
            if let Some(d) = on_disk {
                if d != live {
                    return Err(other(
                        first_path,
                        format!(
                            "the live model's {k} is {live}, {} says {d}",
                            cfg_path.display()
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Where one manifest sits in its deployment: (pp rank, pp size, tp rank, tp size, export id).
fn place(
    meta: &serde_json::Map<String, serde_json::Value>,
) -> (u64, u64, u64, u64, Option<String>) {
    let num = |k: &str, default: u64| {
        meta.get(k)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(default)
    };
    (
        num("pp_rank", 0),
        num("pp_size", 1),
        num("tp_rank", 0),
        num("tp_size", 1),
        meta.get("export_id")
            .and_then(serde_json::Value::as_str)
            .map(str::to_string),
    )
}

/// Checks that the manifests are one complete set of one export: every (pipeline stage,
/// tensor-parallel rank) pair of the deployment exactly once, all with the same sizes and the
/// same `export_id`. A partial set would leave the missing ranks' tensors stale while reporting
/// success; a mixed one would combine weights of two moments.
pub fn check_complete_set(manifests: &Manifests, handles: &Path) -> Result<(), HandlesError> {
    let err = |what: String| HandlesError::Set {
        path: handles.to_path_buf(),
        what,
    };
    let places: Vec<(&PathBuf, _)> = manifests.metas.iter().map(|(p, m)| (p, place(m))).collect();
    let Some((first_path, first)) = places.first() else {
        return Ok(());
    };
    let (pp_size, tp_size) = (first.1, first.3);
    if pp_size == 0 || tp_size == 0 || pp_size.saturating_mul(tp_size) > 65_536 {
        return Err(err(format!(
            "{} says pp_size {pp_size} and tp_size {tp_size}",
            first_path.display()
        )));
    }
    let mut seen: BTreeMap<(u64, u64), &PathBuf> = BTreeMap::new();
    for (path, p) in &places {
        if (p.1, p.3) != (pp_size, tp_size) {
            return Err(err(format!(
                "{} is from a deployment of pp_size {} × tp_size {}, {} from one of {pp_size} × {tp_size}: remove the stale manifests and export again",
                path.display(),
                p.1,
                p.3,
                first_path.display()
            )));
        }
        if p.4 != first.4 {
            let id = |i: &Option<String>| i.clone().unwrap_or_else(|| "none".into());
            return Err(err(format!(
                "{} comes from export {}, {} from export {}: a mixed set; remove the stale manifests and export again",
                path.display(),
                id(&p.4),
                first_path.display(),
                id(&first.4)
            )));
        }
        if p.0 >= pp_size || p.2 >= tp_size {
            return Err(err(format!(
                "{} says pp rank {} tp rank {}, outside pp_size {pp_size} × tp_size {tp_size}",
                path.display(),
                p.0,
                p.2
            )));
        }
        if let Some(other) = seen.insert((p.0, p.2), path) {
            return Err(err(format!(
                "{} and {} both hold pp rank {} tp rank {}: manifests of two engines? Remove the stale one",
                other.display(),
                path.display(),
                p.0,
                p.2
            )));
        }
    }
    let missing: Vec<String> = (0..pp_size)
        .flat_map(|pp| (0..tp_size).map(move |tp| (pp, tp)))
        .filter(|k| !seen.contains_key(k))
        .map(|(pp, tp)| format!("pp{pp}-tp{tp}"))
        .collect();
    if !missing.is_empty() {
        return Err(err(format!(
            "an incomplete set: {} of {} manifests (pp_size {pp_size} × tp_size {tp_size}); missing {}. Export from every worker (collective_rpc reaches them all) into this folder",
            seen.len(),
            pp_size * tp_size,
            missing.join(", ")
        )));
    }
    Ok(())
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
