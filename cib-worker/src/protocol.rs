//! What the server and a worker say to each other: the job message on the broker, the bodies
//! of the worker API (claim, output, heartbeat, result), the queue names and the label sets.
//!
//! The broker carries no secret and no command: a job message only names the job, the server
//! to ask and the job token. A worker trades that token for a claim (the commands, the
//! environment with the secrets, the values to mask, and a claim token) over HTTP(S), and
//! every later request carries the claim token. Claims are fenced: each claim of a job gets
//! the next fencing number and a new token, and only the newest claim's token is accepted, so
//! a worker that lost its job (it stopped heartbeating and another worker claimed it) can
//! neither write output nor report a result.

use std::collections::BTreeMap;

use cib_core::pipeline::StopReason;
use cib_core::ports::Outcome;
use serde::{Deserialize, Serialize};

/// The exchange jobs are dead-lettered to, and the queue the server reads them from.
pub const DEAD_LETTER_EXCHANGE: &str = "cib.dead";
pub const DEAD_LETTER_QUEUE: &str = "cib.dead";
/// Queues of jobs are named this, followed by their label set (`cib.jobs.os=macos`).
pub const JOB_QUEUE_PREFIX: &str = "cib.jobs.";
/// How many tries a job gets by default before it is dead-lettered: the first delivery and two
/// redeliveries after a worker was lost (`[broker] max_tries`). The broker enforces it, as the
/// quorum queue's `x-delivery-limit` of `max_tries - 1`.
pub const DEFAULT_MAX_TRIES: u32 = 3;
/// The most tries `[broker] max_tries` may ask for: a job that kills its worker more often
/// than this is not worth more machines.
pub const MAX_TRIES_LIMIT: u32 = 100;
/// A worker consumes every non-empty subset of its labels (so that a step asking for fewer
/// labels finds it); beyond this many labels the queues would be too many.
pub const MAX_LABELS: usize = 6;

/// A label set: `os=macos,arch=arm64`, kept sorted by key.
pub type Labels = BTreeMap<String, String>;

/// Parses `os=macos,arch=arm64`. Keys and values are short words of letters, digits, `.`, `_`
/// and `-`, so that they make valid, unambiguous queue names.
pub fn parse_labels(text: &str) -> Result<Labels, String> {
    let mut labels = Labels::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = part.split_once('=') else {
            return Err(format!("label '{part}' is not KEY=VALUE"));
        };
        let (key, value) = (key.trim(), value.trim());
        check_label_word(key)?;
        check_label_word(value)?;
        if labels.insert(key.to_owned(), value.to_owned()).is_some() {
            return Err(format!("label '{key}' is given twice"));
        }
    }
    if labels.is_empty() {
        return Err("no labels: give at least one, such as os=macos".into());
    }
    if labels.len() > MAX_LABELS {
        return Err(format!("{} labels: at most {MAX_LABELS}", labels.len()));
    }
    Ok(labels)
}

/// Whether `word` may be a label's key or value.
pub fn check_label_word(word: &str) -> Result<(), String> {
    let ok = !word.is_empty()
        && word.len() <= 40
        && word.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok { Ok(()) } else { Err(format!("label word '{word}' must be 1 to 40 letters, digits, '.', '_' and '-'")) }
}

/// The queue of jobs asking for exactly this label set.
pub fn queue_name(labels: &Labels) -> String {
    let set: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{JOB_QUEUE_PREFIX}{}", set.join(","))
}

/// Every queue a worker with these labels consumes: one per non-empty subset of them.
pub fn worker_queues(labels: &Labels) -> Vec<String> {
    let pairs: Vec<(&String, &String)> = labels.iter().collect();
    let mut queues = Vec::new();
    for mask in 1u32..(1 << pairs.len()) {
        let subset: Labels = pairs
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, (k, v))| ((*k).clone(), (*v).clone()))
            .collect();
        queues.push(queue_name(&subset));
    }
    queues.sort();
    queues
}

/// The body of a job message on the broker. No secret and no command travels here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobMessage {
    pub job: String,
    /// The server's base URL, where the worker claims the job.
    pub server: String,
    /// Good for one thing: claiming this job, until the step ends.
    pub token: String,
    pub build: String,
    pub step: String,
    pub attempt: u32,
    pub labels: Labels,
}

/// `POST /api/v1/worker/jobs/{job}/claim` asks with the job token and this body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimRequest {
    /// The worker's name, for the step's log.
    pub worker: String,
}

/// What a claim gives the worker: everything to run the step, and the claim token.
#[derive(Clone, Serialize, Deserialize)]
pub struct Claim {
    /// The claim token: every later request of this claim carries it.
    pub claim: String,
    /// The fencing number of this claim: 1 for the first worker, 2 for the one that took it
    /// over, and so on.
    pub fence: u64,
    pub heartbeat_ms: u64,
    pub commands: Vec<String>,
    /// The step's environment, secrets included.
    pub env: BTreeMap<String, String>,
    /// Values to mask in the output: the secrets given, and the build's other secrets.
    pub mask: Vec<String>,
    pub workdir: Option<String>,
    pub timeout_ms: Option<u64>,
    pub no_output_timeout_ms: Option<u64>,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secret values never reach a log line, even a debug one.
        f.debug_struct("Claim")
            .field("fence", &self.fence)
            .field("commands", &self.commands.len())
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("mask", &self.mask.len())
            .finish()
    }
}

/// The answer to output: how many bytes of this claim's output the server holds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct OutputAck {
    pub offset: u64,
}

/// The answer to a heartbeat: whether the server wants the step stopped, and why.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct HeartbeatAnswer {
    pub stop: Option<StopReason>,
}

/// `POST /api/v1/worker/jobs/{job}/result`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ResultBody {
    pub outcome: Outcome,
}

/// The error body of the worker API: a code a worker acts on, and words for people.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// `unauthorized`, `held`, `fenced`, `ended`, `offset` or `bad_request`.
    pub code: String,
    pub message: String,
    /// For `offset`: the offset the server expects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// For `held`: when to ask again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_into_a_sorted_set_and_queue_names() {
        let labels = parse_labels("os=macos, arch=arm64").unwrap();
        assert_eq!(queue_name(&labels), "cib.jobs.arch=arm64,os=macos");
        assert_eq!(
            worker_queues(&labels),
            vec!["cib.jobs.arch=arm64", "cib.jobs.arch=arm64,os=macos", "cib.jobs.os=macos"]
        );
    }

    #[test]
    fn bad_labels_are_refused_with_the_reason() {
        assert!(parse_labels("").unwrap_err().contains("no labels"));
        assert!(parse_labels("os").unwrap_err().contains("KEY=VALUE"));
        assert!(parse_labels("os=a,os=b").unwrap_err().contains("twice"));
        assert!(parse_labels("os=Mac OS").unwrap_err().contains("must be"));
        assert!(parse_labels("a=1,b=1,c=1,d=1,e=1,f=1,g=1").unwrap_err().contains("at most"));
    }
}
