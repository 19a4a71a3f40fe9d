//! Tests of the lease table: readable scenarios whose event traces are insta snapshots, a serde
//! round trip, and property tests that run random operation sequences against a model.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cib_core::lease::{EndKind, Holder, LeaseError, LeaseEvent, LeaseId, LeaseTable, PoolConfig, Request, Unit, Want};
use cib_core::time::Timestamp;
use proptest::prelude::*;
use serde::Serialize;

// ---------------------------------------------------------------------------------------------
// Scenario harness
// ---------------------------------------------------------------------------------------------

/// Two pools of named units and one counting pool, small enough that queues form quickly.
fn pools() -> Vec<PoolConfig> {
    vec![
        PoolConfig::units(
            "hosts",
            [Unit::new("host-a").with_meta("arch", "x86_64"), Unit::new("host-b").with_meta("arch", "aarch64")],
        ),
        PoolConfig::units(
            "boards",
            [Unit::new("board-1").with_meta("serial", "SN-001"), Unit::new("board-2").with_meta("serial", "SN-002")],
        ),
        PoolConfig::counting("deploys", 2),
    ]
}

fn id(s: &str) -> LeaseId {
    LeaseId::from(s)
}

fn wants(list: &[(&str, u32)]) -> Vec<Want> {
    list.iter().map(|(pool, count)| Want::new(*pool, *count)).collect()
}

/// A build's request with a one-minute ttl.
fn build(lease: &str, list: &[(&str, u32)]) -> Request {
    Request::new(lease, Holder::build("build-1", Some(lease)), wants(list), Duration::from_secs(60))
}

fn secs(s: u64) -> Timestamp {
    Timestamp::from_secs(s)
}

fn mins(m: u64) -> Duration {
    Duration::from_secs(m * 60)
}

/// One operation in a scenario's trace and what came of it.
#[derive(Debug, Serialize)]
struct Step {
    at: Timestamp,
    op: String,
    events: Vec<LeaseEvent>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<LeaseError>,
}

/// Drives a table at explicit times and records every operation with its events, so that a
/// scenario's snapshot is the exact event sequence, in order, with the time of each step.
struct Script {
    table: LeaseTable,
    now: Timestamp,
    trace: Vec<Step>,
}

impl Script {
    fn new() -> Self {
        Script { table: LeaseTable::new(pools()).expect("valid pools"), now: Timestamp::ZERO, trace: Vec::new() }
    }

    fn at(&mut self, now: Timestamp) -> &mut Self {
        self.now = now;
        self
    }

    fn record(
        &mut self,
        op: String,
        result: Result<Vec<LeaseEvent>, LeaseError>,
    ) -> Result<Vec<LeaseEvent>, LeaseError> {
        let (events, error) = match &result {
            Ok(events) => (events.clone(), None),
            Err(error) => (Vec::new(), Some(error.clone())),
        };
        self.trace.push(Step { at: self.now, op, events, error });
        result
    }

    fn request(&mut self, request: Request) -> Result<Vec<LeaseEvent>, LeaseError> {
        let wanted: Vec<String> = request.wants.iter().map(|w| format!("{}:{}", w.pool, w.count)).collect();
        let mut op = format!("request {} [{}]", request.id, wanted.join(", "));
        if request.priority != 0 {
            op.push_str(&format!(" priority {}", request.priority));
        }
        let result = self.table.request(request, self.now);
        self.record(op, result)
    }

    fn renew(&mut self, lease: &str, token: u64) -> Result<Vec<LeaseEvent>, LeaseError> {
        let result = self.table.renew(&id(lease), token, self.now);
        self.record(format!("renew {lease} token {token}"), result)
    }

    fn release(&mut self, lease: &str, token: u64) -> Result<Vec<LeaseEvent>, LeaseError> {
        let result = self.table.release(&id(lease), token, self.now);
        self.record(format!("release {lease} token {token}"), result)
    }

    fn cancel(&mut self, lease: &str) -> Vec<LeaseEvent> {
        let events = self.table.cancel(&id(lease), self.now);
        let _ = self.record(format!("cancel {lease}"), Ok(events.clone()));
        events
    }

    fn revoke(&mut self, lease: &str) -> Result<Vec<LeaseEvent>, LeaseError> {
        let result = self.table.revoke(&id(lease), self.now);
        self.record(format!("revoke {lease}"), result)
    }

    fn tick(&mut self) -> Vec<LeaseEvent> {
        let events = self.table.tick(self.now);
        let _ = self.record("tick".to_owned(), Ok(events.clone()));
        events
    }

    fn configure(&mut self, pools: Vec<PoolConfig>) -> Result<Vec<LeaseEvent>, LeaseError> {
        let names: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
        let op = format!("configure [{}]", names.join(", "));
        let result = self.table.configure(pools, self.now);
        self.record(op, result)
    }

    fn positions(&self, lease: &str) -> Option<Vec<(String, usize)>> {
        self.table.position(&id(lease))
    }

    fn queue(&self, pool: &str) -> Vec<String> {
        self.table.queue(pool).into_iter().map(|id| id.to_string()).collect()
    }

    fn free(&self, pool: &str) -> u32 {
        self.table.pool_status(pool).map_or(0, |s| s.free)
    }

    fn holder_of(&self, pool: &str, unit: &str) -> Option<String> {
        let status = self.table.pool_status(pool)?;
        let unit = status.units.into_iter().find(|u| u.name == unit)?;
        unit.held_by.map(|h| h.lease.to_string())
    }

    fn snapshot(&self, name: &str) {
        insta::with_settings!({ omit_expression => true, prepend_module_to_snapshot => false }, {
            insta::assert_yaml_snapshot!(name, self.trace);
        });
    }
}

fn pos(list: &[(&str, usize)]) -> Option<Vec<(String, usize)>> {
    Some(list.iter().map(|(pool, at)| ((*pool).to_owned(), *at)).collect())
}

/// The kind and lease id of each event, for short assertions next to the full snapshot.
fn kinds(events: &[LeaseEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e {
            LeaseEvent::Waiting { id, .. } => format!("waiting {id}"),
            LeaseEvent::Granted { lease } => format!("granted {} #{}", lease.id, lease.token),
            LeaseEvent::Renewed { id, .. } => format!("renewed {id}"),
            LeaseEvent::Warning { id, .. } => format!("warning {id}"),
            LeaseEvent::Expired { id, token } => format!("expired {id} #{token}"),
            LeaseEvent::Released { id, token } => format!("released {id} #{token}"),
            LeaseEvent::Revoked { id, token } => format!("revoked {id} #{token}"),
            LeaseEvent::Cancelled { id } => format!("cancelled {id}"),
            LeaseEvent::Refused { id, .. } => format!("refused {id}"),
        })
        .collect()
}

fn ok_kinds(result: Result<Vec<LeaseEvent>, LeaseError>) -> Vec<String> {
    kinds(&result.expect("operation succeeds"))
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

#[test]
fn grant_immediately() {
    let mut s = Script::new();
    let events = s.request(build("a", &[("hosts", 1)])).expect("granted");
    let [LeaseEvent::Granted { lease }] = events.as_slice() else { panic!("one grant expected: {events:?}") };
    assert_eq!(lease.units, vec![("hosts".to_owned(), vec!["host-a".to_owned()])]);
    assert_eq!(lease.token, 1);
    assert_eq!(lease.expires_at, secs(60));
    assert_eq!(s.holder_of("hosts", "host-a").as_deref(), Some("a"));
    assert_eq!(s.free("hosts"), 1);
    s.snapshot("lease_grant_immediately");
}

#[test]
fn wait_then_grant_on_release() {
    let mut s = Script::new();
    assert_eq!(ok_kinds(s.request(build("a", &[("hosts", 2)]))), ["granted a #1"]);
    assert_eq!(ok_kinds(s.request(build("b", &[("hosts", 1)]))), ["waiting b"]);
    assert_eq!(s.positions("b"), pos(&[("hosts", 0)]));
    assert_eq!(ok_kinds(s.at(secs(10)).release("a", 1)), ["released a #1", "granted b #2"]);
    assert_eq!(s.positions("b"), None);
    assert_eq!(s.table.lease(&id("b")).map(|l| l.expires_at), Some(secs(70)));
    s.snapshot("lease_wait_then_grant_on_release");
}

#[test]
fn all_or_nothing_across_two_pools() {
    let mut s = Script::new();
    s.request(build("a", &[("hosts", 2)])).expect("granted");
    // Both boards are free, but b also needs a host: it holds nothing while it waits.
    assert_eq!(ok_kinds(s.request(build("b", &[("hosts", 1), ("boards", 2)]))), ["waiting b"]);
    assert_eq!(s.free("boards"), 2);
    assert_eq!(s.holder_of("boards", "board-1"), None);
    // c would fit on a board now, but b is ahead of it in the boards queue.
    assert_eq!(ok_kinds(s.request(build("c", &[("boards", 1)]))), ["waiting c"]);
    assert_eq!(s.positions("c"), pos(&[("boards", 1)]));
    assert_eq!(ok_kinds(s.at(secs(5)).release("a", 1)), ["released a #1", "granted b #2"]);
    assert_eq!(s.holder_of("hosts", "host-a").as_deref(), Some("b"));
    assert_eq!(s.holder_of("boards", "board-2").as_deref(), Some("b"));
    assert_eq!(s.positions("c"), pos(&[("boards", 0)]));
    s.snapshot("lease_all_or_nothing_across_two_pools");
}

#[test]
fn fifo_among_equal_priority() {
    let mut s = Script::new();
    s.request(build("a", &[("hosts", 2)])).expect("granted");
    for (lease, count) in [("b", 1), ("c", 1), ("d", 2), ("e", 1)] {
        assert_eq!(ok_kinds(s.request(build(lease, &[("hosts", count)]))), [format!("waiting {lease}")]);
    }
    assert_eq!(s.queue("hosts"), ["b", "c", "d", "e"]);
    assert_eq!(ok_kinds(s.at(secs(1)).release("a", 1)), ["released a #1", "granted b #2", "granted c #3"]);
    // One host is free, but d needs two and e may not overtake it.
    assert_eq!(ok_kinds(s.at(secs(2)).release("b", 2)), ["released b #2"]);
    assert_eq!(s.queue("hosts"), ["d", "e"]);
    assert_eq!(ok_kinds(s.at(secs(3)).release("c", 3)), ["released c #3", "granted d #4"]);
    assert_eq!(ok_kinds(s.at(secs(4)).release("d", 4)), ["released d #4", "granted e #5"]);
    s.snapshot("lease_fifo_among_equal_priority");
}

#[test]
fn higher_priority_goes_first() {
    let mut s = Script::new();
    s.request(build("a", &[("hosts", 2)])).expect("granted");
    s.request(build("b", &[("hosts", 1)])).expect("queued");
    s.request(build("c", &[("hosts", 1)])).expect("queued");
    assert_eq!(ok_kinds(s.request(build("urgent", &[("hosts", 1)]).with_priority(5))), ["waiting urgent"]);
    assert_eq!(s.queue("hosts"), ["urgent", "b", "c"]);
    assert_eq!(s.positions("urgent"), pos(&[("hosts", 0)]));
    assert_eq!(s.positions("c"), pos(&[("hosts", 2)]));
    assert_eq!(ok_kinds(s.at(secs(1)).release("a", 1)), ["released a #1", "granted urgent #2", "granted b #3"]);
    assert_eq!(s.queue("hosts"), ["c"]);
    s.snapshot("lease_higher_priority_goes_first");
}

#[test]
fn big_request_is_not_starved_by_small_ones() {
    let mut s = Script::new();
    s.request(build("small-1", &[("hosts", 1)])).expect("granted");
    assert_eq!(ok_kinds(s.request(build("big", &[("hosts", 2)]))), ["waiting big"]);
    // host-b is free, yet every later small request waits behind the big one.
    assert_eq!(ok_kinds(s.request(build("small-2", &[("hosts", 1)]))), ["waiting small-2"]);
    assert_eq!(ok_kinds(s.request(build("small-3", &[("hosts", 1)]))), ["waiting small-3"]);
    assert_eq!(s.holder_of("hosts", "host-b"), None);
    assert_eq!(ok_kinds(s.at(secs(1)).release("small-1", 1)), ["released small-1 #1", "granted big #2"]);
    assert_eq!(
        ok_kinds(s.at(secs(2)).release("big", 2)),
        ["released big #2", "granted small-2 #3", "granted small-3 #4"]
    );
    s.snapshot("lease_big_request_is_not_starved_by_small_ones");
}

#[test]
fn expiry_of_silent_holder_grants_next_waiter() {
    let mut s = Script::new();
    s.request(build("a", &[("boards", 2)])).expect("granted");
    s.request(build("b", &[("boards", 1)])).expect("queued");
    assert_eq!(s.table.next_wakeup(), Some(secs(60)));
    assert_eq!(ok_kinds(s.at(secs(30)).renew("a", 1)), ["renewed a"]);
    assert_eq!(s.table.next_wakeup(), Some(secs(90)));
    // a stops renewing. Nothing happens until its expiry comes.
    assert!(s.at(secs(89)).tick().is_empty());
    assert_eq!(kinds(&s.at(secs(90)).tick()), ["expired a #1", "granted b #2"]);
    assert_eq!(s.holder_of("boards", "board-1").as_deref(), Some("b"));
    assert_eq!(s.table.lease(&id("a")), None);
    s.snapshot("lease_expiry_of_silent_holder_grants_next_waiter");
}

#[test]
fn late_release_and_renewal_from_expired_holder_are_fenced() {
    let mut s = Script::new();
    s.request(build("a", &[("hosts", 1)])).expect("granted");
    // At its expiry the lease is dead even before the tick removes it.
    let late = s.at(secs(60)).renew("a", 1);
    assert_eq!(late, Err(LeaseError::Fenced { id: id("a"), token: 1 }));
    assert_eq!(kinds(&s.tick()), ["expired a #1"]);
    // The same id is requested again and gets a new token.
    assert_eq!(ok_kinds(s.at(secs(61)).request(build("a", &[("hosts", 1)]))), ["granted a #2"]);
    // The old holder wakes up: its renewal and release are refused, and the new lease stands.
    assert_eq!(s.renew("a", 1), Err(LeaseError::Fenced { id: id("a"), token: 1 }));
    assert_eq!(s.release("a", 1), Err(LeaseError::Fenced { id: id("a"), token: 1 }));
    assert_eq!(s.table.lease(&id("a")).map(|l| l.token), Some(2));
    assert_eq!(s.holder_of("hosts", "host-a").as_deref(), Some("a"));
    // A token that was never issued is refused too.
    assert_eq!(s.renew("a", 99), Err(LeaseError::Fenced { id: id("a"), token: 99 }));
    assert_eq!(ok_kinds(s.at(secs(62)).release("a", 2)), ["released a #2"]);
    // Even with no live lease under the id, the expired token stays refused.
    assert_eq!(s.release("a", 1), Err(LeaseError::Fenced { id: id("a"), token: 1 }));
    s.snapshot("lease_late_release_and_renewal_from_expired_holder_are_fenced");
}

#[test]
fn release_is_idempotent() {
    let mut s = Script::new();
    s.request(build("a", &[("hosts", 2)])).expect("granted");
    s.request(build("b", &[("hosts", 2)])).expect("queued");
    assert_eq!(ok_kinds(s.at(secs(1)).release("a", 1)), ["released a #1", "granted b #2"]);
    // The retried release changes nothing and says nothing.
    assert_eq!(s.release("a", 1), Ok(vec![]));
    assert_eq!(s.release("a", 1), Ok(vec![]));
    // It is still recognised after the id was granted again.
    s.request(build("a", &[("boards", 1)])).expect("granted");
    assert_eq!(s.at(secs(2)).release("a", 1), Ok(vec![]));
    assert_eq!(s.table.lease(&id("a")).map(|l| l.token), Some(3));
    // A revoked lease is not released by its holder: a release after it is fenced.
    s.revoke("b").expect("revoked");
    assert_eq!(s.release("b", 2), Err(LeaseError::Fenced { id: id("b"), token: 2 }));
    let ended: Vec<(String, u64, EndKind)> = s.table.ended().map(|e| (e.id.to_string(), e.token, e.how)).collect();
    assert_eq!(ended, [("a".to_owned(), 1, EndKind::Released), ("b".to_owned(), 2, EndKind::Revoked)]);
    s.snapshot("lease_release_is_idempotent");
}

#[test]
fn person_lease_with_deadline_and_warning() {
    let mut s = Script::new();
    let hour = mins(60);
    let request = Request::new("person-alice-1", Holder::person("alice"), wants(&[("boards", 1)]), hour)
        .with_deadline(Timestamp::ZERO + 2 * hour, Some(mins(15)))
        .with_reason("flashing firmware by hand");
    assert_eq!(ok_kinds(s.request(request)), ["granted person-alice-1 #1"]);
    let alice = id("person-alice-1");
    assert_eq!(s.table.next_wakeup(), Some(Timestamp::ZERO + hour));
    s.at(Timestamp::ZERO + mins(59)).renew("person-alice-1", 1).expect("renewed");
    // The warning at 1h45m now comes before the expiry at 1h59m.
    assert_eq!(s.table.next_wakeup(), Some(Timestamp::ZERO + mins(105)));
    assert_eq!(kinds(&s.at(Timestamp::ZERO + mins(105)).tick()), ["warning person-alice-1"]);
    // Once only.
    assert!(s.at(Timestamp::ZERO + mins(110)).tick().is_empty());
    // Renewal cannot go past the deadline.
    let renewed = s.at(Timestamp::ZERO + mins(115)).renew("person-alice-1", 1).expect("renewed");
    assert_eq!(renewed, [LeaseEvent::Renewed { id: alice.clone(), token: 1, expires_at: Timestamp::ZERO + 2 * hour }]);
    assert_eq!(s.table.next_wakeup(), Some(Timestamp::ZERO + 2 * hour));
    assert_eq!(kinds(&s.at(Timestamp::ZERO + 2 * hour).tick()), ["expired person-alice-1 #1"]);
    assert_eq!(s.table.next_wakeup(), None);
    s.snapshot("lease_person_lease_with_deadline_and_warning");
}

#[test]
fn person_lease_granted_inside_warning_window_is_warned_at_once() {
    let mut s = Script::new();
    s.request(build("a", &[("boards", 2)])).expect("granted");
    let request = Request::new("person-bob-1", Holder::person("bob"), wants(&[("boards", 1)]), mins(60))
        .with_deadline(secs(100), Some(Duration::from_secs(50)));
    assert_eq!(ok_kinds(s.request(request)), ["waiting person-bob-1"]);
    assert_eq!(
        ok_kinds(s.at(secs(70)).release("a", 1)),
        ["released a #1", "granted person-bob-1 #2", "warning person-bob-1"]
    );
    assert!(s.at(secs(80)).tick().is_empty());
    assert_eq!(s.table.next_wakeup(), Some(secs(100)));
    s.snapshot("lease_person_lease_granted_inside_warning_window_is_warned_at_once");
}

#[test]
fn cancel_waiting() {
    let mut s = Script::new();
    s.request(build("a", &[("hosts", 1)])).expect("granted");
    s.request(build("big", &[("hosts", 2)])).expect("queued");
    s.request(build("small", &[("hosts", 1)])).expect("queued");
    assert_eq!(s.positions("small"), pos(&[("hosts", 1)]));
    // Withdrawing the big request lets the small one through at once.
    assert_eq!(kinds(&s.at(secs(1)).cancel("big")), ["cancelled big", "granted small #2"]);
    // Cancelling again, or cancelling a granted or unknown request, does nothing.
    assert!(s.cancel("big").is_empty());
    assert!(s.cancel("small").is_empty());
    assert!(s.cancel("nobody").is_empty());
    assert_eq!(s.table.lease(&id("small")).map(|l| l.token), Some(2));
    s.snapshot("lease_cancel_waiting");
}

#[test]
fn revoke() {
    let mut s = Script::new();
    s.request(build("a", &[("deploys", 2)])).expect("granted");
    s.request(build("b", &[("deploys", 1)])).expect("queued");
    assert_eq!(ok_kinds(s.at(secs(5)).revoke("a")), ["revoked a #1", "granted b #2"]);
    assert_eq!(s.revoke("a"), Err(LeaseError::NotFound { id: id("a") }));
    assert_eq!(s.renew("a", 1), Err(LeaseError::Fenced { id: id("a"), token: 1 }));
    assert_eq!(s.release("a", 1), Err(LeaseError::Fenced { id: id("a"), token: 1 }));
    // A waiting request is not a lease: administrators cancel it instead.
    s.request(build("c", &[("deploys", 2)])).expect("queued");
    assert_eq!(s.revoke("c"), Err(LeaseError::NotFound { id: id("c") }));
    s.snapshot("lease_revoke");
}

#[test]
fn positions_at_every_step() {
    let mut s = Script::new();
    s.request(build("a", &[("hosts", 2), ("boards", 2)])).expect("granted");

    s.request(build("b", &[("hosts", 1)])).expect("queued");
    assert_eq!(s.positions("b"), pos(&[("hosts", 0)]));

    s.request(build("c", &[("boards", 1)])).expect("queued");
    assert_eq!(s.positions("b"), pos(&[("hosts", 0)]));
    assert_eq!(s.positions("c"), pos(&[("boards", 0)]));

    s.request(build("d", &[("hosts", 1), ("boards", 1)])).expect("queued");
    assert_eq!(s.positions("b"), pos(&[("hosts", 0)]));
    assert_eq!(s.positions("c"), pos(&[("boards", 0)]));
    assert_eq!(s.positions("d"), pos(&[("hosts", 1), ("boards", 1)]));

    s.request(build("e", &[("boards", 2)]).with_priority(1)).expect("queued");
    assert_eq!(s.positions("b"), pos(&[("hosts", 0)]));
    assert_eq!(s.positions("c"), pos(&[("boards", 1)]));
    assert_eq!(s.positions("d"), pos(&[("hosts", 1), ("boards", 2)]));
    assert_eq!(s.positions("e"), pos(&[("boards", 0)]));
    assert_eq!(s.queue("boards"), ["e", "c", "d"]);
    assert_eq!(s.queue("hosts"), ["b", "d"]);

    // e takes both boards and b a host; c waits for a board, and d waits behind c even though
    // host-b is free, since it needs a board too.
    assert_eq!(ok_kinds(s.at(secs(1)).release("a", 1)), ["released a #1", "granted e #2", "granted b #3"]);
    assert_eq!(s.positions("c"), pos(&[("boards", 0)]));
    assert_eq!(s.positions("d"), pos(&[("hosts", 0), ("boards", 1)]));

    s.at(secs(2)).cancel("c");
    assert_eq!(s.positions("d"), pos(&[("hosts", 0), ("boards", 0)]));

    assert_eq!(ok_kinds(s.at(secs(3)).release("e", 2)), ["released e #2", "granted d #4"]);
    assert_eq!(s.positions("d"), None);
    assert!(s.table.waiting().is_empty());
    s.snapshot("lease_positions_at_every_step");
}

#[test]
fn counting_pool() {
    let mut s = Script::new();
    assert_eq!(ok_kinds(s.request(build("a", &[("deploys", 1)]))), ["granted a #1"]);
    assert_eq!(ok_kinds(s.request(build("b", &[("deploys", 1)]))), ["granted b #2"]);
    assert_eq!(s.holder_of("deploys", "slot-1").as_deref(), Some("b"));
    assert_eq!(ok_kinds(s.request(build("c", &[("deploys", 2)]))), ["waiting c"]);
    assert_eq!(ok_kinds(s.at(secs(1)).release("a", 1)), ["released a #1"]);
    // slot-0 is free, but c is first in line for two slots.
    assert_eq!(ok_kinds(s.request(build("d", &[("deploys", 1)]))), ["waiting d"]);
    assert_eq!(s.positions("d"), pos(&[("deploys", 1)]));
    assert_eq!(ok_kinds(s.at(secs(2)).release("b", 2)), ["released b #2", "granted c #3"]);
    let status = s.table.pool_status("deploys").expect("pool");
    assert!(status.counting);
    assert_eq!((status.capacity, status.free, status.held), (2, 0, 2));
    assert_eq!(s.queue("deploys"), ["d"]);
    s.snapshot("lease_counting_pool");
}

#[test]
fn impossible_requests_are_refused_and_change_nothing() {
    let mut s = Script::new();
    s.request(build("a", &[("hosts", 2)])).expect("granted");
    s.request(build("b", &[("hosts", 1)])).expect("queued");
    let before = s.table.clone();

    let refusals = [
        (build("c", &[("gpus", 1)]), LeaseError::UnknownPool { pool: "gpus".into() }),
        (
            build("c", &[("boards", 1), ("hosts", 3)]),
            LeaseError::ExceedsCapacity { pool: "hosts".into(), requested: 3, capacity: 2 },
        ),
        // Wants on the same pool add up.
        (
            build("c", &[("deploys", 1), ("deploys", 2)]),
            LeaseError::ExceedsCapacity { pool: "deploys".into(), requested: 3, capacity: 2 },
        ),
        (build("c", &[("boards", 0)]), LeaseError::ZeroCount { pool: "boards".into() }),
        (build("a", &[("boards", 1)]), LeaseError::DuplicateId { id: id("a") }),
        (build("b", &[("boards", 1)]), LeaseError::DuplicateId { id: id("b") }),
        (
            build("c", &[("boards", 1)]).with_deadline(secs(10), None),
            LeaseError::DeadlinePassed { id: id("c"), deadline: secs(10) },
        ),
    ];
    s.at(secs(10));
    for (request, error) in refusals {
        assert_eq!(s.request(request), Err(error));
    }
    assert_eq!(s.table, before);
    assert_eq!(
        LeaseTable::new(vec![PoolConfig::counting("x", 1), PoolConfig::counting("x", 2)]),
        Err(LeaseError::DuplicatePool { pool: "x".into() })
    );
    assert_eq!(
        LeaseTable::new(vec![PoolConfig::units("x", [Unit::new("u"), Unit::new("u")])]),
        Err(LeaseError::DuplicateUnit { pool: "x".into(), unit: "u".into() })
    );
    s.snapshot("lease_impossible_requests_are_refused_and_change_nothing");
}

#[test]
fn next_wakeup() {
    let mut s = Script::new();
    assert_eq!(s.table.next_wakeup(), None);
    s.request(build("a", &[("boards", 2)])).expect("granted");
    assert_eq!(s.table.next_wakeup(), Some(secs(60)));
    let person = Request::new("person-carol-1", Holder::person("carol"), wants(&[("hosts", 1)]), mins(60))
        .with_deadline(secs(40), Some(Duration::from_secs(10)));
    s.request(person).expect("granted");
    // The warning is due at 30 s, before anything else.
    assert_eq!(s.table.next_wakeup(), Some(secs(30)));
    let hurried = Request::new("person-dave-1", Holder::person("dave"), wants(&[("boards", 1)]), mins(60))
        .with_deadline(secs(20), None);
    s.request(hurried).expect("queued");
    // A waiting request's deadline counts too: it is refused then.
    assert_eq!(s.table.next_wakeup(), Some(secs(20)));
    assert_eq!(kinds(&s.at(secs(20)).tick()), ["refused person-dave-1"]);
    assert_eq!(s.table.next_wakeup(), Some(secs(30)));
    assert_eq!(kinds(&s.at(secs(30)).tick()), ["warning person-carol-1"]);
    assert_eq!(s.table.next_wakeup(), Some(secs(40)));
    assert_eq!(kinds(&s.at(secs(40)).tick()), ["expired person-carol-1 #2"]);
    assert_eq!(s.table.next_wakeup(), Some(secs(60)));
    // An overdue tick shows as a wakeup in the past.
    s.at(secs(75));
    assert_eq!(s.table.next_wakeup(), Some(secs(60)));
    assert_eq!(kinds(&s.tick()), ["expired a #1"]);
    assert_eq!(s.table.next_wakeup(), None);
    s.snapshot("lease_next_wakeup");
}

#[test]
fn configure_retires_held_units_until_released() {
    let mut s = Script::new();
    s.request(build("a", &[("hosts", 1)])).expect("granted");
    s.request(build("b", &[("boards", 1)])).expect("granted");
    s.request(build("c", &[("deploys", 2)])).expect("granted");
    s.request(build("wide", &[("hosts", 2)])).expect("queued");
    s.request(build("board-user", &[("boards", 1)]).with_priority(1)).expect("granted");
    s.request(build("late-board-user", &[("boards", 1)])).expect("queued");

    // host-a leaves and host-c arrives; the boards pool goes away; deploys shrinks to 1.
    let events = s
        .at(secs(1))
        .configure(vec![
            PoolConfig::units("hosts", [Unit::new("host-b"), Unit::new("host-c").with_meta("arch", "riscv64")]),
            PoolConfig::counting("deploys", 1),
        ])
        .expect("configured");
    assert_eq!(kinds(&events), ["refused late-board-user", "granted wide #5"]);

    let hosts = s.table.pool_status("hosts").expect("hosts");
    assert_eq!((hosts.capacity, hosts.free, hosts.held), (2, 0, 3));
    let retired: Vec<(&str, bool)> = hosts.units.iter().map(|u| (u.name.as_str(), u.retired)).collect();
    assert_eq!(retired, [("host-b", false), ("host-c", false), ("host-a", true)]);
    let boards = s.table.pool_status("boards").expect("boards lingers while held");
    assert!(!boards.configured);
    assert_eq!(s.request(build("d", &[("boards", 1)])), Err(LeaseError::UnknownPool { pool: "boards".into() }));

    // Released retired units disappear, and the removed pool with its last unit.
    assert_eq!(ok_kinds(s.at(secs(2)).release("a", 1)), ["released a #1"]);
    assert_eq!(s.table.pool_status("hosts").map(|p| p.units.len()), Some(2));
    s.release("b", 2).expect("released");
    s.release("board-user", 4).expect("released");
    assert_eq!(s.table.pool_status("boards"), None);
    assert_eq!(s.table.pools().collect::<Vec<_>>(), ["deploys", "hosts"]);

    // c still holds slot-0 and the retired slot-1; the one configured slot frees with them.
    let deploys = s.table.pool_status("deploys").expect("deploys");
    assert_eq!((deploys.capacity, deploys.free, deploys.held), (1, 0, 2));
    s.request(build("e", &[("deploys", 1)])).expect("queued");
    assert_eq!(ok_kinds(s.at(secs(3)).release("c", 3)), ["released c #3", "granted e #6"]);
    let deploys = s.table.pool_status("deploys").expect("deploys");
    assert_eq!((deploys.capacity, deploys.free, deploys.held, deploys.units.len()), (1, 0, 1, 1));
    s.snapshot("lease_configure_retires_held_units_until_released");
}

#[test]
fn pool_status_shows_holders_and_metadata() {
    let mut s = Script::new();
    s.request(build("a", &[("hosts", 1)])).expect("granted");
    s.request(build("b", &[("hosts", 2)])).expect("queued");
    let status = s.table.pool_status("hosts").expect("hosts");
    insta::with_settings!({ omit_expression => true, prepend_module_to_snapshot => false }, {
        insta::assert_yaml_snapshot!("lease_pool_status_shows_holders_and_metadata", status);
    });
}

#[test]
fn serde_round_trip_mid_scenario() {
    let mut live = Script::new();
    live.request(build("a", &[("hosts", 2)])).expect("granted");
    live.request(build("b", &[("hosts", 1), ("boards", 1)])).expect("queued");
    let person = Request::new("person-erin-1", Holder::person("erin"), wants(&[("boards", 1)]), mins(10))
        .with_deadline(Timestamp::ZERO + mins(30), Some(mins(5)));
    live.request(person).expect("granted");
    live.request(build("c", &[("deploys", 2)]).with_priority(2)).expect("granted");
    live.at(secs(30)).release("a", 1).expect("released");

    let json = serde_json::to_string(&live.table).expect("serializes");
    let mut rebuilt: LeaseTable = serde_json::from_str(&json).expect("deserializes");
    assert_eq!(rebuilt, live.table);

    // Both tables take the same operations and must say the same things.
    type Op = Box<dyn Fn(&mut LeaseTable) -> Result<Vec<LeaseEvent>, LeaseError>>;
    let ops: Vec<Op> = vec![
        Box::new(|t| t.request(build("d", &[("hosts", 2)]), secs(31))),
        Box::new(|t| t.renew(&id("person-erin-1"), 3, secs(40))),
        Box::new(|t| Ok(t.tick(Timestamp::ZERO + mins(25)))),
        Box::new(|t| t.release(&id("a"), 1, Timestamp::ZERO + mins(25))),
        Box::new(|t| t.release(&id("b"), 5, Timestamp::ZERO + mins(26))),
        Box::new(|t| Ok(t.tick(Timestamp::ZERO + mins(40)))),
        Box::new(|t| Ok(t.tick(Timestamp::ZERO + mins(60)))),
    ];
    for op in ops {
        let expected = op(&mut live.table);
        assert_eq!(op(&mut rebuilt), expected);
        assert_eq!(rebuilt, live.table);
    }
    assert!(live.table.leases().next().is_none());
}

// ---------------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------------

/// Pool names in the property tests; the last one is never configured.
const POOLS: [&str; 4] = ["hosts", "boards", "slots", "nope"];
const CAPACITY: [u32; 3] = [3, 2, 4];
/// A handful of ids, so that duplicates, re-requests and stale tokens are common.
const IDS: usize = 6;

fn prop_pools() -> Vec<PoolConfig> {
    vec![
        PoolConfig::units("hosts", (0..3).map(|i| Unit::new(format!("h{i}")))),
        PoolConfig::units("boards", (0..2).map(|i| Unit::new(format!("b{i}")))),
        PoolConfig::counting("slots", 4),
    ]
}

#[derive(Debug, Clone)]
enum TokenPick {
    /// The token of the live lease with that id, or the id's last token when none is live.
    Current,
    /// One of the tokens ever issued for that id.
    Stale(usize),
    /// Any number at all, mostly never issued.
    Raw(u64),
}

#[derive(Debug, Clone)]
enum Op {
    Request {
        id: usize,
        person: bool,
        wants: Vec<(usize, u32)>,
        priority: i32,
        ttl_ms: u64,
        deadline: Option<(u64, Option<u64>)>,
        dt: u64,
    },
    Renew {
        id: usize,
        token: TokenPick,
        dt: u64,
    },
    Release {
        id: usize,
        token: TokenPick,
        dt: u64,
    },
    Cancel {
        id: usize,
        dt: u64,
    },
    Revoke {
        id: usize,
        dt: u64,
    },
    Tick {
        dt: u64,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let pool = prop_oneof![20 => 0usize..3, 1 => Just(3usize)];
    let count = prop_oneof![16 => 1u32..=2, 1 => 0u32..=5];
    let want = (pool, count);
    let request = (
        0..IDS,
        any::<bool>(),
        prop::collection::vec(want, 1..=3),
        0i32..3,
        100u64..=2000,
        prop::option::of((100u64..=1500, prop::option::of(0u64..=300))),
        0u64..=30,
    )
        .prop_map(|(id, person, wants, priority, ttl_ms, deadline, dt)| Op::Request {
            id,
            person,
            wants,
            priority,
            ttl_ms,
            deadline,
            dt,
        });
    let token = || {
        prop_oneof![
            3 => Just(TokenPick::Current),
            2 => (0usize..16).prop_map(TokenPick::Stale),
            1 => (0u64..40).prop_map(TokenPick::Raw),
        ]
    };
    prop_oneof![
        4 => request,
        2 => (0..IDS, token(), 0u64..=30).prop_map(|(id, token, dt)| Op::Renew { id, token, dt }),
        2 => (0..IDS, token(), 0u64..=30).prop_map(|(id, token, dt)| Op::Release { id, token, dt }),
        1 => (0..IDS, 0u64..=30).prop_map(|(id, dt)| Op::Cancel { id, dt }),
        1 => (0..IDS, 0u64..=30).prop_map(|(id, dt)| Op::Revoke { id, dt }),
        3 => (0u64..=300).prop_map(|dt| Op::Tick { dt }),
    ]
}

/// A request as the model remembers it while it waits.
#[derive(Debug, Clone)]
struct ModelWaiter {
    id: LeaseId,
    seq: u64,
    priority: i32,
    /// Merged wants, in order of first mention.
    wants: Vec<(String, u32)>,
    deadline: Option<Timestamp>,
}

#[derive(Debug, Clone)]
struct ModelLease {
    token: u64,
    wants: Vec<(String, u32)>,
    ttl: Duration,
    expires_at: Timestamp,
    deadline: Option<Timestamp>,
    warn_at: Option<Timestamp>,
    warned: bool,
    granted_at: Timestamp,
}

/// What the table should look like, rebuilt independently from the operations and the events
/// the table emitted, and the checks that compare the two.
struct Model {
    now: Timestamp,
    next_seq: u64,
    /// In the global order: priority descending, then arrival.
    waiting: Vec<ModelWaiter>,
    live: BTreeMap<LeaseId, ModelLease>,
    /// Every token granted, with its id, in grant order.
    issued: Vec<(LeaseId, u64)>,
    /// Tokens whose lease ended by release, which the table must keep recognising.
    released: BTreeSet<(LeaseId, u64)>,
    /// Every token whose lease ended, once per end.
    ended: Vec<u64>,
}

impl Model {
    fn new() -> Self {
        Model {
            now: Timestamp::ZERO,
            next_seq: 0,
            waiting: Vec::new(),
            live: BTreeMap::new(),
            issued: Vec::new(),
            released: BTreeSet::new(),
            ended: Vec::new(),
        }
    }

    fn pick_token(&self, id: &LeaseId, pick: &TokenPick) -> u64 {
        let own: Vec<u64> = self.issued.iter().filter(|(i, _)| i == id).map(|(_, t)| *t).collect();
        match pick {
            TokenPick::Current => self.live.get(id).map(|l| l.token).or(own.last().copied()).unwrap_or(0),
            TokenPick::Stale(k) if own.is_empty() => *k as u64,
            TokenPick::Stale(k) => own[k % own.len()],
            TokenPick::Raw(t) => *t,
        }
    }

    /// Applies the events of one operation to the model, checking each one as it goes.
    /// `arriving` is the request that this operation made, which has no model entry yet.
    fn absorb(&mut self, events: &[LeaseEvent], arriving: Option<&ModelWaiter>) -> Result<(), TestCaseError> {
        for event in events {
            match event {
                LeaseEvent::Waiting { id, positions } => {
                    let new = arriving.filter(|a| &a.id == id).ok_or_else(|| fail("waiting for an old request"))?;
                    let at = self.waiting.partition_point(|w| w.priority >= new.priority);
                    self.waiting.insert(at, new.clone());
                    prop_assert_eq!(positions.clone(), self.positions(id).unwrap_or_default());
                }
                LeaseEvent::Granted { lease } => {
                    let (waiter, was_waiting) = match self.waiting.iter().position(|w| w.id == lease.id) {
                        Some(at) => (self.waiting.remove(at), true),
                        None => (
                            arriving.filter(|a| a.id == lease.id).ok_or_else(|| fail("grant from nowhere"))?.clone(),
                            false,
                        ),
                    };
                    // First come, first served: nobody still waiting who arrived earlier with an
                    // equal or higher priority shares a pool with the granted request.
                    for other in &self.waiting {
                        let shares = other.wants.iter().any(|(p, _)| waiter.wants.iter().any(|(q, _)| p == q));
                        let ahead = other.priority > waiter.priority
                            || (other.priority == waiter.priority && (!was_waiting || other.seq < waiter.seq));
                        prop_assert!(!(shares && ahead), "{} overtook {}", lease.id, other.id);
                    }
                    prop_assert!(self.issued.last().is_none_or(|(_, t)| *t < lease.token), "tokens only grow");
                    prop_assert!(!self.live.contains_key(&lease.id));
                    let granted: Vec<(String, u32)> =
                        lease.units.iter().map(|(p, names)| (p.clone(), names.len() as u32)).collect();
                    prop_assert_eq!(&granted, &waiter.wants, "all or nothing, exactly as asked");
                    prop_assert_eq!(lease.granted_at, self.now);
                    prop_assert!(waiter.deadline.is_none_or(|d| d > self.now), "no lease dead on arrival");
                    self.issued.push((lease.id.clone(), lease.token));
                    self.live.insert(
                        lease.id.clone(),
                        ModelLease {
                            token: lease.token,
                            wants: waiter.wants,
                            ttl: lease.ttl,
                            expires_at: lease.expires_at,
                            deadline: lease.deadline,
                            warn_at: lease.warn_at,
                            warned: false,
                            granted_at: lease.granted_at,
                        },
                    );
                }
                LeaseEvent::Renewed { id, token, expires_at } => {
                    let live = self.live.get_mut(id).ok_or_else(|| fail("renewed a dead lease"))?;
                    prop_assert_eq!(live.token, *token);
                    live.expires_at = *expires_at;
                }
                LeaseEvent::Warning { id, token, deadline } => {
                    let live = self.live.get_mut(id).ok_or_else(|| fail("warned a dead lease"))?;
                    prop_assert_eq!(live.token, *token);
                    prop_assert_eq!(Some(*deadline), live.deadline);
                    prop_assert!(!live.warned, "warned twice");
                    prop_assert!(live.warn_at.is_some_and(|w| w <= self.now));
                    live.warned = true;
                }
                LeaseEvent::Expired { id, token }
                | LeaseEvent::Released { id, token }
                | LeaseEvent::Revoked { id, token } => {
                    let live = self.live.remove(id).ok_or_else(|| fail("ended a dead lease"))?;
                    prop_assert_eq!(live.token, *token);
                    if matches!(event, LeaseEvent::Released { .. }) {
                        self.released.insert((id.clone(), *token));
                    }
                    self.ended.push(*token);
                }
                LeaseEvent::Cancelled { id } | LeaseEvent::Refused { id, .. } => {
                    let at = self.waiting.iter().position(|w| &w.id == id).ok_or_else(|| fail("not waiting"))?;
                    self.waiting.remove(at);
                }
            }
        }
        Ok(())
    }

    fn positions(&self, id: &LeaseId) -> Option<Vec<(String, usize)>> {
        let at = self.waiting.iter().position(|w| &w.id == id)?;
        let me = &self.waiting[at];
        Some(
            me.wants
                .iter()
                .map(|(pool, _)| {
                    let ahead = self.waiting[..at].iter().filter(|w| w.wants.iter().any(|(p, _)| p == pool)).count();
                    (pool.clone(), ahead)
                })
                .collect(),
        )
    }

    /// Checks every invariant of the table against itself and against the model.
    fn check(&self, table: &LeaseTable) -> Result<(), TestCaseError> {
        // The same leases with the same tokens and expiries, and the same queue in the same order.
        let leases: Vec<(LeaseId, u64, Timestamp)> =
            table.leases().map(|l| (l.id.clone(), l.token, l.expires_at)).collect();
        let modelled: Vec<(LeaseId, u64, Timestamp)> =
            self.live.iter().map(|(id, l)| (id.clone(), l.token, l.expires_at)).collect();
        prop_assert_eq!(leases, modelled);
        let waiting: Vec<&LeaseId> = table.waiting().iter().map(|w| &w.request.id).collect();
        let modelled: Vec<&LeaseId> = self.waiting.iter().map(|w| &w.id).collect();
        prop_assert_eq!(waiting, modelled);
        for w in &self.waiting {
            prop_assert_eq!(table.position(&w.id), self.positions(&w.id));
        }

        // No unit is held twice, and every held unit is held by a live lease that lists it.
        let mut held: BTreeMap<(String, String), LeaseId> = BTreeMap::new();
        for lease in table.leases() {
            for (pool, units) in &lease.units {
                for unit in units {
                    let previous = held.insert((pool.clone(), unit.clone()), lease.id.clone());
                    prop_assert!(previous.is_none(), "{pool}/{unit} held twice");
                }
            }
        }
        let mut free: BTreeMap<&str, u32> = BTreeMap::new();
        for (i, pool) in POOLS[..3].iter().enumerate() {
            let status = table.pool_status(pool).ok_or_else(|| fail("pool lost"))?;
            prop_assert_eq!(status.capacity, CAPACITY[i]);
            prop_assert_eq!(status.units.len() as u32, CAPACITY[i], "no unit lost or invented");
            prop_assert!(status.held <= status.capacity);
            prop_assert_eq!(status.free + status.held, status.capacity);
            let mut held_here = 0;
            for unit in &status.units {
                let expected = held.get(&((*pool).to_owned(), unit.name.clone()));
                prop_assert_eq!(unit.held_by.as_ref().map(|h| &h.lease), expected, "{}/{}", pool, &unit.name);
                held_here += u32::from(expected.is_some());
            }
            prop_assert_eq!(held_here, status.held, "every unit is free or held, by exactly the leases");
            free.insert(pool, status.free);
        }
        prop_assert_eq!(
            held.len(),
            self.live.values().map(|l| l.wants.iter().map(|(_, c)| *c as usize).sum::<usize>()).sum::<usize>()
        );

        // Nobody waits who could be served: a scan by the queueing rule grants no one.
        let mut blocked: BTreeSet<&str> = BTreeSet::new();
        for w in &self.waiting {
            let alive = w.deadline.is_none_or(|d| d > self.now);
            let fits = w.wants.iter().all(|(p, c)| !blocked.contains(p.as_str()) && free[p.as_str()] >= *c);
            prop_assert!(!(alive && fits), "{} could be granted but waits", w.id);
            blocked.extend(w.wants.iter().map(|(p, _)| p.as_str()));
        }

        // A lease granted inside its warning window was warned with its grant.
        let late = self.live.values().all(|l| l.warned || l.warn_at.is_none_or(|w| w > l.granted_at));
        prop_assert!(late, "a lease granted inside its warning window is warned at once");

        let wakeups =
            self.live.values().flat_map(|l| [Some(l.expires_at), l.deadline, l.warn_at.filter(|_| !l.warned)]);
        let expected = wakeups.chain(self.waiting.iter().map(|w| w.deadline)).flatten().min();
        prop_assert_eq!(table.next_wakeup(), expected);
        Ok(())
    }
}

fn fail(message: &str) -> TestCaseError {
    TestCaseError::fail(message.to_owned())
}

fn lease_id(i: usize) -> LeaseId {
    LeaseId(format!("r{i}"))
}

/// An operation with its id, token and time worked out, so that it can be applied to two tables.
#[derive(Debug, Clone)]
enum Resolved {
    Request(Request),
    Renew(LeaseId, u64),
    Release(LeaseId, u64),
    Cancel(LeaseId),
    Revoke(LeaseId),
    Tick,
}

fn apply(table: &mut LeaseTable, op: &Resolved, now: Timestamp) -> Result<Vec<LeaseEvent>, LeaseError> {
    match op {
        Resolved::Request(request) => table.request(request.clone(), now),
        Resolved::Renew(id, token) => table.renew(id, *token, now),
        Resolved::Release(id, token) => table.release(id, *token, now),
        Resolved::Cancel(id) => Ok(table.cancel(id, now)),
        Resolved::Revoke(id) => table.revoke(id, now),
        Resolved::Tick => Ok(table.tick(now)),
    }
}

/// Turns a generated operation into a concrete one, advancing the model's clock.
fn resolve(model: &mut Model, op: &Op) -> Resolved {
    let dt = match op {
        Op::Request { dt, .. }
        | Op::Renew { dt, .. }
        | Op::Release { dt, .. }
        | Op::Cancel { dt, .. }
        | Op::Revoke { dt, .. }
        | Op::Tick { dt } => *dt,
    };
    model.now = model.now + Duration::from_millis(dt);
    match op {
        Op::Request { id, person, wants, priority, ttl_ms, deadline, .. } => {
            let id = lease_id(*id);
            let holder =
                if *person { Holder::person(format!("p-{id}")) } else { Holder::build("b", Some(id.as_str())) };
            let list: Vec<Want> = wants.iter().map(|(p, c)| Want::new(POOLS[*p], *c)).collect();
            let mut request = Request::new(id, holder, list, Duration::from_millis(*ttl_ms)).with_priority(*priority);
            // Only people's leases have deadlines, as in the engine.
            if *person && let Some((until, warn)) = deadline {
                request =
                    request.with_deadline(model.now + Duration::from_millis(*until), warn.map(Duration::from_millis));
            }
            Resolved::Request(request)
        }
        Op::Renew { id, token, .. } => {
            let id = lease_id(*id);
            let token = model.pick_token(&id, token);
            Resolved::Renew(id, token)
        }
        Op::Release { id, token, .. } => {
            let id = lease_id(*id);
            let token = model.pick_token(&id, token);
            Resolved::Release(id, token)
        }
        Op::Cancel { id, .. } => Resolved::Cancel(lease_id(*id)),
        Op::Revoke { id, .. } => Resolved::Revoke(lease_id(*id)),
        Op::Tick { .. } => Resolved::Tick,
    }
}

/// The refusal a request deserves, if any, checked in the documented order: duplicate id, then
/// each want for an unknown pool or zero units, then the merged counts against capacity. The
/// merged wants come back too.
fn expected_refusal(model: &Model, request: &Request) -> (Option<LeaseError>, Vec<(String, u32)>) {
    let mut merged: Vec<(String, u32)> = Vec::new();
    for want in &request.wants {
        match merged.iter_mut().find(|(pool, _)| *pool == want.pool) {
            Some((_, count)) => *count += want.count,
            None => merged.push((want.pool.clone(), want.count)),
        }
    }
    let id = &request.id;
    if model.live.contains_key(id) || model.waiting.iter().any(|w| &w.id == id) {
        return (Some(LeaseError::DuplicateId { id: id.clone() }), merged);
    }
    for want in &request.wants {
        if !POOLS[..3].contains(&want.pool.as_str()) {
            return (Some(LeaseError::UnknownPool { pool: want.pool.clone() }), merged);
        }
        if want.count == 0 {
            return (Some(LeaseError::ZeroCount { pool: want.pool.clone() }), merged);
        }
    }
    for (pool, requested) in &merged {
        let capacity = POOLS.iter().position(|p| p == pool).map_or(0, |i| CAPACITY[i]);
        if *requested > capacity {
            let error = LeaseError::ExceedsCapacity { pool: pool.clone(), requested: *requested, capacity };
            return (Some(error), merged);
        }
    }
    (None, merged)
}

/// Asserts that an operation's events are its own announcement followed only by the grants
/// (and at-once warnings) that it made possible.
fn announced_then_grants(events: &[LeaseEvent], first: &LeaseEvent) -> Result<(), TestCaseError> {
    prop_assert_eq!(events.first(), Some(first));
    let only_grants = events[1..].iter().all(|e| matches!(e, LeaseEvent::Granted { .. } | LeaseEvent::Warning { .. }));
    prop_assert!(only_grants, "only grants follow: {:?}", events);
    Ok(())
}

/// Applies one resolved operation to the table, predicts its outcome from the model, checks
/// both, and returns the outcome so that a second table can be compared.
fn step(
    table: &mut LeaseTable,
    model: &mut Model,
    op: &Resolved,
) -> Result<Result<Vec<LeaseEvent>, LeaseError>, TestCaseError> {
    let now = model.now;
    let result = apply(table, op, now);
    match op {
        Resolved::Request(request) => {
            let (refusal, wants) = expected_refusal(model, request);
            match refusal {
                Some(error) => prop_assert_eq!(&result, &Err(error)),
                None => {
                    let id = &request.id;
                    let events = result.clone().map_err(|e| fail(&format!("refused: {e}")))?;
                    // A new request can only be granted or queued itself: it frees nothing.
                    let own = |e: &LeaseEvent| match e {
                        LeaseEvent::Granted { lease } => &lease.id == id,
                        LeaseEvent::Waiting { id: w, .. } | LeaseEvent::Warning { id: w, .. } => w == id,
                        _ => false,
                    };
                    prop_assert!(!events.is_empty() && events.len() <= 2 && events.iter().all(own), "{:?}", events);
                    let arriving = ModelWaiter {
                        id: id.clone(),
                        seq: model.next_seq,
                        priority: request.priority,
                        wants,
                        deadline: request.deadline,
                    };
                    model.next_seq += 1;
                    model.absorb(&events, Some(&arriving))?;
                }
            }
        }
        Resolved::Renew(id, token) => match model.live.get(id).filter(|l| l.token == *token && l.expires_at > now) {
            Some(live) => {
                let extended = now + live.ttl;
                let expires_at = live.deadline.map_or(extended, |d| extended.min(d));
                let renewed = LeaseEvent::Renewed { id: id.clone(), token: *token, expires_at };
                prop_assert_eq!(&result, &Ok(vec![renewed]));
                model.absorb(&result.clone().unwrap_or_default(), None)?;
            }
            None => prop_assert_eq!(&result, &Err(LeaseError::Fenced { id: id.clone(), token: *token })),
        },
        Resolved::Release(id, token) => {
            if model.live.get(id).is_some_and(|l| l.token == *token) {
                let events = result.clone().map_err(|e| fail(&format!("release refused: {e}")))?;
                announced_then_grants(&events, &LeaseEvent::Released { id: id.clone(), token: *token })?;
                model.absorb(&events, None)?;
            } else if model.released.contains(&(id.clone(), *token)) {
                prop_assert_eq!(&result, &Ok(vec![]), "a repeated release is idempotent");
            } else {
                prop_assert_eq!(&result, &Err(LeaseError::Fenced { id: id.clone(), token: *token }));
            }
        }
        Resolved::Cancel(id) => {
            let events = result.clone().unwrap_or_default();
            if model.waiting.iter().any(|w| &w.id == id) {
                announced_then_grants(&events, &LeaseEvent::Cancelled { id: id.clone() })?;
                model.absorb(&events, None)?;
            } else {
                prop_assert!(events.is_empty());
            }
        }
        Resolved::Revoke(id) => match model.live.get(id) {
            Some(live) => {
                let events = result.clone().map_err(|e| fail(&format!("revoke refused: {e}")))?;
                announced_then_grants(&events, &LeaseEvent::Revoked { id: id.clone(), token: live.token })?;
                model.absorb(&events, None)?;
            }
            None => prop_assert_eq!(&result, &Err(LeaseError::NotFound { id: id.clone() })),
        },
        Resolved::Tick => {
            let events = result.clone().unwrap_or_default();
            // Exactly the leases that reached their expiry end, in expiry order, first.
            let mut due: Vec<(Timestamp, u64, LeaseId)> = model
                .live
                .iter()
                .filter(|(_, l)| l.expires_at <= now || l.deadline.is_some_and(|d| d <= now))
                .map(|(id, l)| (l.expires_at, l.token, id.clone()))
                .collect();
            due.sort();
            let expired: Vec<LeaseEvent> =
                due.into_iter().map(|(_, token, id)| LeaseEvent::Expired { id, token }).collect();
            prop_assert!(events.len() >= expired.len());
            prop_assert_eq!(&events[..expired.len()], &expired[..]);
            let expired_first = events[expired.len()..].iter().all(|e| !matches!(e, LeaseEvent::Expired { .. }));
            prop_assert!(expired_first, "expiries come first: {:?}", events);
            model.absorb(&events, None)?;
            let gone = table.leases().all(|l| l.expires_at > now && l.deadline.is_none_or(|d| d > now));
            prop_assert!(gone, "expired leases are gone after the tick");
            prop_assert!(table.waiting().iter().all(|w| w.request.deadline.is_none_or(|d| d > now)));
            let warned = model.live.values().all(|l| l.warned || l.warn_at.is_none_or(|w| w > now));
            prop_assert!(warned, "every warning due by the tick was emitted");
        }
    }
    model.check(table)?;
    Ok(result)
}

/// Ends everything: cancels the waiting, releases every other lease, and lets the rest expire.
fn wind_down(table: &mut LeaseTable, model: &mut Model) -> Result<(), TestCaseError> {
    let waiting: Vec<LeaseId> = table.waiting().iter().map(|w| w.request.id.clone()).collect();
    for id in waiting {
        let events = table.cancel(&id, model.now);
        model.absorb(&events, None)?;
        model.check(table)?;
    }
    let live: Vec<(LeaseId, u64)> = table.leases().map(|l| (l.id.clone(), l.token)).collect();
    for (id, token) in live.into_iter().step_by(2) {
        let events = table.release(&id, token, model.now).map_err(|e| fail(&format!("final release: {e}")))?;
        model.absorb(&events, None)?;
        model.check(table)?;
    }
    model.now = model.now + Duration::from_secs(1_000_000);
    let events = table.tick(model.now);
    model.absorb(&events, None)?;
    model.check(table)?;

    prop_assert!(table.leases().next().is_none());
    prop_assert!(table.waiting().is_empty());
    for pool in &POOLS[..3] {
        let status = table.pool_status(pool).ok_or_else(|| fail("pool lost"))?;
        prop_assert_eq!(status.free, status.capacity, "{} has every unit free", pool);
    }
    // Every lease granted ended exactly once.
    let mut ended = model.ended.clone();
    ended.sort_unstable();
    let granted: Vec<u64> = model.issued.iter().map(|(_, t)| *t).collect();
    prop_assert_eq!(ended, granted);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

    /// Random sequences of requests, renewals, releases, cancellations, revocations and ticks
    /// keep every invariant after every operation, and end with every unit free. Halfway
    /// through, the table is also persisted and read back, and the copy must behave the same.
    #[test]
    fn random_operations_keep_the_invariants(ops in prop::collection::vec(op_strategy(), 10..=50)) {
        let mut table = LeaseTable::new(prop_pools()).map_err(|e| fail(&e.to_string()))?;
        let mut model = Model::new();
        let half = ops.len() / 2;
        let mut copy: Option<LeaseTable> = None;
        for (i, op) in ops.iter().enumerate() {
            if i == half {
                let json = serde_json::to_string(&table).map_err(|e| fail(&e.to_string()))?;
                let read: LeaseTable = serde_json::from_str(&json).map_err(|e| fail(&e.to_string()))?;
                prop_assert_eq!(&read, &table);
                copy = Some(read);
            }
            let op = resolve(&mut model, op);
            let outcome = step(&mut table, &mut model, &op)?;
            // The copy read back from JSON takes the same operations, says the same things and
            // stays equal to the live table, as a replay after a restart must.
            if let Some(copy) = copy.as_mut() {
                prop_assert_eq!(apply(copy, &op, model.now), outcome);
                prop_assert_eq!(&*copy, &table);
            }
        }
        wind_down(&mut table, &mut model)?;
    }
}
