//! The vocabulary of runs and steps: their states, as stored and as the API shows them.

use serde::Serialize;

/// Run states. Final: everything but `pending` and `running`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Recorded, waiting for a worker.
    Pending,
    /// Executing steps.
    Running,
    /// Every step succeeded (or failed with `on_failure: continue`).
    Succeeded,
    /// A step failed, or the run could not be planned.
    Failed,
    /// An operator cancelled it.
    Cancelled,
    /// The daemon stopped while it ran; never resumed silently.
    Interrupted,
    /// Not started: a cooldown, the kill switch, a maintenance window or the circuit
    /// breaker held it back; `reason` says which.
    Suppressed,
    /// Waiting for approval of its next step.
    AwaitingApproval,
    /// An approver denied it; nothing more ran.
    Denied,
    /// Its approval request expired; nothing more ran.
    Expired,
    /// The kill switch stopped it before its next step.
    Killed,
    /// Its alert resolved before it finished (waiting in the queue, for approval, or between
    /// steps); nothing more ran.
    Resolved,
    /// A dry run that went through every step: each was rendered, validated and recorded,
    /// and nothing was done.
    DryRun,
}

impl RunState {
    /// Every state, for parsing.
    pub const ALL: &'static [RunState] = &[
        RunState::Pending,
        RunState::Running,
        RunState::Succeeded,
        RunState::Failed,
        RunState::Cancelled,
        RunState::Interrupted,
        RunState::Suppressed,
        RunState::AwaitingApproval,
        RunState::Denied,
        RunState::Expired,
        RunState::Killed,
        RunState::Resolved,
        RunState::DryRun,
    ];

    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Pending => "pending",
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
            RunState::Interrupted => "interrupted",
            RunState::Suppressed => "suppressed",
            RunState::AwaitingApproval => "awaiting_approval",
            RunState::Denied => "denied",
            RunState::Expired => "expired",
            RunState::Killed => "killed",
            RunState::Resolved => "resolved",
            RunState::DryRun => "dry_run",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<RunState> {
        Self::ALL.iter().copied().find(|r| r.as_str() == s)
    }
}

/// Step states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Not started.
    Pending,
    /// Started; its action may be under way.
    Running,
    /// Done.
    Succeeded,
    /// Failed (error recorded).
    Failed,
    /// Never started because the run ended first.
    Skipped,
    /// Was running when the daemon stopped; not re-run.
    Interrupted,
    /// Rendered and recorded, not executed (dry run).
    DryRun,
}

impl StepState {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Running => "running",
            StepState::Succeeded => "succeeded",
            StepState::Failed => "failed",
            StepState::Skipped => "skipped",
            StepState::Interrupted => "interrupted",
            StepState::DryRun => "dry_run",
        }
    }
}
