//! Synthetic Qwen3.5-shaped models and training-like changes to them, for the demo, the
//! benchmark and tests.
//!
//! The model has Qwen3.5's tensor names and the shapes of its matrices scaled down from hidden
//! size 5120 to `hidden`: gated-query full attention every fourth layer, Gated DeltaNet linear
//! attention (`in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`, `conv1d`, `A_log` in f32,
//! `dt_bias`, `norm`, `out_proj`) in the others, a SwiGLU MLP, untied embeddings. Weights are
//! bf16 filled with pseudo-random bytes (hashing cost does not depend on the values).
//!
//! Files are written with the `safetensors` crate and sharded like HuggingFace checkpoints, with
//! a `model.safetensors.index.json`.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use safetensors::Dtype;
use safetensors::tensor::TensorView;

use crate::io::RealIo;
use crate::model::{INDEX_FILE, ModelLayout};

/// A small, fast, deterministic pseudo-random generator (SplitMix64).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

/// One tensor of a synthetic model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// HF name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<u64>,
}

impl TensorSpec {
    fn new(name: String, dtype: Dtype, shape: &[u64]) -> Self {
        TensorSpec {
            name,
            dtype,
            shape: shape.to_vec(),
        }
    }

    /// Bytes of data.
    pub fn nbytes(&self) -> u64 {
        crate::model::tensor_nbytes(self.dtype, &self.shape).expect("synthetic shapes are small")
    }
}

fn round16(x: f64) -> u64 {
    ((x / 16.0).round() as u64).max(1) * 16
}

/// Tensors of a Qwen3.5-shaped model with hidden size `hidden` and `layers` layers.
pub fn qwen35_tensors(hidden: u64, layers: u64) -> Vec<TensorSpec> {
    let h = hidden;
    let f = h as f64;
    let inter = round16(f * 17408.0 / 5120.0);
    let vocab = 8 * h;
    let (q_rows, kv_rows, attn_out) = (
        round16(f * 12288.0 / 5120.0),
        round16(f * 1024.0 / 5120.0),
        round16(f * 6144.0 / 5120.0),
    );
    let key_dim = round16(f * 2048.0 / 5120.0);
    let value_dim = round16(f * 6144.0 / 5120.0);
    let v_heads = (h * 48 / 5120).max(2);
    let head_v = (value_dim / v_heads).max(1);
    let conv_dim = 2 * key_dim + value_dim;
    let p = "model.language_model";
    let mut t = vec![TensorSpec::new(
        format!("{p}.embed_tokens.weight"),
        Dtype::BF16,
        &[vocab, h],
    )];
    for i in 0..layers {
        let l = format!("{p}.layers.{i}");
        if i % 4 == 3 {
            for (n, shape) in [
                ("q_proj.weight", vec![q_rows, h]),
                ("k_proj.weight", vec![kv_rows, h]),
                ("v_proj.weight", vec![kv_rows, h]),
                ("o_proj.weight", vec![h, attn_out]),
                ("q_norm.weight", vec![256.min(h)]),
                ("k_norm.weight", vec![256.min(h)]),
            ] {
                t.push(TensorSpec::new(
                    format!("{l}.self_attn.{n}"),
                    Dtype::BF16,
                    &shape,
                ));
            }
        } else {
            for (n, dtype, shape) in [
                ("in_proj_qkv.weight", Dtype::BF16, vec![conv_dim, h]),
                ("in_proj_z.weight", Dtype::BF16, vec![value_dim, h]),
                ("in_proj_b.weight", Dtype::BF16, vec![v_heads, h]),
                ("in_proj_a.weight", Dtype::BF16, vec![v_heads, h]),
                ("conv1d.weight", Dtype::BF16, vec![conv_dim, 1, 4]),
                ("A_log", Dtype::F32, vec![v_heads]),
                ("dt_bias", Dtype::BF16, vec![v_heads]),
                ("norm.weight", Dtype::BF16, vec![head_v]),
                ("out_proj.weight", Dtype::BF16, vec![h, value_dim]),
            ] {
                t.push(TensorSpec::new(
                    format!("{l}.linear_attn.{n}"),
                    dtype,
                    &shape,
                ));
            }
        }
        for (n, shape) in [
            ("gate_proj.weight", [inter, h]),
            ("up_proj.weight", [inter, h]),
            ("down_proj.weight", [h, inter]),
        ] {
            t.push(TensorSpec::new(format!("{l}.mlp.{n}"), Dtype::BF16, &shape));
        }
        t.push(TensorSpec::new(
            format!("{l}.input_layernorm.weight"),
            Dtype::BF16,
            &[h],
        ));
        t.push(TensorSpec::new(
            format!("{l}.post_attention_layernorm.weight"),
            Dtype::BF16,
            &[h],
        ));
    }
    t.push(TensorSpec::new(
        format!("{p}.norm.weight"),
        Dtype::BF16,
        &[h],
    ));
    t.push(TensorSpec::new(
        "lm_head.weight".into(),
        Dtype::BF16,
        &[vocab, h],
    ));
    t
}

/// The tensors of an 8-layer Qwen3.5-shaped model of about `target_bytes` (never less than the
/// smallest, hidden size 16).
pub fn qwen35_of_size(target_bytes: u64) -> Vec<TensorSpec> {
    let mut hidden = 16;
    loop {
        let t = qwen35_tensors(hidden, 8);
        let total: u64 = t.iter().map(TensorSpec::nbytes).sum();
        if total >= target_bytes || hidden >= 1 << 16 {
            return t;
        }
        hidden += 16;
    }
}

/// Writes `tensors` filled from `seed` into `dir` as shards of at most `shard_bytes` (a single
/// `model.safetensors` if everything fits in one), with an index for sharded models.
pub fn write_model(
    dir: &Path,
    tensors: &[TensorSpec],
    shard_bytes: u64,
    seed: u64,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut shards: Vec<Vec<&TensorSpec>> = vec![Vec::new()];
    let mut size = 0;
    for t in tensors {
        if size > 0 && size + t.nbytes() > shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += t.nbytes();
        shards.last_mut().expect("one shard at least").push(t);
    }
    let mut rng = Rng::new(seed);
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let name = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        };
        let data: Vec<Vec<u8>> = shard
            .iter()
            .map(|t| {
                let mut b = vec![0u8; t.nbytes() as usize];
                rng.fill(&mut b);
                b
            })
            .collect();
        let views: Vec<(String, TensorView<'_>)> = shard
            .iter()
            .zip(&data)
            .map(|(t, d)| {
                let shape = t.shape.iter().map(|&x| x as usize).collect();
                (
                    t.name.clone(),
                    TensorView::new(t.dtype, shape, d).expect("sizes match by construction"),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&name))
            .map_err(std::io::Error::other)?;
        for t in shard {
            weight_map.insert(t.name.clone(), name.clone());
        }
    }
    if n > 1 {
        let total: u64 = tensors.iter().map(TensorSpec::nbytes).sum();
        let index =
            serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        std::fs::write(
            dir.join(INDEX_FILE),
            serde_json::to_vec_pretty(&index).map_err(std::io::Error::other)?,
        )?;
    }
    Ok(())
}

/// A kind of change a training step makes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Change {
    /// One bf16 element changed in `fraction` of the blocks of `block_size` bytes.
    Sparse {
        /// Fraction of blocks touched.
        fraction: f64,
        /// Block size.
        block_size: u64,
    },
    /// `fraction` of all bf16 elements changed, spread over every bf16 tensor.
    Dense {
        /// Fraction of elements changed.
        fraction: f64,
    },
    /// The largest tensor replaced entirely.
    WholeTensor,
}

/// What [`mutate`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MutationStats {
    /// Elements changed.
    pub elements: u64,
    /// Bytes rewritten.
    pub bytes: u64,
    /// Tensors touched.
    pub tensors: u64,
}

/// Applies a training-like change to the model in `dir`, in place, with plain file writes.
pub fn mutate(
    dir: &Path,
    change: Change,
    seed: u64,
) -> Result<MutationStats, crate::model::ModelError> {
    let layout = ModelLayout::open(dir, &RealIo::new())?;
    let mut rng = Rng::new(seed);
    let mut stats = MutationStats::default();
    let io_err = |path: &Path, e| crate::model::ModelError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let files: Vec<File> = (0..layout.files.len())
        .map(|i| {
            let path = layout.file_path(i);
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| io_err(&path, e))
        })
        .collect::<Result<_, _>>()?;
    // Flips low mantissa bits of one bf16 element: a small, certain change.
    let nudge = |rng: &mut Rng, el: &mut [u8]| el[0] ^= 1 + (rng.below(127) as u8);
    match change {
        Change::Sparse {
            fraction,
            block_size,
        } => {
            for t in layout
                .tensors
                .iter()
                .filter(|t| t.entry.dtype == Dtype::BF16 && t.entry.len >= 2)
            {
                let mut touched = false;
                for b in 0..t.entry.len.div_ceil(block_size) {
                    if (rng.next_u64() as f64) / (u64::MAX as f64) >= fraction {
                        continue;
                    }
                    let start = b * block_size;
                    let elems = (block_size.min(t.entry.len - start)) / 2;
                    if elems == 0 {
                        continue;
                    }
                    let off = t.entry.offset + start + 2 * rng.below(elems);
                    let mut el = [0u8; 2];
                    let path = layout.file_path(t.file);
                    files[t.file]
                        .read_exact_at(&mut el, off)
                        .map_err(|e| io_err(&path, e))?;
                    nudge(&mut rng, &mut el);
                    files[t.file]
                        .write_all_at(&el, off)
                        .map_err(|e| io_err(&path, e))?;
                    stats.elements += 1;
                    stats.bytes += 2;
                    touched = true;
                }
                stats.tensors += u64::from(touched);
            }
        }
        Change::Dense { fraction } => {
            let mean_gap = (1.0 / fraction).max(1.0) as u64;
            for t in layout
                .tensors
                .iter()
                .filter(|t| t.entry.dtype == Dtype::BF16 && t.entry.len >= 2)
            {
                let path = layout.file_path(t.file);
                let mut data = vec![0u8; t.entry.len as usize];
                files[t.file]
                    .read_exact_at(&mut data, t.entry.offset)
                    .map_err(|e| io_err(&path, e))?;
                let elems = t.entry.len / 2;
                let mut e = rng.below(mean_gap);
                while e < elems {
                    nudge(&mut rng, &mut data[2 * e as usize..2 * e as usize + 2]);
                    stats.elements += 1;
                    e += 1 + rng.below(2 * mean_gap - 1);
                }
                files[t.file]
                    .write_all_at(&data, t.entry.offset)
                    .map_err(|e| io_err(&path, e))?;
                stats.bytes += t.entry.len;
                stats.tensors += 1;
            }
        }
        Change::WholeTensor => {
            if let Some(t) = layout
                .tensors
                .iter()
                .max_by_key(|t| (t.entry.len, std::cmp::Reverse(t.entry.name.clone())))
            {
                let path = layout.file_path(t.file);
                let mut data = vec![0u8; t.entry.len as usize];
                rng.fill(&mut data);
                files[t.file]
                    .write_all_at(&data, t.entry.offset)
                    .map_err(|e| io_err(&path, e))?;
                stats.elements += t.entry.len * 8 / t.entry.dtype.bitsize() as u64;
                stats.bytes += t.entry.len;
                stats.tensors = 1;
            }
        }
    }
    for (i, f) in files.iter().enumerate() {
        f.sync_all().map_err(|e| io_err(&layout.file_path(i), e))?;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_scale_and_names_are_qwen35() {
        let t = qwen35_tensors(64, 4);
        assert!(
            t.iter()
                .any(|t| t.name == "model.language_model.layers.3.self_attn.q_proj.weight")
        );
        assert!(t.iter().any(
            |t| t.name == "model.language_model.layers.0.linear_attn.A_log"
                && t.dtype == Dtype::F32
        ));
        let small: u64 = qwen35_of_size(1 << 20).iter().map(TensorSpec::nbytes).sum();
        let big: u64 = qwen35_of_size(64 << 20)
            .iter()
            .map(TensorSpec::nbytes)
            .sum();
        assert!((1 << 20..2 << 20).contains(&small), "{small}");
        assert!((64 << 20..70 << 20).contains(&big), "{big}");
    }

    #[test]
    fn rng_below_is_in_range() {
        let mut r = Rng::new(1);
        assert!((0..1000).all(|_| r.below(7) < 7));
        let mut b = [0u8; 13];
        r.fill(&mut b);
        assert!(b.iter().any(|&x| x != 0));
    }
}
