//! Time as the pure parts of cib see it: a number handed in by the caller, never read from a clock.

use std::fmt;
use std::ops::{Add, Sub};

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch. The engine reads the clock and passes `now` down; the
/// pipeline machine and the lease table only compare and add.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub const ZERO: Timestamp = Timestamp(0);

    pub fn from_secs(secs: u64) -> Self {
        Timestamp(secs.saturating_mul(1000))
    }

    pub fn millis(self) -> u64 {
        self.0
    }

    /// Time from `earlier` to `self`, zero when `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> std::time::Duration {
        std::time::Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl Add<std::time::Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, d: std::time::Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
    }
}

impl Sub<std::time::Duration> for Timestamp {
    type Output = Timestamp;
    fn sub(self, d: std::time::Duration) -> Timestamp {
        Timestamp(self.0.saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
    }
}

impl Timestamp {
    /// The time in UTC as RFC 3339 with milliseconds: `2026-11-29T05:59:13.123Z`.
    pub fn rfc3339(self) -> String {
        format!("{}.{:03}Z", self.date_time(), self.0 % 1000)
    }

    /// The time in UTC as RFC 3339 to the second, the way GitHub writes times:
    /// `2026-11-29T05:59:13Z`.
    pub fn rfc3339_secs(self) -> String {
        format!("{}Z", self.date_time())
    }

    /// `YYYY-MM-DDTHH:MM:SS` in UTC.
    fn date_time(self) -> String {
        let secs = self.0 / 1000;
        let (days, rest) = (secs / 86_400, secs % 86_400);
        // Howard Hinnant's days-to-civil: the proleptic Gregorian date of a day count.
        let z = days as i64 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}", rest / 3600, (rest % 3600) / 60, rest % 60)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t+{}.{:03}s", self.0 / 1000, self.0 % 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::Timestamp;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(Timestamp(0).rfc3339(), "1970-01-01T00:00:00.000Z");
        assert_eq!(Timestamp(951_782_400_000).rfc3339(), "2000-02-29T00:00:00.000Z");
        assert_eq!(Timestamp(1_795_931_953_123).rfc3339(), "2026-11-29T05:59:13.123Z");
        assert_eq!(Timestamp(4_102_444_799_999).rfc3339(), "2099-12-31T23:59:59.999Z");
    }
}
