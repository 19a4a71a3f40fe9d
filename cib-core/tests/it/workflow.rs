//! The merge and promotion rules: every refusal, and the words it gives.

use cib_core::event::Conclusion;
use cib_core::ports::{Comparison, Permission};
use cib_core::spec::{self, Duration};
use cib_core::time::Timestamp;
use cib_core::workflow::{
    Approval, DownstreamResult, DownstreamState, MergeFacts, PipelineResults, PromotionFacts, Refusal, check_merge,
    check_promotion, explain,
};

fn policies() -> (spec::MergePolicy, spec::PromotionPolicy) {
    let s = spec::parse(
        r#"
pipelines:
  test: { steps: [{ name: a, image: busybox, commands: [true] }] }
  staging: { steps: [{ name: a, image: busybox, commands: [true] }] }
promotion:
  requires:
    pipelines: [staging]
    approvals: { count: 2, from: { users: [alice, bob, carol], teams: [stakeholders] }, expires: 3d }
merge:
  requires: { pipelines: [test], reviews: 1 }
"#,
    )
    .expect("valid spec");
    (s.merge.expect("merge policy"), s.promotion.expect("promotion policy"))
}

fn results(pairs: &[(&str, Conclusion)]) -> PipelineResults {
    pairs.iter().map(|(p, c)| ((*p).to_owned(), *c)).collect()
}

const C: &str = "c0ffee0000000000000000000000000000000001";
const OTHER: &str = "beef000000000000000000000000000000000002";

fn approval(by: &str, commit: &str, at: u64) -> Approval {
    Approval { commit: commit.into(), by: by.into(), teams: Vec::new(), at: Timestamp::from_secs(at) }
}

#[test]
fn a_green_up_to_date_reviewed_branch_merges() {
    let (merge, _) = policies();
    let green = results(&[("test", Conclusion::Success)]);
    let facts = MergeFacts {
        user: "dev",
        permission: Permission::Write,
        comparison: Comparison { ahead: 2, behind: 0 },
        results: &green,
        reviews: 1,
    };
    assert_eq!(check_merge(&merge, &facts), Ok(()));
}

#[test]
fn every_merge_refusal_is_listed_at_once() {
    let (merge, _) = policies();
    let red = results(&[("test", Conclusion::Failed)]);
    let facts = MergeFacts {
        user: "visitor",
        permission: Permission::Read,
        comparison: Comparison { ahead: 1, behind: 3 },
        results: &red,
        reviews: 0,
    };
    let refusals = check_merge(&merge, &facts).expect_err("refused");
    assert_eq!(
        refusals,
        [
            Refusal::NoPermission { user: "visitor".into() },
            Refusal::Stale { target: "master".into(), behind: 3 },
            Refusal::NotGreen { pipeline: "test".into(), state: "a failed build".into() },
            Refusal::MissingReviews { have: 0, need: 1 },
        ]
    );
    insta::assert_snapshot!(explain("merge this pull request", &refusals), @r"
    cib cannot merge this pull request:
    - visitor has no write permission on the repository
    - the branch is 3 commit(s) behind master: rebase it on master first
    - pipeline 'test' has a failed build on this commit
    - 0 approving review(s), 1 needed
    ");
    let never = results(&[]);
    let facts = MergeFacts {
        results: &never,
        permission: Permission::Admin,
        comparison: Comparison { ahead: 1, behind: 0 },
        reviews: 2,
        ..facts
    };
    assert_eq!(
        check_merge(&merge, &facts),
        Err(vec![Refusal::NotGreen { pipeline: "test".into(), state: "never run".into() }])
    );
}

fn promotion<'a>(results: &'a PipelineResults, approvals: &'a [Approval], now: u64) -> PromotionFacts<'a> {
    PromotionFacts {
        commit: C,
        author: Some("dana"),
        comparison: Comparison { ahead: 3, behind: 0 },
        results,
        approvals,
        downstream: &[],
        now: Timestamp::from_secs(now),
    }
}

#[test]
fn a_commit_that_passed_staging_with_two_approvals_is_promoted() {
    let (_, promote) = policies();
    let green = results(&[("staging", Conclusion::Success)]);
    let approvals = [approval("alice", C, 100), approval("bob", C, 200), approval("alice", C, 300)];
    assert_eq!(
        check_promotion(&promote, &promotion(&green, &approvals, 1_000)),
        Ok(vec!["alice".into(), "bob".into()])
    );
    let by_team =
        [approval("alice", C, 100), Approval { teams: vec!["stakeholders".into()], ..approval("erin", C, 100) }];
    assert_eq!(
        check_promotion(&promote, &promotion(&green, &by_team, 1_000)),
        Ok(vec!["alice".into(), "erin".into()]),
        "a team member counts"
    );
}

#[test]
fn a_commit_that_never_passed_staging_is_refused() {
    let (_, promote) = policies();
    let approvals = [approval("alice", C, 100), approval("bob", C, 100)];
    let none = results(&[]);
    let refusals = check_promotion(&promote, &promotion(&none, &approvals, 1_000)).expect_err("refused");
    assert_eq!(refusals, [Refusal::NotGreen { pipeline: "staging".into(), state: "never run".into() }]);
    let failed = results(&[("staging", Conclusion::Failed)]);
    let refusals = check_promotion(&promote, &promotion(&failed, &approvals, 1_000)).expect_err("refused");
    assert_eq!(refusals, [Refusal::NotGreen { pipeline: "staging".into(), state: "a failed build".into() }]);
}

#[test]
fn self_approval_too_few_approvals_another_commit_and_expiry_are_each_refused() {
    let (_, promote) = policies();
    let green = results(&[("staging", Conclusion::Success)]);
    // The author approves their own commit.
    let own = [approval("dana", C, 100), approval("alice", C, 100)];
    let mut promote_self = promote.clone();
    promote_self.approvers.users.push("dana".into());
    let refusals = check_promotion(&promote_self, &promotion(&green, &own, 1_000)).expect_err("refused");
    assert_eq!(
        refusals,
        [
            Refusal::ApprovalIgnored { by: "dana".into(), why: "the commit's author may not approve it".into() },
            Refusal::TooFewApprovals { have: 1, need: 2 },
        ]
    );
    promote_self.self_approval = true;
    assert!(check_promotion(&promote_self, &promotion(&green, &own, 1_000)).is_ok(), "unless the policy allows it");
    // One approval, and one for another commit.
    let elsewhere = [approval("alice", C, 100), approval("bob", OTHER, 100)];
    let refusals = check_promotion(&promote, &promotion(&green, &elsewhere, 1_000)).expect_err("refused");
    assert_eq!(
        refusals,
        [
            Refusal::TooFewApprovals { have: 1, need: 2 },
            Refusal::ApprovalIgnored { by: "bob".into(), why: "it approves another commit (beef00000000)".into() },
        ]
    );
    // An approval older than three days has lapsed.
    let three_days = Duration::from_secs(3 * 86_400).as_secs();
    let stale = [approval("alice", C, 100), approval("bob", C, 100 + three_days)];
    let refusals = check_promotion(&promote, &promotion(&green, &stale, 100 + three_days + 10)).expect_err("refused");
    assert_eq!(
        refusals,
        [
            Refusal::ApprovalIgnored { by: "alice".into(), why: "it has expired; approve again".into() },
            Refusal::TooFewApprovals { have: 1, need: 2 },
        ]
    );
    // Someone who is not an allowed approver.
    let stranger = [approval("alice", C, 100), approval("mallory", C, 100)];
    let refusals = check_promotion(&promote, &promotion(&green, &stranger, 1_000)).expect_err("refused");
    assert!(
        refusals.contains(&Refusal::ApprovalIgnored {
            by: "mallory".into(),
            why: "not one of the allowed approvers".into()
        })
    );
}

#[test]
fn a_production_move_that_is_not_a_fast_forward_is_refused() {
    let (_, promote) = policies();
    let green = results(&[("staging", Conclusion::Success)]);
    let approvals = [approval("alice", C, 100), approval("bob", C, 100)];
    let facts =
        PromotionFacts { comparison: Comparison { ahead: 1, behind: 2 }, ..promotion(&green, &approvals, 1_000) };
    let refusals = check_promotion(&promote, &facts).expect_err("refused");
    assert_eq!(refusals, [Refusal::NotFastForward { target: "production".into() }]);
    assert_eq!(
        explain("promote this commit", &refusals),
        "cib cannot promote this commit:\n- production has commits this commit does not contain: it cannot move by fast-forward"
    );
}

#[test]
fn a_neutral_build_does_not_pass_a_required_pipeline() {
    let (merge, promotion) = policies();
    let neutral = results(&[("test", Conclusion::Neutral)]);
    let facts = MergeFacts {
        user: "dev",
        permission: Permission::Write,
        comparison: Comparison { ahead: 2, behind: 0 },
        results: &neutral,
        reviews: 1,
    };
    let refusals = check_merge(&merge, &facts).expect_err("a neutral build is not green");
    insta::assert_snapshot!(explain("merge this pull request", &refusals), @r"
    cib cannot merge this pull request:
    - pipeline 'test' has a neutral build (steps needing secrets were skipped) on this commit
    ");
    let neutral = results(&[("staging", Conclusion::Neutral)]);
    let approvals = [approval("alice", C, 100), approval("bob", C, 100)];
    let refused = check_promotion(&promotion, &self::promotion(&neutral, &approvals, 200));
    assert!(matches!(&refused, Err(r) if matches!(r[..], [Refusal::NotGreen { .. }])), "{refused:?}");
}

fn downstream_result(repo: &str, commit: &str, build: &str, state: DownstreamState) -> DownstreamResult {
    DownstreamResult {
        upstream_repo: "acme/api".into(),
        upstream_commit: commit.into(),
        repo: repo.into(),
        pipeline: "test".into(),
        build: build.into(),
        commit: "d0d0".into(),
        state,
        at: Timestamp::from_secs(10),
    }
}

#[test]
fn a_promotion_waits_for_each_required_downstream_repository_on_the_exact_commit() {
    let policy = spec::parse(
        r#"
pipelines:
  staging: { steps: [{ name: a, image: busybox, commands: [true] }] }
promotion:
  requires: { downstream: [acme/client, acme/cli] }
"#,
    )
    .expect("valid spec")
    .promotion
    .expect("promotion policy");
    let none = results(&[]);
    fn facts<'a>(none: &'a PipelineResults, downstream: &'a [DownstreamResult]) -> PromotionFacts<'a> {
        PromotionFacts { downstream, ..promotion(none, &[], 1_000) }
    }
    // The client failed on this commit, passed on another; the cli is still running.
    let seen = [
        downstream_result("acme/client", C, "b-1", DownstreamState::Failed),
        downstream_result("acme/client", OTHER, "b-0", DownstreamState::Success),
        downstream_result("acme/cli", C, "b-2", DownstreamState::Running),
    ];
    let refusals = check_promotion(&policy, &facts(&none, &seen)).expect_err("refused");
    insta::assert_snapshot!(explain("promote this commit", &refusals), @r"
    cib cannot promote this commit:
    - acme/client's test pipeline failed on this commit: build b-1
    - acme/cli's test pipeline is still running on this commit: build b-2
    ");
    // Nothing on record for a repository is a refusal too: a result of another commit is not one.
    let other = [downstream_result("acme/client", OTHER, "b-0", DownstreamState::Success)];
    let refusals = check_promotion(&policy, &facts(&none, &other)).expect_err("refused");
    assert_eq!(refusals.len(), 2, "{refusals:?}");
    assert_eq!(
        refusals[0].to_string(),
        "acme/client has no downstream result (none of its 'on: upstream' pipelines ran) on this commit"
    );
    // Both passed on this commit: promoted.
    let green = [
        downstream_result("acme/client", C, "b-3", DownstreamState::Success),
        downstream_result("acme/cli", C, "b-2", DownstreamState::Success),
    ];
    assert_eq!(check_promotion(&policy, &facts(&none, &green)), Ok(Vec::new()));
}
