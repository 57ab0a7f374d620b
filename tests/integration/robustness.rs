//! Parsers of files we did not write never panic: random and mutated safetensors headers,
//! journals and deltas give errors (or, for an unlucky mutation that keeps a file valid, a
//! result), never a crash.

use std::path::Path;

use apollo_checkpoint::SafetensorsSource;
use apollo_checkpoint::delta::Delta;
use apollo_checkpoint::io::RealIo;
use apollo_checkpoint::journal::Journal;
use apollo_checkpoint::model::ModelLayout;
use apollo_checkpoint::synthetic::Rng;

use crate::util::{checkpoint, mixed_tensors, pair, write_model};

/// Variants of `bytes`: random bytes, truncations, bit flips, and a header-length field that lies.
fn mutations(bytes: &[u8], rng: &mut Rng, n: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for i in 0..n {
        let mut b = bytes.to_vec();
        match i % 4 {
            0 => {
                let len = rng.below(b.len() as u64 + 1) as usize;
                b.truncate(len);
            }
            1 => {
                for _ in 0..=rng.below(8) {
                    let at = rng.below(b.len() as u64) as usize;
                    b[at] ^= 1 << rng.below(8);
                }
            }
            2 => {
                let at = rng.below(b.len().min(4096) as u64) as usize;
                let end = (at + 1 + rng.below(64) as usize).min(b.len());
                rng.fill(&mut b[at..end]);
            }
            _ => {
                let fake = rng.next_u64() % (b.len() as u64 * 2 + 16);
                b[..8].copy_from_slice(&fake.to_le_bytes());
            }
        }
        out.push(b);
    }
    let mut random = vec![0u8; 1 + rng.below(4096) as usize];
    rng.fill(&mut random);
    out.push(random);
    out
}

#[test]
fn mutated_safetensors_files_give_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    write_model(&dir, &mixed_tensors(5), 1);
    let f = dir.join("model.safetensors");
    let good = std::fs::read(&f).unwrap();
    let mut rng = Rng::new(7);
    let io = RealIo::new();
    for (i, bad) in mutations(&good, &mut rng, 400).into_iter().enumerate() {
        std::fs::write(&f, &bad).unwrap();
        let result = ModelLayout::open(&dir, &io);
        let _ = SafetensorsSource::open(&dir);
        // A truncated file, or one whose header length changed, is never accepted.
        let truncated = bad.len() < good.len();
        let length_changed = bad.len() >= 8 && bad[..8] != good[..8];
        if truncated || length_changed {
            assert!(
                result.is_err(),
                "mutation {i} ({} bytes) was accepted",
                bad.len()
            );
        }
    }
}

fn committed_journal_and_delta(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let mut tensors = mixed_tensors(8);
    let p = pair(&tensors, 1, 1);
    checkpoint(&p.model).init(4096).unwrap();
    for t in &mut tensors {
        if let Some(b) = t.data.first_mut() {
            *b ^= 1;
        }
    }
    write_model(&p.source, &tensors, 1);
    checkpoint(&p.model)
        .sync(&SafetensorsSource::open(&p.source).unwrap())
        .unwrap();
    let undo = p.model.join(".apollo-checkpoint/undo");
    let journal = std::fs::read_dir(&undo)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let outbox = dir.join("outbox");
    let r = checkpoint(&p.model)
        .export_delta(&outbox, Some(0), false)
        .unwrap();
    (
        std::fs::read(journal).unwrap(),
        std::fs::read(r.file.unwrap()).unwrap(),
    )
}

#[test]
fn mutated_journals_and_deltas_give_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let (journal, delta) = committed_journal_and_delta(tmp.path());
    let io = RealIo::new();
    let mut rng = Rng::new(9);
    let jp = tmp.path().join("journal");
    for bad in mutations(&journal, &mut rng, 300) {
        std::fs::write(&jp, &bad).unwrap();
        if let Ok(apollo_checkpoint::journal::JournalState::Committed(j)) = Journal::open(&io, &jp)
        {
            // Only an intact journal may pass its checksums.
            assert_eq!(bad, journal, "a damaged journal passed its checksums");
            drop(j);
        }
    }
    let dp = tmp.path().join("d.apd");
    for bad in mutations(&delta, &mut rng, 300) {
        std::fs::write(&dp, &bad).unwrap();
        if Delta::open(&io, &dp).is_ok() {
            assert_eq!(bad, delta, "a damaged delta passed its checksum");
        }
    }
}

mod random_bytes {
    use apollo_checkpoint::delta::Delta;
    use apollo_checkpoint::io::{Io, OpenMode, RealIo};
    use apollo_checkpoint::journal::Journal;
    use apollo_checkpoint::live::handles::read_all;
    use apollo_checkpoint::model::read_header;
    use proptest::prelude::*;

    /// Random bytes, often behind the magic each parser looks for first, so the parsing past
    /// it is exercised too.
    fn input() -> impl Strategy<Value = Vec<u8>> {
        (
            prop::sample::select(vec![
                &b""[..],
                b"APJRNL01",
                b"APDELTA1",
                b"{\"format\":\"apollo-checkpoint-handles\",\"version\":1,",
            ]),
            prop::collection::vec(any::<u8>(), 0..2048),
        )
            .prop_map(|(magic, rest)| [magic, &rest[..]].concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]
        #[test]
        fn every_parser_returns_an_error_or_a_value_never_a_panic(bytes in input()) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("f");
            std::fs::write(&path, &bytes).unwrap();
            let io = RealIo::new();
            let _ = Journal::open(&io, &path);
            let _ = Delta::open(&io, &path);
            let _ = read_all(std::slice::from_ref(&path));
            let file = io.open(&path, OpenMode::Read).unwrap();
            let _ = read_header("f", file.as_ref());
        }
    }
}

/// Forged deltas — mutated, then given a correct checksum, which anyone can compute — applied to
/// a real replica: each is refused or applied whole. Afterwards the replica holds its base
/// generation or the delta's target byte for byte, no journal is pending, and nothing panicked.
/// `APOLLO_FUZZ_CASES` runs more cases by hand (CI: 3,000; with the mutated files above and
/// the 2,048 random inputs given to each of four parsers, over 12,000 cases).
#[test]
fn forged_deltas_applied_to_a_real_replica_are_refused_or_applied_whole() {
    let cases: usize = std::env::var("APOLLO_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let mut tensors = mixed_tensors(31);
    let p = pair(&tensors, 2, 1);
    let (outbox, full) = crate::util::full_export(&p);
    let template = p.tmp.path().join("template");
    checkpoint(&template).apply_delta(&[full]).unwrap();
    let base = crate::util::model_files(&template);
    for t in tensors.iter_mut().filter(|t| !t.data.is_empty()) {
        let n = t.data.len();
        t.data[n / 2] ^= 0x11;
    }
    write_model(&p.source, &tensors, 1);
    checkpoint(&p.model)
        .sync(&SafetensorsSource::open(&p.source).unwrap())
        .unwrap();
    let target = crate::util::model_files(&p.model);
    let delta = checkpoint(&p.model)
        .export_delta(&outbox, None, false)
        .unwrap()
        .file
        .unwrap();
    let good = std::fs::read(&delta).unwrap();
    let body = good.len() - 48; // the trailer: magic, count, BLAKE3 of the body
    let mut rng = Rng::new(32);
    let replica = p.tmp.path().join("replica");
    let forged = p.tmp.path().join("forged.apd");
    let (mut refused, mut applied) = (0, 0);
    for i in 0..cases {
        let mut b = good.clone();
        // Half the cases hit the header and file table, where fewer bytes matter more.
        let span = if i % 2 == 0 { body.min(512) } else { body };
        for _ in 0..=rng.below(4) {
            let at = rng.below(span as u64) as usize;
            if rng.below(2) == 0 {
                b[at] ^= 1 << rng.below(8);
            } else {
                let end = (at + 1 + rng.below(16) as usize).min(body);
                rng.fill(&mut b[at..end]);
            }
        }
        let sum = blake3::hash(&b[..body]);
        b[body + 16..].copy_from_slice(sum.as_bytes());
        std::fs::write(&forged, &b).unwrap();
        let _ = std::fs::remove_dir_all(&replica);
        let copied = std::process::Command::new("cp")
            .arg("-a")
            .arg(&template)
            .arg(&replica)
            .status()
            .unwrap();
        assert!(copied.success());
        match checkpoint(&replica).apply_delta(std::slice::from_ref(&forged)) {
            Ok(_) => applied += 1,
            Err(_) => refused += 1,
        }
        let now = crate::util::model_files(&replica);
        assert!(
            now == base || now == target,
            "case {i}: neither base nor target"
        );
        assert!(
            !replica.join(".apollo-checkpoint/journal").exists(),
            "case {i}: a journal is left pending"
        );
    }
    assert_eq!(applied + refused, cases);
    assert!(refused > cases / 2, "{refused} refused of {cases}");
}
