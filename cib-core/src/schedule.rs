//! When a scheduled pipeline runs: pure functions over a cron expression, a time zone (a fixed
//! offset from UTC) and the time, which the server's scheduler calls on every tick.
//!
//! A slot is a time the cron expression names. The scheduler starts a build for a slot at most
//! once, because the build's id is derived from the slot ([`build_id`]) and the engine drops an
//! enqueue of an id the store already holds; the enqueue is journaled before anything runs, so
//! the journal is the record of which slots ran, across restarts.

#![deny(clippy::disallowed_methods)]

use chrono::{DateTime, FixedOffset, TimeZone, Utc};

use crate::event::BuildId;
use crate::spec::Cron;
use crate::time::Timestamp;

/// A slot is on time for this long after it: a scheduler that ticks every second sees it well
/// within, and a server down for less than this across a slot still runs it.
pub const GRACE_MILLIS: u64 = 30_000;

fn at(ts: Timestamp, zone: FixedOffset) -> Option<DateTime<FixedOffset>> {
    let millis = i64::try_from(ts.millis()).ok()?;
    Utc.timestamp_millis_opt(millis).single().map(|t| t.with_timezone(&zone))
}

fn stamp(t: DateTime<FixedOffset>) -> Option<Timestamp> {
    u64::try_from(t.timestamp_millis()).ok().map(Timestamp)
}

/// The newest slot at or before `now`.
pub fn last_slot(cron: &Cron, zone: FixedOffset, now: Timestamp) -> Option<Timestamp> {
    let now = at(now, zone)?;
    cron.schedule().find_previous_occurrence(&now, true).ok().and_then(stamp)
}

/// The next `count` slots after `now`.
pub fn next_slots(cron: &Cron, zone: FixedOffset, now: Timestamp, count: usize) -> Vec<Timestamp> {
    let Some(now) = at(now, zone) else { return Vec::new() };
    cron.schedule().iter_after(now).take(count).filter_map(stamp).collect()
}

/// The slot to start a build for at `now`, if any: the newest slot when it is on time (at most
/// [`GRACE_MILLIS`] old). Slots missed while the server was down are skipped, unless
/// `catch_up`: then the newest of them runs (once, as any slot: its build id is its own), and
/// the older ones never do.
pub fn due(cron: &Cron, zone: FixedOffset, catch_up: bool, now: Timestamp) -> Option<Timestamp> {
    let slot = last_slot(cron, zone, now)?;
    let on_time = now.millis().saturating_sub(slot.millis()) <= GRACE_MILLIS;
    (on_time || catch_up).then_some(slot)
}

/// The build of one slot of one schedule of a pipeline: the same id whoever computes it, so a
/// slot is built at most once.
pub fn build_id(repo: &str, pipeline: &str, cron: &str, branch: &str, slot: Timestamp) -> BuildId {
    let key = format!("{repo}\n{pipeline}\n{cron}\n{branch}");
    let hash =
        key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3));
    BuildId(format!("schedule-{pipeline}-{:08x}-{}", hash & 0xffff_ffff, slot.millis()))
}

/// Reads a time zone as the server's configuration writes it: `UTC`, or an offset such as
/// `+02:00` or `-05:30`.
pub fn parse_zone(text: &str) -> Result<FixedOffset, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("utc") || t == "Z" {
        return FixedOffset::east_opt(0).ok_or_else(|| "UTC".into());
    }
    let bad = || format!("invalid time zone '{text}': write UTC or an offset such as +02:00");
    let (sign, rest) = match t.as_bytes().first() {
        Some(b'+') => (1, &t[1..]),
        Some(b'-') => (-1, &t[1..]),
        _ => return Err(bad()),
    };
    let (h, m) = rest.split_once(':').ok_or_else(bad)?;
    let (h, m): (i32, i32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if !(0..=14).contains(&h) || !(0..60).contains(&m) {
        return Err(bad());
    }
    FixedOffset::east_opt(sign * (h * 3600 + m * 60)).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc() -> FixedOffset {
        parse_zone("UTC").expect("utc")
    }

    fn minute(n: u64) -> Timestamp {
        Timestamp(n * 60_000)
    }

    #[test]
    fn an_every_minute_schedule_is_due_once_per_minute_within_the_grace() {
        let cron = Cron::parse("*/1 * * * *").expect("cron");
        assert_eq!(due(&cron, utc(), false, Timestamp(minute(5).millis() + 10_000)), Some(minute(5)));
        assert_eq!(due(&cron, utc(), false, Timestamp(minute(5).millis() + 45_000)), None, "past the grace");
        assert_eq!(due(&cron, utc(), true, Timestamp(minute(5).millis() + 45_000)), Some(minute(5)), "caught up");
        assert_eq!(next_slots(&cron, utc(), minute(5), 2), [minute(6), minute(7)]);
    }

    #[test]
    fn slots_follow_the_time_zone_and_ids_follow_the_slot() {
        let cron = Cron::parse("0 3 * * *").expect("cron");
        let plus2 = parse_zone("+02:00").expect("zone");
        // 03:00 at +02:00 is 01:00 UTC.
        assert_eq!(next_slots(&cron, plus2, Timestamp(0), 1), [Timestamp(3_600_000)]);
        assert!(parse_zone("Europe/Paris").is_err());
        let a = build_id("acme/api", "nightly", "0 3 * * *", "master", Timestamp(1));
        assert_eq!(a, build_id("acme/api", "nightly", "0 3 * * *", "master", Timestamp(1)));
        assert_ne!(a, build_id("acme/api", "nightly", "0 3 * * *", "master", Timestamp(2)));
        assert_ne!(a, build_id("acme/api", "nightly", "0 4 * * *", "master", Timestamp(1)));
    }
}
