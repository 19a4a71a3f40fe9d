//! Active/standby leadership on PostgreSQL: one `leadership` row names the server that runs
//! the engine, until when (a lease renewed every second or so), and under which fencing epoch.
//!
//! The row is taken and renewed with one conditional `UPDATE` judged by the database's clock
//! (`clock_timestamp()`), so the servers' own clocks never have to agree. The epoch goes up
//! whenever the holder changes. Fencing is the store's, not the engine's: a [`PgStore`] whose
//! server takes part in leadership refuses every write of the engine (journal, snapshots,
//! events, logs, the inbox's outcomes, webhook cursors) unless
//! - its own lease has not run out by its own monotonic clock (a process that was paused
//!   knows it the moment it runs again, before it reaches the database), and
//! - for the transactional writes, the row's epoch, read `FOR SHARE` in the write's own
//!   transaction, is still the one this server won. The share lock makes a takeover's
//!   `UPDATE` wait for writes in flight, so no write of an old epoch commits after a new one.
//!
//! The table is made by [`PgStore::leadership`] (`CREATE TABLE IF NOT EXISTS`), outside the
//! versioned schema that PostgreSQL shares with SQLite: it is state of the running servers,
//! not of the builds, and `cib store copy` has nothing to carry into it.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cib_core::ports::StoreError;
use deadpool_postgres::Pool;

use super::{PgStore, Sql, pool_error};

/// The start of every message of a write refused by fencing.
pub const FENCED: &str = "fenced: ";

/// Whether a store error is a refusal by fencing: the server lost (or never held) the lease.
pub fn is_fenced(error: &StoreError) -> bool {
    matches!(error, StoreError::Permanent(m) if m.starts_with(FENCED))
}

fn fenced(why: String) -> StoreError {
    StoreError::Permanent(format!("{FENCED}{why}"))
}

/// What a store knows of its server's leadership.
#[derive(Debug)]
pub(crate) struct Fence {
    /// 0: the server takes no part in leadership (one server on the database), and nothing is
    /// checked. Below 0: it takes part and does not hold the lease. Above 0: the epoch it holds.
    epoch: AtomicI64,
    /// Until when, in milliseconds after `origin`, the lease is surely this server's.
    until: AtomicU64,
    origin: Instant,
}

impl Default for Fence {
    fn default() -> Self {
        Fence { epoch: AtomicI64::new(0), until: AtomicU64::new(0), origin: Instant::now() }
    }
}

impl Fence {
    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The epoch to check against the row, `None` when nothing is checked; refused when the
    /// lease is not held or has run out here.
    pub(crate) fn local(&self) -> Result<Option<i64>, StoreError> {
        let epoch = self.epoch.load(Ordering::SeqCst);
        if epoch == 0 {
            return Ok(None);
        }
        if epoch < 0 {
            return Err(fenced("this server does not hold the leadership lease (standby)".into()));
        }
        if self.elapsed_ms() >= self.until.load(Ordering::SeqCst) {
            return Err(fenced(format!("the leadership lease of epoch {epoch} ran out before it was renewed")));
        }
        Ok(Some(epoch))
    }

    /// [`Fence::local`], then the row's epoch in the write's own transaction.
    pub(crate) async fn check(&self, tx: &impl Sql) -> Result<(), StoreError> {
        let Some(epoch) = self.local()? else { return Ok(()) };
        let row = tx.opt("SELECT epoch FROM leadership WHERE id = 1 FOR SHARE", &[]).await?;
        let current: i64 = row.map_or(0, |r| r.get(0));
        if current != epoch {
            return Err(fenced(format!("epoch {epoch} is stale: another server holds the lease at epoch {current}")));
        }
        Ok(())
    }

    /// Whether this server held the lease and its time has run out here.
    fn expired(&self) -> bool {
        self.epoch.load(Ordering::SeqCst) > 0 && self.elapsed_ms() >= self.until.load(Ordering::SeqCst)
    }
}

/// The server named in the leadership row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The holder's id (unique per process).
    pub holder: String,
    /// Its address, for clients sent away by a standby.
    pub address: String,
    pub epoch: i64,
}

/// The outcome of one round of [`Leadership::round`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tenure {
    /// This server holds the lease, under this epoch.
    Active { epoch: i64 },
    /// Another server holds it (or nobody, for a moment).
    Standby { active: Option<Holder> },
    /// This server held it and another has taken it: it must stop writing and step down.
    Lost { active: Option<Holder> },
}

/// One server's part in the leadership of a database. See the module's documentation.
#[derive(Debug, Clone)]
pub struct Leadership {
    pool: Pool,
    fence: Arc<Fence>,
    holder: String,
    address: String,
    lease: Duration,
}

impl PgStore {
    /// Takes part in leadership as `holder` (unique per process), reachable at `address`, with
    /// leases of `lease`. From now on this store refuses the engine's writes until
    /// [`Leadership::round`] wins the lease, and again as soon as it is lost or runs out.
    pub async fn leadership(&self, holder: &str, address: &str, lease: Duration) -> Result<Leadership, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        // Two servers starting at once may both create it; the loser of that race sees a
        // unique violation on the catalog, and the table is there all the same.
        let created = client
            .exec(
                "CREATE TABLE IF NOT EXISTS leadership (
                    id BIGINT PRIMARY KEY CHECK (id = 1),
                    holder TEXT NOT NULL,
                    address TEXT NOT NULL,
                    epoch BIGINT NOT NULL,
                    deadline TIMESTAMPTZ NOT NULL)",
                &[],
            )
            .await;
        if let Err(e) = created {
            let exists = client.opt("SELECT to_regclass('leadership') IS NOT NULL", &[]).await?;
            if !exists.is_some_and(|r| r.get::<_, bool>(0)) {
                return Err(e);
            }
        }
        client
            .exec(
                "INSERT INTO leadership (id, holder, address, epoch, deadline) VALUES (1, '', '', 0, '-infinity')
                 ON CONFLICT (id) DO NOTHING",
                &[],
            )
            .await?;
        self.fence.epoch.store(-1, Ordering::SeqCst);
        Ok(Leadership {
            pool: self.pool.clone(),
            fence: self.fence.clone(),
            holder: holder.to_owned(),
            address: address.to_owned(),
            lease,
        })
    }
}

impl Leadership {
    /// Takes the lease if it is free or has run out, renews it if this server holds it, and
    /// says which. Call it at least once per lease (every second for a 3 s lease).
    pub async fn round(&self) -> Result<Tenure, StoreError> {
        // The lease counts here from before the request left, so it ends here no later than
        // in the database.
        let sent = self.fence.elapsed_ms();
        let client = self.pool.get().await.map_err(pool_error)?;
        let seconds = self.lease.as_secs_f64();
        let row = client
            .opt(
                "UPDATE leadership SET
                    epoch = CASE WHEN holder = $1 THEN epoch ELSE epoch + 1 END,
                    holder = $1, address = $2,
                    deadline = clock_timestamp() + make_interval(secs => $3)
                 WHERE id = 1 AND (holder = $1 OR deadline < clock_timestamp())
                 RETURNING epoch",
                &[&self.holder, &self.address, &seconds],
            )
            .await?;
        if let Some(row) = row {
            let epoch: i64 = row.get(0);
            let lease_ms = u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX);
            self.fence.until.store(sent.saturating_add(lease_ms), Ordering::SeqCst);
            self.fence.epoch.store(epoch, Ordering::SeqCst);
            return Ok(Tenure::Active { epoch });
        }
        let held = self.fence.epoch.swap(-1, Ordering::SeqCst) > 0;
        let active = self.holder().await?;
        Ok(if held { Tenure::Lost { active } } else { Tenure::Standby { active } })
    }

    /// The server the row names, while its lease runs.
    pub async fn holder(&self) -> Result<Option<Holder>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let row = client
            .opt("SELECT holder, address, epoch FROM leadership WHERE id = 1 AND deadline >= clock_timestamp()", &[])
            .await?;
        Ok(row.map(|r| Holder { holder: r.get(0), address: r.get(1), epoch: r.get(2) }))
    }

    /// Gives the lease up (a clean stop), so that a standby takes over at its next round
    /// rather than when the lease runs out. This store refuses the engine's writes from now on.
    pub async fn release(&self) -> Result<(), StoreError> {
        self.fence.epoch.store(-1, Ordering::SeqCst);
        let client = self.pool.get().await.map_err(pool_error)?;
        client
            .exec("UPDATE leadership SET deadline = '-infinity' WHERE id = 1 AND holder = $1", &[&self.holder])
            .await?;
        Ok(())
    }

    /// The epoch this server holds, if it holds the lease and it has not run out here.
    pub fn epoch(&self) -> Option<i64> {
        self.fence.local().ok().flatten()
    }

    /// Whether this server held the lease and it has run out here without a renewal: it must
    /// stop at once, since another server may take over any moment.
    pub fn expired(&self) -> bool {
        self.fence.expired()
    }

    /// This server's id in the row.
    pub fn holder_id(&self) -> &str {
        &self.holder
    }

    /// How long a lease lasts.
    pub fn lease(&self) -> Duration {
        self.lease
    }
}
