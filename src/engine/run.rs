//! Drives one claimed run, step by step. Every transition is written to the store before the
//! next action; the kill switch, the run deadline and shutdown are honoured between steps,
//! never inside one; an operator's cancel also stops the step under way. A step behind an approval gate parks the run
//! (`awaiting_approval`) and frees its worker; an approval puts it back in the queue.

use super::Engine;
use super::budgets::Budget;
use crate::executors::{ExecError, Executor, StepContext};
use crate::notify::Event;
use crate::playbook::actions::Action;
use crate::playbook::spec::{GateScope, OnFailure, Phase};
use crate::store::{
    ApprovalState, ClaimedRun, EndMessage, RunState, StepRecord, StepResult, StepState, StoreError,
    Untold,
};
use crate::text::storable;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// How long past its timeout an executor may take to report before the engine gives up on it.
const EXECUTOR_GRACE: Duration = Duration::from_secs(15);

/// How long a cancelled step's executor may take to stop what it started (an SSH command's
/// remote process group: TERM, then KILL two seconds later).
const CANCEL_GRACE: Duration = Duration::from_secs(8);

/// Why a run stopped before its last step.
pub(super) enum Stop {
    /// It ended in this state.
    End { state: RunState, error: String },
    /// It waits for approval; its state is already `awaiting_approval`.
    Parked,
    /// It is not this task's to drive: taken over by another replica, or started by another
    /// claim of it (see [`crate::store::Store::step_started_after`]). Its end is not written.
    Lost,
}

fn step_ref(run: &ClaimedRun, step: &StepRecord) -> crate::store::StepRef {
    crate::store::StepRef {
        run_id: run.id,
        idx: step.idx,
        action: step.action,
        target: run.target.clone(),
    }
}

fn end(state: RunState, error: impl Into<String>) -> Stop {
    Stop::End {
        state,
        error: error.into(),
    }
}

/// A step's start refused: the run is lost to this task ([`Stop::Lost`]); else as
/// [`record_err`].
fn start_err(e: StoreError) -> Stop {
    match e {
        StoreError::LostRun(_) => Stop::Lost,
        e => record_err(e),
    }
}

/// A run's end as it is recorded when the database refused it as it was (`refused`): the same
/// state, and a note in place of each text the run's steps produced (the last step's output
/// and error, the run's error), which is where a text the database will not take comes from.
fn without_texts(
    had_error: bool,
    last: Option<StepResult>,
    refused: &StoreError,
) -> (Option<String>, Option<StepResult>) {
    let note = format!("not recorded as it was, refused by the store: {refused}");
    let note = storable(&note).into_owned();
    let last = last.map(|step| StepResult {
        output: None,
        error: Some(format!("its result was {note}")),
        ..step
    });
    let error = (had_error || last.is_some()).then(|| format!("the run's end was {note}"));
    (error, last)
}

pub(super) fn record_err(e: StoreError) -> Stop {
    end(
        RunState::Failed,
        format!("cannot record step state, stopped before acting: {e}"),
    )
}

/// Whether step `i` is the first step of a run that intake started in its own transaction.
fn started_at_intake(run: &ClaimedRun, i: usize) -> bool {
    run.first_step_started && i == 0 && run.steps[0].state == StepState::Running
}

/// Exactly what an approval covers: the target and, for each covered step, its action and
/// rendered arguments. Its hash binds an approval to this and nothing else.
pub(crate) fn gated_action(target: &str, steps: &[StepRecord]) -> (Value, String) {
    let steps: Vec<Value> = steps
        .iter()
        .map(|s| json!({ "step": s.name, "action": s.action, "args": s.args }))
        .collect();
    let action = json!({ "target": target, "steps": steps });
    // serde_json sorts object keys, so equal actions hash equally.
    let hash = hex::encode(Sha256::digest(action.to_string().as_bytes()));
    (action, hash)
}

/// What a run has done so far.
#[derive(Default)]
struct Progress {
    /// Outputs of the steps that succeeded, by step name.
    outputs: Vec<(String, Value)>,
    /// The previous step's result, not yet written: it goes with the run's next write (the
    /// next step's start, a park for approval, or the run's end), so that it is on disk before
    /// anything else is done; the message about it (a failure the run went on after) is sent
    /// after that write.
    unwritten: Option<(StepResult, Option<Event>)>,
    /// The step that ended the run was refused before acting (nothing was sent).
    refused: bool,
}

/// What a finished run says.
enum Report {
    /// Figures from the steps, for the default message.
    Figures(String),
    /// The playbook's own `report`, which replaces the default message.
    Playbook(String),
}

/// What a shadow run would have done, step by step, with the gates it would have waited at.
fn dry_run_summary(outputs: &[(String, Value)]) -> String {
    let steps: Vec<String> = outputs
        .iter()
        .filter_map(|(_, o)| {
            let w = o.get("would_run")?;
            let mut line = format!("{} {}", w["action"].as_str().unwrap_or(""), w["args"]);
            if let Some(gate) = o.get("would_wait_for") {
                let n = gate["approvals"].as_u64().unwrap_or(1);
                let s = if n == 1 { "" } else { "s" };
                line = format!("{line} (would wait for {n} approval{s} first)");
            }
            Some(line)
        })
        .collect();
    format!("Nothing was done. Would have run: {}", steps.join("; "))
}

impl Engine {
    /// Drives a claimed run through its steps to its end (or its park at an approval gate),
    /// recording each transition before the next action. (The executors `execute` a step;
    /// the engine drives a run.)
    pub(crate) async fn drive(self: &Arc<Self>, run: ClaimedRun) {
        let span = tracing::info_span!("run", run_id = run.id, playbook = %run.playbook);
        let token = {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            let driving = running.entry(run.id).or_default();
            if driving.driven {
                // Claimed twice by this replica (once before it lost its lease, loaded late,
                // and again since): one task drives it.
                let _span = span.enter();
                tracing::warn!("the run is driven by this replica already; not twice");
                return;
            }
            driving.driven = true;
            driving.token.clone()
        };
        async {
            tracing::info!(steps = run.steps.len(), dry_run = run.dry_run, target = %run.target, "run started");
            let info = self.claimed_info(&run);
            let fresh = run.first_step_started
                || run.steps.iter().all(|s| s.state == StepState::Pending);
            if fresh && !run.resumed {
                self.live().notifier.send(Event::RunStarted { run: info.clone() });
            }
            // Outputs of the steps done so far (a resumed run has some already).
            let mut progress = Progress {
                outputs: (run.steps.iter())
                    .filter_map(|s| Some((s.name.clone(), s.output.clone()?)))
                    .collect(),
                unwritten: None,
                refused: false,
            };
            let (state, error) = match self.steps(&run, &token, &mut progress).await {
                Ok(()) if run.dry_run => (RunState::Shadow, None),
                Ok(()) => (RunState::Succeeded, None),
                Err(Stop::Parked) => {
                    tracing::info!("run waits for approval");
                    return;
                }
                Err(Stop::Lost) => {
                    tracing::warn!(
                        "the run is no longer this task's (taken over, or claimed again); acting no further"
                    );
                    return;
                }
                Err(Stop::End { state, error }) => (state, Some(error)),
            };
            let elapsed = (self.store.now_ms() - run.started_ms).max(0) as f64 / 1000.0;
            self.metrics.runs.with_label_values(&[&run.playbook, state.as_str()]).inc();
            self.metrics.run_duration.with_label_values(&[&run.playbook]).observe(elapsed);
            let (last, last_event) = progress.unwritten.take().unzip();
            // The last step's result, its audit row and the run's end: one write. Retried while
            // the database is away (a PostgreSQL restart, a failover): the end of a run that
            // acted must reach the record.
            let refused = state == RunState::Failed && progress.refused;
            let (summary, report) = match self.report(&run, state, elapsed, &progress.outputs) {
                Report::Figures(s) => (s, None),
                Report::Playbook(r) => (String::new(), Some(r)),
            };
            // The end's message is kept with the end until chat has it (see `store::outbox`).
            let shown = self.live().notifier.shows(&run.playbook, "run_finished");
            let message = shown.then(|| EndMessage {
                summary: summary.clone(),
                report: report.clone(),
            });
            let end = |error, last, message| {
                let limits = self.live().limits;
                (self.store).run_finished_telling(run.id, state, error, last, limits, refused, message)
            };
            let write = || end(error.clone(), last.clone(), message.clone());
            let backoff = backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(5))
                .with_max_times(40)
                .with_jitter();
            let written = backon::Retryable::retry(write, backoff)
                .when(StoreError::is_transient)
                .notify(|e: &StoreError, d| {
                    tracing::warn!(error = %e, retry_in = ?d, "cannot record the end of the run yet; retrying");
                })
                .await;
            let written = match written {
                Err(e) if !e.is_transient() => {
                    // Refused for what it says (a text the database will not take, say): the
                    // run ends all the same, without the texts, rather than hold its target
                    // `running` until a restart.
                    tracing::error!(error = %e, state = state.as_str(), "cannot record the end of the run as it was; recording it without its texts");
                    let (error, last) = without_texts(error.is_some(), last, &e);
                    // Its message may hold the same texts: sent, not kept.
                    end(error, last, None).await.map(|tripped| (tripped, false))
                }
                written => written.map(|tripped| (tripped, message.is_some())),
            };
            let (tripped, kept) = match written {
                Ok(written) => {
                    tracing::info!(state = state.as_str(), error = error.as_deref(), "run finished");
                    written
                }
                Err(e) => {
                    tracing::error!(error = %e, state = state.as_str(), "cannot record the end of the run");
                    (None, false)
                }
            };
            if let Some(event) = last_event.flatten() {
                self.live().notifier.send(event);
            }
            let evidence = self.evidence_of(&run, i64::MAX).await;
            let event = Event::RunFinished {
                run: info,
                evidence,
                state,
                duration_seconds: elapsed,
                summary,
                report,
                error,
            };
            let kept = (message.filter(|_| kept))
                .map(|message| self.told_when_sent(Untold::End { run_id: run.id, message }));
            self.live().notifier.send_kept(event, kept);
            if let Some(trip) = tripped {
                self.announce_breaker(trip.scope(), trip.to_string());
            }
            self.count_toward_autonomy(&run, state).await;
        }
        .instrument(span)
        .await;
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&run.id);
        // A run that held its target's slot may have kept others waiting.
        self.wake.notify_one();
    }

    /// The figures a finished run reports: the playbook's `report` template if it has one,
    /// else the `summary` of each step that gave one ("Cleanup ran. Space reclaimed: 5.1 GB").
    fn report(
        &self,
        run: &ClaimedRun,
        state: RunState,
        elapsed: f64,
        outputs: &[(String, Value)],
    ) -> Report {
        if run.dry_run {
            return Report::Figures(dry_run_summary(outputs));
        }
        let set = self.playbooks();
        if let Some(template) = set.get(&run.playbook).and_then(|p| p.report.as_ref()) {
            let mut scope = crate::playbook::script::alert_scope(&run.alert);
            let steps: serde_json::Map<String, Value> = outputs.iter().cloned().collect();
            let run_map = json!({
                "id": run.id,
                "state": state.as_str(),
                "duration_seconds": elapsed,
                "duration": crate::notify::human_duration(elapsed),
                "target": run.target,
            });
            for (name, value) in [
                ("params", &run.params),
                ("steps", &Value::Object(steps)),
                ("run", &run_map),
            ] {
                scope.push_constant(name, rhai::serde::to_dynamic(value).unwrap_or_default());
            }
            match template.render(&set.sandbox, &mut scope) {
                Ok(Value::String(s)) => return Report::Playbook(s),
                Ok(other) => return Report::Playbook(other.to_string()),
                Err(e) => {
                    tracing::warn!(error = %e, "the playbook's report template failed; using the default summary")
                }
            }
        }
        let parts: Vec<&str> = outputs
            .iter()
            .filter_map(|(_, o)| o["summary"].as_str())
            .collect();
        Report::Figures(parts.join(" "))
    }

    /// Between steps: may the run go on?
    async fn may_continue(
        &self,
        run: &ClaimedRun,
        step: &StepRecord,
        token: &tokio_util::sync::CancellationToken,
    ) -> Result<(), Stop> {
        if token.is_cancelled() {
            return Err(end(
                RunState::Cancelled,
                format!("cancelled by an operator before step {:?}", step.name),
            ));
        }
        if self.shutdown.is_cancelled() {
            return Err(end(
                RunState::Interrupted,
                format!("the daemon shut down before step {:?}", step.name),
            ));
        }
        if let Some(reason) = self
            .store
            .kill_reason(&run.playbook)
            .await
            .map_err(record_err)?
        {
            return Err(end(
                RunState::Killed,
                format!("stopped before step {:?}: {reason}", step.name),
            ));
        }
        let stops_on_resolve = self
            .playbooks()
            .get(&run.playbook)
            .is_none_or(|p| p.on_resolve == crate::playbook::spec::OnResolve::Stop);
        if stops_on_resolve
            && self
                .store
                .resolved_while_running(run.id)
                .await
                .map_err(record_err)?
        {
            return Err(end(
                RunState::Resolved,
                format!("the alert resolved; stopped before step {:?}", step.name),
            ));
        }
        if let Some(deadline) = run.deadline_ms
            && self.store.now_ms() > run.started_ms + deadline
        {
            let d = crate::time::format_duration(Duration::from_millis(deadline as u64));
            return Err(end(
                RunState::Failed,
                format!("run deadline of {d} passed before step {:?}", step.name),
            ));
        }
        Ok(())
    }

    /// An approval gate: passes only with an approval of exactly this action.
    async fn gate(
        &self,
        run: &ClaimedRun,
        i: usize,
        gate: Option<&crate::playbook::Gate>,
    ) -> Result<(), Stop> {
        let step = &run.steps[i];
        let Some(gate) = gate else {
            return Ok(());
        };
        let covered = if gate.scope == GateScope::Run {
            &run.steps[i..]
        } else {
            &run.steps[i..=i]
        };
        let (action, hash) = gated_action(&run.target, covered);
        match self
            .store
            .approval_of(run.id, step.idx)
            .await
            .map_err(record_err)?
        {
            // A shadow run waits for nobody; the step's record says what it would have waited for.
            None if run.dry_run => Ok(()),
            None => {
                let tell = self.live().notifier.shows(&run.playbook, "approval_needed");
                let (id, expires_at) = self
                    .store
                    .park_for_approval(run.id, step.idx, gate.clone(), action, hash.clone(), tell)
                    .await
                    .map_err(start_err)?;
                tracing::info!(approval_id = id, step = %step.name, "approval requested");
                let evidence = self.evidence_of(run, step.idx).await;
                let ask = Untold::Ask {
                    run_id: run.id,
                    approval_id: id,
                };
                let kept = tell.then(|| self.told_when_sent(ask));
                self.live().notifier.send_kept(
                    Event::ApprovalNeeded {
                        run: self.claimed_info(run),
                        evidence,
                        approval_id: id,
                        action: gated_action(&run.target, covered).0,
                        action_hash: hash,
                        required: gate.count,
                        approvers: gate.approvers.clone(),
                        expires_at,
                    },
                    kept,
                );
                Err(Stop::Parked)
            }
            Some((_, ApprovalState::Approved, approved)) if approved == hash => Ok(()),
            Some((id, ApprovalState::Approved, _)) => Err(end(
                RunState::Failed,
                format!(
                    "approval {id} no longer applies: what step {:?} would do changed after it was approved",
                    step.name
                ),
            )),
            Some((id, state, _)) => Err(end(RunState::Failed, format!("approval {id} is {state}"))),
        }
    }

    /// Runs the main steps, then, if one failed and stopped the run, its `on_failure` steps.
    async fn steps(
        self: &Arc<Self>,
        run: &ClaimedRun,
        token: &tokio_util::sync::CancellationToken,
        progress: &mut Progress,
    ) -> Result<(), Stop> {
        // A run resumed (after an approval) in its failure phase has its failed step on record.
        let mut failure = run
            .steps
            .iter()
            .find(|s| {
                s.phase == Phase::Main
                    && s.state == StepState::Failed
                    && s.on_failure == OnFailure::Stop
            })
            .map(|s| {
                format!(
                    "step {:?} failed: {}",
                    s.name,
                    s.error.as_deref().unwrap_or("")
                )
            });
        if failure.is_none() {
            for (i, step) in run
                .steps
                .iter()
                .enumerate()
                .filter(|(_, s)| s.phase == Phase::Main)
            {
                if step.state != StepState::Pending && !started_at_intake(run, i) {
                    continue;
                }
                if let Some(error) = self.step(run, i, token, progress).await? {
                    let mut why = format!("step {:?} failed: {error}", step.name);
                    if step.action == Action::Verify && self.undoes_failed_verification(run) {
                        // The verification's result first: the undo reads the run's record.
                        self.flush(progress).await?;
                        why.push_str(&self.undo_after_verification(run.id).await);
                    }
                    failure = Some(why);
                    let main_left = (run.steps[i + 1..].iter())
                        .any(|s| s.phase == Phase::Main && s.state == StepState::Pending);
                    if main_left {
                        self.flush(progress).await?;
                        self.store
                            .skip_pending_main(run.id)
                            .await
                            .map_err(record_err)?;
                    }
                    break;
                }
            }
        }
        let Some(failure) = failure else {
            return Ok(());
        };
        // Escalation: every on_failure step runs, whatever the one before it did.
        for (i, step) in run
            .steps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.phase == Phase::OnFailure)
        {
            if step.state == StepState::Pending {
                self.step(run, i, token, progress).await?;
            }
        }
        Err(end(RunState::Failed, failure))
    }

    /// Runs one step: checks, gate, record, act, record. Returns the error of a failed step
    /// whose `on_failure` is `stop`.
    async fn step(
        &self,
        run: &ClaimedRun,
        i: usize,
        token: &tokio_util::sync::CancellationToken,
        progress: &mut Progress,
    ) -> Result<Option<String>, Stop> {
        let step = &run.steps[i];
        // A first step started at intake was checked and marked `running` in that
        // transaction.
        let started = started_at_intake(run, i);
        if !started {
            self.may_continue(run, step, token).await?;
            let earned = self.earned_gate(run, i).await?;
            let gate = step.approval.as_ref().or(earned.as_ref());
            if gate.is_some() {
                // A gate may park the run: what came before is written first.
                self.flush(progress).await?;
            }
            self.gate(run, i, gate).await?;
        }
        let ctx = self.context(run, step, token);
        let Some(executor) = self.live().executors.get(step.action).cloned() else {
            return Err(self.no_executor(run, step, progress).await);
        };
        let mut confirmed = run.leases_lost;
        if !started {
            // The previous step's result and this step's start: one write.
            let (previous, event) = progress.unwritten.take().unzip();
            confirmed = self.store.leases_lost();
            let kept = previous.clone();
            if let Err(e) = (self.store)
                .step_started_after(run.id, step.idx, previous)
                .await
            {
                // Not written: it goes with the run's end instead.
                progress.unwritten = kept.zip(event);
                return Err(start_err(e));
            }
            if let Some(event) = event.flatten() {
                self.live().notifier.send(event);
            }
        }
        self.still_holds(step, run.id, confirmed).await?;
        let step_timer = std::time::Instant::now();
        let first = i == 0 && !run.resumed && run.received_us > 0;
        if first && step.phase == Phase::Main {
            let since = (crate::time::now_us() - run.received_us).max(0) as f64 / 1e6;
            self.metrics.alert_to_first_step.observe(since);
        }
        let mut result = match self.budget(run, step, token).await? {
            Budget::Room => act(executor.as_ref(), &ctx, run, step).await,
            Budget::Spent(why) if run.dry_run => (act(executor.as_ref(), &ctx, run, step).await)
                .map(|mut would| {
                    would["would_be_refused"] = json!(why);
                    would
                }),
            Budget::Spent(why) => Err(ExecError::Failed(why)),
            Budget::Cancelled => Err(ExecError::Cancelled),
        };
        self.keep_artifacts(run, step, &ctx, &mut result).await;
        self.metrics
            .step_duration
            .with_label_values(&[step.action.name()])
            .observe(step_timer.elapsed().as_secs_f64());
        if step.on_failure == OnFailure::Stop && step.phase == Phase::Main {
            progress.refused = matches!(result, Err(ExecError::Refused(_)));
        }
        let (state, output, error) = self.settle(result, run.dry_run);
        tracing::info!(step = %step.name, action = %step.action, state = state.as_str(), error = error.as_deref(), "step finished");
        let result = StepResult {
            step: step_ref(run, step),
            state,
            output: output.clone(),
            error: error.clone(),
        };
        // A failure that ends the run is told once, by the run's end; a step the run goes on
        // after (or an escalation step) is told on its own.
        let ends_run = step.phase == Phase::Main && step.on_failure == OnFailure::Stop;
        let event = match &error {
            Some(e) if !ends_run && state != StepState::Cancelled => Some(Event::StepFailed {
                run: self.claimed_info(run),
                step: step.name.clone(),
                error: e.clone(),
            }),
            _ => None,
        };
        if let Some(out) = output.filter(|_| error.is_none()) {
            progress.outputs.push((step.name.clone(), out));
        }
        // Written with the run's next write: the next step's start or the run's end.
        progress.unwritten = Some((result, event));
        if state == StepState::Cancelled {
            // No further step, and no escalation: the operator asked for the run to stop.
            return Err(end(
                RunState::Cancelled,
                format!("cancelled by an operator during step {:?}", step.name),
            ));
        }
        Ok(error.filter(|_| step.on_failure == OnFailure::Stop))
    }

    /// Acts only while the run is this replica's ([`crate::store::Store::still_holds_step`]):
    /// a task that ran late past its lease's trusted time (a paused process, a starved
    /// runtime), or past a takeover of its runs, confirms the run first, and does nothing
    /// when another replica took it over.
    async fn still_holds(&self, step: &StepRecord, run_id: i64, since: u64) -> Result<(), Stop> {
        let held = tokio::select! {
            biased;
            held = self.store.still_holds_step(run_id, step.idx, since) => held,
            () = self.shutdown.cancelled() => return Err(Stop::Lost),
        };
        match held {
            Ok(true) => Ok(()),
            Ok(false) => {
                tracing::warn!(step = %step.name, "the run was taken over while this replica's lease lapsed; not acting");
                Err(Stop::Lost)
            }
            Err(e) => {
                tracing::warn!(error = %e, step = %step.name, "cannot confirm the run is still this replica's after its lease lapsed; not acting");
                Err(Stop::Lost)
            }
        }
    }

    /// Stores what the step attached (a graph, a log) with the run. An artifact over its caps
    /// is not kept, and the step's output says why; so are artifacts the store could not take:
    /// the step acted, and its result is recorded all the same.
    async fn keep_artifacts(
        &self,
        run: &ClaimedRun,
        step: &StepRecord,
        ctx: &StepContext,
        result: &mut Result<Value, ExecError>,
    ) {
        let mut artifacts = ctx.artifacts.take();
        if artifacts.is_empty() {
            return;
        }
        // A log can hold a secret as well as any output: text is redacted like outputs are.
        for a in artifacts
            .iter_mut()
            .filter(|a| a.content_type.starts_with("text/"))
        {
            let text = String::from_utf8_lossy(&a.data);
            a.data = self.live().redactor.redact(&text).into_bytes();
        }
        let kept = self
            .store
            .save_artifacts(
                run.id,
                step.idx,
                &step.name,
                artifacts,
                self.config.artifacts,
            )
            .await
            .unwrap_or_else(|e| {
                vec![Err(format!(
                    "the step's artifacts could not be stored: {e}"
                ))]
            });
        let refused: Vec<String> = kept.into_iter().filter_map(Result::err).collect();
        if refused.is_empty() {
            return;
        }
        for why in &refused {
            tracing::warn!(step = %step.name, "{why}");
        }
        if let Ok(out) | Err(ExecError::FailedWith(_, out)) = result
            && out.is_object()
        {
            out["artifacts_refused"] = json!(refused);
        }
    }

    /// What an executor is given for a step.
    fn context(
        &self,
        run: &ClaimedRun,
        step: &StepRecord,
        token: &tokio_util::sync::CancellationToken,
    ) -> StepContext {
        StepContext {
            timeout: step
                .timeout_ms
                .map_or(self.config.default_step_timeout, |ms| {
                    Duration::from_millis(ms as u64)
                }),
            run_id: run.id,
            playbook: run.playbook.clone(),
            step: step.name.clone(),
            args: step.args.clone(),
            alert: run.alert.clone(),
            params: run.params.clone(),
            cancel: token.clone(),
            watch: Some(Arc::new(StepWatch {
                store: self.store.clone(),
                run_id: run.id,
                idx: step.idx,
                playbook: run.playbook.clone(),
                fingerprint: run.alert.fingerprint.clone(),
                starts_at: run.alert.starts_at.clone(),
            })),
            artifacts: Default::default(),
        }
    }

    /// Records a step whose action no executor is configured for, and ends the run.
    async fn no_executor(
        &self,
        run: &ClaimedRun,
        step: &StepRecord,
        progress: &mut Progress,
    ) -> Stop {
        let error = format!("no executor for action {:?} is configured", step.action);
        if let Err(stop) = self.flush(progress).await {
            return stop;
        }
        let recorded = self
            .store
            .step_finished(StepResult {
                step: step_ref(run, step),
                state: StepState::Failed,
                output: None,
                error: Some(error.clone()),
            })
            .await;
        match recorded {
            Ok(()) => end(RunState::Failed, error),
            Err(e) => record_err(e),
        }
    }

    /// What a step's result is recorded as: its state, output and error. Nothing recorded,
    /// logged or sent carries a configured secret (an upstream may echo one back), and the
    /// error holds no NUL (its output is JSON, where a NUL is an escape).
    fn settle(
        &self,
        result: Result<Value, ExecError>,
        dry_run: bool,
    ) -> (StepState, Option<Value>, Option<String>) {
        match result {
            // Evidence gathered in a shadow run is real output: redacted like any.
            Ok(out) if dry_run => (
                StepState::Shadow,
                Some(self.live().redactor.redact_json(out)),
                None,
            ),
            Ok(out) => (
                StepState::Succeeded,
                Some(self.live().redactor.redact_json(out)),
                None,
            ),
            Err(ExecError::Cancelled) => (
                StepState::Cancelled,
                None,
                Some(ExecError::Cancelled.to_string()),
            ),
            Err(ExecError::FailedWith(e, out)) => (
                StepState::Failed,
                Some(self.live().redactor.redact_json(out)),
                Some(storable(&self.live().redactor.redact(&e)).into_owned()),
            ),
            Err(e) => (
                StepState::Failed,
                None,
                Some(storable(&self.live().redactor.redact(&e.to_string())).into_owned()),
            ),
        }
    }

    /// What the run's evidence steps before step `before_idx` found (none without such a step,
    /// and without a read).
    async fn evidence_of(&self, run: &ClaimedRun, before_idx: i64) -> Vec<crate::store::Evidence> {
        let gathers = (run.steps.iter()).any(|s| s.idx < before_idx && s.action.reads_only());
        if !gathers {
            return Vec::new();
        }
        self.store
            .evidence(run.id, before_idx)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot load the run's evidence for its message");
                Vec::new()
            })
    }

    /// What a message says about a claimed run.
    fn claimed_info(&self, run: &ClaimedRun) -> crate::notify::RunInfo {
        let links = crate::notify::AlertLinks::new(
            run.alert.title(&run.target),
            &run.alert.annotations,
            run.alert.generator_url.as_deref(),
        );
        self.run_info(run.id, &run.playbook, &run.target, links, run.dry_run)
    }

    /// Whether the run's playbook undoes its changes when a verification fails.
    fn undoes_failed_verification(&self, run: &ClaimedRun) -> bool {
        use crate::playbook::spec::OnVerifyFailure;
        let set = self.playbooks();
        (set.get(&run.playbook)).is_some_and(|p| p.on_verify_failure == OnVerifyFailure::Undo)
    }

    /// Writes the previous step's result now (before a park, a skip or a refusal), then
    /// sends its message.
    async fn flush(&self, progress: &mut Progress) -> Result<(), Stop> {
        if let Some((result, event)) = progress.unwritten.take() {
            if let Err(e) = self.store.step_finished(result.clone()).await {
                // Not written: it goes with the run's end instead.
                progress.unwritten = Some((result, event));
                return Err(record_err(e));
            }
            if let Some(event) = event {
                self.live().notifier.send(event);
            }
        }
        Ok(())
    }
}

/// Does what a step says. Every step is validated (inventory, cluster, namespace scope, names)
/// before any request is made; a shadow run stops there and tells what it would have done.
/// Otherwise the step executes within its timeout, and a cancel stops it.
async fn act(
    executor: &dyn Executor,
    ctx: &StepContext,
    run: &ClaimedRun,
    step: &StepRecord,
) -> Result<Value, ExecError> {
    executor.validate(ctx)?;
    // Evidence changes nothing: a shadow run gathers it as a real run would.
    if run.dry_run && !step.action.reads_only() {
        let mut would = json!({ "would_run": { "action": step.action, "target": run.target, "args": step.args } });
        if let Some(gate) = &step.approval {
            would["would_wait_for"] = json!({
                "approvals": gate.count,
                "approvers": gate.approvers,
                "scope": gate.scope,
                "expires_in": crate::time::format_duration(Duration::from_millis(gate.expires_ms)),
            });
        }
        return Ok(would);
    }
    // Executors enforce the step timeout themselves (remote ones on the remote side, to kill
    // what they started); this outer bound is only the backstop.
    let bounded = async {
        match tokio::time::timeout(ctx.timeout + EXECUTOR_GRACE, executor.execute(ctx)).await {
            Ok(r) => r,
            Err(_) => Err(ExecError::Failed(format!(
                "timed out after {}; the executor did not stop by itself",
                crate::time::format_duration(ctx.timeout)
            ))),
        }
    };
    tokio::pin!(bounded);
    // A cancel stops the step under way: an executor that stops what it started remotely gets
    // a moment to do so; any other is dropped at once.
    tokio::select! {
        r = &mut bounded => r,
        () = ctx.cancel.cancelled() => {
            if executor.stops_on_cancel() {
                tokio::time::timeout(CANCEL_GRACE, &mut bounded)
                    .await
                    .unwrap_or(Err(ExecError::Cancelled))
            } else {
                Err(ExecError::Cancelled)
            }
        }
    }
}

/// A running step's view of its run, through the store (so a new occurrence received by
/// another replica counts too).
struct StepWatch {
    store: crate::store::Store,
    run_id: i64,
    idx: i64,
    playbook: String,
    fingerprint: String,
    starts_at: String,
}

impl std::fmt::Debug for StepWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StepWatch(run {} step {})", self.run_id, self.idx)
    }
}

#[async_trait::async_trait]
impl crate::executors::RunWatch for StepWatch {
    async fn refired_since(&self, since: crate::time::Timestamp) -> Result<bool, String> {
        let (playbook, fingerprint) = (self.playbook.clone(), self.fingerprint.clone());
        (self.store)
            .refired(playbook, fingerprint, self.starts_at.clone(), since.ms())
            .await
            .map_err(|e| e.to_string())
    }

    async fn progress(&self, progress: Value) {
        if let Err(e) = self
            .store
            .step_progress(self.run_id, self.idx, progress)
            .await
        {
            tracing::warn!(run_id = self.run_id, error = %e, "cannot record a step's progress");
        }
    }
}
