//! The README's exit-code table, row by row, through the built binary: each case sets up a
//! model, runs one command, and checks the exit code, the message and, for every failure, that
//! the model files are byte for byte as they were.

use std::path::{Path, PathBuf};

use apollo_checkpoint::lock::{LockKind, StateLock};

use crate::util::{
    deltas_in, mixed_tensors, pair, run, s, snapshot, stderr, stdout_json, write_model,
};

/// One row: what it is, the command's arguments (given the case's directory, after its setup),
/// the exit code and a phrase the message must hold.
struct Row {
    what: &'static str,
    code: i32,
    needle: &'static str,
    setup: fn(&Case) -> Vec<String>,
}

/// A model (indexed) and a live source equal to it, in a temp dir.
struct Case {
    tmp: tempfile::TempDir,
    model: PathBuf,
    source: PathBuf,
    /// The directory whose files a failing command must leave as they are (the model unless
    /// the setup says otherwise).
    watched: std::cell::RefCell<Option<PathBuf>>,
    /// A lock this test holds while the command runs.
    held: std::cell::RefCell<Option<StateLock>>,
}

impl Case {
    fn new() -> Case {
        let p = pair(&mixed_tensors(40), 2, 1);
        succeeds(&["init", "--model-dir", s(&p.model)]);
        Case {
            model: p.model.clone(),
            source: p.source.clone(),
            tmp: p.tmp,
            watched: std::cell::RefCell::new(None),
            held: std::cell::RefCell::new(None),
        }
    }

    fn watch(&self, dir: &Path) {
        *self.watched.borrow_mut() = Some(dir.to_path_buf());
    }

    fn watched(&self) -> PathBuf {
        self.watched
            .borrow()
            .clone()
            .unwrap_or_else(|| self.model.clone())
    }

    fn dir(&self, name: &str) -> PathBuf {
        let d = self.tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

/// Runs a setup step that must succeed.
fn succeeds(argv: &[&str]) {
    let o = run(argv);
    assert!(o.status.success(), "{argv:?}: {}", stderr(&o));
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|a| (*a).to_string()).collect()
}

fn sync_from(c: &Case, from: &Path) -> Vec<String> {
    args(&["sync", "--model-dir", s(&c.model), "--from", s(from)])
}

/// Flips one byte of `path` in place.
fn flip(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 0x55;
    std::fs::write(path, b).unwrap();
}

/// A changed source synced once, so the state holds undo data and an export can be made.
fn one_generation(c: &Case) {
    let mut t = mixed_tensors(40);
    t[1].data[7] ^= 1;
    write_model(&c.source, &t, 1);
    succeeds(&["sync", "--model-dir", s(&c.model), "--from", s(&c.source)]);
}

const ROWS: &[Row] = &[
    Row {
        what: "success",
        code: 0,
        needle: "",
        setup: |c| sync_from(c, &c.source),
    },
    Row {
        what: "verify found differences",
        code: 1,
        needle: "verify failed",
        setup: |c| {
            let f = c.model.join("model-00001-of-00002.safetensors");
            let len = std::fs::metadata(&f).unwrap().len() as usize;
            flip(&f, len - 10);
            args(&["verify", "--model-dir", s(&c.model)])
        },
    },
    Row {
        what: "bad command line",
        code: 2,
        needle: "--from",
        setup: |c| args(&["sync", "--model-dir", s(&c.model)]),
    },
    Row {
        what: "bad data: --from holds a malformed safetensors file",
        code: 65,
        needle: "model.safetensors",
        setup: |c| {
            let d = c.dir("garbage");
            std::fs::write(
                d.join("model.safetensors"),
                b"\x10\0\0\0\0\0\0\0{not json at all",
            )
            .unwrap();
            sync_from(c, &d)
        },
    },
    Row {
        what: "bad data: --from holds a truncated file",
        code: 65,
        needle: "model.safetensors",
        setup: |c| {
            let d = c.dir("short");
            let full = std::fs::read(c.source.join("model.safetensors")).unwrap();
            std::fs::write(d.join("model.safetensors"), &full[..full.len() - 100]).unwrap();
            sync_from(c, &d)
        },
    },
    Row {
        what: "bad data: a source that does not match the model",
        code: 65,
        needle: "in the model but not in the source",
        setup: |c| {
            let mut t = mixed_tensors(40);
            t.pop();
            write_model(&c.source, &t, 1);
            sync_from(c, &c.source)
        },
    },
    Row {
        what: "bad data: a committed journal that fails its checksum",
        code: 65,
        needle: "corrupt",
        setup: |c| {
            one_generation(c);
            let state = c.model.join(".apollo-checkpoint");
            let undo = state.join("undo").join("00000000000000000001.apj");
            let journal = state.join("journal");
            std::fs::copy(undo, &journal).unwrap();
            flip(&journal, 120);
            args(&["recover", "--model-dir", s(&c.model)])
        },
    },
    Row {
        what: "bad data: a damaged delta",
        code: 65,
        needle: "not a valid delta",
        setup: |c| {
            one_generation(c);
            let outbox = c.dir("outbox");
            succeeds(&[
                "export-delta",
                "--model-dir",
                s(&c.model),
                "--out",
                s(&outbox),
                "--since",
                "0",
            ]);
            let delta = deltas_in(&outbox).remove(0);
            flip(&delta, 200);
            let replica = c.dir("replica");
            std::fs::write(replica.join("config.json"), b"{}").unwrap();
            c.watch(&replica);
            args(&["apply-delta", "--replica-dir", s(&replica), s(&delta)])
        },
    },
    Row {
        what: "no model: --model-dir does not exist",
        code: 66,
        needle: "no model.safetensors",
        setup: |c| {
            let nope = c.tmp.path().join("nope");
            args(&["sync", "--model-dir", s(&nope), "--from", s(&c.source)])
        },
    },
    Row {
        what: "no model: --from does not exist",
        code: 66,
        needle: "no model.safetensors",
        setup: |c| sync_from(c, &c.tmp.path().join("no-such-dir")),
    },
    Row {
        what: "I/O: --from whose index cannot be read",
        code: 74,
        needle: "model.safetensors.index.json",
        setup: |c| {
            // A directory where the index should be: reading it fails (EISDIR), as an
            // unreadable file would for a user who is not root.
            let d = c.dir("unreadable");
            std::fs::create_dir(d.join("model.safetensors.index.json")).unwrap();
            sync_from(c, &d)
        },
    },
    Row {
        what: "I/O: a state directory that cannot be created",
        code: 74,
        needle: "state",
        setup: |c| {
            let file = c.tmp.path().join("a-file");
            std::fs::write(&file, b"x").unwrap();
            args(&[
                "init",
                "--model-dir",
                s(&c.model),
                "--state-dir",
                s(&file.join("state")),
            ])
        },
    },
    Row {
        what: "busy: another apollo-checkpoint holds the lock",
        code: 75,
        needle: "locked by",
        setup: |c| {
            let state = c.model.join(".apollo-checkpoint");
            let lock =
                StateLock::acquire(&state, LockKind::Exclusive, std::time::Duration::ZERO).unwrap();
            *c.held.borrow_mut() = Some(lock);
            sync_from(c, &c.source)
        },
    },
    Row {
        what: "state: no index yet",
        code: 78,
        needle: "no index yet",
        setup: |c| {
            let fresh = c.dir("fresh");
            write_model(&fresh, &mixed_tensors(41), 1);
            args(&["rollback", "--model-dir", s(&fresh)])
        },
    },
    Row {
        what: "state: already initialized",
        code: 78,
        needle: "already initialized",
        setup: |c| args(&["init", "--model-dir", s(&c.model)]),
    },
    Row {
        what: "state: bad --block-size",
        code: 78,
        needle: "power of two",
        setup: |c| {
            let st = c.tmp.path().join("st");
            args(&[
                "init",
                "--model-dir",
                s(&c.model),
                "--block-size",
                "1000",
                "--state-dir",
                s(&st),
            ])
        },
    },
    Row {
        what: "state: a model file changed behind the index",
        code: 78,
        needle: "verify --repair",
        setup: |c| {
            let f = c.model.join("model-00002-of-00002.safetensors");
            let len = std::fs::metadata(&f).unwrap().len() as usize;
            flip(&f, len - 1);
            sync_from(c, &c.source)
        },
    },
    Row {
        what: "state: a rollback target out of reach",
        code: 78,
        needle: "cannot roll back",
        setup: |c| args(&["rollback", "--model-dir", s(&c.model), "--to", "5"]),
    },
    Row {
        what: "state: an export that needs --full or --since",
        code: 78,
        needle: "--full",
        setup: |c| {
            let outbox = c.tmp.path().join("outbox");
            args(&[
                "export-delta",
                "--model-dir",
                s(&c.model),
                "--out",
                s(&outbox),
            ])
        },
    },
    Row {
        what: "state: a delta that does not fit the replica",
        code: 78,
        needle: "apply the deltas from 1 first",
        setup: |c| {
            // A replica at generation 1, from a full delta.
            one_generation(c);
            let full = c.dir("full-outbox");
            succeeds(&[
                "export-delta",
                "--model-dir",
                s(&c.model),
                "--out",
                s(&full),
                "--full",
            ]);
            let replica = c.tmp.path().join("replica");
            succeeds(&[
                "apply-delta",
                "--replica-dir",
                s(&replica),
                s(&deltas_in(&full)[0]),
            ]);
            // Two more generations; the delta 2..3 leaves a gap after the replica's 1.
            for flip_back in [false, true] {
                let mut t = mixed_tensors(40);
                t[1].data[7] ^= u8::from(!flip_back);
                t[2].data[9] ^= 1;
                write_model(&c.source, &t, 1);
                succeeds(&["sync", "--model-dir", s(&c.model), "--from", s(&c.source)]);
            }
            let outbox = c.dir("outbox");
            succeeds(&[
                "export-delta",
                "--model-dir",
                s(&c.model),
                "--out",
                s(&outbox),
                "--since",
                "2",
            ]);
            let gap = deltas_in(&outbox).remove(0);
            c.watch(&replica);
            args(&["apply-delta", "--replica-dir", s(&replica), s(&gap)])
        },
    },
];

#[test]
fn every_row_of_the_exit_code_table() {
    for row in ROWS {
        let c = Case::new();
        let argv = (row.setup)(&c);
        let watched = c.watched();
        let before = snapshot(&watched);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let o = run(&argv);
        let err = stderr(&o);
        assert_eq!(
            o.status.code(),
            Some(row.code),
            "{}: {argv:?}\n{err}",
            row.what
        );
        assert!(err.contains(row.needle), "{}: {err}", row.what);
        if row.code != 0 {
            assert_eq!(
                snapshot(&watched),
                before,
                "{}: the files changed",
                row.what
            );
        }
    }
    // The success row's JSON has the stats (the table's row 0).
    let c = Case::new();
    let o = run(&[
        "sync",
        "--model-dir",
        s(&c.model),
        "--from",
        s(&c.source),
        "--json",
    ]);
    assert_eq!(stdout_json(&o)["changed"], false);
}
