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

/// A model with an index, an outbox, a local stand-in for the backup host and the script's
/// environment; `None` (saying so) when rsync is missing outside CI.
struct Night {
    p: crate::util::Pair,
    outbox: PathBuf,
    replica: PathBuf,
    fake_ssh: PathBuf,
}

impl Night {
    fn new(tensors: &[T]) -> Option<Night> {
        if !have_rsync() {
            assert!(
                std::env::var_os("CI").is_none(),
                "rsync must be installed in CI (.ci/run installs it)"
            );
            eprintln!("skipping the nightly script test: rsync is not installed");
            return None;
        }
        let p = pair(tensors, 2, 1);
        checkpoint(&p.model).init(4096).unwrap();
        let (outbox, remote) = (p.tmp.path().join("outbox"), p.tmp.path().join("moria"));
        let replica = remote.join("replica");
        std::fs::create_dir_all(&remote).unwrap();
        let fake_ssh: PathBuf = p.tmp.path().join("fake-ssh");
        std::fs::write(&fake_ssh, "#!/bin/sh\n# Stand-in for ssh: drop the host, run the command here.\nshift\nexec sh -c \"$*\"\n").unwrap();
        std::fs::set_permissions(
            &fake_ssh,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        Some(Night {
            p,
            outbox,
            replica,
            fake_ssh,
        })
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        let bin = env!("CARGO_BIN_EXE_apollo-checkpoint").to_string();
        vec![
            ("APOLLO_MODEL_DIR", s(&self.p.model).to_string()),
            ("APOLLO_OUTBOX", s(&self.outbox).to_string()),
            ("APOLLO_REMOTE_HOST", "moria".to_string()),
            ("APOLLO_REMOTE_DIR", s(&self.replica).to_string()),
            ("APOLLO_SSH", s(&self.fake_ssh).to_string()),
            ("APOLLO_BIN", bin.clone()),
            ("APOLLO_REMOTE_BIN", bin),
        ]
    }

    /// One sync of `tensors` into the model.
    fn sync(&self, tensors: &[T]) {
        write_model(&self.p.source, tensors, 1);
        checkpoint(&self.p.model)
            .sync(&SafetensorsSource::open(&self.p.source).unwrap())
            .unwrap();
    }
}

fn script_env(args: &[&str], env: &[(&'static str, String)]) -> Output {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    script(args, &env)
}

#[test]
fn the_nightly_script_keeps_a_replica_in_step_and_is_safe_to_rerun() {
    let mut tensors: Vec<T> = mixed_tensors(80);
    let Some(night_setup) = Night::new(&tensors) else {
        return;
    };
    let (p, outbox, replica) = (&night_setup.p, &night_setup.outbox, &night_setup.replica);
    let env_owned = night_setup.env();
    let env: Vec<(&str, &str)> = env_owned.iter().map(|(k, v)| (*k, v.as_str())).collect();

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
    assert_eq!(model_files(replica), model_files(&p.model));

    let mut rng = Rng::new(81);
    for night in 0..3 {
        for _ in 0..2 {
            for t in tensors.iter_mut().filter(|t| !t.data.is_empty()) {
                let i = rng.below(t.data.len() as u64) as usize;
                t.data[i] ^= 0x0f;
            }
            night_setup.sync(&tensors);
        }
        if night == 1 {
            // The backup host's apollo-checkpoint is broken tonight: the script fails...
            let mut broken = env.clone();
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
        assert_eq!(model_files(replica), model_files(&p.model), "night {night}");
        assert!(
            stderr(&o).contains(&format!("at generation {}", 2 * (night + 1))),
            "{}",
            stderr(&o)
        );
    }
    // Applied deltas were pruned here, and the remote inbox follows on the next run.
    let o = script(&[], &env);
    assert!(o.status.success(), "{}", stderr(&o));
    let left = deltas_in(outbox);
    assert!(left.is_empty(), "{left:?}");
    assert!(checkpoint(replica).verify(false).unwrap().clean);
}

/// With keys, every delta travels with its MAC and the backup host refuses one without a valid
/// MAC (here: a forged delta dropped into its inbox) with nothing applied.
#[test]
fn the_nightly_script_authenticates_deltas_with_a_key() {
    let mut tensors: Vec<T> = mixed_tensors(82);
    let Some(n) = Night::new(&tensors) else {
        return;
    };
    let key = n.p.tmp.path().join("moria.key");
    std::fs::write(&key, "3c".repeat(32)).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut env = n.env();
    env.push(("APOLLO_KEY_FILE", s(&key).to_string()));
    // A key here without one there would never be checked: refused.
    let o = script_env(&["--bootstrap", "full"], &env);
    assert!(
        !o.status.success() && stderr(&o).contains("--remote-key-file"),
        "{}",
        stderr(&o)
    );
    env.push(("APOLLO_REMOTE_KEY_FILE", s(&key).to_string()));
    let o = script_env(&["--bootstrap", "full"], &env);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(model_files(&n.replica), model_files(&n.p.model));

    let mut rng = Rng::new(83);
    for t in tensors.iter_mut().filter(|t| !t.data.is_empty()) {
        let i = rng.below(t.data.len() as u64) as usize;
        t.data[i] ^= 0x0f;
    }
    n.sync(&tensors);
    let export = |since: &[&str]| {
        let mut args = vec![
            "export-delta",
            "--model-dir",
            s(&n.p.model),
            "--out",
            s(&n.outbox),
        ];
        args.extend_from_slice(since);
        args.extend_from_slice(&["--key-file", s(&key)]);
        run_bin(&args)
    };
    // Someone with write access to the inbox forges the next delta: the MAC gives it away.
    let o = export(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let delta = deltas_in(&n.outbox).pop().unwrap();
    let mac = apollo_checkpoint::mac::mac_path(&delta);
    assert!(mac.exists());
    let other_key = n.p.tmp.path().join("other.key");
    std::fs::write(&other_key, "5a".repeat(32)).unwrap();
    std::fs::set_permissions(
        &other_key,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    // Applied with a key, each must be refused, naming why.
    let refused = |key: &std::path::Path, says: &str| {
        let o = run_bin(&[
            "apply-delta",
            "--replica-dir",
            s(&n.replica),
            "--key-file",
            s(key),
            s(&delta),
        ]);
        assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
        assert!(stderr(&o).contains(says), "{}", stderr(&o));
    };
    refused(&other_key, "MAC does not match");
    std::fs::remove_file(&mac).unwrap();
    refused(&key, "no MAC");
    assert_eq!(checkpoint(&n.replica).status().unwrap().generation, Some(0));
    // The next night re-exports nothing new but ships the MAC-less delta: the script fails
    // rather than apply it; a fresh export with its MAC goes through.
    let o = script_env(&[], &env);
    assert!(!o.status.success(), "{}", stderr(&o));
    let o = export(&["--since", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = script_env(&[], &env);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(model_files(&n.replica), model_files(&n.p.model));
}

fn run_bin(args: &[&str]) -> Output {
    crate::util::run(args)
}
