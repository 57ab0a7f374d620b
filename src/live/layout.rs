//! The layout map: how the HuggingFace tensors of the model files are laid out in a serving
//! engine's live parameters (vLLM's packed and tensor-parallel layout), so that a live source can
//! be read as HF tensors without copying.
//!
//! Each HF tensor is described as a list of byte [`Segment`]s, each a contiguous run of bytes of
//! one live parameter on one rank, placed at an offset of the HF tensor. The map is built from
//! facts about each live parameter (its packed parts and their sizes along the packed dimension,
//! its tensor-parallel rank and size and which dimension is sharded), never from model-specific
//! constants, and it is not tied to one rank: parameters of every rank go into one map.
//!
//! Covered:
//! - plain parameters (one rank, or replicated on every rank: rank 0 is read);
//! - packed parameters concatenated along dim 0 (`qkv_proj`, `gate_up_proj`, `in_proj_qkvz`,
//!   `in_proj_ba`, ...), unsharded or column-parallel: rank r holds, for every part i, rows
//!   `[r·sᵢ/tp, (r+1)·sᵢ/tp)` of that part, parts one after another;
//! - column-parallel plain parameters (dim 0 sharded) and row-parallel ones (dim 1 sharded: every
//!   HF row is the concatenation of the ranks' pieces);
//! - parts replicated across ranks when tp exceeds their count (KV heads): a part may say it is
//!   split in `units` pieces of `unit_rows` rows, and which unit each rank holds.
//!
//! Packed parts are views: segments point into the live parameter; nothing is copied to split it.

use std::collections::BTreeMap;

use safetensors::Dtype;

use crate::model::tensor_nbytes;

/// One part of a packed parameter: an HF tensor stored as rows of the packed one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedPart {
    /// HF name of the part. Empty for padding rows that belong to no HF tensor (a vocabulary
    /// padded to a multiple of 64, say); those are never read.
    pub hf_name: String,
    /// Its rows in the full (unsharded) HF tensor.
    pub rows: u64,
    /// Rows this rank holds of it (rows / tp when evenly split; one head when replicated).
    pub local_rows: u64,
    /// Offset, in rows of the HF tensor, of the rows this rank holds.
    pub first_row: u64,
}

/// One live parameter of one rank, as the export hook describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveParam {
    /// The engine's name (e.g. `language_model.model.layers.0.self_attn.qkv_proj.weight`).
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape of this rank's tensor.
    pub shape: Vec<u64>,
    /// Tensor-parallel rank.
    pub tp_rank: u64,
    /// Tensor-parallel size.
    pub tp_size: u64,
    /// The dimension sharded across ranks (`None`: replicated or unsharded).
    pub shard_dim: Option<usize>,
    /// For packed parameters: the HF parts, in packing order, along dim 0.
    pub parts: Vec<PackedPart>,
    /// For plain parameters: the HF name.
    pub hf_name: String,
}

/// A run of bytes of one live parameter placed in an HF tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Index of the live parameter.
    pub param: usize,
    /// Byte offset in the live parameter.
    pub src: u64,
    /// Byte offset in the HF tensor.
    pub dst: u64,
    /// Length.
    pub len: u64,
}

/// An HF tensor assembled from live parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HfTensor {
    /// HF name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Full shape.
    pub shape: Vec<u64>,
    /// Length in bytes.
    pub len: u64,
    /// Segments sorted by `dst`, covering `0..len` exactly once.
    pub segments: Vec<Segment>,
}

/// Why a layout cannot be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// A parameter's description does not add up.
    #[error("live parameter {param}: {what}")]
    BadParam {
        /// The parameter.
        param: String,
        /// What is wrong.
        what: String,
    },
    /// The ranks' pieces of an HF tensor do not cover it exactly once.
    #[error("HF tensor {tensor}: {what}")]
    Coverage {
        /// The tensor.
        tensor: String,
        /// What is wrong.
        what: String,
    },
}

/// HF tensors by name, assembled from the live parameters of every rank.
#[derive(Clone, Debug, Default)]
pub struct LayoutMap {
    /// The tensors, by HF name.
    pub tensors: BTreeMap<String, HfTensor>,
}

struct Builder {
    dtype: Dtype,
    shape: Vec<u64>,
    segments: Vec<Segment>,
}

impl LayoutMap {
    /// Builds the map from the live parameters of all ranks.
    pub fn build(params: &[LiveParam]) -> Result<Self, LayoutError> {
        let mut builders: BTreeMap<String, Builder> = BTreeMap::new();
        for (pi, p) in params.iter().enumerate() {
            let bad = |what: String| LayoutError::BadParam {
                param: p.name.clone(),
                what,
            };
            let elem_bits = p.dtype.bitsize() as u64;
            if p.shape.is_empty() || p.tp_size == 0 || p.tp_rank >= p.tp_size {
                return Err(bad(format!(
                    "shape {:?}, tp rank {} of {}",
                    p.shape, p.tp_rank, p.tp_size
                )));
            }
            let row_elems: u64 = p.shape[1..].iter().product();
            let row_bytes = (row_elems * elem_bits).div_ceil(8);
            // One piece of this parameter: bytes [src, src + len) of it at `dst` in `name`.
            let mut put = |name: &str, shape: &[u64], src: u64, dst: u64, len: u64| {
                let seg = Segment {
                    param: pi,
                    src,
                    dst,
                    len,
                };
                push(&mut builders, name, p.dtype, shape, seg);
            };
            if p.parts.is_empty() {
                let mut full = p.shape.clone();
                match p.shard_dim {
                    None => {
                        // Replicated: read it from rank 0 only.
                        if p.tp_rank != 0 {
                            continue;
                        }
                        let len = tensor_nbytes(p.dtype, &p.shape)
                            .ok_or_else(|| bad("size overflows".into()))?;
                        put(&p.hf_name, &full, 0, 0, len);
                    }
                    Some(0) => {
                        full[0] = p.shape[0] * p.tp_size;
                        let len = p.shape[0] * row_bytes;
                        put(&p.hf_name, &full, 0, p.tp_rank * len, len);
                    }
                    Some(1) if p.shape.len() == 2 => {
                        // Row-parallel: every HF row is the ranks' pieces side by side.
                        full[1] = p.shape[1] * p.tp_size;
                        let piece = row_bytes;
                        let hf_row = piece * p.tp_size;
                        for row in 0..p.shape[0] {
                            let dst = row * hf_row + p.tp_rank * piece;
                            put(&p.hf_name, &full, row * piece, dst, piece);
                        }
                    }
                    Some(d) => {
                        return Err(bad(format!(
                            "sharding along dim {d} of a {}-d tensor is not supported",
                            p.shape.len()
                        )));
                    }
                }
                continue;
            }
            // Packed along dim 0: this rank's rows of each part, one part after another.
            let local_total: u64 = p.parts.iter().map(|x| x.local_rows).sum();
            if local_total != p.shape[0] {
                return Err(bad(format!(
                    "its parts hold {local_total} rows but it has {}",
                    p.shape[0]
                )));
            }
            let mut local_row = 0;
            for part in &p.parts {
                if part.hf_name.is_empty() {
                    local_row += part.local_rows;
                    continue;
                }
                let mut full = p.shape.clone();
                full[0] = part.rows;
                if part.first_row + part.local_rows > part.rows {
                    return Err(bad(format!(
                        "part {} rows {}+{} exceed its {} rows",
                        part.hf_name, part.first_row, part.local_rows, part.rows
                    )));
                }
                put(
                    &part.hf_name,
                    &full,
                    local_row * row_bytes,
                    part.first_row * row_bytes,
                    part.local_rows * row_bytes,
                );
                local_row += part.local_rows;
            }
        }
        let mut tensors = BTreeMap::new();
        for (name, mut b) in builders {
            let len = tensor_nbytes(b.dtype, &b.shape).ok_or_else(|| LayoutError::Coverage {
                tensor: name.clone(),
                what: "size overflows".into(),
            })?;
            b.segments.sort_by_key(|s| (s.dst, s.param));
            // Replicated pieces (the same rows on several ranks) are read once.
            b.segments
                .dedup_by(|later, first| later.dst == first.dst && later.len == first.len);
            let mut next = 0;
            for s in &b.segments {
                if s.dst != next {
                    let what = if s.dst > next {
                        format!("bytes {next}..{} are on no rank", s.dst)
                    } else {
                        format!("bytes {}..{next} are on two ranks", s.dst)
                    };
                    return Err(LayoutError::Coverage { tensor: name, what });
                }
                next = s.dst + s.len;
            }
            if next != len {
                let what = if next < len {
                    format!("bytes {next}..{len} are on no rank")
                } else {
                    format!("the ranks hold {next} bytes but it has {len}")
                };
                return Err(LayoutError::Coverage { tensor: name, what });
            }
            tensors.insert(
                name.clone(),
                HfTensor {
                    name,
                    dtype: b.dtype,
                    shape: b.shape,
                    len,
                    segments: b.segments,
                },
            );
        }
        Ok(LayoutMap { tensors })
    }
}

impl LayoutMap {
    /// Presents tensor `from` also as `to` (tied weights: one live parameter, two tensors in the
    /// files), unless `to` is live on its own or `from` is not in the map.
    pub fn alias(&mut self, from: &str, to: &str) {
        if self.tensors.contains_key(to) {
            return;
        }
        if let Some(t) = self.tensors.get(from) {
            let mut copy = t.clone();
            copy.name = to.to_string();
            self.tensors.insert(to.to_string(), copy);
        }
    }
}

fn push(
    builders: &mut BTreeMap<String, Builder>,
    name: &str,
    dtype: Dtype,
    shape: &[u64],
    seg: Segment,
) {
    builders
        .entry(name.to_string())
        .or_insert_with(|| Builder {
            dtype,
            shape: shape.to_vec(),
            segments: Vec::new(),
        })
        .segments
        .push(seg);
}

impl HfTensor {
    /// The pieces of `[offset, offset + len)`: (segment, offset within it, length).
    pub fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (Segment, u64, u64)> + '_ {
        let end = offset + len;
        let first = self.segments.partition_point(|s| s.dst + s.len <= offset);
        self.segments[first..]
            .iter()
            .take_while(move |s| s.dst < end)
            .map(move |s| {
                let a = offset.max(s.dst);
                let b = end.min(s.dst + s.len);
                (*s, a - s.dst, b - a)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// HF tensor bytes: row-major, `rows × cols` bf16 elements, distinct per tensor.
    fn hf(rows: u64, cols: u64, seed: u8) -> Vec<u8> {
        (0..rows * cols * 2)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn rows_of(t: &[u8], cols: u64, a: u64, b: u64) -> Vec<u8> {
        t[(a * cols * 2) as usize..(b * cols * 2) as usize].to_vec()
    }

    fn assemble(map: &LayoutMap, name: &str, live: &[Vec<u8>]) -> Vec<u8> {
        let t = &map.tensors[name];
        let mut out = vec![0u8; t.len as usize];
        for (s, within, len) in t.pieces(0, t.len) {
            let src = (s.src + within) as usize;
            out[(s.dst + within) as usize..(s.dst + within + len) as usize]
                .copy_from_slice(&live[s.param][src..src + len as usize]);
        }
        out
    }

    fn part(name: &str, rows: u64, tp: u64, r: u64) -> PackedPart {
        PackedPart {
            hf_name: name.into(),
            rows,
            local_rows: rows / tp,
            first_row: r * rows / tp,
        }
    }

    /// gate_up_proj and a Qwen3.5-style gated qkv_proj, at tp 1, 2 and 4: every rank's packed
    /// tensor is built from the HF tensors as vLLM does, and the map gives the HF bytes back.
    #[test]
    fn packed_column_parallel_parameters_map_back_to_hf_tensors() {
        let cols = 16;
        let (q, k, v) = (hf(32, cols, 1), hf(8, cols, 2), hf(8, cols, 3));
        let (gate, up) = (hf(24, cols, 4), hf(24, cols, 5));
        for tp in [1u64, 2, 4] {
            let mut params = Vec::new();
            let mut live = Vec::new();
            for r in 0..tp {
                let mut qkv = rows_of(&q, cols, r * 32 / tp, (r + 1) * 32 / tp);
                qkv.extend(rows_of(&k, cols, r * 8 / tp, (r + 1) * 8 / tp));
                qkv.extend(rows_of(&v, cols, r * 8 / tp, (r + 1) * 8 / tp));
                params.push(LiveParam {
                    name: "language_model.model.layers.3.self_attn.qkv_proj.weight".into(),
                    dtype: Dtype::BF16,
                    shape: vec![48 / tp, cols],
                    tp_rank: r,
                    tp_size: tp,
                    shard_dim: Some(0),
                    parts: vec![
                        part("q", 32, tp, r),
                        part("k", 8, tp, r),
                        part("v", 8, tp, r),
                    ],
                    hf_name: String::new(),
                });
                live.push(qkv);
                let mut gu = rows_of(&gate, cols, r * 24 / tp, (r + 1) * 24 / tp);
                gu.extend(rows_of(&up, cols, r * 24 / tp, (r + 1) * 24 / tp));
                params.push(LiveParam {
                    name: "gate_up_proj".into(),
                    dtype: Dtype::BF16,
                    shape: vec![48 / tp, cols],
                    tp_rank: r,
                    tp_size: tp,
                    shard_dim: Some(0),
                    parts: vec![part("gate", 24, tp, r), part("up", 24, tp, r)],
                    hf_name: String::new(),
                });
                live.push(gu);
            }
            let map = LayoutMap::build(&params).unwrap();
            for (name, want) in [
                ("q", &q),
                ("k", &k),
                ("v", &v),
                ("gate", &gate),
                ("up", &up),
            ] {
                assert_eq!(&assemble(&map, name, &live), want, "{name} at tp {tp}");
                assert_eq!(map.tensors[name].shape[1], cols);
            }
        }
    }

    /// Row-parallel (o_proj, down_proj) and column-parallel plain parameters, and a replicated
    /// one (norms), at tp 2.
    #[test]
    fn row_parallel_column_parallel_and_replicated_parameters() {
        let (rows, cols, tp) = (6u64, 8u64, 2u64);
        let o = hf(rows, cols, 7);
        let e = hf(rows * 2, cols, 8);
        let n = hf(1, cols, 9);
        let mut params = Vec::new();
        let mut live = Vec::new();
        for r in 0..tp {
            let piece: Vec<u8> = (0..rows)
                .flat_map(|row| {
                    let start = ((row * cols + r * cols / tp) * 2) as usize;
                    o[start..start + (cols / tp * 2) as usize].to_vec()
                })
                .collect();
            let base = LiveParam {
                name: String::new(),
                dtype: Dtype::BF16,
                shape: vec![],
                tp_rank: r,
                tp_size: tp,
                shard_dim: None,
                parts: vec![],
                hf_name: String::new(),
            };
            params.push(LiveParam {
                name: "o_proj".into(),
                shape: vec![rows, cols / tp],
                shard_dim: Some(1),
                hf_name: "o".into(),
                ..base.clone()
            });
            live.push(piece);
            params.push(LiveParam {
                name: "embed".into(),
                shape: vec![rows * 2 / tp, cols],
                shard_dim: Some(0),
                hf_name: "e".into(),
                ..base.clone()
            });
            live.push(rows_of(
                &e,
                cols,
                r * rows * 2 / tp,
                (r + 1) * rows * 2 / tp,
            ));
            params.push(LiveParam {
                name: "norm".into(),
                shape: vec![cols],
                hf_name: "n".into(),
                ..base
            });
            live.push(n.clone());
        }
        let map = LayoutMap::build(&params).unwrap();
        assert_eq!(assemble(&map, "o", &live), o);
        assert_eq!(assemble(&map, "e", &live), e);
        assert_eq!(assemble(&map, "n", &live), n);
        // A read in the middle of a row-parallel tensor crosses ranks.
        let t = &map.tensors["o"];
        let pieces: Vec<_> = t.pieces(4, 20).collect();
        assert!(pieces.len() >= 2 && pieces.iter().map(|p| p.2).sum::<u64>() == 20);
    }

    /// KV heads replicated across ranks when tp exceeds their count: each head is read once.
    #[test]
    fn replicated_kv_heads_are_read_once_and_gaps_are_refused() {
        let cols = 4;
        let (k, head) = (hf(2, cols, 5), 1u64); // 2 KV heads of 1 row, tp 4: 2 ranks per head
        let mut params = Vec::new();
        let mut live = Vec::new();
        for r in 0..4u64 {
            let h = r / 2;
            params.push(LiveParam {
                name: "qkv".into(),
                dtype: Dtype::BF16,
                shape: vec![head, cols],
                tp_rank: r,
                tp_size: 4,
                shard_dim: Some(0),
                parts: vec![PackedPart {
                    hf_name: "k".into(),
                    rows: 2,
                    local_rows: head,
                    first_row: h,
                }],
                hf_name: String::new(),
            });
            live.push(rows_of(&k, cols, h, h + 1));
        }
        let map = LayoutMap::build(&params).unwrap();
        assert_eq!(assemble(&map, "k", &live), k);
        assert_eq!(map.tensors["k"].segments.len(), 2);
        // Without rank 2 and 3, head 1 is on no rank.
        let e = LayoutMap::build(&params[..2]).unwrap_err();
        assert!(e.to_string().contains("on no rank"), "{e}");
        // Parts that do not add up to the parameter are refused.
        let mut bad = params[0].clone();
        bad.shape = vec![3, cols];
        assert!(
            LayoutMap::build(&[bad])
                .unwrap_err()
                .to_string()
                .contains("parts hold 1 rows")
        );
    }
}
