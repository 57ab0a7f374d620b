//! The `--json` contract: every command prints one object of `src/output.schema.json` on stdout
//! — on success and on failure, with `schema_version`, `command`, `at` and `model_dir` — and
//! the schema rejects objects that break it.

use std::process::Output;

use crate::util::{assert_output_schema, mixed_tensors, pair, run, s, stderr, stdout_json};

/// The one JSON line of `o`, checked against the schema, for `command` in `model_dir`.
fn contract(o: &Output, command: &str, model_dir: &str) -> serde_json::Value {
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).lines().count(),
        1,
        "one object per run: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let j = stdout_json(o);
    assert_eq!(j["command"], command, "{j}");
    assert_eq!(j["model_dir"], model_dir, "{j}");
    assert_eq!(j["schema_version"], 1);
    j
}

#[test]
fn every_command_prints_one_object_of_the_documented_schema() {
    let mut tensors = mixed_tensors(21);
    let p = pair(&tensors, 2, 1);
    let (m, src) = (s(&p.model), s(&p.source));
    let outbox = p.tmp.path().join("outbox");
    let replica = p.tmp.path().join("replica");
    let (ob, rep) = (s(&outbox), s(&replica));

    let ok = |args: &[&str], command: &str, dir: &str| {
        let o = run(args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        contract(&o, command, dir)
    };
    ok(&["init", "--model-dir", m, "--json"], "init", m);
    tensors[0].data[3] ^= 1;
    crate::util::write_model(&p.source, &tensors, 1);
    let j = ok(
        &["sync", "--model-dir", m, "--from", src, "--json"],
        "sync",
        m,
    );
    assert_eq!(j["changed"], true);
    ok(&["status", "--model-dir", m, "--json"], "status", m);
    ok(&["verify", "--model-dir", m, "--json"], "verify", m);
    ok(&["recover", "--model-dir", m, "--json"], "recover", m);
    ok(&["retention", "--model-dir", m, "--json"], "retention", m);
    let j = ok(
        &[
            "export-delta",
            "--model-dir",
            m,
            "--out",
            ob,
            "--full",
            "--json",
        ],
        "export-delta",
        m,
    );
    let full = j["file"].as_str().unwrap().to_string();
    let j = ok(
        &["apply-delta", "--replica-dir", rep, "--json", &full],
        "apply-delta",
        rep,
    );
    assert_eq!(j["generation"], 1);
    ok(
        &[
            "export-delta",
            "--model-dir",
            m,
            "--out",
            ob,
            "--prune-through",
            "0",
            "--json",
        ],
        "export-delta",
        m,
    );
    ok(&["rollback", "--model-dir", m, "--json"], "rollback", m);
    ok(&["log", "--model-dir", m, "--json"], "log", m);
    let j = ok(&["report", "--model-dir", m, "--json"], "report", m);
    assert_eq!(j["last_generation"], 2, "{j}");

    // Failures: the same envelope with error, kind and exit code; the text stays on stderr.
    let fail = |args: &[&str], command: &str, dir: serde_json::Value, code: i32, kind: &str| {
        let o = run(args);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {}", stderr(&o));
        let j = stdout_json(&o);
        assert_eq!(j["command"], command);
        assert_eq!(j["model_dir"], dir);
        assert_eq!(j["kind"], kind, "{j}");
        assert_eq!(j["exit_code"], code);
        let message = j["error"].as_str().unwrap();
        assert!(stderr(&o).contains(message), "{}", stderr(&o));
    };
    let nowhere = p.tmp.path().join("nowhere");
    let nw = s(&nowhere);
    fail(
        &["status", "--model-dir", nw, "--json"],
        "status",
        nw.into(),
        66,
        "no_model",
    );
    fail(
        &["init", "--model-dir", m, "--json"],
        "init",
        m.into(),
        78,
        "state",
    );
    fail(
        &["sync", "--model-dir", m, "--from", nw, "--json"],
        "sync",
        m.into(),
        66,
        "no_model",
    );
    fail(
        &[
            "report",
            "--model-dir",
            m,
            "--generations",
            "7..9",
            "--json",
        ],
        "report",
        m.into(),
        2,
        "usage",
    );
    fail(
        &["sync", "--model-dir", m, "--bogus", "--json"],
        "sync",
        serde_json::Value::Null,
        2,
        "usage",
    );
    // `status` needing a person is not a failure of the command: its report, and exit 78.
    let fresh = p.tmp.path().join("fresh");
    crate::util::write_model(&fresh, &tensors, 1);
    let o = run(&["status", "--model-dir", s(&fresh), "--json"]);
    assert_eq!(o.status.code(), Some(78));
    let j = contract(&o, "status", s(&fresh));
    assert_eq!(j["initialized"], false);
}

/// The checks above would pass against a schema that accepts anything: these must not.
#[test]
fn the_schema_rejects_objects_that_break_the_contract() {
    let good = serde_json::json!({
        "schema_version": 1, "command": "retention", "at": "2026-12-03T11:50:13.496Z",
        "model_dir": "/m", "generations": 24, "bytes": 1024
    });
    assert_output_schema(&good);
    let broken = [
        ("schema_version", serde_json::json!(2)),
        ("at", serde_json::json!("yesterday")),
        ("command", serde_json::json!("frobnicate")),
        ("generations", serde_json::json!(-1)),
    ];
    for (key, value) in broken {
        let mut bad = good.clone();
        bad[key] = value;
        let r = std::panic::catch_unwind(|| assert_output_schema(&bad));
        assert!(r.is_err(), "{key} = {} accepted", bad[key]);
    }
    for key in ["schema_version", "at", "model_dir", "bytes"] {
        let mut bad = good.clone();
        bad.as_object_mut().unwrap().remove(key);
        let r = std::panic::catch_unwind(|| assert_output_schema(&bad));
        assert!(r.is_err(), "without {key} accepted");
    }
    let mut failure = good.clone();
    let o = failure.as_object_mut().unwrap();
    o.remove("generations");
    o.remove("bytes");
    o.insert("error".into(), "no".into());
    o.insert("kind".into(), "state".into());
    assert!(std::panic::catch_unwind(|| assert_output_schema(&failure)).is_err());
    failure["exit_code"] = 78.into();
    assert_output_schema(&failure);
}
