//! The real binary, SIGKILLed at random moments of a sync, many times: after `recover` the files
//! are always exactly one of the two states, and `verify` is clean.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use apollo_checkpoint::synthetic::Rng;

use crate::util::{T, model_files, run, s, stderr, stdout_json, write_model};

#[test]
fn sigkill_at_random_moments_always_recovers_to_one_generation() {
    let kills: u64 = std::env::var("APOLLO_KILL_TEST_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let tmp = tempfile::tempdir().unwrap();
    let (model, a, b) = (
        tmp.path().join("model"),
        tmp.path().join("a"),
        tmp.path().join("b"),
    );
    // Two versions of a 6 MiB model: B changes a byte in a third of A's blocks and rewrites one
    // tensor, so a sync between them journals and writes a few MiB.
    let mut rng = Rng::new(2026);
    let mut tensors: Vec<T> = (0..6)
        .map(|i| {
            T::random(
                &format!("model.layers.{i}.mlp.up_proj.weight"),
                safetensors::Dtype::BF16,
                &[512, 1024],
                &mut rng,
            )
        })
        .collect();
    write_model(&a, &tensors, 2);
    write_model(&model, &tensors, 2);
    for t in &mut tensors {
        for block in t.data.chunks_mut(4096) {
            if rng.below(3) == 0 {
                block[rng.below(4096) as usize] ^= 0x5a;
            }
        }
    }
    rng.fill(&mut tensors[2].data);
    write_model(&b, &tensors, 2);
    let (state_a, state_b) = (model_files(&a), model_files(&b));
    assert!(run(&["init", "--model-dir", s(&model)]).status.success());

    // How long an uninterrupted sync takes, to spread the kills over it.
    let t0 = Instant::now();
    let o = run(&["sync", "--model-dir", s(&model), "--from", s(&b)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let full = t0.elapsed().max(Duration::from_millis(5));
    assert_eq!(model_files(&model), state_b);

    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    let mut repaired = 0;
    for round in 0..kills {
        let at_b = model_files(&model) == state_b;
        let target = if at_b { &a } else { &b };
        let mut child = Command::new(env!("CARGO_BIN_EXE_apollo-checkpoint"))
            .args([
                "sync",
                "--model-dir",
                s(&model),
                "--from",
                s(target),
                "--json",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let delay = full.mul_f64(rng.below(1000) as f64 / 1000.0 * 1.2);
        std::thread::sleep(delay);
        let _ = child.kill();
        let status = child.wait().unwrap();

        let o = run(&["recover", "--model-dir", s(&model), "--json"]);
        assert!(
            o.status.success(),
            "round {round}: recover failed: {}",
            stderr(&o)
        );
        let j = stdout_json(&o);
        let action = j["action"].as_str().unwrap().to_string();
        repaired += j["blocks"]["repaired"].as_u64().unwrap();
        let files = model_files(&model);
        let now_b = files == state_b;
        assert!(
            now_b || files == state_a,
            "round {round} (killed after {delay:?}, {status}): files are neither generation"
        );
        *seen
            .entry(format!(
                "{action}/{}",
                if now_b == at_b { "old" } else { "new" }
            ))
            .or_default() += 1;
        let o = run(&["verify", "--model-dir", s(&model)]);
        assert!(
            o.status.success(),
            "round {round}: verify after recover: {}",
            stderr(&o)
        );
    }
    eprintln!("{kills} kills: {seen:?}, {repaired} torn blocks repaired");
    // The kills landed in different phases: some before the commit record (old state kept),
    // some after it (rolled forward to the new state).
    assert!(
        seen.keys().any(|k| k.ends_with("/old")) && seen.keys().any(|k| k.ends_with("/new")),
        "{seen:?}"
    );
    assert!(
        seen.keys().any(|k| k.starts_with("rolled_forward")),
        "no kill landed after a commit record: {seen:?}"
    );
}
