//! What a person can ask cib in chat, parsed from the words they typed. Pure: the server runs a
//! [`Command`] as the person behind the chat user, through the API's own handlers.

/// One chat command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Help,
    /// The newest build of each pipeline (of one repository, or all).
    Status {
        repo: Option<String>,
    },
    /// The recent builds (of one repository, or all).
    Builds {
        repo: Option<String>,
    },
    Retry {
        build: String,
    },
    Cancel {
        build: String,
    },
    Approve {
        build: String,
        gate: String,
    },
    Reject {
        build: String,
        gate: String,
    },
    Merge {
        repo: String,
        branch: String,
    },
    ApproveRelease {
        repo: String,
        commit: String,
    },
    Promote {
        repo: String,
        commit: String,
    },
    /// `lease take <pool> [for 2h]`; an hour when no duration is given.
    LeaseTake {
        pool: String,
        duration: String,
    },
    LeaseReturn {
        id: String,
    },
    /// Marks the manual test (hold gate) a build waits at as passed or failed.
    Pass {
        build: String,
    },
    Fail {
        build: String,
    },
}

/// Every command with its arguments, one per line: the answer to `help` and to a mistake.
pub const HELP: &str = "cib commands:\n\
status [repo]: the newest build of each pipeline\n\
builds [repo]: recent builds\n\
retry <build>, cancel <build>\n\
approve <build> <gate>, reject <build> <gate>\n\
merge <repo> <branch>: fast-forward the integration branch to <branch>\n\
approve-release <repo> <commit>, promote <repo> <commit>\n\
lease take <pool> [for 2h], lease return <id>\n\
pass <build>, fail <build>: mark the manual test a build waits at\n\
help";

/// Parses a command line (without `/cib` or the bot's mention). The error names the command's
/// usage, or lists them all.
pub fn parse(text: &str) -> Result<Command, String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let usage = |u: &str| Err(format!("usage: {u}"));
    let one = |w: &[&str], u: &str| -> Result<String, String> {
        match w {
            [a] => Ok((*a).to_owned()),
            _ => Err(format!("usage: {u}")),
        }
    };
    let two = |w: &[&str], u: &str| -> Result<(String, String), String> {
        match w {
            [a, b] => Ok(((*a).to_owned(), (*b).to_owned())),
            _ => Err(format!("usage: {u}")),
        }
    };
    let Some((first, rest)) = words.split_first() else { return Ok(Command::Help) };
    let repo_opt = |w: &[&str], u: &str| -> Result<Option<String>, String> {
        match w {
            [] => Ok(None),
            [r] => Ok(Some((*r).to_owned())),
            _ => Err(format!("usage: {u}")),
        }
    };
    match first.to_ascii_lowercase().as_str() {
        "help" => Ok(Command::Help),
        "status" => Ok(Command::Status { repo: repo_opt(rest, "status [repo]")? }),
        "builds" => Ok(Command::Builds { repo: repo_opt(rest, "builds [repo]")? }),
        "retry" => Ok(Command::Retry { build: one(rest, "retry <build>")? }),
        "cancel" => Ok(Command::Cancel { build: one(rest, "cancel <build>")? }),
        "approve" => two(rest, "approve <build> <gate>").map(|(build, gate)| Command::Approve { build, gate }),
        "reject" => two(rest, "reject <build> <gate>").map(|(build, gate)| Command::Reject { build, gate }),
        "merge" => two(rest, "merge <repo> <branch>").map(|(repo, branch)| Command::Merge { repo, branch }),
        "approve-release" => {
            two(rest, "approve-release <repo> <commit>").map(|(repo, commit)| Command::ApproveRelease { repo, commit })
        }
        "promote" => two(rest, "promote <repo> <commit>").map(|(repo, commit)| Command::Promote { repo, commit }),
        "pass" => Ok(Command::Pass { build: one(rest, "pass <build>")? }),
        "fail" => Ok(Command::Fail { build: one(rest, "fail <build>")? }),
        "lease" => match rest {
            ["take", pool] => Ok(Command::LeaseTake { pool: (*pool).to_owned(), duration: "1h".into() }),
            ["take", pool, "for", duration] if is_duration(duration) => {
                Ok(Command::LeaseTake { pool: (*pool).to_owned(), duration: (*duration).to_owned() })
            }
            ["return", id] => Ok(Command::LeaseReturn { id: (*id).to_owned() }),
            _ => usage("lease take <pool> [for 2h], lease return <id>"),
        },
        other => Err(format!("cib does not know '{other}'.\n{HELP}")),
    }
}

/// `2h`, `30m`, `1h30m`, `45s`: digits followed by a unit, the API's duration form.
fn is_duration(s: &str) -> bool {
    let mut digits = false;
    let mut any = false;
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits = true;
        } else if matches!(c, 'h' | 'm' | 's' | 'd') && digits {
            digits = false;
            any = true;
        } else {
            return false;
        }
    }
    any && !digits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_commands_parse() {
        let cases: Vec<(&str, Command)> = vec![
            ("", Command::Help),
            ("help", Command::Help),
            ("status", Command::Status { repo: None }),
            ("status acme/shop", Command::Status { repo: Some("acme/shop".into()) }),
            ("builds acme/shop", Command::Builds { repo: Some("acme/shop".into()) }),
            ("retry b-1", Command::Retry { build: "b-1".into() }),
            ("cancel b-1", Command::Cancel { build: "b-1".into() }),
            ("approve b-1 deploy", Command::Approve { build: "b-1".into(), gate: "deploy".into() }),
            ("reject b-1 deploy", Command::Reject { build: "b-1".into(), gate: "deploy".into() }),
            ("merge acme/shop feature/x", Command::Merge { repo: "acme/shop".into(), branch: "feature/x".into() }),
            (
                "approve-release acme/shop abc",
                Command::ApproveRelease { repo: "acme/shop".into(), commit: "abc".into() },
            ),
            ("promote acme/shop abc", Command::Promote { repo: "acme/shop".into(), commit: "abc".into() }),
            ("lease take staging", Command::LeaseTake { pool: "staging".into(), duration: "1h".into() }),
            ("lease take staging for 2h", Command::LeaseTake { pool: "staging".into(), duration: "2h".into() }),
            ("lease return L-3", Command::LeaseReturn { id: "L-3".into() }),
            ("pass b-1", Command::Pass { build: "b-1".into() }),
            ("  FAIL   b-1 ", Command::Fail { build: "b-1".into() }),
        ];
        for (text, expected) in cases {
            assert_eq!(parse(text), Ok(expected), "{text}");
        }
    }

    #[test]
    fn chat_command_mistakes_name_the_usage() {
        assert_eq!(parse("approve b-1"), Err("usage: approve <build> <gate>".into()));
        assert_eq!(
            parse("lease take staging for ever"),
            Err("usage: lease take <pool> [for 2h], lease return <id>".into())
        );
        assert_eq!(parse("retry"), Err("usage: retry <build>".into()));
        let unknown = parse("deploy now").unwrap_err();
        assert!(unknown.starts_with("cib does not know 'deploy'.") && unknown.contains("lease take"), "{unknown}");
    }
}
