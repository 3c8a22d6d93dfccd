//! The vocabulary of runs and steps: their states, phases and failure modes, as stored and as
//! the API shows them. Each is an enum stored as its name; nothing compares them as text.

use crate::playbook::spec::{GateScope, OnFailure, Phase};
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
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
    /// A shadow run that went through every step: each was rendered, validated and recorded,
    /// and nothing was done.
    Shadow,
    /// A new occurrence that joined a queued run of the same playbook and alert (`reason`
    /// names it); it never runs itself.
    Coalesced,
    /// Shown, never stored: running, and an operator asked this replica to cancel it; it
    /// ends `cancelled` once its step under way has stopped.
    Cancelling,
}

impl RunState {
    /// Every stored state, for parsing.
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
        RunState::Shadow,
        RunState::Coalesced,
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
            RunState::Shadow => "shadow",
            RunState::Coalesced => "coalesced",
            RunState::Cancelling => "cancelling",
        }
    }

    /// Not over yet: waiting to start, executing (or being cancelled), or waiting for an
    /// approval.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            RunState::Pending
                | RunState::Running
                | RunState::Cancelling
                | RunState::AwaitingApproval
        )
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<RunState> {
        Self::ALL.iter().copied().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
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
    /// Rendered and recorded, not executed (shadow mode).
    Shadow,
    /// Stopped while under way: an operator cancelled the run.
    Cancelled,
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
            StepState::Shadow => "shadow",
            StepState::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for StepState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Approval request states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalState {
    /// Waiting for approvers.
    Pending,
    /// Approved by as many distinct approvers as it needs.
    Approved,
    /// Denied; its run ended without acting.
    Denied,
    /// Nobody decided in time; its run ended without acting.
    Expired,
    /// Its run ended some other way (resolved, cancelled, killed).
    Cancelled,
}

impl ApprovalState {
    /// Every state.
    pub const ALL: &'static [ApprovalState] = &[
        ApprovalState::Pending,
        ApprovalState::Approved,
        ApprovalState::Denied,
        ApprovalState::Expired,
        ApprovalState::Cancelled,
    ];

    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalState::Pending => "pending",
            ApprovalState::Approved => "approved",
            ApprovalState::Denied => "denied",
            ApprovalState::Expired => "expired",
            ApprovalState::Cancelled => "cancelled",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<ApprovalState> {
        Self::ALL.iter().copied().find(|a| a.as_str() == s)
    }
}

impl std::fmt::Display for ApprovalState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored word as PostgreSQL `TEXT`: written with `$name`, read with `$parse`.
macro_rules! pg_text {
    ($ty:ty, $name:expr, $parse:expr) => {
        impl postgres::types::ToSql for $ty {
            fn to_sql(
                &self,
                ty: &postgres::types::Type,
                out: &mut bytes::BytesMut,
            ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
                let name: fn(&$ty) -> &'static str = $name;
                <&str as postgres::types::ToSql>::to_sql(&name(self), ty, out)
            }

            fn accepts(ty: &postgres::types::Type) -> bool {
                <&str as postgres::types::ToSql>::accepts(ty)
            }

            postgres::types::to_sql_checked!();
        }

        impl<'a> postgres::types::FromSql<'a> for $ty {
            fn from_sql(
                ty: &postgres::types::Type,
                raw: &'a [u8],
            ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
                let text = <&str as postgres::types::FromSql>::from_sql(ty, raw)?;
                let parse: fn(&str) -> Option<$ty> = $parse;
                parse(text).ok_or_else(|| format!("unknown {} {text:?}", stringify!($ty)).into())
            }

            fn accepts(ty: &postgres::types::Type) -> bool {
                <&str as postgres::types::FromSql>::accepts(ty)
            }
        }
    };
}

impl ToSql for crate::playbook::actions::Action {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.name()))
    }
}

impl FromSql for crate::playbook::actions::Action {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let text = value.as_str()?;
        Self::parse(text)
            .ok_or_else(|| FromSqlError::Other(format!("unknown action {text:?}").into()))
    }
}

pg_text!(crate::playbook::actions::Action, |a| a.name(), |text| {
    Self::parse(text)
});

/// Each word of a stored vocabulary.
macro_rules! stored_as_names {
    ($($ty:ty => [$($variant:ident),+ $(,)?]),+ $(,)?) => {$(
        impl ToSql for $ty {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }

        impl FromSql for $ty {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                let text = value.as_str()?;
                [$(<$ty>::$variant),+]
                    .into_iter()
                    .find(|w| w.as_str() == text)
                    .ok_or_else(|| {
                        FromSqlError::Other(
                            format!("unknown {} {text:?}", stringify!($ty)).into(),
                        )
                    })
            }
        }

        pg_text!($ty, |w| w.as_str(), |text| [$(<$ty>::$variant),+]
            .into_iter()
            .find(|w| w.as_str() == text));
    )+};
}

stored_as_names! {
    RunState => [Pending, Running, Succeeded, Failed, Cancelled, Interrupted, Suppressed,
                 AwaitingApproval, Denied, Expired, Killed, Resolved, Shadow, Coalesced],
    StepState => [Pending, Running, Succeeded, Failed, Skipped, Interrupted, Shadow, Cancelled],
    OnFailure => [Stop, Continue],
    Phase => [Main, OnFailure],
    GateScope => [Run, Step],
    ApprovalState => [Pending, Approved, Denied, Expired, Cancelled],
    crate::alert::AlertStatus => [Firing, Resolved],
}

/// A moment is stored as milliseconds since the Unix epoch (`INTEGER` / `BIGINT`).
impl ToSql for crate::time::Timestamp {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.ms()))
    }
}

impl FromSql for crate::time::Timestamp {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        value.as_i64().map(crate::time::Timestamp::from_ms)
    }
}

impl postgres::types::ToSql for crate::time::Timestamp {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        postgres::types::ToSql::to_sql(&self.ms(), ty, out)
    }

    fn accepts(ty: &postgres::types::Type) -> bool {
        <i64 as postgres::types::ToSql>::accepts(ty)
    }

    postgres::types::to_sql_checked!();
}

impl<'a> postgres::types::FromSql<'a> for crate::time::Timestamp {
    fn from_sql(
        ty: &postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        <i64 as postgres::types::FromSql>::from_sql(ty, raw).map(crate::time::Timestamp::from_ms)
    }

    fn accepts(ty: &postgres::types::Type) -> bool {
        <i64 as postgres::types::FromSql>::accepts(ty)
    }
}
