//! Why an alert could not be planned: the run is recorded as failed with this as its error,
//! and counted by kind (`reflex_plan_failures_total{reason}`).

/// A planning failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// Rhai raised an error in `when`, a parameter or a hole (the time budget included).
    #[error("{0}")]
    Script(String),
    /// A hole evaluated to nothing (a label or parameter the alert lacks).
    #[error("{0}")]
    Missing(String),
    /// A value its hole's context cannot hold safely (an option, empty, a path that leaves
    /// its directory, NUL…).
    #[error("{0}")]
    Refused(String),
    /// A step would act in a Kubernetes namespace the playbook does not allow.
    #[error("{0}")]
    Namespace(String),
}

impl PlanError {
    /// Bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            PlanError::Script(_) => "script",
            PlanError::Missing(_) => "missing_value",
            PlanError::Refused(_) => "refused_value",
            PlanError::Namespace(_) => "namespace",
        }
    }

    /// The same error, its message prefixed with where it happened.
    pub fn at(self, prefix: impl std::fmt::Display) -> PlanError {
        let wrap = |m: String| format!("{prefix}: {m}");
        match self {
            PlanError::Script(m) => PlanError::Script(wrap(m)),
            PlanError::Missing(m) => PlanError::Missing(wrap(m)),
            PlanError::Refused(m) => PlanError::Refused(wrap(m)),
            PlanError::Namespace(m) => PlanError::Namespace(wrap(m)),
        }
    }
}
