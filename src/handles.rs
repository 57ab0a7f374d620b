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

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::experts::{self, ExpertFacts};
use crate::layout::{LayoutError, LayoutMap, LiveParam, PackedPart};
use crate::model::{ModelLayout, dtype_name, parse_dtype};
use crate::names::{NameResolver, Resolved, Unmatched, WeightsMapper};

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

#[derive(Deserialize)]
struct Manifest {
    format: String,
    version: u32,
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

/// vLLM's common packings, used for parameters without layout facts when the manifest names
/// no `packed_modules_mapping`.
const DEFAULT_PACKING: &[(&str, &[&str])] = &[
    ("qkv_proj", &["q_proj", "k_proj", "v_proj"]),
    ("gate_up_proj", &["gate_proj", "up_proj"]),
    ("in_proj_qkvz", &["in_proj_qkv", "in_proj_z"]),
    ("in_proj_ba", &["in_proj_b", "in_proj_a"]),
];

/// The live parameters of a set of manifests, as HF tensors of the model files.
#[derive(Clone, Debug, Default)]
pub struct LiveParams {
    /// The manifests' tensors, fused-MoE parameters split into one view per expert (what a
    /// reader opens; `params[i]` reads `tensors[i]`).
    pub tensors: Vec<ManifestTensor>,
    /// One live parameter per entry of `tensors`.
    pub params: Vec<LiveParam>,
    /// Engine parameters (or packed parts) no tensor of the files matches (none are listed
    /// without the files).
    pub unmatched: Vec<Unmatched>,
    /// Where the files decided against the layout facts.
    pub notes: Vec<String>,
}

/// The live parameters the manifests describe, with the HF names the model files hold (see
/// [`crate::names`]). `model` (the files' tensors) is needed to resolve names, to group
/// `pieces` into unequal HF parts and to unpack parameters that came without layout facts;
/// without it names follow the wrapper rules and those are refused or taken whole.
pub fn live_params(
    manifests: &Manifests,
    model: Option<&ModelLayout>,
) -> Result<LiveParams, HandlesError> {
    let rows_on_disk: HashMap<&str, u64> = model
        .iter()
        .flat_map(|m| &m.tensors)
        .filter_map(|t| Some((t.entry.name.as_str(), *t.entry.shape.first()?)))
        .collect();
    let disk_rows = |name: &str| rows_on_disk.get(name).copied();
    let resolver = NameResolver::new(
        model
            .iter()
            .flat_map(|m| &m.tensors)
            .map(|t| t.entry.name.clone()),
        mapper(manifests),
    );
    let mapping = packing(manifests);
    let config = match model {
        Some(m) => read_config(&m.dir)?,
        None => None,
    };
    let tensors = experts::split(&manifests.tensors, &resolver)?;
    let mut out = LiveParams::default();
    let mut names = Names {
        resolver: &resolver,
        report: model.is_some(),
        unmatched: &mut out.unmatched,
    };
    for t in &tensors {
        let bad = |what: String| {
            HandlesError::Layout(LayoutError::BadParam {
                param: t.name.clone(),
                what,
            })
        };
        let mut facts = match &t.layout {
            Some(f) => f.clone(),
            None => unpacked_without_facts(t, &mapping, config.as_ref(), &disk_rows, &resolver)
                .map_err(bad)?
                .unwrap_or_default(),
        };
        let parts = match facts.packed.clone() {
            Some(packed) => {
                if let Some(note) = fused_on_disk(t, &packed, &mut facts, &resolver) {
                    out.notes.push(note);
                }
                let part_names: Vec<String> = if facts.pieces.is_empty() {
                    facts.parts.iter().map(|p| p.name.clone()).collect()
                } else {
                    facts.names.clone()
                };
                let mut hf = HashMap::new();
                for n in part_names {
                    let name = if n.is_empty() {
                        String::new()
                    } else {
                        names.hf(&t.name.replacen(&packed, &n, 1))?
                    };
                    hf.insert(n, name);
                }
                let hf = |n: &str| hf.get(n).cloned().unwrap_or_default();
                if facts.pieces.is_empty() {
                    facts
                        .parts
                        .iter()
                        .map(|p| PackedPart {
                            hf_name: hf(&p.name),
                            rows: p.rows,
                            local_rows: p.local_rows,
                            first_row: p.first_row,
                        })
                        .collect()
                } else {
                    group_pieces(&facts, hf, &disk_rows).map_err(bad)?
                }
            }
            None => Vec::new(),
        };
        let hf_name = if parts.is_empty() {
            names.hf(&t.name)?
        } else {
            String::new()
        };
        out.params.push(LiveParam {
            name: t.name.clone(),
            dtype: parse_dtype(&t.dtype).expect("checked by read_all"),
            shape: t.shape.clone(),
            tp_rank: facts.tp_rank,
            tp_size: facts.tp_size,
            shard_dim: facts.shard_dim,
            parts,
            hf_name,
        });
    }
    out.tensors = tensors;
    Ok(out)
}

/// Resolves engine names for [`live_params`], collecting the unmatched ones.
struct Names<'a> {
    resolver: &'a NameResolver,
    report: bool,
    unmatched: &'a mut Vec<Unmatched>,
}

impl Names<'_> {
    /// The HF name of `engine`: the one the files hold; an unmatched one is recorded and named
    /// by the wrapper rules; two held are an error.
    fn hf(&mut self, engine: &str) -> Result<String, HandlesError> {
        match self.resolver.resolve(engine) {
            Resolved::Held(n) => Ok(n),
            Resolved::Ambiguous(held) => Err(HandlesError::AmbiguousName {
                engine: engine.to_string(),
                held,
            }),
            Resolved::Missing => {
                if self.report {
                    self.unmatched.push(self.resolver.unmatched(engine));
                }
                Ok(NameResolver::preferred(engine))
            }
        }
    }
}

/// A packed parameter whose facts split it into parts the files do not hold, while the files
/// hold the parameter itself (a vision tower's fused `attn.qkv`, Qwen3-Next's `in_proj_qkvz`):
/// the files decide, and the parts become pieces of the one fused tensor (grouped by its rows
/// in the files, so a rank's pieces land where they belong). Returns a note saying so.
fn fused_on_disk(
    t: &ManifestTensor,
    packed: &str,
    facts: &mut LayoutFacts,
    resolver: &NameResolver,
) -> Option<String> {
    let names: Vec<&str> = if facts.pieces.is_empty() {
        facts.parts.iter().map(|p| p.name.as_str()).collect()
    } else {
        facts.names.iter().map(String::as_str).collect()
    };
    if names.iter().all(|n| n.is_empty() || *n == packed) {
        return None;
    }
    let held = |n: &str| matches!(resolver.resolve(n), Resolved::Held(_));
    let Resolved::Held(whole) = resolver.resolve(&t.name) else {
        return None;
    };
    if names.iter().any(|n| held(&t.name.replacen(packed, n, 1))) {
        return None;
    }
    let note = format!(
        "{}: the layout facts split it into {}, but the files hold it fused as {whole}: taken whole",
        t.name,
        names.join(", ")
    );
    if facts.pieces.is_empty() {
        facts.pieces = facts
            .parts
            .iter()
            .map(|p| PieceFacts {
                rows: p.rows,
                local_rows: p.local_rows,
                first_row: p.first_row,
            })
            .collect();
        facts.parts.clear();
    }
    facts.names = vec![packed.to_string()];
    Some(note)
}

/// The engine's `hf_to_vllm_mapper`, if a manifest carries it (`meta.hf_to_vllm_mapper`).
fn mapper(manifests: &Manifests) -> WeightsMapper {
    manifests
        .metas
        .iter()
        .find_map(|(_, m)| m.get("hf_to_vllm_mapper"))
        .map(WeightsMapper::from_json)
        .unwrap_or_default()
}

/// `model_dir/config.json`, if there is one.
fn read_config(model_dir: &Path) -> Result<Option<serde_json::Value>, HandlesError> {
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

/// The packed modules of the manifests' `meta.packed_modules_mapping`, or vLLM's common ones.
fn packing(manifests: &Manifests) -> Vec<(String, Vec<String>)> {
    for (_, meta) in &manifests.metas {
        if let Some(m) = meta
            .get("packed_modules_mapping")
            .and_then(serde_json::Value::as_object)
        {
            return m
                .iter()
                .filter_map(|(k, v)| {
                    let names: Vec<String> = v
                        .as_array()?
                        .iter()
                        .map(|n| n.as_str().map(str::to_string))
                        .collect::<Option<_>>()?;
                    Some((k.clone(), names))
                })
                .collect();
        }
    }
    DEFAULT_PACKING
        .iter()
        .map(|(k, v)| {
            (
                (*k).to_string(),
                v.iter().map(|n| (*n).to_string()).collect(),
            )
        })
        .collect()
}

/// Layout facts for a parameter that came without any, when its name holds a packed module of
/// `mapping` and the files do not hold it under its own name (Qwen3-Next keeps `in_proj_qkvz`
/// packed on disk): the rows of its parts by the model's `config.json` (see [`rows_by_config`]),
/// which must equal the rows of those parts in the files where the files hold them all; by the
/// files alone when the config does not describe this packing. `Ok(None)`: take it whole.
fn unpacked_without_facts(
    t: &ManifestTensor,
    mapping: &[(String, Vec<String>)],
    config: Option<&serde_json::Value>,
    disk_rows: &impl Fn(&str) -> Option<u64>,
    resolver: &NameResolver,
) -> Result<Option<LayoutFacts>, String> {
    let hf_name = |engine: &str| match resolver.resolve(engine) {
        Resolved::Held(n) => n,
        _ => NameResolver::preferred(engine),
    };
    if matches!(resolver.resolve(&t.name), Resolved::Held(_)) {
        return Ok(None);
    }
    let live_rows = t.shape.first().copied().unwrap_or(0);
    let segments: Vec<&str> = t.name.split('.').collect();
    let Some((packed, names)) = mapping
        .iter()
        .find(|(packed, _)| segments.contains(&packed.as_str()))
    else {
        return Ok(None);
    };
    let hf_names: Vec<String> = names
        .iter()
        .map(|n| hf_name(&t.name.replacen(packed.as_str(), n, 1)))
        .collect();
    let by_files: Option<Vec<u64>> = hf_names.iter().map(|n| disk_rows(n)).collect();
    let by_config = match config {
        Some(c) => rows_by_config(packed, names.len(), c, live_rows)?,
        None => None,
    };
    let rows = match (by_config, by_files) {
        (Some(c), Some(f)) if c != f => {
            return Err(format!(
                "config.json gives its parts {hf_names:?} {c:?} rows, but the files hold {f:?}"
            ));
        }
        (Some(c), _) => c,
        (None, Some(f)) if f.iter().sum::<u64>() == live_rows => f,
        (None, _) => return Ok(None),
    };
    Ok(Some(LayoutFacts {
        packed: Some(packed.clone()),
        parts: names
            .iter()
            .zip(rows)
            .map(|(n, r)| PartFacts {
                name: n.clone(),
                rows: r,
                local_rows: r,
                first_row: 0,
            })
            .collect(),
        ..LayoutFacts::default()
    }))
}

/// The rows of the `parts` parts of packed module `packed`, as the model config (`text_config`
/// keys first, then top-level ones) describes them for a live parameter of `live_rows` rows:
/// - `qkv_proj` [q, k, v]: `num_attention_heads` (× 2 with Qwen3.5's gated query, taken from
///   `attn_output_gate` or, absent that, from whichever reading adds up), `num_key_value_heads`,
///   `head_dim` (default `hidden_size / num_attention_heads`);
/// - `gate_up_proj` [gate, up]: twice `intermediate_size` (or `shared_expert_intermediate_size`,
///   `moe_intermediate_size`, whichever adds up);
/// - `in_proj_qkvz` [qkv, z] and `in_proj_ba` [b, a]: the Gated DeltaNet head counts and head
///   dimensions (`linear_num_key_heads`, `linear_key_head_dim`, `linear_num_value_heads`,
///   `linear_value_head_dim`).
///
/// `Ok(None)` when the config lacks those keys or the packing is another; an error when it has
/// them but no reading adds up to the live parameter (the config is not this model's).
pub fn rows_by_config(
    packed: &str,
    parts: usize,
    config: &serde_json::Value,
    live_rows: u64,
) -> Result<Option<Vec<u64>>, String> {
    let key = |k: &str| {
        config
            .get("text_config")
            .and_then(|t| t.get(k))
            .or_else(|| config.get(k))
    };
    let num = |k: &str| key(k).and_then(serde_json::Value::as_u64);
    let candidates: Vec<Vec<u64>> = match (packed, parts) {
        ("qkv_proj", 3) => {
            let (Some(heads), Some(hidden)) = (num("num_attention_heads"), num("hidden_size"))
            else {
                return Ok(None);
            };
            let kv = num("num_key_value_heads").unwrap_or(heads);
            let dim = num("head_dim").unwrap_or(hidden / heads.max(1));
            let gates: &[u64] = match key("attn_output_gate").and_then(serde_json::Value::as_bool) {
                Some(true) => &[2],
                Some(false) => &[1],
                None => &[1, 2],
            };
            gates
                .iter()
                .map(|g| vec![g * heads * dim, kv * dim, kv * dim])
                .collect()
        }
        ("gate_up_proj", 2) => [
            "intermediate_size",
            "shared_expert_intermediate_size",
            "moe_intermediate_size",
        ]
        .iter()
        .filter_map(|k| num(k))
        .map(|i| vec![i, i])
        .collect(),
        ("in_proj_qkvz" | "in_proj_ba", 2) => {
            let dims = (
                num("linear_num_key_heads"),
                num("linear_key_head_dim"),
                num("linear_num_value_heads"),
                num("linear_value_head_dim"),
            );
            let (Some(nk), Some(dk), Some(nv), Some(dv)) = dims else {
                return Ok(None);
            };
            if packed == "in_proj_ba" {
                vec![vec![nv, nv]]
            } else {
                vec![vec![2 * nk * dk + nv * dv, nv * dv]]
            }
        }
        _ => Vec::new(),
    };
    if candidates.is_empty() {
        return Ok(None);
    }
    candidates
        .iter()
        .find(|c| c.iter().sum::<u64>() == live_rows)
        .map(|c| Some(c.clone()))
        .ok_or_else(|| {
            format!(
                "config.json's sizes for {packed} ({}) do not add up to its {live_rows} live rows",
                candidates
                    .iter()
                    .map(|c| format!("{c:?}"))
                    .collect::<Vec<_>>()
                    .join(" or ")
            )
        })
}

/// Groups a packed parameter's pieces into its HF parts (see the module documentation).
fn group_pieces(
    facts: &LayoutFacts,
    hf: impl Fn(&str) -> String,
    disk_rows: &impl Fn(&str) -> Option<u64>,
) -> Result<Vec<PackedPart>, String> {
    let (names, pieces) = (&facts.names, &facts.pieces);
    if names.is_empty() {
        return Err("packed pieces without part names".into());
    }
    let distinct = names
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        == names.len();
    if names.len() == pieces.len() && distinct {
        return Ok(names
            .iter()
            .zip(pieces)
            .map(|(n, p)| PackedPart {
                hf_name: hf(n),
                rows: p.rows,
                local_rows: p.local_rows,
                first_row: p.first_row,
            })
            .collect());
    }
    if !distinct {
        return Err(format!("its part names repeat: {names:?}"));
    }
    let mut out = Vec::new();
    let mut next = pieces.iter();
    for n in names {
        let name = hf(n);
        // One name the files do not hold (it is reported as unmatched): all its pieces.
        let whole = (names.len() == 1).then(|| pieces.iter().map(|p| p.rows).sum());
        let Some(want) = disk_rows(&name).or(whole) else {
            return Err(format!(
                "its {} pieces cannot be matched to its {} parts: the files hold no {name}",
                pieces.len(),
                names.len()
            ));
        };
        let mut group = Vec::new();
        let mut rows = 0;
        while rows < want {
            let Some(p) = next.next() else { break };
            rows += p.rows;
            group.push(p);
        }
        if rows != want {
            return Err(format!(
                "its pieces do not add up to {name}'s {want} rows in the files"
            ));
        }
        let mut offset = 0;
        for p in group {
            out.push(PackedPart {
                hf_name: name.clone(),
                rows: want,
                local_rows: p.local_rows,
                first_row: offset + p.first_row,
            });
            offset += p.rows;
        }
    }
    if next.next().is_some() {
        return Err("it has more pieces than its parts' rows in the files".into());
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

#[cfg(test)]
mod tests {
    use super::rows_by_config;
    use serde_json::json;

    /// Qwen3.5-27B's config.json (the keys that matter), as HF writes it: under `text_config`.
    fn qwen35_27b() -> serde_json::Value {
        json!({ "architectures": ["Qwen3_5ForConditionalGeneration"], "text_config": {
            "hidden_size": 5120, "intermediate_size": 17408, "num_attention_heads": 24,
            "num_key_value_heads": 4, "head_dim": 256, "linear_num_key_heads": 16,
            "linear_key_head_dim": 128, "linear_num_value_heads": 48, "linear_value_head_dim": 128 } })
    }

    #[test]
    fn qwen35_packings_come_from_its_config() {
        let c = qwen35_27b();
        // The gated query: 24 heads × 256 × 2 (no attn_output_gate key: the reading that adds up).
        assert_eq!(
            rows_by_config("qkv_proj", 3, &c, 14336),
            Ok(Some(vec![12288, 1024, 1024]))
        );
        assert_eq!(
            rows_by_config("gate_up_proj", 2, &c, 2 * 17408),
            Ok(Some(vec![17408, 17408]))
        );
        assert_eq!(
            rows_by_config("in_proj_qkvz", 2, &c, 16384),
            Ok(Some(vec![10240, 6144]))
        );
        assert_eq!(
            rows_by_config("in_proj_ba", 2, &c, 96),
            Ok(Some(vec![48, 48]))
        );
    }

    #[test]
    fn llama_style_config_at_the_top_level_and_head_dim_from_hidden_size() {
        let c = json!({ "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
                        "intermediate_size": 14336, "attn_output_gate": false });
        assert_eq!(
            rows_by_config("qkv_proj", 3, &c, 6144),
            Ok(Some(vec![4096, 1024, 1024]))
        );
        // attn_output_gate: false rules out the gated reading even where it would add up.
        assert!(rows_by_config("qkv_proj", 3, &c, 10240).is_err());
        // MoE shared experts use their own intermediate size.
        let moe = json!({ "intermediate_size": 5120, "shared_expert_intermediate_size": 512 });
        assert_eq!(
            rows_by_config("gate_up_proj", 2, &moe, 1024),
            Ok(Some(vec![512, 512]))
        );
    }

    #[test]
    fn a_config_that_does_not_describe_the_packing_gives_no_answer_and_one_that_disagrees_an_error()
    {
        let c = qwen35_27b();
        assert_eq!(rows_by_config("w13", 2, &c, 100), Ok(None));
        assert_eq!(rows_by_config("qkv_proj", 2, &c, 14336), Ok(None));
        assert_eq!(
            rows_by_config("in_proj_qkvz", 2, &json!({ "hidden_size": 8 }), 10),
            Ok(None)
        );
        let e = rows_by_config("qkv_proj", 3, &c, 14000).unwrap_err();
        assert!(
            e.contains("14000") && e.contains("[12288, 1024, 1024]"),
            "{e}"
        );
    }
}
