//! Approval requests: what exactly will be done (rendered, hashed), who may approve, until
//! when, and who did. Decisions and their effect on the run are one transaction.

use super::db::Row;
use super::lifecycle::finish_run;
use super::{ApprovalState, Db, RunState, Store, StoreError};
use crate::playbook::Gate;
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One approver's decision.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Vote {
    /// Token name.
    pub who: String,
    /// When.
    #[schema(value_type = String, format = DateTime)]
    pub at: Timestamp,
    /// Their comment.
    pub comment: Option<String>,
}

/// An approval request as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ApprovalView {
    /// Approval id.
    pub id: i64,
    /// The run waiting on it.
    pub run_id: i64,
    /// The run's playbook.
    pub playbook: String,
    /// The gated step (0-based).
    pub step_idx: i64,
    /// Its name.
    pub step_name: String,
    /// The playbook's gate (covers every step) or one step's: `run` or `step`.
    #[schema(value_type = String)]
    pub scope: crate::playbook::spec::GateScope,
    /// Where it stands: pending, approved, denied, expired, cancelled.
    #[schema(value_type = String)]
    pub state: ApprovalState,
    /// Exactly what will be done: target, then each step's action and rendered arguments.
    #[schema(value_type = Object)]
    pub action: Value,
    /// SHA-256 of `action`: the approval applies to this and nothing else.
    pub action_hash: String,
    /// Distinct approvals needed.
    pub required: u32,
    /// Token names allowed to approve; empty: anyone with the approver role.
    pub approvers_allowed: Vec<String>,
    /// Approvals so far.
    pub approvals: Vec<Vote>,
    /// Requested.
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    /// Expires.
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: Timestamp,
    /// Decided.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub decided_at: Option<Timestamp>,
    /// By whom (the approver completing the count, or the denier).
    pub decided_by: Option<String>,
    /// The decider's comment.
    pub comment: Option<String>,
    /// What the run's evidence steps before the gate found (logs, events, a graph).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub evidence: Vec<super::Evidence>,
}

/// What a decision did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No such approval.
    NotFound,
    /// It is no longer pending (its state).
    NotPending(ApprovalState),
    /// It had expired; it and its run are now `expired`.
    Expired,
    /// A kill switch is engaged: nothing can be approved.
    Killed(String),
    /// This identity is not among the approvers the playbook names.
    NotAllowed,
    /// This identity already approved.
    AlreadyApproved,
    /// Approval recorded; more are needed.
    Recorded {
        /// Approvals so far.
        have: u32,
        /// Needed.
        need: u32,
    },
    /// Fully approved: the run is pending again.
    Approved,
    /// Denied: the run is `denied`.
    Denied,
}

/// Closes a run's pending approval (the run ended some other way).
pub(super) fn close_pending(
    c: &Db,
    run_id: i64,
    state: ApprovalState,
    now: i64,
) -> Result<(), StoreError> {
    c.later(
        "UPDATE approvals SET state = ?2, decided_at = ?3 WHERE run_id = ?1 AND state = 'pending'",
        &[&run_id, &state, &now],
    )
}

const SELECT: &str = "SELECT a.id, a.run_id, r.playbook, a.step_idx, s.name, a.scope, a.state, a.action, a.action_hash,
    a.required, a.allowed, a.approvals, a.created_at, a.expires_at, a.decided_at, a.decided_by, a.comment
  FROM approvals a JOIN runs r ON r.id = a.run_id JOIN steps s ON s.run_id = a.run_id AND s.idx = a.step_idx";

fn view(r: &Row) -> Result<ApprovalView, StoreError> {
    let text = |i: usize| -> Result<String, StoreError> { r.get(i) };
    Ok(ApprovalView {
        id: r.get(0)?,
        run_id: r.get(1)?,
        playbook: r.get(2)?,
        step_idx: r.get(3)?,
        step_name: r.get(4)?,
        scope: r.get(5)?,
        state: r.get(6)?,
        action: serde_json::from_str(&text(7)?).unwrap_or(Value::Null),
        action_hash: r.get(8)?,
        required: u32::try_from(r.get::<i64>(9)?).unwrap_or(u32::MAX),
        approvers_allowed: serde_json::from_str(&text(10)?).unwrap_or_default(),
        approvals: serde_json::from_str(&text(11)?).unwrap_or_default(),
        created_at: r.get(12)?,
        expires_at: r.get(13)?,
        decided_at: r.get(14)?,
        decided_by: r.get(15)?,
        comment: r.get(16)?,
        evidence: Vec::new(),
    })
}

/// Approvals with the evidence gathered before each.
fn with_evidence(c: &Db, mut views: Vec<ApprovalView>) -> Result<Vec<ApprovalView>, StoreError> {
    for v in &mut views {
        v.evidence = super::artifacts::run_evidence(c, v.run_id, v.step_idx)?;
    }
    Ok(views)
}

fn expire(c: &Db, id: i64, run_id: i64, now: i64) -> Result<(), StoreError> {
    c.exec(
        "UPDATE approvals SET state = 'expired', decided_at = ?2 WHERE id = ?1",
        &[&id, &now],
    )?;
    finish_run(
        c,
        run_id,
        RunState::Expired,
        Some("the approval request expired; nothing was done"),
        now,
    )?;
    super::audit::audit_in(
        c,
        "reflex",
        "approval.expire",
        Some(&format!("approval/{id} run/{run_id}")),
        "ok",
        None,
    )
}

impl Store {
    /// Requests approval for a run's step and parks the run in `awaiting_approval`, in one
    /// transaction, keeping the request for chat when `tell` (see [`super::outbox`]). Returns the approval id; [`StoreError::LostRun`] when the run is no
    /// longer executing as this replica's (see [`Store::step_started_after`]).
    pub async fn park_for_approval(
        &self,
        run_id: i64,
        step_idx: i64,
        gate: Gate,
        action: Value,
        hash: String,
        tell: bool,
    ) -> Result<(i64, Timestamp), StoreError> {
        let now = self.now_ms();
        let owner = self.inner.replica.clone();
        self.write(move |c| {
            let parked = c.exec(
                "UPDATE runs SET state = 'awaiting_approval'
                 WHERE id = ?1 AND state = 'running' AND owner = ?2",
                &[&run_id, &owner],
            )?;
            if parked == 0 {
                return Err(StoreError::LostRun(run_id));
            }
            let id = c.insert(
                "INSERT INTO approvals (run_id, step_idx, scope, state, action, action_hash, required, allowed, created_at, expires_at)
                 VALUES (?1, ?2, ?3, 'pending', ?4, ?5, ?6, ?7, ?8, ?9)",
                &[
                    &run_id,
                    &step_idx,
                    &gate.scope,
                    &action.to_string(),
                    &hash,
                    &i64::from(gate.count),
                    &serde_json::to_string(&gate.approvers).unwrap_or_else(|_| "[]".into()),
                    &now,
                    &(now + gate.expires_ms as i64),
                ],
            )?
            .ok_or(StoreError::NoRow)?;
            if tell {
                // The request goes to chat from the record, even after a crash (`outbox`).
                super::outbox::keep_ask(c, run_id, id, &owner, now)?;
            }
            Ok((id, Timestamp::from_ms(now + gate.expires_ms as i64)))
        })
        .await
    }

    /// The approval of a run's step: (id, state, action hash).
    pub async fn approval_of(
        &self,
        run_id: i64,
        step_idx: i64,
    ) -> Result<Option<(i64, ApprovalState, String)>, StoreError> {
        self.read(move |c| {
            c.row(
                "SELECT id, state, action_hash FROM approvals WHERE run_id = ?1 AND step_idx = ?2",
                &[&run_id, &step_idx],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
        })
        .await
    }

    /// Records an approver's decision (and, when it completes the count or denies, its effect
    /// on the run), audited in the same transaction.
    pub async fn decide(
        &self,
        id: i64,
        who: String,
        approve: bool,
        comment: Option<String>,
    ) -> Result<Decision, StoreError> {
        let now = self.now_ms();
        self.write(move |c| {
            // Replicas decide one at a time on PostgreSQL: the row is locked until the commit,
            // so two approvals at once both count.
            let row: Option<(i64, ApprovalState, i64, i64, String, String, String)> = c.row(
                if c.is_pg() {
                    "SELECT a.run_id, a.state, a.expires_at, a.required, a.allowed, a.approvals, r.playbook
                     FROM approvals a JOIN runs r ON r.id = a.run_id WHERE a.id = ?1 FOR UPDATE OF a"
                } else {
                    "SELECT a.run_id, a.state, a.expires_at, a.required, a.allowed, a.approvals, r.playbook
                     FROM approvals a JOIN runs r ON r.id = a.run_id WHERE a.id = ?1"
                },
                &[&id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
            )?;
            let Some((run_id, state, expires_at, required, allowed, votes, playbook)) = row else {
                return Ok(Decision::NotFound);
            };
            let required = u32::try_from(required).unwrap_or(u32::MAX);
            let target = format!("approval/{id} run/{run_id}");
            let action = if approve { "approval.approve" } else { "approval.deny" };
            let refuse = |tx: &Db, why: &str| super::audit::audit_in(tx, &who, action, Some(&target), "refused", Some(why));
            if state != ApprovalState::Pending {
                refuse(c, &format!("approval is {state}"))?;
                return Ok(Decision::NotPending(state));
            }
            if now >= expires_at {
                expire(c, id, run_id, now)?;
                refuse(c, "expired")?;
                return Ok(Decision::Expired);
            }
            let allowed: Vec<String> = serde_json::from_str(&allowed).unwrap_or_default();
            if !allowed.is_empty() && !allowed.contains(&who) {
                refuse(c, "not among the playbook's approvers")?;
                return Ok(Decision::NotAllowed);
            }
            if !approve {
                c.exec(
                    "UPDATE approvals SET state = 'denied', decided_at = ?2, decided_by = ?3, comment = ?4 WHERE id = ?1",
                    &[&id, &now, &who, &comment],
                )?;
                finish_run(c, run_id, RunState::Denied, Some(&format!("denied by {who}")), now)?;
                super::audit::audit_in(c, &who, action, Some(&target), "ok", comment.as_deref())?;
                return Ok(Decision::Denied);
            }
            if let Some(reason) = super::switches::engaged_reason(c, &playbook, now)? {
                refuse(c, &reason)?;
                return Ok(Decision::Killed(reason));
            }
            let mut votes: Vec<Vote> = serde_json::from_str(&votes).unwrap_or_default();
            if votes.iter().any(|v| v.who == who) {
                refuse(c, "already approved by this identity")?;
                return Ok(Decision::AlreadyApproved);
            }
            votes.push(Vote { who: who.clone(), at: Timestamp::from_ms(now), comment: comment.clone() });
            let have = votes.len() as u32;
            let text = serde_json::to_string(&votes).unwrap_or_else(|_| "[]".into());
            let decision = if have >= required {
                c.exec(
                    "UPDATE approvals SET state = 'approved', approvals = ?2, decided_at = ?3, decided_by = ?4, comment = ?5 WHERE id = ?1",
                    &[&id, &text, &now, &who, &comment],
                )?;
                c.exec(
                    "UPDATE runs SET state = 'pending' WHERE id = ?1 AND state = 'awaiting_approval'",
                    &[&run_id],
                )?;
                // Any replica may execute it now.
                c.wake();
                Decision::Approved
            } else {
                c.exec("UPDATE approvals SET approvals = ?2 WHERE id = ?1", &[&id, &text])?;
                Decision::Recorded { have, need: required }
            };
            super::audit::audit_in(c, &who, action, Some(&target), "ok", comment.as_deref())?;
            Ok(decision)
        })
        .await
    }

    /// Expires every pending approval past its time, with its run. Returns the run ids.
    pub async fn expire_due(&self) -> Result<Vec<i64>, StoreError> {
        let now = self.now_ms();
        self.write(move |c| {
            let due: Vec<(i64, i64)> = c.rows(
                if c.is_pg() {
                    // Another replica's sweeper waits, then finds them expired.
                    "SELECT id, run_id FROM approvals WHERE state = 'pending' AND expires_at <= ?1 FOR UPDATE"
                } else {
                    "SELECT id, run_id FROM approvals WHERE state = 'pending' AND expires_at <= ?1"
                },
                &[&now],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            for &(id, run_id) in &due {
                expire(c, id, run_id, now)?;
            }
            Ok(due.into_iter().map(|(_, run)| run).collect())
        })
        .await
    }

    /// Approvals, newest first, optionally in one state.
    pub async fn list_approvals(
        &self,
        state: Option<ApprovalState>,
        limit: u32,
    ) -> Result<Vec<ApprovalView>, StoreError> {
        self.read(move |c| {
            let views = c.rows(
                &format!("{SELECT} WHERE (a.state = ?1 OR ?1 IS NULL) ORDER BY a.id DESC LIMIT ?2"),
                &[&state, &i64::from(limit)],
                view,
            )?;
            with_evidence(c, views)
        })
        .await
    }

    /// How many approval requests are pending.
    pub async fn pending_approvals(&self) -> Result<i64, StoreError> {
        self.read(|c| {
            c.one(
                "SELECT count(*) FROM approvals WHERE state = 'pending'",
                &[],
                |r| r.get(0),
            )
        })
        .await
    }

    /// The approvals of one run, oldest first.
    pub async fn run_approvals(&self, run_id: i64) -> Result<Vec<ApprovalView>, StoreError> {
        self.read(move |c| {
            c.rows(
                &format!("{SELECT} WHERE a.run_id = ?1 ORDER BY a.id"),
                &[&run_id],
                view,
            )
        })
        .await
    }

    /// One approval.
    pub async fn get_approval(&self, id: i64) -> Result<Option<ApprovalView>, StoreError> {
        self.read(move |c| {
            let found = c.row(&format!("{SELECT} WHERE a.id = ?1"), &[&id], view)?;
            Ok(with_evidence(c, found.into_iter().collect())?.pop())
        })
        .await
    }
}
