//! The intake rules, decided in pure code: what becomes of one playbook matched by one alert.
//!
//! In order, the first that applies decides:
//! 1. a re-delivery of an occurrence already recorded is a duplicate (dedup);
//! 2. a new occurrence while a run of the same playbook and alert waits in the queue joins it
//!    (coalescing, when the playbook asks for it and the plan rendered);
//! 3. the holds, in order: a maintenance window, a kill switch (global or the playbook's), the
//!    playbook's cooldown, the circuit breaker (only for a run that could act: its plan
//!    rendered);
//! 4. a plan that could not be rendered fails the run;
//! 5. a run that may start now (a worker slot, its target free) starts in the same write;
//!    else it waits in the queue.
//!
//! The facts a rule needs come from [`Facts`], asked lazily and in this order, so that a
//! decided alert costs no further query: the store answers them inside its write transaction
//! (`store::intake`), tests answer them from a table.

use serde::Serialize;

/// What held a run back at intake, checked in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Hold {
    /// A maintenance window matched the alert.
    Maintenance,
    /// A kill switch (global or the playbook's) is engaged.
    KillSwitch,
    /// The playbook ran for the same key within its cooldown.
    Cooldown,
    /// One more run would cross a breaker limit; the breaker engaged the kill switch.
    Breaker,
}

/// What intake knows of a candidate without asking.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// The maintenance window holding the alert, as its reason, if one does.
    pub maintenance: Option<&'a str>,
    /// Whether the playbook joins a new occurrence to a queued run.
    pub coalesce: bool,
    /// The plan rendered, or why not.
    pub plan: Result<(), &'a str>,
}

/// The facts the rules ask for, each at most once and only when no earlier rule decided.
pub trait Facts {
    /// Why a fact could not be had (the store's error).
    type Error;
    /// The run already recorded for this occurrence.
    fn recorded(&mut self) -> Result<Option<i64>, Self::Error>;
    /// The queued run of the same playbook and alert a new occurrence would join.
    fn queued(&mut self) -> Result<Option<i64>, Self::Error>;
    /// Why a kill switch holds the playbook.
    fn kill_switch(&mut self) -> Result<Option<String>, Self::Error>;
    /// Why the cooldown holds it.
    fn cooldown(&mut self) -> Result<Option<String>, Self::Error>;
    /// Why one more run would cross a breaker limit (the store engages the switch as it
    /// answers).
    fn breaker(&mut self) -> Result<Option<String>, Self::Error>;
    /// Whether the run may start now.
    fn may_start(&mut self) -> Result<bool, Self::Error>;
}

/// What becomes of the candidate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A re-delivery: this run has it already.
    Duplicate(i64),
    /// Joins this queued run.
    Join(i64),
    /// Held back, with why.
    Hold(Hold, String),
    /// Recorded failed: its plan could not be rendered.
    Fail(String),
    /// Recorded and started in the same write.
    Start,
    /// Recorded pending, for the dispatcher.
    Queue,
}

/// Decides one candidate (see the module doc for the order).
pub fn decide<F: Facts>(c: Candidate<'_>, facts: &mut F) -> Result<Verdict, F::Error> {
    if let Some(run) = facts.recorded()? {
        return Ok(Verdict::Duplicate(run));
    }
    if c.coalesce
        && c.plan.is_ok()
        && let Some(run) = facts.queued()?
    {
        return Ok(Verdict::Join(run));
    }
    if let Some(why) = c.maintenance {
        return Ok(Verdict::Hold(Hold::Maintenance, why.to_string()));
    }
    if let Some(why) = facts.kill_switch()? {
        return Ok(Verdict::Hold(Hold::KillSwitch, why));
    }
    if let Some(why) = facts.cooldown()? {
        return Ok(Verdict::Hold(Hold::Cooldown, why));
    }
    if c.plan.is_ok()
        && let Some(why) = facts.breaker()?
    {
        return Ok(Verdict::Hold(Hold::Breaker, why));
    }
    if let Err(e) = c.plan {
        return Ok(Verdict::Fail(e.to_string()));
    }
    Ok(if facts.may_start()? {
        Verdict::Start
    } else {
        Verdict::Queue
    })
}

/// A playbook's autonomy (`autonomy:`): earned by verified runs, lost by failed ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AutonomyRules {
    /// Verified runs in a row after which acting steps run without an approval.
    pub approve_until: u32,
    /// Failed verifications (or undos) in a row that put the playbook back behind approval.
    pub demote_after: u32,
}

/// Whether a playbook's acting steps wait for a person.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Its acting steps need an approval.
    Approve,
    /// Earned: they run without one.
    Auto,
}

impl Level {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Approve => "approve",
            Level::Auto => "auto",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Level> {
        [Level::Approve, Level::Auto]
            .into_iter()
            .find(|l| l.as_str() == s)
    }
}

/// Where a playbook stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Standing {
    /// Its level.
    pub level: Level,
    /// Verified runs in a row.
    pub streak: u32,
    /// Failed verifications (or undos) in a row.
    pub failures: u32,
}

impl Default for Standing {
    /// Where every playbook starts: behind approval.
    fn default() -> Self {
        Standing {
            level: Level::Approve,
            streak: 0,
            failures: 0,
        }
    }
}

/// What a run of the playbook came to, as autonomy counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It succeeded, and its verification held.
    Verified,
    /// A verification step failed.
    VerificationFailed,
    /// An operator undid it.
    Undone,
    /// Anything else (failed before verifying, cancelled, denied): the streak is broken, the
    /// failures are not counted.
    Other,
}

/// The standing after one outcome: a verified run extends the streak (and clears the
/// failures), `approve_until` of them in a row promote; a failed verification or an undo
/// counts a failure (and breaks the streak), `demote_after` of them in a row demote; anything
/// else breaks the streak.
pub fn next_standing(s: Standing, outcome: Outcome, rules: AutonomyRules) -> Standing {
    let mut next = match outcome {
        Outcome::Verified => Standing {
            streak: s.streak.saturating_add(1),
            failures: 0,
            ..s
        },
        Outcome::VerificationFailed | Outcome::Undone => Standing {
            streak: 0,
            failures: s.failures.saturating_add(1),
            ..s
        },
        Outcome::Other => Standing { streak: 0, ..s },
    };
    match next.level {
        Level::Approve if next.streak >= rules.approve_until => next.level = Level::Auto,
        Level::Auto if next.failures >= rules.demote_after => {
            next = Standing {
                level: Level::Approve,
                streak: 0,
                failures: next.failures,
            };
        }
        _ => {}
    }
    next
}

/// How a run's end counts: `succeeded`, and the states of its `verify` steps (`Some(true)`
/// held, `Some(false)` failed, `None` never ran). A failed verification counts against the
/// playbook; a run that succeeded with at least one verification, all held, counts for it.
pub fn run_outcome(succeeded: bool, verifies: &[Option<bool>]) -> Outcome {
    if verifies.contains(&Some(false)) {
        Outcome::VerificationFailed
    } else if succeeded && !verifies.is_empty() && verifies.iter().all(|v| *v == Some(true)) {
        Outcome::Verified
    } else {
        Outcome::Other
    }
}

/// Why a playbook's level changed to `to`, the last run counted being `run_id` (audited and
/// told in chat).
pub fn change_reason(to: Standing, run_id: i64) -> String {
    match to.level {
        Level::Auto => format!(
            "{} verified runs in a row, the last run {run_id}",
            to.streak
        ),
        Level::Approve => format!(
            "{} failed verifications or undos in a row, the last run {run_id}",
            to.failures
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn autonomy_is_earned_by_verified_runs_in_a_row_and_lost_by_failed_ones() {
        let rules = AutonomyRules {
            approve_until: 3,
            demote_after: 2,
        };
        let walk = |outcomes: &[Outcome]| {
            (outcomes.iter()).fold(Standing::default(), |s, o| next_standing(s, *o, rules))
        };
        use Outcome::*;
        let level = |outcomes: &[Outcome]| walk(outcomes).level;
        assert_eq!(level(&[Verified, Verified]), Level::Approve);
        assert_eq!(level(&[Verified, Verified, Verified]), Level::Auto);
        // In a row: anything else starts the count again.
        assert_eq!(
            level(&[Verified, Verified, Other, Verified]),
            Level::Approve
        );
        assert_eq!(walk(&[Verified, Verified, Other, Verified]).streak, 1);
        // Earned, one failure is forgiven, two in a row demote; an undo counts as one.
        let earned = [Verified, Verified, Verified];
        assert_eq!(
            level(&[&earned[..], &[VerificationFailed]].concat()),
            Level::Auto
        );
        assert_eq!(
            level(&[&earned[..], &[VerificationFailed, Verified, Undone]].concat()),
            Level::Auto
        );
        let lost = walk(&[&earned[..], &[VerificationFailed, Undone]].concat());
        assert_eq!((lost.level, lost.streak), (Level::Approve, 0));
        // Demoted, it earns its way back from zero.
        let back = [&earned[..], &[Undone, Undone], &earned[..]].concat();
        assert_eq!(level(&back), Level::Auto);
        assert_eq!(level(&back[..back.len() - 1]), Level::Approve); // What counts: verifications that held, all of them, in a run that succeeded.
        assert_eq!(run_outcome(true, &[Some(true)]), Verified);
        assert_eq!(
            run_outcome(true, &[]),
            Other,
            "nothing verified, nothing earned"
        );
        assert_eq!(run_outcome(true, &[Some(true), None]), Other);
        assert_eq!(
            run_outcome(false, &[Some(true), Some(false)]),
            VerificationFailed
        );
    }

    /// Facts from a table; records which were asked.
    #[derive(Default)]
    struct Table {
        recorded: Option<i64>,
        queued: Option<i64>,
        kill: Option<&'static str>,
        cooldown: Option<&'static str>,
        breaker: Option<&'static str>,
        may_start: bool,
        asked: Vec<&'static str>,
    }

    impl Facts for Table {
        type Error = ();
        fn recorded(&mut self) -> Result<Option<i64>, ()> {
            self.asked.push("recorded");
            Ok(self.recorded)
        }
        fn queued(&mut self) -> Result<Option<i64>, ()> {
            self.asked.push("queued");
            Ok(self.queued)
        }
        fn kill_switch(&mut self) -> Result<Option<String>, ()> {
            self.asked.push("kill_switch");
            Ok(self.kill.map(String::from))
        }
        fn cooldown(&mut self) -> Result<Option<String>, ()> {
            self.asked.push("cooldown");
            Ok(self.cooldown.map(String::from))
        }
        fn breaker(&mut self) -> Result<Option<String>, ()> {
            self.asked.push("breaker");
            Ok(self.breaker.map(String::from))
        }
        fn may_start(&mut self) -> Result<bool, ()> {
            self.asked.push("may_start");
            Ok(self.may_start)
        }
    }

    const PLANNED: Candidate<'static> = Candidate {
        maintenance: None,
        coalesce: false,
        plan: Ok(()),
    };

    fn everything_holds() -> Table {
        Table {
            recorded: Some(1),
            queued: Some(2),
            kill: Some("kill"),
            cooldown: Some("cooldown"),
            breaker: Some("breaker"),
            may_start: true,
            ..Default::default()
        }
    }

    #[test]
    fn the_first_rule_that_applies_decides_and_nothing_after_it_is_asked() {
        let coalescing = Candidate {
            coalesce: true,
            maintenance: Some("window w"),
            ..PLANNED
        };
        // Take the rules away one by one, from the first: each next one decides.
        let mut t = everything_holds();
        assert_eq!(decide(coalescing, &mut t), Ok(Verdict::Duplicate(1)));
        assert_eq!(t.asked, ["recorded"]);
        let mut t = Table {
            recorded: None,
            ..everything_holds()
        };
        assert_eq!(decide(coalescing, &mut t), Ok(Verdict::Join(2)));
        let mut t = Table {
            recorded: None,
            queued: None,
            ..everything_holds()
        };
        assert_eq!(
            decide(coalescing, &mut t),
            Ok(Verdict::Hold(Hold::Maintenance, "window w".into()))
        );
        assert_eq!(
            t.asked,
            ["recorded", "queued"],
            "no switch, cooldown or breaker read"
        );
        let mut t = Table {
            recorded: None,
            queued: None,
            ..everything_holds()
        };
        assert_eq!(
            decide(PLANNED, &mut t),
            Ok(Verdict::Hold(Hold::KillSwitch, "kill".into()))
        );
        let mut t = Table {
            recorded: None,
            kill: None,
            ..everything_holds()
        };
        assert_eq!(
            decide(PLANNED, &mut t),
            Ok(Verdict::Hold(Hold::Cooldown, "cooldown".into()))
        );
        let mut t = Table {
            recorded: None,
            kill: None,
            cooldown: None,
            ..everything_holds()
        };
        assert_eq!(
            decide(PLANNED, &mut t),
            Ok(Verdict::Hold(Hold::Breaker, "breaker".into()))
        );
        assert_eq!(t.asked, ["recorded", "kill_switch", "cooldown", "breaker"]);
        let mut t = Table {
            may_start: true,
            ..Default::default()
        };
        assert_eq!(decide(PLANNED, &mut t), Ok(Verdict::Start));
        let mut t = Table::default();
        assert_eq!(decide(PLANNED, &mut t), Ok(Verdict::Queue));
    }

    #[test]
    fn a_plan_that_failed_is_held_by_switches_but_never_trips_the_breaker_or_starts() {
        let failed = Candidate {
            plan: Err("missing label instance"),
            coalesce: true,
            ..PLANNED
        };
        let mut t = Table {
            queued: Some(2),
            breaker: Some("breaker"),
            may_start: true,
            ..Default::default()
        };
        assert_eq!(
            decide(failed, &mut t),
            Ok(Verdict::Fail("missing label instance".into()))
        );
        assert_eq!(
            t.asked,
            ["recorded", "kill_switch", "cooldown"],
            "never joins a run"
        );
        let mut t = Table {
            kill: Some("kill"),
            ..Default::default()
        };
        assert_eq!(
            decide(failed, &mut t),
            Ok(Verdict::Hold(Hold::KillSwitch, "kill".into()))
        );
    }

    #[test]
    fn a_joining_occurrence_is_not_held() {
        // A queued run already holds its place: the new occurrence joins it whatever holds.
        let mut t = Table {
            recorded: None,
            ..everything_holds()
        };
        let c = Candidate {
            coalesce: true,
            ..PLANNED
        };
        assert_eq!(decide(c, &mut t), Ok(Verdict::Join(2)));
        assert_eq!(t.asked, ["recorded", "queued"]);
    }
}
