//! Output: complete and in order at volume, streams kept apart, secrets masked across reads.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Instant;

use cib_core::event::BuildId;
use cib_core::ports::{Executor, Outcome, StepRun, StopSignal, Stream};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_thousand_lines_arrive_complete_and_in_order() {
    let exec = executor("lines").await;
    let dir = tempdir();
    let sink = Sink::new();
    let (_keep, stop) = StopSignal::new();
    let job = job("lines", "seq", &["seq 1 200000", "echo done >&2"]);
    let started = Instant::now();
    let outcome = exec.run(&step_run(job, dir.path()), sink.clone(), stop).await;
    let took = started.elapsed();
    assert_eq!(outcome.ok(), Some(Outcome::Exited(0)));
    let expected: String = (1..=200_000).map(|n| format!("{n}\n")).collect();
    let got = sink.text(Stream::Stdout);
    if got != expected {
        let lines: Vec<&str> = got.lines().collect();
        let first_bad = lines.iter().enumerate().find(|(i, l)| **l != (i + 1).to_string());
        panic!("{} lines arrived; the first one out of place: {first_bad:?}", lines.len());
    }
    assert_eq!(sink.text(Stream::Stderr), "done\n");
    let _ = writeln!(
        std::io::stderr(),
        "200000 lines ({} bytes) in {took:?}, over {} writes to the sink",
        expected.len(),
        sink.writes(Stream::Stdout).len()
    );
    exec.cleanup(&BuildId::from("lines")).await.unwrap_or_else(|e| panic!("cleanup: {e}"));
    assert_nothing_left(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_printed_across_two_reads_never_reaches_the_sink() {
    let exec = executor("secret-split").await;
    let dir = tempdir();
    let sink = Sink::new();
    let (_keep, stop) = StopSignal::new();
    let secret = "s3cr3t-split-value";
    // The secret leaves the container in two writes half a second apart, so it arrives in two
    // frames; on stderr the same, to check both streams.
    let mut job = job(
        "secret",
        "split",
        &[
            r#"printf 'token=%s' "$(echo "$TOKEN" | cut -c1-9)""#,
            "sleep 0.5",
            r#"printf '%s;\n' "$(echo "$TOKEN" | cut -c10-)""#,
            r#"printf 'err=%s' "$(echo "$TOKEN" | cut -c1-4)" >&2"#,
            "sleep 0.5",
            r#"printf '%s\n' "$(echo "$TOKEN" | cut -c5-)" >&2"#,
        ],
    );
    job.step.secrets = vec!["TOKEN".into()];
    let run = StepRun {
        job,
        secrets: BTreeMap::from([("TOKEN".to_owned(), secret.to_owned())]),
        mask: Vec::new(),
        workspace: dir.path().to_path_buf(),
    };
    assert_eq!(exec.run(&run, sink.clone(), stop).await.ok(), Some(Outcome::Exited(0)));
    assert_eq!(sink.text(Stream::Stdout), "token=***;\n");
    assert_eq!(sink.text(Stream::Stderr), "err=***\n");
    // What reached the sink came in more than one write: the masker did see a split secret.
    let writes = sink.writes(Stream::Stdout);
    assert!(writes.len() >= 2, "the output came in one piece, so nothing was split: {writes:?}");
    for w in writes.iter().chain(sink.writes(Stream::Stderr).iter()) {
        let text = String::from_utf8_lossy(w);
        assert!(!text.contains("s3cr") && !text.contains("value"), "part of the secret leaked: {text:?}");
    }
    exec.cleanup(&BuildId::from("secret")).await.unwrap_or_else(|e| panic!("cleanup: {e}"));
    assert_nothing_left(&exec).await;
}

/// Percent-encoding as `urlencode` does it: unreserved bytes as they are, others as `%XX`.
fn percent(value: &str, upper: bool) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => char::from(b).to_string(),
            _ if upper => format!("%{b:02X}"),
            _ => format!("%{b:02x}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_secret_of_the_build_is_masked_encoded_and_line_by_line_across_reads() {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};
    let exec = executor("secret-forms").await;
    let dir = tempdir();
    let sink = Sink::new();
    let (_keep, stop) = StopSignal::new();
    // The step's own secret, and one it does not get but the build holds (another step's).
    let token = "tok/en+with?odd&chars=\u{e9}\"q\"";
    let key = "-----BEGIN TEST KEY-----\nMIIBOgIBAAJBAKj34GkxFhD9\n-----END TEST KEY-----";
    let mut forms: Vec<String> = Vec::new();
    for value in [token, key] {
        forms.push(value.to_owned());
        forms.push(STANDARD.encode(value));
        forms.push(URL_SAFE.encode(value));
        forms.push(percent(value, true));
        forms.push(percent(value, false));
        let json = serde_json::to_string(value).expect("a string is JSON");
        forms.push(json[1..json.len() - 1].to_owned());
    }
    // The lines in reverse order, so that together they do not spell the whole value (which
    // would be masked as one).
    forms.extend(key.lines().rev().map(str::to_owned));
    // Each form leaves the container in three writes with pauses between them, so that it
    // reaches the executor split across reads.
    let mut commands = Vec::new();
    for form in &forms {
        let chars: Vec<char> = form.chars().collect();
        let third = chars.len().div_ceil(3);
        for piece in chars.chunks(third) {
            let piece: String = piece.iter().collect();
            assert!(!piece.contains('\''), "the test quotes pieces in single quotes");
            // A command holds no line break, so one inside a piece is written as printf's `\n`.
            if piece.contains('\n') {
                assert!(!piece.contains('\\'), "a piece with a line break has no other escapes");
                commands.push(format!("printf '%b' '{}'", piece.replace('\n', "\\n")));
            } else {
                commands.push(format!("printf '%s' '{piece}'"));
            }
            commands.push("sleep 0.1".to_owned());
        }
        commands.push("echo".to_owned());
    }
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    let mut job = job("secret-forms", "print", &commands);
    job.step.secrets = vec!["TOKEN".into()];
    let run = StepRun {
        job,
        secrets: BTreeMap::from([("TOKEN".to_owned(), token.to_owned())]),
        mask: vec![key.to_owned()],
        workspace: dir.path().to_path_buf(),
    };
    assert_eq!(exec.run(&run, sink.clone(), stop).await.ok(), Some(Outcome::Exited(0)));
    let stored = sink.text(Stream::Stdout);
    let writes = sink.writes(Stream::Stdout);
    assert!(writes.len() >= forms.len(), "the output came in few pieces, so little was split: {}", writes.len());
    // Every form printed became a line of its own, and every line was masked.
    assert_eq!(stored.lines().count(), forms.len(), "{stored:?}");
    for (line, form) in stored.lines().zip(&forms) {
        assert!(line.contains("***"), "{form:?} gave {line:?}");
    }
    for form in &forms {
        assert!(!stored.contains(form.as_str()), "{form:?} leaked: {stored}");
    }
    exec.cleanup(&BuildId::from("secret-forms")).await.unwrap_or_else(|e| panic!("cleanup: {e}"));
    assert_nothing_left(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_units_reach_the_step_as_variables_and_a_file_in_the_workspace() {
    let exec = executor("resources-file").await;
    let dir = tempdir();
    let mut job = job("resources", "use", &["cat \"$CIB_RESOURCES_FILE\"", "echo \"host=$CIB_RESOURCE_ENV_0_HOST\""]);
    job.env.insert("CIB_RESOURCE_ENV_0_HOST".into(), "stage-1.internal".into());
    job.resources = vec![cib_core::pipeline::GrantedUnit {
        pool: "env".into(),
        unit: "stage-1".into(),
        metadata: [("host".to_owned(), "stage-1.internal".to_owned())].into(),
    }];
    let sink = Sink::new();
    let (_keep, stop) = StopSignal::new();
    let outcome = exec.run(&step_run(job, dir.path()), sink.clone(), stop).await.expect("run");
    assert_eq!(outcome, Outcome::Exited(0), "{}", sink.text(Stream::Stderr));
    let out = sink.text(Stream::Stdout);
    let start = out.find('[').expect("JSON in the output");
    let end = out.rfind(']').expect("JSON in the output");
    let units: serde_json::Value = serde_json::from_str(&out[start..=end]).expect("the file is JSON");
    assert_eq!(units[0]["pool"], "env");
    assert_eq!(units[0]["unit"], "stage-1");
    assert_eq!(units[0]["metadata"]["host"], "stage-1.internal");
    assert!(out.contains("host=stage-1.internal"), "{out}");
    exec.cleanup(&"resources".into()).await.expect("cleanup");
}
