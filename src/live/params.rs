//! The live parameters of a set of manifests: each engine parameter, or packed part of one,
//! with the HF name the files hold (see [`crate::live::names`]), its rows and its ranks; packed
//! pieces grouped into HF tensors by the files' rows, fused tensors the files hold whole kept
//! whole, and parameters without layout facts unpacked by `config.json` or the files.

use std::collections::HashMap;

use super::experts;
use super::handles::{
    HandlesError, LayoutFacts, ManifestTensor, Manifests, PartFacts, PieceFacts, read_config,
};
use super::layout::{LayoutError, LiveParam, PackedPart};
use super::names::{NameResolver, Resolved, Unmatched, WeightsMapper};
use crate::model::{ModelLayout, parse_dtype};

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
/// [`crate::live::names`]). `model` (the files' tensors) is needed to resolve names, to group
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
pub(crate) fn mapper(manifests: &Manifests) -> WeightsMapper {
    manifests
        .metas
        .iter()
        .find_map(|(_, m)| m.get("hf_to_vllm_mapper"))
        .map(WeightsMapper::from_json)
        .unwrap_or_default()
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
