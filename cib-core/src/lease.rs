//! The resource lease table: pools of units, all-or-nothing requests queued by priority and
//! arrival, leases that expire unless renewed, and fencing tokens that refuse a late holder.
//!
//! The table is a pure value. It does no I/O, reads no clock and draws no random numbers: every
//! operation that needs the time takes `now` as an argument, and every mutating operation returns
//! the [`LeaseEvent`]s it caused in a deterministic order. Maps are `BTreeMap`s and queues are
//! `Vec`s, so two tables fed the same operations are equal, and a table rebuilt by replaying
//! stored inputs (or deserialized from a snapshot) behaves exactly like the live one.
//!
//! # Queueing
//!
//! Waiting requests form one global order: priority descending, then arrival ascending. After
//! every change, the table scans that order once and grants a request when every pool it wants
//! has enough free units *and* no request earlier in the order that wants one of the same pools
//! is still waiting. Nobody therefore overtakes an earlier request of equal or higher priority
//! in a pool they share: equal priorities are served first come, first served per pool, and a
//! big request is never starved by a stream of small ones that would each fit. A request that
//! could never be served (unknown pool, zero units, more units than the pool has) is refused at
//! once instead of being queued forever.
//!
//! # Fencing
//!
//! Every grant takes the next value of one counter, the fencing token, which only grows and is
//! never reused, even when the same [`LeaseId`] is requested again. Renewals and releases must
//! present the token of the live lease; a holder whose lease expired or was revoked is refused
//! with [`LeaseError::Fenced`], so it learns that its work may have run unprotected, and can
//! never free units that now belong to somebody else. A duplicate release of a lease that its
//! holder already released is recognised from a bounded record of ended leases (the last
//! [`ENDED_RECORD_LIMIT`] leases to end) and answered with success and no events, because
//! retrying a release is normal. Beyond that bound the duplicate is answered with `Fenced`, the
//! safe side: the holder was letting go anyway.
//!
//! # Reconfiguration
//!
//! [`LeaseTable::configure`] swaps the pool definitions at runtime. A unit that is removed while
//! held stays held, marked retired, until its lease ends; then it disappears. It no longer counts
//! towards the pool's capacity, so it is never granted again. A pool that is removed while some
//! of its units are held lingers, unconfigured, until the last of them is freed. Waiting requests
//! that the new configuration can never serve are refused with [`LeaseEvent::Refused`]; units
//! that were added are granted to waiters at once.

// Pure code: no clock, environment, files or threads (see clippy.toml).
#![deny(clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

/// How many ended leases the table remembers so that it can recognise a duplicate release.
///
/// A thousand is far more than the number of leases that end between a holder's release and
/// its retry, yet it keeps a persisted table small.
pub const ENDED_RECORD_LIMIT: usize = 1024;

/// The caller's name for a request and for the lease it becomes, such as `build-42/deploy` or
/// `person-alice-1`. Only one live lease or waiting request may carry a given id at a time; after
/// the lease ends the same id can be requested again and gets a fresh fencing token.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct LeaseId(pub String);

impl LeaseId {
    pub fn new(id: impl Into<String>) -> Self {
        LeaseId(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for LeaseId {
    fn from(id: &str) -> Self {
        LeaseId(id.to_owned())
    }
}

impl From<String> for LeaseId {
    fn from(id: String) -> Self {
        LeaseId(id)
    }
}

/// One pool as configured: a name and the units in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolConfig {
    pub name: String,
    pub kind: PoolKind,
}

impl PoolConfig {
    /// A pool of named units, such as hosts or boards.
    pub fn units(name: impl Into<String>, units: impl IntoIterator<Item = Unit>) -> Self {
        PoolConfig { name: name.into(), kind: PoolKind::Units(units.into_iter().collect()) }
    }

    /// A pool of interchangeable slots, such as concurrent deployments.
    pub fn counting(name: impl Into<String>, capacity: u32) -> Self {
        PoolConfig { name: name.into(), kind: PoolKind::Counting { capacity } }
    }
}

/// What a pool holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolKind {
    /// Named units with metadata (a host name, a serial number), granted in the order listed.
    Units(Vec<Unit>),
    /// Interchangeable slots. The table names them `slot-0`, `slot-1`, … so that leases on
    /// counting pools can be checked exactly like leases on named units.
    Counting { capacity: u32 },
}

/// A named unit of a pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unit {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

impl Unit {
    pub fn new(name: impl Into<String>) -> Self {
        Unit { name: name.into(), metadata: BTreeMap::new() }
    }

    pub fn with_meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }
}

/// Who holds or waits for a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Holder {
    /// A build, or one step of it.
    Build {
        build: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        step: Option<String>,
    },
    /// A person who borrows units by hand, usually until a deadline.
    Person { login: String },
}

impl Holder {
    pub fn build(build: impl Into<String>, step: Option<&str>) -> Self {
        Holder::Build { build: build.into(), step: step.map(str::to_owned) }
    }

    pub fn person(login: impl Into<String>) -> Self {
        Holder::Person { login: login.into() }
    }
}

/// A number of units from one pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Want {
    pub pool: String,
    pub count: u32,
}

impl Want {
    pub fn new(pool: impl Into<String>, count: u32) -> Self {
        Want { pool: pool.into(), count }
    }
}

/// A request for units from one or more pools, granted all at once or not at all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: LeaseId,
    pub holder: Holder,
    /// Wants naming the same pool twice are added together when the request is made.
    pub wants: Vec<Want>,
    /// Higher goes first. Requests of equal priority are served in order of arrival.
    #[serde(default)]
    pub priority: i32,
    /// The lease expires unless renewed within this long of its grant or its last renewal.
    /// Kept to whole milliseconds, the resolution of [`Timestamp`].
    #[serde(rename = "ttl_ms", with = "millis")]
    pub ttl: Duration,
    /// A hard end, for a person's lease: it expires then even if renewed. A request still
    /// waiting at its deadline is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Timestamp>,
    /// Emit [`LeaseEvent::Warning`] this long before the deadline, once.
    #[serde(default, rename = "warn_before_ms", with = "opt_millis", skip_serializing_if = "Option::is_none")]
    pub warn_before: Option<Duration>,
    /// Free text shown in queues and status pages, such as "flashing firmware".
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

impl Request {
    /// A request of priority 0 with no deadline and no reason.
    pub fn new(id: impl Into<LeaseId>, holder: Holder, wants: Vec<Want>, ttl: Duration) -> Self {
        Request {
            id: id.into(),
            holder,
            wants,
            priority: 0,
            ttl,
            deadline: None,
            warn_before: None,
            reason: String::new(),
        }
    }

    pub fn with_priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    pub fn with_deadline(mut self, deadline: Timestamp, warn_before: Option<Duration>) -> Self {
        self.deadline = Some(deadline);
        self.warn_before = warn_before;
        self
    }

    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = reason.into();
        self
    }

    fn wants_pool(&self, pool: &str) -> bool {
        self.wants.iter().any(|w| w.pool == pool)
    }
}

/// A request in the queue, with its place in the arrival order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiter {
    pub request: Request,
    /// Arrival number, unique and increasing across the whole table; it breaks priority ties.
    pub seq: u64,
    /// When the request arrived.
    pub since: Timestamp,
}

/// A granted lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: LeaseId,
    pub holder: Holder,
    /// For each pool wanted, in the order of the request, the names of the units granted.
    pub units: Vec<(String, Vec<String>)>,
    /// The fencing token: present it to renew or release.
    pub token: u64,
    pub granted_at: Timestamp,
    /// The lease expires at this time unless renewed first; never later than `deadline`.
    pub expires_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Timestamp>,
    #[serde(rename = "ttl_ms", with = "millis")]
    pub ttl: Duration,
    /// When the deadline warning is due, if one was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// How a lease ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndKind {
    Released,
    Revoked,
    Expired,
}

/// The record of a lease that ended, kept so that a duplicate release can be recognised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndedLease {
    pub id: LeaseId,
    pub token: u64,
    pub how: EndKind,
    pub at: Timestamp,
}

/// What a change to the table caused, in the order it happened. Grants that a release, an
/// expiry or a cancellation made possible follow it in the same list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum LeaseEvent {
    /// A request was queued; its 0-based position in each pool it wants.
    Waiting {
        id: LeaseId,
        positions: Vec<(String, usize)>,
    },
    Granted {
        lease: Lease,
    },
    Renewed {
        id: LeaseId,
        token: u64,
        expires_at: Timestamp,
    },
    /// A lease's deadline is near.
    Warning {
        id: LeaseId,
        token: u64,
        deadline: Timestamp,
    },
    Expired {
        id: LeaseId,
        token: u64,
    },
    Released {
        id: LeaseId,
        token: u64,
    },
    Revoked {
        id: LeaseId,
        token: u64,
    },
    /// A waiting request was withdrawn by its requester.
    Cancelled {
        id: LeaseId,
    },
    /// A waiting request was dropped by the table: its deadline passed, or a new configuration
    /// can never serve it.
    Refused {
        id: LeaseId,
        error: LeaseError,
    },
}

/// Why the table refused an operation. Nothing is changed when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "error", rename_all = "snake_case")]
pub enum LeaseError {
    #[error("unknown pool '{pool}'")]
    UnknownPool { pool: String },
    #[error("{requested} units of pool '{pool}' were requested, but it has only {capacity}")]
    ExceedsCapacity { pool: String, requested: u32, capacity: u32 },
    #[error("zero units of pool '{pool}' were requested")]
    ZeroCount { pool: String },
    #[error("a lease or a waiting request with id '{id}' already exists")]
    DuplicateId { id: LeaseId },
    #[error("token {token} does not hold lease '{id}' (it expired, was revoked, or was never issued)")]
    Fenced { id: LeaseId, token: u64 },
    #[error("no live lease with id '{id}'")]
    NotFound { id: LeaseId },
    #[error("the deadline {deadline} of '{id}' has passed")]
    DeadlinePassed { id: LeaseId, deadline: Timestamp },
    #[error("pool '{pool}' is configured twice")]
    DuplicatePool { pool: String },
    #[error("unit '{unit}' appears twice in pool '{pool}'")]
    DuplicateUnit { pool: String, unit: String },
}

/// A pool as it stands: its units, who holds them, and who waits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PoolStatus {
    pub name: String,
    pub counting: bool,
    /// False for a pool that was removed from the configuration but still has held units.
    pub configured: bool,
    /// Units in the current configuration.
    pub capacity: u32,
    /// Configured units that nobody holds.
    pub free: u32,
    /// Held units, retired ones included; this can exceed `capacity` after the pool shrank.
    pub held: u32,
    pub units: Vec<UnitStatus>,
    /// Waiting requests that want this pool, in the order they will be served.
    pub queue: Vec<LeaseId>,
}

/// One unit of a [`PoolStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct UnitStatus {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Removed from the configuration; it disappears when released.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retired: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_by: Option<UnitHold>,
}

/// Which lease holds a unit, and until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct UnitHold {
    pub lease: LeaseId,
    pub token: u64,
    pub expires_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Timestamp>,
}

/// The lease table. See the module documentation for the rules it keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseTable {
    pools: BTreeMap<String, Pool>,
    /// Kept sorted in the global order: priority descending, then arrival ascending.
    waiting: Vec<Waiter>,
    leases: BTreeMap<LeaseId, LiveLease>,
    /// The most recently ended leases, oldest first, at most [`ENDED_RECORD_LIMIT`].
    ended: VecDeque<EndedLease>,
    /// The token the next grant takes. Tokens start at 1, so 0 is never valid.
    next_token: u64,
    next_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Pool {
    counting: bool,
    configured: bool,
    /// Configured units in configured order, then retired units that are still held.
    units: Vec<UnitState>,
}

impl Pool {
    fn capacity(&self) -> u32 {
        count_u32(self.units.iter().filter(|u| !u.retired))
    }

    fn free(&self) -> u32 {
        count_u32(self.units.iter().filter(|u| !u.retired && u.holder.is_none()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct UnitState {
    name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    metadata: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    holder: Option<LeaseId>,
    /// A retired unit is always held: it is dropped the moment it is freed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    retired: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct LiveLease {
    lease: Lease,
    /// Whether the deadline warning was emitted, so that it is emitted once.
    warned: bool,
}

impl LeaseTable {
    /// A table with the given pools and no leases. Fails if a pool name, or a unit name within
    /// a pool, appears twice.
    pub fn new(pools: Vec<PoolConfig>) -> Result<Self, LeaseError> {
        Ok(LeaseTable {
            pools: build_pools(pools)?,
            waiting: Vec::new(),
            leases: BTreeMap::new(),
            ended: VecDeque::new(),
            next_token: 1,
            next_seq: 0,
        })
    }

    /// Replaces the pool definitions. Held units that are no longer configured stay held until
    /// released and then disappear; waiting requests the new pools can never serve are refused;
    /// waiters that fit now are granted. On error nothing changes.
    pub fn configure(&mut self, pools: Vec<PoolConfig>, now: Timestamp) -> Result<Vec<LeaseEvent>, LeaseError> {
        let mut fresh = build_pools(pools)?;
        for (name, old) in std::mem::take(&mut self.pools) {
            let held = old.units.into_iter().filter(|u| u.holder.is_some());
            match fresh.get_mut(&name) {
                Some(pool) => {
                    for unit in held {
                        // A unit that is still configured keeps its holder under its new
                        // metadata; one that is not stays held, retired, until freed.
                        match pool.units.iter_mut().find(|u| !u.retired && u.name == unit.name) {
                            Some(same) => same.holder = unit.holder,
                            None => pool.units.push(UnitState { retired: true, ..unit }),
                        }
                    }
                }
                None => {
                    let units: Vec<UnitState> = held.map(|u| UnitState { retired: true, ..u }).collect();
                    if !units.is_empty() {
                        fresh.insert(name, Pool { counting: old.counting, configured: false, units });
                    }
                }
            }
        }
        self.pools = fresh;

        let mut events = Vec::new();
        let waiting = std::mem::take(&mut self.waiting);
        for waiter in waiting {
            match self.check_capacity(&waiter.request.wants) {
                Ok(()) => self.waiting.push(waiter),
                Err(error) => events.push(LeaseEvent::Refused { id: waiter.request.id, error }),
            }
        }
        self.pump(now, &mut events);
        Ok(events)
    }

    /// Asks for units. The request is granted at once if it can be, and queued otherwise; it is
    /// refused, and nothing changes, if it could never be served or its id is in use. Refusals
    /// are checked in this order: duplicate id; then, want by want, unknown pool and zero count;
    /// then the merged counts against capacity; then a deadline already past. A request with no
    /// wants at all is granted at once and holds nothing, which keeps the rule total.
    pub fn request(&mut self, mut request: Request, now: Timestamp) -> Result<Vec<LeaseEvent>, LeaseError> {
        if self.leases.contains_key(&request.id) || self.waiting.iter().any(|w| w.request.id == request.id) {
            return Err(LeaseError::DuplicateId { id: request.id });
        }
        for want in &request.wants {
            if !self.pools.get(&want.pool).is_some_and(|p| p.configured) {
                return Err(LeaseError::UnknownPool { pool: want.pool.clone() });
            }
            if want.count == 0 {
                return Err(LeaseError::ZeroCount { pool: want.pool.clone() });
            }
        }
        request.wants = merge_wants(request.wants);
        self.check_capacity(&request.wants)?;
        if let Some(deadline) = request.deadline
            && deadline <= now
        {
            return Err(LeaseError::DeadlinePassed { id: request.id, deadline });
        }
        // Durations are stored to the millisecond, the resolution of every time they are added
        // to, so that a persisted table reads back equal to the live one.
        request.ttl = whole_millis(request.ttl);
        request.warn_before = request.warn_before.map(whole_millis);

        let id = request.id.clone();
        let seq = self.next_seq;
        self.next_seq += 1;
        // The new request arrived last, so it goes after every request of equal or higher
        // priority and before every request of lower priority.
        let at = self.waiting.partition_point(|w| w.request.priority >= request.priority);
        self.waiting.insert(at, Waiter { request, seq, since: now });

        let mut events = Vec::new();
        self.pump(now, &mut events);
        if let Some(positions) = self.position(&id) {
            events.push(LeaseEvent::Waiting { id, positions });
        }
        Ok(events)
    }

    /// Extends a live lease to `now + ttl`, capped at its deadline. Refused with `Fenced` unless
    /// `token` is the token of the live lease and the lease has not yet reached its expiry
    /// (a lease past its expiry is dead even before the next tick removes it).
    pub fn renew(&mut self, id: &LeaseId, token: u64, now: Timestamp) -> Result<Vec<LeaseEvent>, LeaseError> {
        let fenced = || LeaseError::Fenced { id: id.clone(), token };
        let live = self.leases.get_mut(id).ok_or_else(fenced)?;
        if live.lease.token != token || live.lease.expires_at <= now {
            return Err(fenced());
        }
        let extended = now + live.lease.ttl;
        live.lease.expires_at = match live.lease.deadline {
            Some(deadline) => extended.min(deadline),
            None => extended,
        };
        Ok(vec![LeaseEvent::Renewed { id: id.clone(), token, expires_at: live.lease.expires_at }])
    }

    /// Moves a live lease's deadline (a person keeping an environment longer, or giving it
    /// back sooner): the lease now expires at `until`, and its warning, if it has one, comes
    /// again the same time before the new deadline.
    pub fn extend(
        &mut self,
        id: &LeaseId,
        token: u64,
        until: Timestamp,
        now: Timestamp,
    ) -> Result<Vec<LeaseEvent>, LeaseError> {
        let fenced = || LeaseError::Fenced { id: id.clone(), token };
        let live = self.leases.get_mut(id).ok_or_else(fenced)?;
        if live.lease.token != token || live.lease.expires_at <= now {
            return Err(fenced());
        }
        if until <= now {
            return Err(LeaseError::DeadlinePassed { id: id.clone(), deadline: until });
        }
        let warn_before = live.lease.deadline.zip(live.lease.warn_at).map(|(d, w)| d.since(w));
        live.lease.deadline = Some(until);
        live.lease.expires_at = until;
        live.lease.warn_at = warn_before.map(|w| until - w);
        live.warned = live.lease.warn_at.is_some_and(|at| at <= now) && live.warned;
        Ok(vec![LeaseEvent::Renewed { id: id.clone(), token, expires_at: until }])
    }

    /// Ends a live lease and grants its units to waiters. Releasing a lease that its holder
    /// already released, with the same token, succeeds with no events. Any other token is
    /// refused with `Fenced`, including the token of a lease that expired or was revoked.
    ///
    /// A lease past its expiry that the next tick has not yet removed can still be released:
    /// its units went to nobody else, and the holder is giving them back.
    pub fn release(&mut self, id: &LeaseId, token: u64, now: Timestamp) -> Result<Vec<LeaseEvent>, LeaseError> {
        if self.leases.get(id).is_some_and(|l| l.lease.token == token) {
            let mut events = Vec::new();
            self.end(id, EndKind::Released, now, &mut events);
            self.pump(now, &mut events);
            return Ok(events);
        }
        let released_before = self.ended.iter().any(|e| e.token == token && &e.id == id && e.how == EndKind::Released);
        if released_before { Ok(Vec::new()) } else { Err(LeaseError::Fenced { id: id.clone(), token }) }
    }

    /// Withdraws a waiting request, and grants to the waiters it was holding back. Cancelling
    /// a request that is not waiting (never made, already granted, already cancelled) does
    /// nothing, so that a cancellation can be retried safely.
    pub fn cancel(&mut self, id: &LeaseId, now: Timestamp) -> Vec<LeaseEvent> {
        let Some(at) = self.waiting.iter().position(|w| &w.request.id == id) else {
            return Vec::new();
        };
        self.waiting.remove(at);
        let mut events = vec![LeaseEvent::Cancelled { id: id.clone() }];
        self.pump(now, &mut events);
        events
    }

    /// Ends a live lease whatever its token, for administrators, and grants its units to
    /// waiters. The holder's later renewals and releases are refused with `Fenced`.
    pub fn revoke(&mut self, id: &LeaseId, now: Timestamp) -> Result<Vec<LeaseEvent>, LeaseError> {
        if !self.leases.contains_key(id) {
            return Err(LeaseError::NotFound { id: id.clone() });
        }
        let mut events = Vec::new();
        self.end(id, EndKind::Revoked, now, &mut events);
        self.pump(now, &mut events);
        Ok(events)
    }

    /// Moves the table to `now`: expires leases that reached their expiry or deadline, refuses
    /// waiting requests whose deadline passed, emits due deadline warnings, then grants to
    /// waiters. The engine should call it at [`next_wakeup`](Self::next_wakeup).
    pub fn tick(&mut self, now: Timestamp) -> Vec<LeaseEvent> {
        let mut events = Vec::new();

        // Leases end in the order they expired, ties broken by grant order, so the events do not
        // depend on the ids' alphabetical order.
        let mut due: Vec<(Timestamp, u64, LeaseId)> = self
            .leases
            .values()
            .map(|l| &l.lease)
            .filter(|l| l.expires_at <= now || l.deadline.is_some_and(|d| d <= now))
            .map(|l| (l.expires_at, l.token, l.id.clone()))
            .collect();
        due.sort();
        for (_, _, id) in due {
            self.end(&id, EndKind::Expired, now, &mut events);
        }

        self.waiting.retain(|w| match w.request.deadline {
            Some(deadline) if deadline <= now => {
                let id = w.request.id.clone();
                events.push(LeaseEvent::Refused { id: id.clone(), error: LeaseError::DeadlinePassed { id, deadline } });
                false
            }
            _ => true,
        });

        let mut warnings: Vec<(Timestamp, u64, LeaseId)> = self
            .leases
            .values()
            .filter(|l| !l.warned)
            .filter_map(|l| l.lease.warn_at.filter(|at| *at <= now).map(|at| (at, l.lease.token, l.lease.id.clone())))
            .collect();
        warnings.sort();
        for (_, _, id) in warnings {
            if let Some(live) = self.leases.get_mut(&id) {
                live.warned = true;
                events.extend(warning(&live.lease));
            }
        }

        self.pump(now, &mut events);
        events
    }

    /// The earliest time at which [`tick`](Self::tick) has something to do: a lease expiring
    /// or reaching its deadline, a warning falling due, a waiting request reaching its
    /// deadline. `None` when nothing is timed. It can lie in the past, when a tick is overdue.
    pub fn next_wakeup(&self) -> Option<Timestamp> {
        let leases = self.leases.values().flat_map(|l| {
            let warn = if l.warned { None } else { l.lease.warn_at };
            [Some(l.lease.expires_at), l.lease.deadline, warn]
        });
        let waiters = self.waiting.iter().map(|w| w.request.deadline);
        leases.chain(waiters).flatten().min()
    }

    /// The 0-based position of a waiting request in the queue of each pool it wants, in the
    /// order of its wants. `None` when the request is not waiting.
    pub fn position(&self, id: &LeaseId) -> Option<Vec<(String, usize)>> {
        let at = self.waiting.iter().position(|w| &w.request.id == id)?;
        let ahead = &self.waiting[..at];
        let positions = self.waiting[at]
            .request
            .wants
            .iter()
            .map(|want| (want.pool.clone(), ahead.iter().filter(|w| w.request.wants_pool(&want.pool)).count()))
            .collect();
        Some(positions)
    }

    /// The requests waiting for a pool, in the order they will be served.
    pub fn queue(&self, pool: &str) -> Vec<&LeaseId> {
        self.waiting.iter().filter(|w| w.request.wants_pool(pool)).map(|w| &w.request.id).collect()
    }

    /// Every waiting request, in the global order: priority descending, then arrival.
    pub fn waiting(&self) -> &[Waiter] {
        &self.waiting
    }

    /// Every live lease, by id.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values().map(|l| &l.lease)
    }

    pub fn lease(&self, id: &LeaseId) -> Option<&Lease> {
        self.leases.get(id).map(|l| &l.lease)
    }

    /// The most recently ended leases, oldest first; at most [`ENDED_RECORD_LIMIT`].
    pub fn ended(&self) -> impl Iterator<Item = &EndedLease> {
        self.ended.iter()
    }

    /// The names of every pool, removed ones with units still held included.
    pub fn pools(&self) -> impl Iterator<Item = &str> {
        self.pools.keys().map(String::as_str)
    }

    /// A pool's units, who holds them until when, and its queue.
    pub fn pool_status(&self, pool: &str) -> Option<PoolStatus> {
        let (name, state) = self.pools.get_key_value(pool)?;
        let units: Vec<UnitStatus> = state
            .units
            .iter()
            .map(|u| UnitStatus {
                name: u.name.clone(),
                metadata: u.metadata.clone(),
                retired: u.retired,
                held_by: u.holder.as_ref().and_then(|id| self.leases.get(id)).map(|l| UnitHold {
                    lease: l.lease.id.clone(),
                    token: l.lease.token,
                    expires_at: l.lease.expires_at,
                    deadline: l.lease.deadline,
                }),
            })
            .collect();
        Some(PoolStatus {
            name: name.clone(),
            counting: state.counting,
            configured: state.configured,
            capacity: state.capacity(),
            free: state.free(),
            held: count_u32(state.units.iter().filter(|u| u.holder.is_some())),
            units,
            queue: self.queue(pool).into_iter().cloned().collect(),
        })
    }

    /// Refuses wants that no pool of the current configuration can ever serve.
    fn check_capacity(&self, wants: &[Want]) -> Result<(), LeaseError> {
        for want in wants {
            let Some(pool) = self.pools.get(&want.pool).filter(|p| p.configured) else {
                return Err(LeaseError::UnknownPool { pool: want.pool.clone() });
            };
            let capacity = pool.capacity();
            if want.count > capacity {
                return Err(LeaseError::ExceedsCapacity { pool: want.pool.clone(), requested: want.count, capacity });
            }
        }
        Ok(())
    }

    /// Grants to waiters in the global order. A waiter is granted when every pool it wants has
    /// enough free units and no earlier waiter that wants one of those pools is still waiting.
    /// A waiter that is passed over blocks all its pools for everyone after it, which is what
    /// keeps arrival order within a priority and keeps big requests from starving.
    fn pump(&mut self, now: Timestamp, events: &mut Vec<LeaseEvent>) {
        let mut blocked: BTreeSet<String> = BTreeSet::new();
        // Free counts are read once and kept up to date here: counting a pool's free units
        // walks its units, and doing that for every waiter made each pump quadratic.
        let mut free: BTreeMap<String, u32> = self.pools.iter().map(|(name, p)| (name.clone(), p.free())).collect();
        let mut at = 0;
        while at < self.waiting.len() {
            // Once every pool is blocked, nobody further back can be granted anything.
            if !free.is_empty() && blocked.len() >= free.len() {
                break;
            }
            let request = &self.waiting[at].request;
            // A waiter whose deadline has passed is not granted a lease that would be dead on
            // arrival; it keeps its place, blocking, until the tick refuses it.
            let alive = request.deadline.is_none_or(|d| d > now);
            let fits = request
                .wants
                .iter()
                .all(|want| !blocked.contains(&want.pool) && free.get(&want.pool).is_some_and(|f| *f >= want.count));
            if alive && fits {
                let waiter = self.waiting.remove(at);
                for want in &waiter.request.wants {
                    if let Some(f) = free.get_mut(&want.pool) {
                        *f -= want.count;
                    }
                }
                self.grant(waiter.request, now, events);
            } else {
                blocked.extend(request.wants.iter().map(|w| w.pool.clone()));
                at += 1;
            }
        }
    }

    /// Turns a request into a lease. The caller has checked that every pool has enough free
    /// units; units are taken in pool order.
    fn grant(&mut self, request: Request, now: Timestamp, events: &mut Vec<LeaseEvent>) {
        let token = self.next_token;
        self.next_token += 1;
        let mut units = Vec::with_capacity(request.wants.len());
        for want in &request.wants {
            let mut names = Vec::new();
            if let Some(pool) = self.pools.get_mut(&want.pool) {
                let free = pool.units.iter_mut().filter(|u| !u.retired && u.holder.is_none());
                for unit in free.take(usize::try_from(want.count).unwrap_or(usize::MAX)) {
                    unit.holder = Some(request.id.clone());
                    names.push(unit.name.clone());
                }
            }
            debug_assert_eq!(names.len(), want.count as usize, "pump grants only when units are free");
            units.push((want.pool.clone(), names));
        }
        let extended = now + request.ttl;
        let lease = Lease {
            id: request.id,
            holder: request.holder,
            units,
            token,
            granted_at: now,
            expires_at: request.deadline.map_or(extended, |d| extended.min(d)),
            deadline: request.deadline,
            ttl: request.ttl,
            warn_at: request.deadline.zip(request.warn_before).map(|(d, w)| d - w),
            reason: request.reason,
        };
        events.push(LeaseEvent::Granted { lease: lease.clone() });
        // A lease granted inside its warning window is warned at once rather than at a tick
        // that may be far away.
        let warned = lease.warn_at.is_some_and(|at| at <= now);
        if warned {
            events.extend(warning(&lease));
        }
        self.leases.insert(lease.id.clone(), LiveLease { lease, warned });
    }

    /// Removes a live lease, frees its units and records how it ended.
    fn end(&mut self, id: &LeaseId, how: EndKind, now: Timestamp, events: &mut Vec<LeaseEvent>) {
        let Some(live) = self.leases.remove(id) else { return };
        let lease = live.lease;
        for (pool_name, _) in &lease.units {
            let Some(pool) = self.pools.get_mut(pool_name) else { continue };
            pool.units.retain_mut(|u| {
                if u.holder.as_ref() != Some(&lease.id) {
                    return true;
                }
                u.holder = None;
                !u.retired
            });
            if !pool.configured && pool.units.is_empty() {
                self.pools.remove(pool_name);
            }
        }
        if self.ended.len() >= ENDED_RECORD_LIMIT {
            self.ended.pop_front();
        }
        self.ended.push_back(EndedLease { id: lease.id.clone(), token: lease.token, how, at: now });
        let (id, token) = (lease.id, lease.token);
        events.push(match how {
            EndKind::Released => LeaseEvent::Released { id, token },
            EndKind::Revoked => LeaseEvent::Revoked { id, token },
            EndKind::Expired => LeaseEvent::Expired { id, token },
        });
    }
}

fn warning(lease: &Lease) -> Option<LeaseEvent> {
    lease.deadline.map(|deadline| LeaseEvent::Warning { id: lease.id.clone(), token: lease.token, deadline })
}

/// Checks pool definitions and turns them into empty pools.
fn build_pools(configs: Vec<PoolConfig>) -> Result<BTreeMap<String, Pool>, LeaseError> {
    let mut pools = BTreeMap::new();
    for config in configs {
        let (counting, units) = match config.kind {
            PoolKind::Units(units) => (false, units),
            PoolKind::Counting { capacity } => (true, (0..capacity).map(|i| Unit::new(format!("slot-{i}"))).collect()),
        };
        let mut names = BTreeSet::new();
        for unit in &units {
            if !names.insert(unit.name.as_str()) {
                return Err(LeaseError::DuplicateUnit { pool: config.name, unit: unit.name.clone() });
            }
        }
        let units = units
            .into_iter()
            .map(|u| UnitState { name: u.name, metadata: u.metadata, holder: None, retired: false })
            .collect();
        if pools.contains_key(&config.name) {
            return Err(LeaseError::DuplicatePool { pool: config.name });
        }
        pools.insert(config.name, Pool { counting, configured: true, units });
    }
    Ok(pools)
}

/// Adds up wants that name the same pool, keeping the order of first mention.
fn merge_wants(wants: Vec<Want>) -> Vec<Want> {
    let mut merged: Vec<Want> = Vec::with_capacity(wants.len());
    for want in wants {
        match merged.iter_mut().find(|m| m.pool == want.pool) {
            Some(m) => m.count = m.count.saturating_add(want.count),
            None => merged.push(want),
        }
    }
    merged
}

fn count_u32<T>(items: impl Iterator<Item = T>) -> u32 {
    u32::try_from(items.count()).unwrap_or(u32::MAX)
}

fn whole_millis(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Durations as whole milliseconds, which is how people read them in a persisted table.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// Optional durations as whole milliseconds.
mod opt_millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<u64>::deserialize(d).map(|ms| ms.map(Duration::from_millis))
    }
}
