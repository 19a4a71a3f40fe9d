//! Fork safety: a pull request from a fork gets no secrets and no privileged steps until a
//! maintainer approves it, and an approval holds for the commit it was given for only.
//!
//! This is pure bookkeeping with no I/O, so the engine or the server can keep one [`ForkGate`]
//! and rebuild it by replaying its inputs. Binding an approval to the head commit is the point:
//! a maintainer reviews the code they saw, and a push after the approval could add anything, so
//! it needs a new approval. Who counts as a maintainer is the caller's answer from the forge's
//! permission API ([`cib_core::ports::Vcs::permission`]), never a name in the payload.

use std::collections::BTreeMap;

use cib_core::forge::PullRequest;
use cib_core::ports::Permission;

/// A pull request: its repository and number.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PullRef {
    pub repo: String,
    pub number: u64,
}

impl PullRef {
    pub fn new(repo: &str, number: u64) -> Self {
        PullRef { repo: repo.to_owned(), number }
    }

    pub fn of(pr: &PullRequest) -> Self {
        PullRef::new(&pr.repo, pr.number)
    }
}

/// Who approved a fork's pull request, and at which commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForkApproval {
    pub head: String,
    pub by: String,
}

/// Why an approval was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApprovalRefused {
    #[error("{by} has {permission:?} access; approving a fork's build needs write access")]
    NotAMaintainer { by: String, permission: Permission },
    #[error("{by} opened this pull request and cannot approve their own code")]
    OwnPullRequest { by: String },
}

/// The approvals of fork pull requests, each bound to a head commit.
#[derive(Debug, Clone, Default)]
pub struct ForkGate {
    approvals: BTreeMap<PullRef, ForkApproval>,
}

impl ForkGate {
    pub fn new() -> Self {
        ForkGate::default()
    }

    /// Records that `by`, whose permission on the repository is `permission`, approved `pr` at
    /// `head`. Replaces any earlier approval of the pull request. `author` is the pull request's
    /// author, who may not approve their own code even with write access (they could push to
    /// the fork and approve the result).
    pub fn approve(
        &mut self,
        pr: PullRef,
        head: &str,
        by: &str,
        permission: Permission,
        author: &str,
    ) -> Result<(), ApprovalRefused> {
        if permission < Permission::Write {
            return Err(ApprovalRefused::NotAMaintainer { by: by.to_owned(), permission });
        }
        if by.eq_ignore_ascii_case(author) {
            return Err(ApprovalRefused::OwnPullRequest { by: by.to_owned() });
        }
        self.approvals.insert(pr, ForkApproval { head: head.to_owned(), by: by.to_owned() });
        Ok(())
    }

    /// Whether `pr` is approved at exactly `head`.
    pub fn is_approved(&self, pr: &PullRef, head: &str) -> bool {
        self.approvals.get(pr).is_some_and(|a| a.head == head)
    }

    /// The approval on record, whatever its commit.
    pub fn approval(&self, pr: &PullRef) -> Option<&ForkApproval> {
        self.approvals.get(pr)
    }

    /// Forgets a pull request's approval (closed, merged, or a maintainer withdrew it).
    pub fn revoke(&mut self, pr: &PullRef) {
        self.approvals.remove(pr);
    }

    /// Whether a build of `pr` at its head commit may see secrets and run privileged steps:
    /// always for a branch of the repository itself, and for a fork only with an approval of
    /// that very commit.
    pub fn trusted(&self, pr: &PullRequest) -> bool {
        !pr.from_fork || self.is_approved(&PullRef::of(pr), &pr.head_commit)
    }
}

#[cfg(test)]
mod tests {
    use cib_core::forge::PullRequestAction;

    use super::*;

    fn fork_pr(head: &str) -> PullRequest {
        PullRequest {
            repo: "o/r".into(),
            action: PullRequestAction::Opened,
            number: 7,
            base_branch: "main".into(),
            base_commit: "b".repeat(40),
            head_branch: "patch-1".into(),
            head_commit: head.into(),
            head_repo: Some("mallory/r".into()),
            from_fork: true,
            author: "mallory".into(),
            sender: "mallory".into(),
        }
    }

    #[test]
    fn a_fork_is_untrusted_until_approved_and_a_push_needs_a_new_approval() {
        let mut gate = ForkGate::new();
        let first = fork_pr("1111");
        assert!(!gate.trusted(&first));
        gate.approve(PullRef::of(&first), "1111", "maintainer", Permission::Write, "mallory").expect("approved");
        assert!(gate.trusted(&first));

        let pushed = PullRequest { head_commit: "2222".into(), action: PullRequestAction::Synchronize, ..first };
        assert!(!gate.trusted(&pushed), "the approval was for 1111, not 2222");
        gate.approve(PullRef::of(&pushed), "2222", "maintainer", Permission::Admin, "mallory").expect("approved");
        assert!(gate.trusted(&pushed));

        gate.revoke(&PullRef::of(&pushed));
        assert!(!gate.trusted(&pushed));
    }

    #[test]
    fn only_maintainers_other_than_the_author_approve() {
        let mut gate = ForkGate::new();
        let pr = PullRef::new("o/r", 7);
        assert!(matches!(
            gate.approve(pr.clone(), "1111", "reader", Permission::Read, "mallory"),
            Err(ApprovalRefused::NotAMaintainer { .. })
        ));
        assert!(matches!(
            gate.approve(pr.clone(), "1111", "Mallory", Permission::Write, "mallory"),
            Err(ApprovalRefused::OwnPullRequest { .. })
        ));
        assert!(!gate.is_approved(&pr, "1111"));
    }

    #[test]
    fn branches_of_the_repository_itself_are_trusted() {
        let gate = ForkGate::new();
        let own = PullRequest { from_fork: false, head_repo: Some("o/r".into()), ..fork_pr("1111") };
        assert!(gate.trusted(&own));
    }
}
