//! Mixture-of-experts parameters: vLLM's `FusedMoE` keeps a layer's experts stacked in two
//! parameters, `experts.w13_weight` `[E_local, 2·I/tp, H]` (each expert's gate projection rows,
//! then its up projection rows, this rank's slice of each) and `experts.w2_weight`
//! `[E_local, H, I/tp]` (each expert's down projection, this rank's columns). Checkpoints hold one
//! tensor per expert and projection: `mlp.experts.{e}.gate_proj.weight` `[I, H]`, `up_proj`
//! `[I, H]`, `down_proj` `[H, I]` (Mixtral-style files name them `w1`, `w3`, `w2`).
//!
//! [`split`] turns each such parameter into one view per expert — same IPC handle, the expert's
//! byte offset — with the facts of the dense layer it is a slice of: a view of `w13` is a packed
//! `[gate; up]` parameter, column-parallel when tp > 1; a view of `w2` is a plain parameter,
//! row-parallel when tp > 1. With expert parallelism a rank holds a subset of the experts
//! (`experts` in the facts: their global ids in local order); the layout map then checks that the
//! ranks together hold every expert once. Nothing is copied.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::live::handles::{HandlesError, LayoutFacts, ManifestTensor, PartFacts};
use crate::live::layout::LayoutError;
use crate::live::names::{NameResolver, Resolved};
use crate::model::{parse_dtype, tensor_nbytes};

/// Which fused-MoE parameter.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ExpertKind {
    /// `w13_weight`: gate and up projections.
    W13,
    /// `w2_weight`: down projection.
    W2,
}

/// The facts of a fused-MoE parameter, as the export hook reads them from the `FusedMoE` layer.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct ExpertFacts {
    /// Which parameter.
    pub kind: ExpertKind,
    /// Global ids of the experts this rank holds, in local order (vLLM's `expert_map`
    /// inverted; all experts without expert parallelism).
    pub experts: Vec<u64>,
    /// Experts in the layer, over all ranks (vLLM's `global_num_experts`): every one must be
    /// held by some rank, or the missing ones' tensors would silently stay stale.
    #[serde(default)]
    pub num_experts: Option<u64>,
    /// The checkpoint's names of the gate, up and down projections; absent: `gate_proj`,
    /// `up_proj`, `down_proj` or `w1`, `w3`, `w2`, whichever the files hold.
    #[serde(default)]
    pub names: Option<[String; 3]>,
}

/// The checkpoint naming schemes tried when the facts name none.
const NAMINGS: &[[&str; 3]] = &[["gate_proj", "up_proj", "down_proj"], ["w1", "w3", "w2"]];

/// `tensors` with every fused-MoE parameter replaced by one view per expert (see the module
/// documentation); other tensors are kept as they are, in order.
pub fn split(
    tensors: &[ManifestTensor],
    resolver: &NameResolver,
) -> Result<Vec<ManifestTensor>, HandlesError> {
    let mut out = Vec::with_capacity(tensors.len());
    // Per fused parameter: the experts its ranks hold, and how many there are.
    let mut held: BTreeMap<&str, (BTreeSet<u64>, Option<u64>)> = BTreeMap::new();
    for t in tensors {
        let Some((facts, ex)) = t
            .layout
            .as_ref()
            .and_then(|f| f.experts.as_ref().map(|e| (f, e)))
        else {
            out.push(t.clone());
            continue;
        };
        let bad = |what: String| {
            HandlesError::Layout(LayoutError::BadParam {
                param: t.name.clone(),
                what,
            })
        };
        let token = match ex.kind {
            ExpertKind::W13 => "w13_weight",
            ExpertKind::W2 => "w2_weight",
        };
        let Some(prefix) = t.name.strip_suffix(token) else {
            return Err(bad(format!(
                "fused-MoE facts for a parameter whose name does not end in {token}"
            )));
        };
        let &[local, rows, cols] = t.shape.as_slice() else {
            return Err(bad(format!(
                "a fused-MoE parameter of shape {:?}, not [experts, rows, columns]",
                t.shape
            )));
        };
        if local != ex.experts.len() as u64 {
            return Err(bad(format!(
                "it holds {local} experts but its facts list {}",
                ex.experts.len()
            )));
        }
        if ex.kind == ExpertKind::W13 && rows % 2 != 0 {
            return Err(bad(format!("{rows} rows do not split into gate and up")));
        }
        let dtype = parse_dtype(&t.dtype).expect("checked by read_all");
        let per =
            tensor_nbytes(dtype, &[rows, cols]).ok_or_else(|| bad("its size overflows".into()))?;
        if per.checked_mul(local) != Some(t.nbytes) {
            return Err(bad(format!(
                "{local} experts of {per} bytes, but the manifest says {} bytes",
                t.nbytes
            )));
        }
        let entry = held.entry(t.name.as_str()).or_default();
        entry.0.extend(ex.experts.iter().copied());
        entry.1 = entry.1.or(ex.num_experts);
        let names = naming(ex, prefix, resolver);
        let (tp, r) = (facts.tp_size, facts.tp_rank);
        for (j, &e) in ex.experts.iter().enumerate() {
            let mut view = t.clone();
            view.offset = t.offset + j as u64 * per;
            view.nbytes = per;
            view.shape = vec![rows, cols];
            let (name, layout) = match ex.kind {
                ExpertKind::W13 => {
                    let half = rows / 2;
                    let part = |n: &str| PartFacts {
                        name: format!("{n}.weight"),
                        rows: half * tp,
                        local_rows: half,
                        first_row: r * half,
                    };
                    let layout = LayoutFacts {
                        tp_rank: r,
                        tp_size: tp,
                        shard_dim: (tp > 1).then_some(0),
                        packed: Some(token.to_string()),
                        parts: vec![part(&names[0]), part(&names[1])],
                        ..LayoutFacts::default()
                    };
                    (format!("{prefix}{e}.{token}"), layout)
                }
                ExpertKind::W2 => {
                    let layout = LayoutFacts {
                        tp_rank: r,
                        tp_size: tp,
                        shard_dim: (tp > 1).then_some(1),
                        ..LayoutFacts::default()
                    };
                    (format!("{prefix}{e}.{}.weight", names[2]), layout)
                }
            };
            view.name = name;
            view.layout = Some(layout);
            out.push(view);
        }
    }
    for (name, (experts, total)) in held {
        let Some(total) = total else { continue };
        let missing: Vec<String> = (0..total)
            .filter(|e| !experts.contains(e))
            .map(|e| e.to_string())
            .collect();
        if !missing.is_empty() || experts.iter().any(|e| *e >= total) {
            return Err(HandlesError::Layout(LayoutError::Coverage {
                tensor: name.to_string(),
                what: format!(
                    "experts {} of its {total} are held by no rank: export from every worker",
                    missing.join(", ")
                ),
            }));
        }
    }
    Ok(out)
}

/// The projections' names: the facts', or the first naming whose gate (or down) projection of
/// the first expert the files hold, or `gate_proj`/`up_proj`/`down_proj`.
fn naming(ex: &ExpertFacts, prefix: &str, resolver: &NameResolver) -> [String; 3] {
    if let Some(n) = &ex.names {
        return n.clone();
    }
    let first = ex.experts.first().copied().unwrap_or(0);
    let probe = if ex.kind == ExpertKind::W13 { 0 } else { 2 };
    let chosen = NAMINGS
        .iter()
        .find(|n| {
            let name = format!("{prefix}{first}.{}.weight", n[probe]);
            matches!(resolver.resolve(&name), Resolved::Held(_))
        })
        .unwrap_or(&NAMINGS[0]);
    chosen.map(str::to_string)
}
