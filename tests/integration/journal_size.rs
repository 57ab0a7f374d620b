//! The journal costs in proportion to the bytes that changed, not the blocks: the targets of a
//! sparse and a dense training step, on a synthetic Qwen3.5-shaped model.

use apollo_checkpoint::SafetensorsSource;
use apollo_checkpoint::synthetic::{self, Change};

use crate::util::checkpoint;

#[test]
fn journal_size_meets_the_sparse_and_dense_targets() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, live) = (tmp.path().join("model"), tmp.path().join("live"));
    let tensors = synthetic::qwen35_of_size(16 << 20);
    synthetic::write_model(&model, &tensors, 8 << 20, 3).unwrap();
    synthetic::write_model(&live, &tensors, 8 << 20, 3).unwrap();
    let model_bytes: u64 = tensors.iter().map(synthetic::TensorSpec::nbytes).sum();
    checkpoint(&model).init(4096).unwrap();

    // Sparse: one bf16 element in 0.5% of blocks; journal <= 5% of the changed blocks' bytes.
    synthetic::mutate(
        &live,
        Change::Sparse {
            fraction: 0.005,
            block_size: 4096,
        },
        1,
    )
    .unwrap();
    let r = checkpoint(&model)
        .sync(&SafetensorsSource::open(&live).unwrap())
        .unwrap();
    assert!(r.blocks_changed > 10, "{r:?}");
    let ratio = r.journal_bytes as f64 / r.bytes_changed as f64;
    assert!(
        ratio <= 0.05,
        "sparse journal is {:.2}% of the changed blocks",
        ratio * 100.0
    );

    // Dense: 1% of bf16 elements everywhere; journal <= 6% of the model.
    synthetic::mutate(&live, Change::Dense { fraction: 0.01 }, 2).unwrap();
    let r = checkpoint(&model)
        .sync(&SafetensorsSource::open(&live).unwrap())
        .unwrap();
    assert!(
        r.bytes_changed > model_bytes * 9 / 10,
        "nearly every block changes: {r:?}"
    );
    let ratio = r.journal_bytes as f64 / model_bytes as f64;
    assert!(
        ratio <= 0.06,
        "dense journal is {:.2}% of the model",
        ratio * 100.0
    );
}
