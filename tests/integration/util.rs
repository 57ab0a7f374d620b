//! Shared helpers: fixture models written with the safetensors crate, an I/O layer that counts
//! what it reads, running the built binary.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use apollo_checkpoint::Checkpoint;
use apollo_checkpoint::io::{FileIo, FileStat, Io, OpenMode, RealIo};
use apollo_checkpoint::synthetic::Rng;
use safetensors::Dtype;
use safetensors::tensor::TensorView;

/// One fixture tensor.
#[derive(Clone, Debug)]
pub struct T {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl T {
    pub fn random(name: &str, dtype: Dtype, shape: &[usize], rng: &mut Rng) -> T {
        let n: usize = shape.iter().product::<usize>() * dtype.bitsize() / 8;
        let mut data = vec![0u8; n];
        rng.fill(&mut data);
        T {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            data,
        }
    }
}

/// The mixed fixture most tests use: every dtype the issue names, tensors smaller than a block,
/// not a multiple of it, empty, and several groups long.
pub fn mixed_tensors(seed: u64) -> Vec<T> {
    let mut rng = Rng::new(seed);
    vec![
        T::random(
            "model.embed_tokens.weight",
            Dtype::BF16,
            &[300, 128],
            &mut rng,
        ), // 76800 B: 18.75 blocks
        T::random(
            "model.layers.0.mlp.up_proj.weight",
            Dtype::BF16,
            &[256, 160],
            &mut rng,
        ), // 81920: exact
        T::random(
            "model.layers.0.self_attn.k_proj.weight",
            Dtype::F16,
            &[33, 70],
            &mut rng,
        ), // 4620
        T::random(
            "model.layers.0.linear_attn.A_log",
            Dtype::F32,
            &[48],
            &mut rng,
        ), // 192: < 1 block
        T::random(
            "model.layers.0.input_layernorm.weight",
            Dtype::F32,
            &[1024],
            &mut rng,
        ), // 4096: 1 block
        T::random("model.position_ids", Dtype::I64, &[513], &mut rng), // 4104: block + 8
        T::random("model.vocab_mask", Dtype::U8, &[70_001], &mut rng), // 70001: > 1 group
        T::random("model.empty_bias", Dtype::F32, &[0], &mut rng),     // 0 bytes
        T::random("lm_head.weight", Dtype::BF16, &[64, 1024], &mut rng), // 131072: 2 groups
    ]
}

/// Writes tensors as one `model.safetensors` (shards == 1) or `shards` files plus an index.
/// Files from an earlier call are removed first, so a directory can be rewritten with other
/// sharding.
pub fn write_model(dir: &Path, tensors: &[T], shards: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") || name == "model.safetensors.index.json" {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    let mut weight_map = BTreeMap::new();
    let per = tensors.len().div_ceil(shards);
    for (i, chunk) in tensors.chunks(per).enumerate() {
        let name = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{shards:05}.safetensors", i + 1)
        };
        let views: Vec<(String, TensorView<'_>)> = chunk
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&name)).unwrap();
        for t in chunk {
            weight_map.insert(t.name.clone(), name.clone());
        }
    }
    if shards > 1 {
        let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
    }
}

/// The model's files (shards and their index), by name.
pub fn model_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    snapshot(dir)
        .into_iter()
        .filter(|(n, _)| n.ends_with(".safetensors") || n.ends_with(".index.json"))
        .collect()
}

/// Every file of a model directory (not the state dir), by name.
pub fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            out.insert(
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            );
        }
    }
    out
}

/// Asserts two model directories hold byte-identical safetensors files with the same names,
/// whatever their sharding: compares each tensor's bytes by name.
pub fn assert_same_tensors(a: &Path, b: &Path) {
    let read = |dir: &Path| -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
        let mut out = BTreeMap::new();
        for (name, bytes) in snapshot(dir) {
            if !name.ends_with(".safetensors") {
                continue;
            }
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            for (n, v) in st.iter() {
                out.insert(
                    n.to_string(),
                    (
                        format!("{:?}", v.dtype()),
                        v.shape().to_vec(),
                        v.data().to_vec(),
                    ),
                );
            }
        }
        out
    };
    let (ta, tb) = (read(a), read(b));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    for (k, v) in &ta {
        assert!(v == &tb[k], "tensor {k} differs");
    }
}

/// An I/O layer that counts the bytes read through it, independently of `RealIo`'s counters.
#[derive(Default, Clone)]
pub struct CountingIo {
    inner: RealIo,
    pub read: Arc<AtomicU64>,
    pub written: Arc<AtomicU64>,
}

struct CountingFile {
    inner: Box<dyn FileIo>,
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl Io for CountingIo {
    /// Counts model files only (the journal is not a model file).
    fn open(&self, path: &Path, mode: OpenMode) -> std::io::Result<Box<dyn FileIo>> {
        let model_file = path.extension().is_some_and(|e| e == "safetensors");
        let (read, written) = if model_file {
            (self.read.clone(), self.written.clone())
        } else {
            (Arc::default(), Arc::default())
        };
        Ok(Box::new(CountingFile {
            inner: self.inner.open(path, mode)?,
            read,
            written,
        }))
    }
    fn create(&self, path: &Path) -> std::io::Result<Box<dyn FileIo>> {
        Ok(Box::new(CountingFile {
            inner: self.inner.create(path)?,
            read: Arc::default(),
            written: Arc::default(),
        }))
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.inner.rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        self.inner.remove_file(path)
    }
    fn sync_dir(&self, path: &Path) -> std::io::Result<()> {
        self.inner.sync_dir(path)
    }
    fn create_dir_all(&self, path: &Path) -> std::io::Result<()> {
        self.inner.create_dir_all(path)
    }
    fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }
}

impl FileIo for CountingFile {
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn stat(&self) -> std::io::Result<FileStat> {
        self.inner.stat()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.written.fetch_add(data.len() as u64, Ordering::Relaxed);
        self.inner.write_at(offset, data)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()
    }
}

/// A checkpoint of `dir` with the real I/O layer.
pub fn checkpoint(dir: &Path) -> Checkpoint {
    Checkpoint::new(dir, None, Arc::new(RealIo::new()))
}

/// `checkpoint(dir)` as the machine comes back from a power cut: another boot id, so writes
/// left to the page cache before it count as lost.
pub fn checkpoint_after_reboot(dir: &Path) -> Checkpoint {
    Checkpoint::new(dir, None, Arc::new(RealIo::with_boot_id("rebooted")))
}

/// A model dir and a source dir holding the same `tensors`, in a fresh temp dir.
pub struct Pair {
    pub tmp: tempfile::TempDir,
    pub model: PathBuf,
    pub source: PathBuf,
}

pub fn pair(tensors: &[T], model_shards: usize, source_shards: usize) -> Pair {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    let source = tmp.path().join("live");
    write_model(&model, tensors, model_shards);
    write_model(&source, tensors, source_shards);
    Pair { tmp, model, source }
}

/// Runs the built binary.
pub fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_apollo-checkpoint"))
        .args(args)
        .output()
        .unwrap()
}

/// Indexes `p.model` and exports it whole into `<tmp>/outbox`: (outbox, the full delta).
pub fn full_export(p: &Pair) -> (PathBuf, PathBuf) {
    checkpoint(&p.model).init(4096).unwrap();
    let outbox = p.tmp.path().join("outbox");
    let full = checkpoint(&p.model)
        .export_delta(&outbox, None, true)
        .unwrap()
        .file
        .unwrap();
    (outbox, full)
}

/// Drops `held` (a lock) after `ms` milliseconds, on another thread.
pub fn release_after<H: Send + 'static>(held: H, ms: u64) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(ms));
        drop(held);
    })
}

/// Runs `sync --model-dir MODEL --from SOURCE` and `extra` arguments through the built binary.
pub fn sync_from(model: &Path, source: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["sync", "--model-dir", s(model), "--from", s(source)];
    args.extend_from_slice(extra);
    run(&args)
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout_json(o: &Output) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            stderr(o)
        )
    });
    assert_output_schema(&v);
    v
}

/// Checks a `--json` object against `src/output.schema.json` (every test that reads one does).
pub fn assert_output_schema(v: &serde_json::Value) {
    static SCHEMA: std::sync::OnceLock<jsonschema::Validator> = std::sync::OnceLock::new();
    let validator = SCHEMA.get_or_init(|| {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../src/output.schema.json")).unwrap();
        jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .expect("the schema compiles")
    });
    let errors: Vec<String> = validator
        .iter_errors(v)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "not the documented schema: {errors:?}\n{v}"
    );
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The delta files (`*.apd`) in `outbox`, sorted by name (so by generation).
pub fn deltas_in(outbox: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(outbox)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "apd"))
        .collect();
    v.sort();
    v
}

/// Asserts that `source` presents exactly the tensors `hf` with their bytes.
pub fn assert_reads_as(source: &dyn apollo_checkpoint::WeightSource, hf: &[T]) {
    assert_eq!(source.tensors().len(), hf.len());
    for (i, st) in source.tensors().iter().enumerate() {
        let t = hf.iter().find(|t| t.name == st.name).expect(&st.name);
        let mut buf = vec![0u8; t.data.len()];
        source.read(i, 0, &mut buf).unwrap();
        assert!(buf == t.data, "{} differs", t.name);
    }
}
