//! Model files: a directory of safetensors files, parsed strictly.
//!
//! A model directory holds either `model.safetensors` or the shards named by
//! `model.safetensors.index.json`. These files were written by someone else, so nothing in them is
//! trusted: the header length is capped, every offset is computed with checked arithmetic, tensor
//! data must start at 0, leave no gap, never overlap and cover the data section exactly, and
//! `dtype size × shape` must equal each tensor's length. The index must name only files that exist
//! and tensors that are in the file it names, and every tensor of every shard must be in the
//! index. Any violation is a [`ModelError`] naming the file, the tensor and what to do.
//!
//! Layout of one safetensors file (all integers little-endian):
//!
//! ```text
//! offset 0        u64 N               length of the JSON header
//! offset 8        N bytes             JSON: { name: {dtype, shape, data_offsets: [begin, end]}, ...,
//!                                             "__metadata__": {string: string} (optional) }
//! offset 8+N      data section        tensor bytes; data_offsets are relative to 8+N
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde::Deserialize;
use serde::de::{MapAccess, Visitor};

use crate::io::{FileIo, FileStat, Io, OpenMode};

/// The largest header we accept (the same cap the safetensors crate uses).
pub const MAX_HEADER_LEN: u64 = 100_000_000;
/// Name of the single-file model.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the index of a sharded model.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Everything that can be wrong with a model directory or one of its files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// Neither `model.safetensors` nor `model.safetensors.index.json` exists.
    #[error(
        "{dir}: no {SINGLE_FILE} or {INDEX_FILE} here; point --model-dir (or --from) at a HuggingFace safetensors model directory"
    )]
    NoModel {
        /// The directory searched.
        dir: PathBuf,
    },
    /// An operating-system error on a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is too short to hold even the header length.
    #[error(
        "{file}: only {len} bytes, too short for a safetensors file; it is truncated or not safetensors; restore it"
    )]
    TooShort {
        /// The file.
        file: String,
        /// Its length.
        len: u64,
    },
    /// The header length field is larger than we accept.
    #[error(
        "{file}: header length {header_len} exceeds the {MAX_HEADER_LEN}-byte limit; the file is corrupt or not safetensors"
    )]
    HeaderTooLarge {
        /// The file.
        file: String,
        /// The header length it claims.
        header_len: u64,
    },
    /// The header runs past the end of the file.
    #[error(
        "{file}: header of {header_len} bytes runs past the end of the {file_len}-byte file; the file is truncated; restore it"
    )]
    HeaderPastEnd {
        /// The file.
        file: String,
        /// The header length it claims.
        header_len: u64,
        /// The file length.
        file_len: u64,
    },
    /// The header is not the JSON object safetensors requires.
    #[error("{file}: header is not valid safetensors JSON: {reason}")]
    BadHeader {
        /// The file.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// One tensor's entry in the header is malformed or inconsistent.
    #[error("{file}: tensor {tensor}: {reason}")]
    BadTensor {
        /// The file.
        file: String,
        /// The tensor.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// The tensors do not cover the data section exactly.
    #[error(
        "{file}: tensor data covers {covered} bytes but the data section after the header has {data_len}; the file is truncated or has trailing bytes"
    )]
    DataLength {
        /// The file.
        file: String,
        /// Bytes covered by tensors.
        covered: u64,
        /// Bytes in the data section.
        data_len: u64,
    },
    /// `model.safetensors.index.json` is malformed or inconsistent with the shards.
    #[error("{INDEX_FILE}: {reason}")]
    BadIndex {
        /// What is wrong.
        reason: String,
    },
    /// A tensor name occurs in two shards.
    #[error("tensor {tensor} is in both {first} and {second}; a model holds each tensor once")]
    DuplicateTensor {
        /// The tensor.
        tensor: String,
        /// First file holding it.
        first: String,
        /// Second file holding it.
        second: String,
    },
}

impl ModelError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    fn tensor(file: &str, tensor: &str, reason: impl Into<String>) -> Self {
        ModelError::BadTensor {
            file: file.to_string(),
            tensor: tensor.to_string(),
            reason: reason.into(),
        }
    }
}

/// One tensor as its file's header describes it, with offsets made absolute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<u64>,
    /// Offset of its first byte from the start of the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A parsed and validated safetensors header.
#[derive(Clone, Debug)]
pub struct FileHeader {
    /// Length of the JSON header (the `N` of the layout).
    pub header_len: u64,
    /// BLAKE3 of the first `8 + N` bytes: any edit of the header changes it.
    pub header_hash: [u8; 32],
    /// Tensors in data order.
    pub tensors: Vec<TensorEntry>,
}

/// Name of a dtype as safetensors writes it (`"BF16"`, `"F8_E4M3"`, ...).
pub fn dtype_name(dtype: Dtype) -> String {
    match serde_json::to_value(dtype) {
        Ok(serde_json::Value::String(s)) => s,
        _ => format!("{dtype:?}"),
    }
}

/// Parses a dtype name as safetensors writes it.
pub fn parse_dtype(name: &str) -> Option<Dtype> {
    serde_json::from_value(serde_json::Value::String(name.to_string())).ok()
}

/// Bytes of `shape` elements of `dtype`, or `None` on overflow or a partial byte.
///
/// ```
/// use apollo_checkpoint::model::tensor_nbytes;
/// use safetensors::Dtype;
/// assert_eq!(tensor_nbytes(Dtype::BF16, &[248_320, 5120]), Some(2_542_796_800));
/// assert_eq!(tensor_nbytes(Dtype::F32, &[0, 7]), Some(0));
/// assert_eq!(tensor_nbytes(Dtype::F32, &[u64::MAX, 2]), None);
/// ```
pub fn tensor_nbytes(dtype: Dtype, shape: &[u64]) -> Option<u64> {
    let elems = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))?;
    let bits = elems.checked_mul(dtype.bitsize() as u64)?;
    (bits % 8 == 0).then_some(bits / 8)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensor {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// The header's top-level entries in file order, so duplicates can be detected.
struct RawEntries(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for RawEntries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawEntries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawEntries, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, serde_json::Value>()? {
                    out.push(entry);
                }
                Ok(RawEntries(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Reads and validates the header of one open safetensors file. `name` is used in errors.
pub fn read_header(name: &str, file: &dyn FileIo) -> Result<FileHeader, ModelError> {
    let file_len = file.len();
    if file_len < 8 {
        return Err(ModelError::TooShort {
            file: name.to_string(),
            len: file_len,
        });
    }
    let mut n_bytes = [0u8; 8];
    file.read_at(0, &mut n_bytes)
        .map_err(|e| ModelError::io(file.path(), e))?;
    let header_len = u64::from_le_bytes(n_bytes);
    if header_len > MAX_HEADER_LEN {
        return Err(ModelError::HeaderTooLarge {
            file: name.to_string(),
            header_len,
        });
    }
    let data_start = 8 + header_len;
    if data_start > file_len {
        return Err(ModelError::HeaderPastEnd {
            file: name.to_string(),
            header_len,
            file_len,
        });
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_at(8, &mut header)
        .map_err(|e| ModelError::io(file.path(), e))?;
    let mut hasher = blake3::Hasher::new();
    hasher.update(&n_bytes);
    hasher.update(&header);
    let header_hash = *hasher.finalize().as_bytes();
    let tensors = parse_header_json(name, &header, data_start, file_len - data_start)?;
    Ok(FileHeader {
        header_len,
        header_hash,
        tensors,
    })
}

fn parse_header_json(
    file: &str,
    header: &[u8],
    data_start: u64,
    data_len: u64,
) -> Result<Vec<TensorEntry>, ModelError> {
    let bad = |reason: String| ModelError::BadHeader {
        file: file.to_string(),
        reason,
    };
    let text = std::str::from_utf8(header).map_err(|e| bad(format!("not UTF-8 ({e})")))?;
    // safetensors writers pad the header with spaces to align the data section.
    let text = text.trim_end_matches(' ');
    if !text.starts_with('{') {
        return Err(bad("does not start with '{'".into()));
    }
    let RawEntries(entries) = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let mut seen = HashSet::new();
    let mut tensors = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        if !seen.insert(key.clone()) {
            return Err(ModelError::tensor(
                file,
                &key,
                "appears twice in the header",
            ));
        }
        if key == "__metadata__" {
            let ok = value
                .as_object()
                .is_some_and(|m| m.values().all(serde_json::Value::is_string));
            if !ok {
                return Err(bad("__metadata__ must map strings to strings".into()));
            }
            continue;
        }
        let raw: RawTensor = serde_json::from_value(value)
            .map_err(|e| ModelError::tensor(file, &key, format!("malformed entry: {e}")))?;
        let dtype = parse_dtype(&raw.dtype).ok_or_else(|| {
            ModelError::tensor(file, &key, format!("unknown dtype {:?}", raw.dtype))
        })?;
        let (begin, end) = raw.data_offsets;
        if begin > end {
            return Err(ModelError::tensor(
                file,
                &key,
                format!("data_offsets [{begin}, {end}] run backwards"),
            ));
        }
        let len = end - begin;
        let expected = tensor_nbytes(dtype, &raw.shape).ok_or_else(|| {
            ModelError::tensor(
                file,
                &key,
                format!(
                    "shape {:?} of {} overflows or is not whole bytes",
                    raw.shape, raw.dtype
                ),
            )
        })?;
        if expected != len {
            return Err(ModelError::tensor(
                file,
                &key,
                format!(
                    "{} × shape {:?} needs {expected} bytes but data_offsets [{begin}, {end}] give {len}; the header lies",
                    raw.dtype, raw.shape
                ),
            ));
        }
        tensors.push(TensorEntry {
            name: key,
            dtype,
            shape: raw.shape,
            offset: begin,
            len,
        });
    }
    // Offsets are still relative to the data section: check coverage, then make them absolute.
    tensors.sort_by(|a, b| (a.offset, a.len, &a.name).cmp(&(b.offset, b.len, &b.name)));
    let mut expected_begin = 0u64;
    for t in &mut tensors {
        if t.offset != expected_begin {
            let what = if t.offset > expected_begin {
                "leaves a gap before it"
            } else {
                "overlaps the tensor before it"
            };
            return Err(ModelError::tensor(
                file,
                &t.name,
                format!(
                    "data starts at {} but the previous tensor ends at {expected_begin}: it {what}",
                    t.offset
                ),
            ));
        }
        expected_begin = t.offset + t.len;
        t.offset += data_start;
    }
    if expected_begin != data_len {
        return Err(ModelError::DataLength {
            file: file.to_string(),
            covered: expected_begin,
            data_len,
        });
    }
    Ok(tensors)
}

/// One safetensors file of a model, parsed.
#[derive(Clone, Debug)]
pub struct ModelFile {
    /// File name relative to the model directory.
    pub name: String,
    /// Size, mtime and inode when it was parsed.
    pub stat: FileStat,
    /// Its validated header.
    pub header: FileHeader,
}

/// Where one tensor of the model lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorLocation {
    /// Index into [`ModelLayout::files`].
    pub file: usize,
    /// The tensor, with its absolute offset inside that file.
    pub entry: TensorEntry,
}

/// A model directory: its files and where each tensor lives.
#[derive(Clone, Debug)]
pub struct ModelLayout {
    /// The directory.
    pub dir: PathBuf,
    /// Its safetensors files, sorted by name.
    pub files: Vec<ModelFile>,
    /// All tensors, sorted by (file, offset).
    pub tensors: Vec<TensorLocation>,
}

#[derive(Deserialize)]
struct RawIndex {
    weight_map: HashMap<String, String>,
}

fn check_file_name(name: &str) -> Result<(), ModelError> {
    let ok = !name.is_empty()
        && !name.contains('/')
        && !name.contains('\\')
        && name != "."
        && name != ".."
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(ModelError::BadIndex {
            reason: format!("file name {name:?} is not a plain file name in the model directory"),
        })
    }
}

impl ModelLayout {
    /// Discovers and strictly parses the model in `dir`, reading headers through `io`.
    pub fn open(dir: &Path, io: &dyn Io) -> Result<Self, ModelError> {
        let index_path = dir.join(INDEX_FILE);
        let mut weight_map: Option<HashMap<String, String>> = None;
        let names: Vec<String> = if index_path.exists() {
            let text = std::fs::read(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let raw: RawIndex =
                serde_json::from_slice(&text).map_err(|e| ModelError::BadIndex {
                    reason: format!("not valid JSON with a weight_map: {e}"),
                })?;
            let mut files: Vec<String> = raw.weight_map.values().cloned().collect();
            files.sort();
            files.dedup();
            if files.is_empty() {
                return Err(ModelError::BadIndex {
                    reason: "its weight_map is empty: it names no tensor and no shard".into(),
                });
            }
            for f in &files {
                check_file_name(f)?;
                if let Some(kind) = not_a_regular_file(&dir.join(f)) {
                    return Err(ModelError::BadIndex {
                        reason: format!(
                            "names shard {f}, which is {kind} in {}, not a regular file",
                            dir.display()
                        ),
                    });
                }
                if !dir.join(f).is_file() {
                    let tensor = raw
                        .weight_map
                        .iter()
                        .find(|(_, v)| *v == f)
                        .map(|(k, _)| k.clone())
                        .unwrap_or_default();
                    return Err(ModelError::BadIndex {
                        reason: format!(
                            "names shard {f} (for tensor {tensor}), which does not exist in {}; the model is incomplete: copy the missing shard",
                            dir.display()
                        ),
                    });
                }
            }
            weight_map = Some(raw.weight_map);
            files
        } else if dir.join(SINGLE_FILE).is_file() {
            vec![SINGLE_FILE.to_string()]
        } else {
            return Err(ModelError::NoModel {
                dir: dir.to_path_buf(),
            });
        };

        let mut files = Vec::with_capacity(names.len());
        let mut tensors = Vec::new();
        let mut owner: HashMap<String, usize> = HashMap::new();
        for (i, name) in names.iter().enumerate() {
            let path = dir.join(name);
            let handle = io
                .open(&path, OpenMode::Read)
                .map_err(|e| ModelError::io(&path, e))?;
            let stat = handle.stat().map_err(|e| ModelError::io(&path, e))?;
            let header = read_header(name, handle.as_ref())?;
            for t in &header.tensors {
                if let Some(&prev) = owner.get(&t.name) {
                    return Err(ModelError::DuplicateTensor {
                        tensor: t.name.clone(),
                        first: names[prev].clone(),
                        second: name.clone(),
                    });
                }
                owner.insert(t.name.clone(), i);
                if let Some(map) = &weight_map {
                    match map.get(&t.name) {
                        Some(f) if f == name => {}
                        Some(f) => {
                            return Err(ModelError::BadIndex {
                                reason: format!(
                                    "says tensor {} is in {f}, but it is in {name}",
                                    t.name
                                ),
                            });
                        }
                        None => {
                            return Err(ModelError::BadIndex {
                                reason: format!(
                                    "does not list tensor {} of {name}; loaders would ignore it",
                                    t.name
                                ),
                            });
                        }
                    }
                }
                tensors.push(TensorLocation {
                    file: i,
                    entry: t.clone(),
                });
            }
            files.push(ModelFile {
                name: name.clone(),
                stat,
                header,
            });
        }
        if let Some(map) = &weight_map {
            let mut missing: Vec<_> = map
                .iter()
                .filter(|(t, _)| !owner.contains_key(*t))
                .collect();
            missing.sort();
            if let Some((tensor, file)) = missing.first() {
                return Err(ModelError::BadIndex {
                    reason: format!(
                        "names tensor {tensor} in {file}, but {file} has no such tensor ({} such tensors in all)",
                        missing.len()
                    ),
                });
            }
        }
        Ok(ModelLayout {
            dir: dir.to_path_buf(),
            files,
            tensors,
        })
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.entry.len).sum()
    }

    /// Path of file `i`.
    pub fn file_path(&self, i: usize) -> PathBuf {
        self.dir.join(&self.files[i].name)
    }
}

/// What `path` is when it exists but is not a regular file (after following links): a FIFO,
/// a directory, a socket or a device; `None` for a regular file or nothing at all.
fn not_a_regular_file(path: &Path) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    let t = std::fs::metadata(path).ok()?.file_type();
    if t.is_file() {
        None
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_fifo() {
        Some("a FIFO")
    } else if t.is_socket() {
        Some("a socket")
    } else {
        Some("a device")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str, data_len: u64) -> Result<Vec<TensorEntry>, ModelError> {
        parse_header_json(
            "f.safetensors",
            json.as_bytes(),
            8 + json.len() as u64,
            data_len,
        )
    }

    #[test]
    fn accepts_padding_metadata_and_empty_tensors() {
        let json = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},"e":{"dtype":"F32","shape":[0],"data_offsets":[12,12]}}   "#;
        let t = parse(json, 12).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].name, "a");
        assert_eq!(t[0].offset, 8 + json.len() as u64);
        assert_eq!(t[1].len, 0);
    }

    #[test]
    fn rejects_gap_overlap_and_short_coverage() {
        let gap = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[5,9]}}"#;
        assert!(parse(gap, 9).unwrap_err().to_string().contains("gap"));
        let overlap = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[3,7]}}"#;
        assert!(
            parse(overlap, 7)
                .unwrap_err()
                .to_string()
                .contains("overlaps")
        );
        let ok = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;
        assert!(matches!(
            parse(ok, 5),
            Err(ModelError::DataLength {
                covered: 4,
                data_len: 5,
                ..
            })
        ));
    }

    #[test]
    fn rejects_lying_sizes_and_bad_entries() {
        let lie = r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        let e = parse(lie, 8).unwrap_err().to_string();
        assert!(
            e.contains("tensor w") && e.contains("needs 12 bytes"),
            "{e}"
        );
        let overflow =
            r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#;
        assert!(
            parse(overflow, 8)
                .unwrap_err()
                .to_string()
                .contains("overflows")
        );
        let dtype = r#"{"w":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}"#;
        assert!(
            parse(dtype, 1)
                .unwrap_err()
                .to_string()
                .contains("unknown dtype")
        );
        let dup = r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        assert!(parse(dup, 1).unwrap_err().to_string().contains("twice"));
        let extra = r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":1}}"#;
        assert!(
            parse(extra, 1)
                .unwrap_err()
                .to_string()
                .contains("malformed")
        );
        let backwards = r#"{"w":{"dtype":"U8","shape":[0],"data_offsets":[1,0]}}"#;
        assert!(
            parse(backwards, 1)
                .unwrap_err()
                .to_string()
                .contains("backwards")
        );
        assert!(parse("[1,2]", 0).is_err());
        assert!(parse(r#"{"__metadata__":{"a":1}}"#, 0).is_err());
    }

    #[test]
    fn nbytes_handles_sub_byte_types() {
        assert_eq!(tensor_nbytes(Dtype::BF16, &[3, 5]), Some(30));
        assert_eq!(tensor_nbytes(Dtype::F4, &[3]), None);
        assert_eq!(tensor_nbytes(Dtype::F4, &[4]), Some(2));
        assert_eq!(tensor_nbytes(Dtype::U8, &[]), Some(1));
        assert_eq!(dtype_name(Dtype::F8_E4M3), "F8_E4M3");
        assert_eq!(parse_dtype("BF16"), Some(Dtype::BF16));
    }
}
