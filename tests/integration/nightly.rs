//! scripts/nightly-moria.sh against a local "remote": two folders on this machine, real rsync,
//! and a stand-in for ssh that runs the command here.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use apollo_checkpoint::SafetensorsSource;
use apollo_checkpoint::synthetic::Rng;

use crate::util::{
    T, checkpoint, deltas_in, mixed_tensors, model_files, pair, s, stderr, write_model,
};

fn have_rsync() -> bool {
    Command::new("rsync")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn script(args: &[&str], env: &[(&str, &str)]) -> Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut c = Command::new("bash");
    c.arg(root.join("scripts/nightly-moria.sh")).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

#[test]
fn the_nightly_script_keeps_a_replica_in_step_and_is_safe_to_rerun() {
    if !have_rsync() {
        assert!(
            std::env::var_os("CI").is_none(),
            "rsync must be installed in CI (.ci/run installs it)"
        );
        eprintln!("skipping the nightly script test: rsync is not installed");
        return;
    }
    let mut tensors: Vec<T> = mixed_tensors(80);
    let p = pair(&tensors, 2, 1);
    checkpoint(&p.model).init(4096).unwrap();
    let (outbox, remote) = (p.tmp.path().join("outbox"), p.tmp.path().join("moria"));
    let replica = remote.join("replica");
    std::fs::create_dir_all(&remote).unwrap();
    let fake_ssh: PathBuf = p.tmp.path().join("fake-ssh");
    std::fs::write(&fake_ssh, "#!/bin/sh\n# Stand-in for ssh: drop the host, run the command here.\nshift\nexec sh -c \"$*\"\n").unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(&fake_ssh).unwrap().permissions(),
        0o755,
    );
    std::fs::set_permissions(
        &fake_ssh,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_apollo-checkpoint");
    let env = [
        ("APOLLO_MODEL_DIR", s(&p.model)),
        ("APOLLO_OUTBOX", s(&outbox)),
        ("APOLLO_REMOTE_HOST", "moria"),
        ("APOLLO_REMOTE_DIR", s(&replica)),
        ("APOLLO_SSH", s(&fake_ssh)),
        ("APOLLO_BIN", bin),
        ("APOLLO_REMOTE_BIN", bin),
    ];

    // The first run needs to know where the replica starts.
    let o = script(&[], &env);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--bootstrap full"), "{}", stderr(&o));

    // --dry-run prints the commands and changes nothing.
    let o = script(&["--bootstrap", "full", "--dry-run"], &env);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("export-delta") && stderr(&o).contains("rsync"),
        "{}",
        stderr(&o)
    );
    assert!(!outbox.exists() && !replica.exists());

    let o = script(&["--bootstrap", "full"], &env);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(model_files(&replica), model_files(&p.model));

    let mut rng = Rng::new(81);
    for night in 0..3 {
        for _ in 0..2 {
            for t in tensors.iter_mut().filter(|t| !t.data.is_empty()) {
                let i = rng.below(t.data.len() as u64) as usize;
                t.data[i] ^= 0x0f;
            }
            write_model(&p.source, &tensors, 1);
            checkpoint(&p.model)
                .sync(&SafetensorsSource::open(&p.source).unwrap())
                .unwrap();
        }
        if night == 1 {
            // The backup host's apollo-checkpoint is broken tonight: the script fails...
            let mut broken = env.to_vec();
            broken.push(("APOLLO_REMOTE_BIN", "false"));
            let o = script(&[], &broken);
            assert!(
                !o.status.success(),
                "a failing remote step must fail the script"
            );
        }
        // ...and simply running it again (or the next night) catches up.
        let o = script(&[], &env);
        assert!(o.status.success(), "night {night}: {}", stderr(&o));
        assert_eq!(
            model_files(&replica),
            model_files(&p.model),
            "night {night}"
        );
        assert!(
            stderr(&o).contains(&format!("at generation {}", 2 * (night + 1))),
            "{}",
            stderr(&o)
        );
    }
    // Applied deltas were pruned here, and the remote inbox follows on the next run.
    let o = script(&[], &env);
    assert!(o.status.success(), "{}", stderr(&o));
    let left = deltas_in(&outbox);
    assert!(left.is_empty(), "{left:?}");
    assert!(checkpoint(&replica).verify(false).unwrap().clean);
}
