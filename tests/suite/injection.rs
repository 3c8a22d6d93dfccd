//! Untrusted alert values through the real binary against a real sshd: a corpus of over 500
//! hostile values, each through eight command shapes as SREs write them (a bare word, inside
//! single and double quotes, mid-word, in `$(…)`, after a `/`, after `--`, in an assignment).
//! Every run either prints exactly the value it was given (proof it arrived as data) or was
//! refused before anything was sent, for the reason its shape predicts; no marker file that a
//! value tries to create ever exists.

use crate::common::TestApp;
use crate::common::sshd::Sshd;
use serde_json::{Value, json};
use std::collections::HashMap;

/// A command shape: its name, the command with `V` where the hole goes, and what the remote
/// side prints for a value.
struct Shape {
    name: &'static str,
    command: &'static str,
    /// The hole starts a word with no `--` before it: a value starting with `-` is refused.
    option_position: bool,
    /// The hole follows a `/`: absolute values and `..` segments are refused.
    after_slash: bool,
    expect: fn(&str) -> String,
}

const SHAPES: &[Shape] = &[
    Shape {
        name: "bare",
        command: "printf '%s\\n' V",
        option_position: true,
        after_slash: false,
        expect: |v| format!("{v}\n"),
    },
    Shape {
        name: "single",
        command: "printf '%s\\n' 'pre V post'",
        option_position: false,
        after_slash: false,
        expect: |v| format!("pre {v} post\n"),
    },
    Shape {
        name: "double",
        command: "printf '%s\\n' \"pre V post\"",
        option_position: false,
        after_slash: false,
        expect: |v| format!("pre {v} post\n"),
    },
    Shape {
        name: "midword",
        command: "printf '%s\\n' pre-V-post",
        option_position: false,
        after_slash: false,
        expect: |v| format!("pre-{v}-post\n"),
    },
    Shape {
        name: "subst",
        command: "x=\"$(printf '%s' V)\"; printf '%s\\n' \"$x\"",
        option_position: true,
        after_slash: false,
        // `$(…)` drops trailing newlines.
        expect: |v| format!("{}\n", v.trim_end_matches('\n')),
    },
    Shape {
        name: "path",
        command: "printf '%s\\n' data/V",
        option_position: false,
        after_slash: true,
        expect: |v| format!("data/{v}\n"),
    },
    Shape {
        name: "dashdash",
        command: "printf '%s|%s\\n' -- V",
        option_position: false,
        after_slash: false,
        expect: |v| format!("--|{v}\n"),
    },
    Shape {
        name: "assign",
        command: "V_=V; printf '%s\\n' \"$V_\"",
        option_position: false,
        after_slash: false,
        expect: |v| format!("{v}\n"),
    },
];

/// Hostile values: cores that try to run `touch MARKER` or change the command, each in a few
/// wrappings.
fn corpus(marker: &str) -> Vec<String> {
    let m = marker;
    let cores: Vec<String> = vec![
        format!("; touch {m}"),
        format!("$(touch {m})"),
        format!("`touch {m}`"),
        format!("' ; touch {m}; '"),
        format!("\" ; touch {m}; \""),
        format!("'\\''; touch {m}; echo '"),
        format!("\"$(touch {m})\""),
        format!("\\$(touch {m})"),
        format!("a\ntouch {m}"),
        format!("a\r\ntouch {m}\n"),
        format!("| touch {m}"),
        format!("&& touch {m}"),
        format!("|| touch {m}"),
        format!("& touch {m}"),
        format!("> {m}"),
        format!(">> {m}"),
        format!("EOF\ntouch {m}\nEOF"),
        format!("$'\\x3b' touch {m}"),
        format!("${{IFS}}touch${{IFS}}{m}"),
        format!("--use-compress-program=touch {m}"),
        format!("-oProxyCommand=touch {m}"),
        format!("；touch {m}"),
        format!("＄(touch {m})"),
        format!("$(touch${{IFS}}{m})"),
        format!("\"; touch {m} #"),
        format!("'; touch {m} #"),
        "< /etc/passwd".into(),
        "$((1+1))".into(),
        "${HOME}".into(),
        "$HOME".into(),
        "$IFS".into(),
        "$@ $* $0 $1 $$ $? $!".into(),
        "\\".into(),
        "\\'".into(),
        "\\\"".into(),
        "'".into(),
        "\"".into(),
        "''".into(),
        "\"\"".into(),
        "*".into(),
        "?".into(),
        "[a-z]*".into(),
        "~root".into(),
        "{a,b}".into(),
        "#".into(),
        "# comment".into(),
        "!".into(),
        "!!".into(),
        "%s%n%x".into(),
        "-rf /".into(),
        "-".into(),
        "--".into(),
        "-e".into(),
        "-n".into(),
        "".into(),
        " ".into(),
        "\t".into(),
        "/".into(),
        "/etc/passwd".into(),
        "../x".into(),
        "../../etc".into(),
        "a/../../b".into(),
        "..".into(),
        ".".into(),
        "./x".into(),
        "－rf".into(),
        "‐rf".into(),
        "ʼ; id".into(),
        "a\u{2028}b".into(),
        "zero\u{200b}width".into(),
        "é ü 日本 🚀".into(),
        "x".repeat(10_000),
        "'".repeat(3_000),
        "\"$`\\".repeat(500),
        ")".into(),
        "(".into(),
        "}".into(),
        "{".into(),
        "$(".into(),
        "a b  c".into(),
        "  leading".into(),
        "trailing  ".into(),
        "x=y".into(),
        "IFS=x".into(),
        "%".into(),
    ];
    let wraps: [fn(&str) -> String; 6] = [
        |c| c.to_string(),
        |c| format!("a{c}"),
        |c| format!("{c}z"),
        |c| format!(" {c} "),
        |c| format!("'{c}"),
        |c| format!("{c}\n"),
    ];
    let mut out: Vec<String> = Vec::new();
    for c in &cores {
        for w in &wraps {
            let v = w(c);
            if !out.contains(&v) {
                out.push(v);
            }
        }
    }
    out
}

/// Why a shape refuses a value, if it does.
fn refusal(shape: &Shape, v: &str) -> Option<&'static str> {
    if v.is_empty() {
        return Some("empty");
    }
    if shape.option_position && v.starts_with('-') {
        return Some("option");
    }
    if shape.after_slash && (v.starts_with('/') || v.split('/').any(|s| s == "..")) {
        return Some("leave the directory");
    }
    None
}

#[tokio::test]
async fn hostile_values_through_eight_command_shapes_run_nothing_the_author_did_not_write() {
    let sshd = Sshd::start();
    let marker = sshd.path("pwned");
    let values = corpus(&marker.display().to_string());
    assert!(values.len() >= 500, "corpus has {} values", values.len());

    let mut builder = TestApp::builder().config(&format!(
        "{}  max_sessions_per_host: 8\nstore:\n  synchronous: normal\nengine:\n  max_concurrent_runs: 16\n  max_runs_per_target: 100\n\
         breaker:\n  max_runs: 100000\n  max_runs_per_playbook: 100000\n  max_targets: 100000\n  max_failures: 100000\n",
        sshd.config_yaml("testhost", &[])
    ));
    for shape in SHAPES {
        let command = shape
            .command
            .replace('V', "{{ labels.v }}")
            .replace("{{ labels.v }}_", "V_");
        let yaml = json!({
            "name": format!("shape-{}", shape.name),
            "matchers": ["alertname=\"Corpus\""],
            "target": "testhost",
            "steps": [{"action": "ssh.run", "with": {"host": "testhost", "command": command}}],
        });
        builder = builder.playbook(&format!("{}.yaml", shape.name), &yaml.to_string());
    }
    let app = builder.start().await;

    // Post the corpus in batches; each alert matches all eight shapes.
    let mut expected: HashMap<i64, (&Shape, &str)> = HashMap::new();
    for (batch_no, batch) in values.chunks(50).enumerate() {
        let alerts: Vec<Value> = batch
            .iter()
            .enumerate()
            .map(|(i, v)| {
                json!({
                    "labels": {"alertname": "Corpus", "i": format!("{batch_no}-{i}"), "v": v},
                    "startsAt": "2026-11-23T00:00:00Z",
                })
            })
            .collect();
        // 400 runs a webhook, against real sshd, with the suite's other tests beside it.
        let (status, body) = app
            .post_raw_within(
                "/api/v1/webhooks/generic",
                Value::from(alerts).to_string(),
                std::time::Duration::from_secs(60),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        for (i, outcomes) in body["outcomes"].as_array().unwrap().iter().enumerate() {
            let v = batch[i].as_str();
            assert_eq!(outcomes.as_array().unwrap().len(), SHAPES.len(), "{v:?}");
            for o in outcomes.as_array().unwrap() {
                let name = o["playbook"].as_str().unwrap().trim_start_matches("shape-");
                let shape = SHAPES.iter().find(|s| s.name == name).unwrap();
                let run_id = o["run_id"].as_i64().unwrap();
                match refusal(shape, v) {
                    Some(why) => {
                        assert_eq!(o["outcome"], "failed", "{name} {v:?}: {o}");
                        let error = o["error"].as_str().unwrap();
                        assert!(error.contains(why), "{name} {v:?}: {error}");
                    }
                    None => {
                        assert_eq!(o["outcome"], "created", "{name} {v:?}: {o}");
                        expected.insert(run_id, (shape, v));
                    }
                }
            }
        }
    }

    // Every run that went out prints exactly its value.
    let mut done = 0;
    for (run_id, (shape, v)) in &expected {
        let run = app
            .wait_for(120, &format!("run {run_id} to end"), || async {
                let run = app.run(*run_id).await;
                let state = run["state"].as_str().unwrap_or("").to_string();
                (state != "pending" && state != "running").then_some(run)
            })
            .await;
        let step = &run["steps"][0];
        assert_eq!(run["state"], "succeeded", "{} {v:?}: {step:#}", shape.name);
        assert_eq!(
            step["output"]["stdout"].as_str().unwrap(),
            (shape.expect)(v),
            "{} {v:?} arrived altered",
            shape.name
        );
        done += 1;
    }
    assert!(!marker.exists(), "a value ran a command");
    eprintln!(
        "{} values x {} shapes: {done} commands ran as written, {} refused before sending",
        values.len(),
        SHAPES.len(),
        values.len() * SHAPES.len() - done
    );
}

#[test]
fn reflex_check_refuses_unsafe_command_shapes_with_line_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "cat <<EOF\n        {{ labels.x }}\n        EOF",
            "here-document",
            9,
        ),
        ("{{ labels.cmd }} --force", "command name", 8),
        ("bash -c 'echo {{ labels.x }}'", "`bash`", 8),
        ("echo `ls {{ labels.x }}`", "$(…)", 8),
        ("ls # {{ labels.x }}", "comment", 8),
    ];
    let ssh = |command: &str| {
        format!(
            "  - action: ssh.run\n    with:\n      host: h\n      command: |\n        {command}\n"
        )
    };
    let mut cases: Vec<(String, &str, usize)> = cases
        .iter()
        .map(|(c, needle, line)| (ssh(c), *needle, *line))
        .collect();
    cases.push((
        "  - action: http\n    with:\n      url: \"http://{{ labels.host }}:8080/x\"\n".into(),
        "host",
        6,
    ));
    cases.push((
        "  - action: verify\n    with:\n      condition: \"value > 0\"\n      query: 'up{instance=`{{ labels.i }}`}'\n".into(),
        "raw",
        7,
    ));
    for (i, (step, needle, line)) in cases.iter().enumerate() {
        let command = step;
        let yaml = format!("name: p{i}\nmatchers: ['alertname=\"X\"']\nsteps:\n{step}");
        let file = dir.path().join(format!("p{i}.yaml"));
        std::fs::write(&file, yaml).unwrap();
        let (code, out) = crate::common::reflex_cli(&["check", file.to_str().unwrap()], dir.path());
        assert_ne!(code, 0, "{command}: {out}");
        assert!(
            out.contains(&format!("p{i}.yaml:{line}:")) && out.contains(needle),
            "{command}: {out}"
        );
    }
}
