//! Replica leases (PostgreSQL): each replica holds a row it renews every [`LEASE_RENEW`]; a
//! row not renewed for [`LEASE_EXPIRY`] (by the database's clock) belongs to a replica that is
//! gone. Any other replica then takes over what it held, in one transaction: its running
//! steps and the runs they belong to are marked `interrupted` (never re-run, as after a
//! crash), and its runs claimed but not yet started go back to the queue.
//!
//! A replica claims and starts runs only while its own lease is good by its own clock, with a
//! margin ([`LEASE_TRUSTED`]): one cut off from the database stops claiming before the others
//! may take its runs over. On SQLite there is one process and no lease.

use super::*;
use std::time::{Duration, Instant};

/// How often a replica renews its lease.
pub const LEASE_RENEW: Duration = Duration::from_secs(2);
/// How long a lease lasts without renewal.
pub const LEASE_EXPIRY: Duration = Duration::from_secs(10);
/// How long after a renewal a replica trusts its own lease (less than the expiry: the others
/// judge by the database's clock, and the renewal took some time).
pub const LEASE_TRUSTED: Duration = Duration::from_secs(7);

/// The database's clock in ms.
const DB_NOW: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// What a takeover did to one replica's work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Takeover {
    /// The replica whose lease expired.
    pub replica: String,
    /// Its runs that were executing a step (or between steps): now `interrupted`.
    pub interrupted: Vec<i64>,
    /// Its runs claimed but not started: pending again.
    pub requeued: Vec<i64>,
    /// The end messages it had not delivered, now this replica's to send.
    pub untold: Vec<super::Untold>,
}

/// This replica's lease as it knows it (process-local): when it was last renewed, and how
/// many times a renewal found it taken over (each time, the runs this replica held were
/// interrupted or requeued by another).
#[derive(Debug, Default)]
pub(super) struct LeaseClock {
    state: tokio::sync::watch::Sender<Lease>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Lease {
    renewed: Option<Instant>,
    lost: u64,
}

impl Lease {
    fn good(&self) -> bool {
        self.renewed.is_some_and(|at| at.elapsed() < LEASE_TRUSTED)
    }
}

impl LeaseClock {
    /// Renewed at `at`; `kept`: the lease was this replica's still (not taken over).
    fn renewed_now(&self, at: Instant, kept: bool) {
        self.state.send_modify(|l| {
            if !kept && l.renewed.is_some() {
                l.lost += 1;
            }
            l.renewed = Some(at);
        });
    }

    fn renewed_never(&self) -> bool {
        self.state.borrow().renewed.is_none()
    }

    fn good(&self) -> bool {
        self.state.borrow().good()
    }

    fn lost(&self) -> u64 {
        self.state.borrow().lost
    }

    /// Until the lease is good.
    async fn good_again(&self) {
        let mut rx = self.state.subscribe();
        // The sender lives as long as the store, which `self` borrows.
        let _ = rx.wait_for(Lease::good).await;
    }
}

impl Store {
    /// Whether this replica may claim and start runs: always on SQLite; on PostgreSQL while
    /// its lease is good.
    pub fn may_claim(&self) -> bool {
        !self.is_shared() || self.inner.lease.good()
    }

    /// How many times a renewal found this replica's lease taken over (PostgreSQL; always 0
    /// on SQLite). Read before a write that takes or confirms runs ([`Store::claim`],
    /// [`Store::record_and_start`], a step's start), it dates what that write confirmed: see
    /// [`Store::still_holds_step`].
    pub fn leases_lost(&self) -> u64 {
        self.inner.lease.lost()
    }

    /// Whether this replica may act on a step whose start was confirmed (recorded under its
    /// ownership) when [`Store::leases_lost`] read `since`. Always on SQLite. On PostgreSQL,
    /// at once while the lease is good and was not taken over since. Otherwise the task ran
    /// late: another replica may have taken the run over (it is then `interrupted`, "never
    /// re-run"), or may do so while the lease is not renewed. So this waits until the lease is
    /// good again, then reads whether the run is still this replica's and the step still
    /// `running`. Once it says yes, no takeover can come for the lease's trusted time.
    pub async fn still_holds_step(
        &self,
        run_id: i64,
        idx: i64,
        since: u64,
    ) -> Result<bool, StoreError> {
        let lease = &self.inner.lease;
        if !self.is_shared() || (lease.good() && lease.lost() == since) {
            return Ok(true);
        }
        lease.good_again().await;
        let me = self.inner.replica.clone();
        self.read(move |c| {
            c.one(
                "SELECT EXISTS (SELECT 1 FROM runs r JOIN steps s ON s.run_id = r.id
                   WHERE r.id = ?1 AND r.state = 'running' AND r.owner = ?2
                     AND s.idx = ?3 AND s.state = 'running')",
                &[&run_id, &me, &idx],
                |r| r.get(0),
            )
        })
        .await
    }

    /// Tests: the lease last renewed as long ago as this replica trusts it, as if its
    /// renewals had stopped (the database away, the process paused).
    #[cfg(test)]
    pub(crate) fn lapse_lease(&self) {
        let long_ago = Instant::now().checked_sub(LEASE_TRUSTED);
        self.inner
            .lease
            .state
            .send_modify(|l| l.renewed = long_ago.or(l.renewed));
    }

    /// Tests: how many tasks wait for this replica's lease to be good again.
    #[cfg(test)]
    pub(crate) fn lease_waiters(&self) -> usize {
        self.inner.lease.state.receiver_count()
    }

    /// Renews this replica's lease (PostgreSQL; a no-op on SQLite). Returns `false` when the
    /// lease had expired and was taken over: the replica had been cut off.
    pub async fn renew_lease(&self) -> Result<bool, StoreError> {
        if !self.is_shared() {
            return Ok(true);
        }
        let me = self.inner.replica.clone();
        let expiry = LEASE_EXPIRY.as_millis() as i64;
        let asked = Instant::now();
        // Not through the writer: a renewal must not wait behind a batch of writes. Whether
        // the row was there is read from the row the statement leaves (`xmax` is 0 on a row
        // it inserted), not from a read before it: a takeover this statement waited for
        // deleted the row after any such read.
        let kept = self
            .read(move |c| {
                c.one(
                    &format!(
                        "INSERT INTO replicas (name, started_at, renewed_at, expires_at)
                           VALUES (?1, {DB_NOW}, {DB_NOW}, {DB_NOW} + ?2)
                         ON CONFLICT (name) DO UPDATE SET renewed_at = excluded.renewed_at,
                           expires_at = excluded.expires_at
                         RETURNING NOT (xmax = 0)"
                    ),
                    &[&me, &expiry],
                    |r| r.get::<bool>(0),
                )
            })
            .await?;
        let first = self.inner.lease.renewed_never();
        self.inner.lease.renewed_now(asked, kept);
        Ok(kept || first)
    }

    /// Takes over the work of every replica whose lease has expired (PostgreSQL; nothing on
    /// SQLite). Replicas doing this at once each take different ones.
    pub async fn take_over_expired(&self) -> Result<Vec<Takeover>, StoreError> {
        if !self.is_shared() {
            return Ok(Vec::new());
        }
        let now = self.now_ms();
        let me = self.inner.replica.clone();
        let taken = self
            .write(move |c| {
                let gone: Vec<String> = c.rows(
                    &format!(
                        "SELECT name FROM replicas WHERE expires_at < {DB_NOW}
                         ORDER BY name FOR UPDATE SKIP LOCKED"
                    ),
                    &[],
                    |r| r.get(0),
                )?;
                let mut out = Vec::new();
                for replica in gone {
                    let requeued = requeue_unstarted(c, &replica)?;
                    let interrupted = super::queue::interrupt_running(
                        c,
                        Some(&replica),
                        now,
                        "the replica running this step stopped renewing its lease; it was not re-run",
                        "the replica running it was lost; check the target before re-running",
                    )?;
                    let untold = super::outbox::take(c, Some(&replica), &me)?;
                    c.exec("DELETE FROM replicas WHERE name = ?1", &[&replica])?;
                    super::audit::audit_in(
                        c,
                        "reflex",
                        "replica.takeover",
                        Some(&format!("replica/{replica}")),
                        "ok",
                        Some(&format!(
                            "lease expired; interrupted runs {interrupted:?}, requeued runs {requeued:?}"
                        )),
                    )?;
                    out.push(Takeover {
                        replica,
                        interrupted,
                        requeued,
                        untold,
                    });
                }
                if out.iter().any(|t| !t.requeued.is_empty()) {
                    c.wake();
                }
                Ok(out)
            })
            .await?;
        Ok(taken)
    }
}

impl Store {
    /// This replica's runs that the database says are running (the engine compares them
    /// with the runs it executes, to find any it lost track of).
    pub async fn owned_running(&self) -> Result<Vec<i64>, StoreError> {
        let me = self.inner.replica.clone();
        self.read(move |c| {
            c.rows(
                "SELECT id FROM runs WHERE state = 'running' AND owner = ?1 ORDER BY id",
                &[&me],
                |r| r.get(0),
            )
        })
        .await
    }

    /// Ends this replica's hold on runs its engine does not execute (their claim or start
    /// committed while the answer was lost with the connection): each goes back to the queue
    /// if no step of it started, else ends `interrupted`, as in a takeover.
    pub async fn release_orphans(&self, ids: Vec<i64>) -> Result<Takeover, StoreError> {
        let me = self.inner.replica.clone();
        let now = self.now_ms();
        self.write(move |c| {
            let mut out = Takeover {
                replica: me.clone(),
                interrupted: Vec::new(),
                requeued: Vec::new(),
                untold: Vec::new(),
            };
            for &id in &ids {
                let requeued = c.exec(
                    "UPDATE runs SET state = 'pending', owner = NULL
                     WHERE id = ?1 AND state = 'running' AND owner = ?2
                       AND NOT EXISTS (SELECT 1 FROM steps s WHERE s.run_id = ?1 AND s.state != 'pending')",
                    &[&id, &me],
                )?;
                if requeued > 0 {
                    out.requeued.push(id);
                    continue;
                }
                let owned: bool = c.one(
                    "SELECT EXISTS (SELECT 1 FROM runs WHERE id = ?1 AND state = 'running' AND owner = ?2)",
                    &[&id, &me],
                    |r| r.get(0),
                )?;
                if owned {
                    c.exec(
                        "UPDATE steps SET state = 'interrupted', finished_at = ?2,
                           error = 'this replica lost track of the run; the step was not re-run'
                         WHERE run_id = ?1 AND state = 'running'",
                        &[&id, &now],
                    )?;
                    super::lifecycle::finish_run(
                        c,
                        id,
                        RunState::Interrupted,
                        Some("the replica running it lost track of it; check the target before re-running"),
                        now,
                    )?;
                    out.interrupted.push(id);
                }
            }
            if !out.requeued.is_empty() {
                c.wake();
            }
            Ok(out)
        })
        .await
    }
}

/// A replica's runs that were claimed and had not started a step: back to the queue.
fn requeue_unstarted(c: &Db, owner: &str) -> Result<Vec<i64>, StoreError> {
    c.rows(
        "UPDATE runs SET state = 'pending', owner = NULL
         WHERE state = 'running' AND owner = ?1
           AND NOT EXISTS (SELECT 1 FROM steps s WHERE s.run_id = runs.id AND s.state != 'pending')
         RETURNING id",
        &[&owner],
        |r| r.get(0),
    )
}
