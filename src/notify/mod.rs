//! Tells humans: every run event goes to the chat sinks whose filters match, as a short
//! factual message. Delivery never blocks a run: the engine hands events to a bounded queue
//! per sink and moves on; each sink delivers in order (so Slack threads stay in order),
//! retrying 429 and 5xx answers with backoff and honouring `Retry-After`. A message given up
//! on is counted (`reflex_notify_failures_total{sink}`) and logged, never lost silently.

pub mod config;
mod sinks;
mod threaded;

pub use sinks::{SinkError, build_sink};

use crate::metrics::Metrics;
use crate::store::{Evidence, RunState};
use crate::time::Timestamp;
use backon::{ExponentialBuilder, Retryable};
use config::{NotifyConfig, SinkConfig};
use serde::Serialize;
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// Events queued per sink before new ones are dropped (and counted).
const SINK_QUEUE: usize = 1024;

/// What a run (or an operator) did.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A run started its first step.
    RunStarted {
        /// The run.
        run: RunInfo,
    },
    /// A run waits for approval.
    ApprovalNeeded {
        /// The run.
        run: RunInfo,
        /// What the run's evidence steps before the gate found.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        evidence: Vec<Evidence>,
        /// The approval request.
        approval_id: i64,
        /// Exactly what will be done.
        action: Value,
        /// Its hash: a decision applies to this action only.
        action_hash: String,
        /// Distinct approvals needed.
        required: u32,
        /// Who may approve (empty: any approver).
        approvers: Vec<String>,
        /// When the request expires.
        expires_at: Timestamp,
    },
    /// A step failed.
    StepFailed {
        /// The run.
        run: RunInfo,
        /// The step.
        step: String,
        /// Why.
        error: String,
    },
    /// A run ended.
    RunFinished {
        /// The run.
        run: RunInfo,
        /// What its evidence steps found.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        evidence: Vec<Evidence>,
        /// Final state.
        state: RunState,
        /// Seconds from start to end.
        duration_seconds: f64,
        /// Figures from the steps ("Cleanup ran. Space reclaimed: 5.1 GB").
        summary: String,
        /// The playbook's own `report`: when set, it is the message.
        #[serde(skip_serializing_if = "Option::is_none")]
        report: Option<String>,
        /// Why it failed or stopped, if it did.
        error: Option<String>,
    },
    /// `reflex.yaml` and the playbooks were reloaded, or a reload was refused.
    #[serde(rename = "reload")]
    Reloaded {
        /// Who (or `SIGHUP`).
        actor: String,
        /// Whether it took effect (a refused one changed nothing).
        ok: bool,
        /// What was loaded, or the errors.
        detail: String,
    },
    /// A playbook earned its autonomy, lost it, or was reset by an admin.
    #[serde(rename = "autonomy")]
    Autonomy {
        /// The playbook.
        playbook: String,
        /// `approve` or `auto`, after.
        level: crate::policy::Level,
        /// Why: the runs that earned or lost it, or who reset it.
        why: String,
    },
    /// A kill switch changed.
    #[serde(rename = "killswitch")]
    KillSwitch {
        /// `global` or `playbook:<name>`.
        scope: String,
        /// Engaged or released.
        engaged: bool,
        /// Who.
        actor: String,
        /// Why.
        reason: String,
        /// When an engagement ends by itself; none: until released.
        until: Option<Timestamp>,
    },
}

/// The run an event is about.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    /// Run id.
    pub id: i64,
    /// A shadow run: every message about it says so.
    #[serde(rename = "shadow")]
    pub dry_run: bool,
    /// Playbook.
    pub playbook: String,
    /// What it acts on.
    pub target: String,
    /// What fired: the alert's `summary` annotation, else "<alertname> on <target>".
    pub title: String,
    /// Link to the run, when `public_url` is configured.
    pub url: Option<String>,
    /// The alert's `runbook_url` annotation (http or https only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runbook_url: Option<String>,
    /// Where the alert came from (its `generatorURL`: the rule's graph).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_url: Option<String>,
}

/// What a message tells of the alert besides its run: its title and its links.
#[derive(Debug, Clone, Default)]
pub struct AlertLinks {
    /// The alert's `summary` annotation, else "<alertname> on <target>".
    pub title: String,
    /// Its `runbook_url` annotation, if a web link.
    pub runbook_url: Option<String>,
    /// Its `generatorURL`, if a web link.
    pub source_url: Option<String>,
}

impl AlertLinks {
    /// From an alert's title, annotations and generator URL. Links come from the alert, so
    /// only http(s) URLs are kept, with every character that could end a link in any chat's
    /// markup percent-encoded.
    pub fn new(
        title: String,
        annotations: &crate::alert::Labels,
        generator_url: Option<&str>,
    ) -> AlertLinks {
        AlertLinks {
            title,
            runbook_url: annotations.get("runbook_url").and_then(|u| safe_link(u)),
            source_url: generator_url.and_then(safe_link),
        }
    }
}

/// An http(s) URL from untrusted text, fit to stand in any markup's link: parsed (so it is one
/// URL), and with `<>|()[]"'` ` `\`, spaces and controls percent-encoded.
pub fn safe_link(raw: &str) -> Option<String> {
    let url = reqwest::Url::parse(raw.trim()).ok()?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return None;
    }
    let mut out = String::with_capacity(url.as_str().len());
    for c in url.as_str().chars() {
        match c {
            '<' | '>' | '|' | '(' | ')' | '[' | ']' | '"' | '\'' | '`' | '\\' | '*' | '_' | '~' => {
                out.push_str(&format!("%{:02X}", c as u32))
            }
            c if c.is_whitespace() || c.is_control() || is_bidi_control(c) => out.push_str(
                &percent_encoding::utf8_percent_encode(
                    &c.to_string(),
                    percent_encoding::NON_ALPHANUMERIC,
                )
                .to_string(),
            ),
            c => out.push(c),
        }
    }
    Some(out)
}

impl Event {
    /// The event name used in filters.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::RunStarted { .. } => "run_started",
            Event::ApprovalNeeded { .. } => "approval_needed",
            Event::StepFailed { .. } => "step_failed",
            Event::RunFinished { .. } => "run_finished",
            Event::KillSwitch { .. } => "killswitch",
            Event::Reloaded { .. } => "reload",
            Event::Autonomy { .. } => "autonomy",
        }
    }

    /// The run it is about.
    pub fn run(&self) -> Option<&RunInfo> {
        match self {
            Event::RunStarted { run }
            | Event::ApprovalNeeded { run, .. }
            | Event::StepFailed { run, .. } => Some(run),
            Event::RunFinished { run, .. } => Some(run),
            Event::KillSwitch { .. } | Event::Reloaded { .. } | Event::Autonomy { .. } => None,
        }
    }

    /// What the run's evidence steps found (approvals and ends of runs).
    pub fn evidence(&self) -> &[Evidence] {
        match self {
            Event::ApprovalNeeded { evidence, .. } | Event::RunFinished { evidence, .. } => {
                evidence
            }
            _ => &[],
        }
    }

    /// The message with its evidence after it, each code block cut at `limit` characters: for
    /// sinks that post one message per event.
    pub fn message_for(&self, markup: Markup, limit: usize) -> String {
        let mut text = self.text_for(markup);
        if let Some(run) = self.run() {
            for ev in self.evidence() {
                text.push_str("\n\n");
                text.push_str(&evidence_text(markup, run, ev, limit));
            }
        }
        text
    }

    /// The message as plain text (logs, the generic webhook's `text`).
    pub fn text(&self) -> String {
        self.text_for(Markup::Plain)
    }

    /// The message, short and factual like a status-page update, with every value that came
    /// from an alert, a step or an operator escaped for `markup`: a label cannot mention
    /// `@channel`, forge a link or start a line of its own.
    pub fn text_for(&self, markup: Markup) -> String {
        let text = self.text_inner(markup);
        match self.run() {
            Some(run) if run.dry_run => format!("Shadow run: {text}"),
            _ => text,
        }
    }

    fn text_inner(&self, markup: Markup) -> String {
        let e = |s: &str| markup.escape(s);
        match self {
            Event::RunStarted { run } => format!(
                "{}. Running playbook {} on {} (run {}).{}",
                e(run.title.trim_end_matches('.')),
                e(&run.playbook),
                e(&run.target),
                run.id,
                links(markup, run)
            ),
            Event::ApprovalNeeded {
                run,
                approval_id,
                action,
                required,
                approvers,
                expires_at,
                ..
            } => {
                let steps = steps_text(markup, action);
                let who = if approvers.is_empty() {
                    String::new()
                } else {
                    format!(" by {}", e(&approvers.join(" or ")))
                };
                format!(
                    "{}. Approval needed{who} ({required}) for run {} ({}) on {}: {}. Expires {expires_at}. \
                     Approve: reflex approve {approval_id} (POST /api/v1/approvals/{approval_id}/approve); \
                     deny: reflex deny {approval_id}.{}",
                    e(run.title.trim_end_matches('.')),
                    run.id,
                    e(&run.playbook),
                    e(&run.target),
                    steps,
                    links(markup, run)
                )
            }
            Event::StepFailed { run, step, error } => {
                format!(
                    "{}. Step {} of run {} ({}) failed: {}.{}",
                    e(run.title.trim_end_matches('.')),
                    e(step),
                    run.id,
                    e(&run.playbook),
                    e(error.trim_end_matches('.')),
                    links(markup, run)
                )
            }
            Event::RunFinished {
                report: Some(report),
                run,
                ..
            } => format!("{}{}", e(report.trim_end()), links(markup, run)),
            Event::RunFinished {
                run,
                state,
                duration_seconds,
                summary,
                error,
                report: None,
                ..
            } => {
                let summary = if summary.is_empty() {
                    String::new()
                } else {
                    format!(" {}.", e(summary.trim_end_matches('.')))
                };
                let why = error
                    .as_ref()
                    .map(|x| format!(" {}.", e(x.trim_end_matches('.'))))
                    .unwrap_or_default();
                let ended = match state {
                    RunState::Shadow => "finished in shadow mode",
                    other => other.as_str(),
                };
                format!(
                    "{}.{summary} Run {} ({}) {ended} in {}.{why}{}{}",
                    e(run.title.trim_end_matches('.')),
                    run.id,
                    e(&run.playbook),
                    human_duration(*duration_seconds),
                    how_to_retry(*state, run.id),
                    links(markup, run)
                )
            }
            Event::KillSwitch {
                scope,
                engaged,
                actor,
                reason,
                until,
            } => switch_text(markup, scope, *engaged, actor, reason, *until),
            Event::Reloaded {
                actor,
                ok: true,
                detail,
            } => format!("Configuration reloaded by {}: {}.", e(actor), e(detail)),
            Event::Reloaded { actor, detail, .. } => format!(
                "Reload by {} refused; nothing changed: {}.",
                e(actor),
                e(detail)
            ),
            Event::Autonomy {
                playbook,
                level: crate::policy::Level::Auto,
                why,
            } => format!(
                "Playbook {} now acts without approval: {}.",
                e(playbook),
                e(why)
            ),
            Event::Autonomy { playbook, why, .. } => {
                format!("Playbook {} needs approval again: {}.", e(playbook), e(why))
            }
        }
    }
}

/// Each step of an approval's action (`ssh.run {"command": …}`), `; `-separated.
fn steps_text(markup: Markup, action: &Value) -> String {
    let steps: Vec<String> = (action["steps"].as_array().into_iter().flatten())
        .map(|s| {
            markup.escape(&format!(
                "{} {}",
                s["action"].as_str().unwrap_or(""),
                s["args"]
            ))
        })
        .collect();
    steps.join("; ")
}

/// ` <url>` of a run's page, when `public_url` is configured, then the alert's runbook and
/// source links, each as a link of `markup`.
fn links(markup: Markup, run: &RunInfo) -> String {
    let mut out = run
        .url
        .as_ref()
        .map(|u| format!(" {u}"))
        .unwrap_or_default();
    for (label, url) in [("Runbook", &run.runbook_url), ("Source", &run.source_url)] {
        if let Some(url) = url {
            out.push(' ');
            out.push_str(&markup.link(url, label));
        }
    }
    out
}

/// A link to one of a run's artifacts: the console's, when `public_url` is configured.
fn artifact_link(markup: Markup, run: &RunInfo, artifact: &crate::store::ArtifactInfo) -> String {
    match &run.url {
        Some(page) => markup.link(
            &format!("{page}/artifacts/{}", artifact.name),
            &artifact.name,
        ),
        None => format!("{} (with run {})", markup.escape(&artifact.name), run.id),
    }
}

/// One evidence step's findings: its name, its summary as a code block cut at `limit`
/// characters, and links to its artifacts.
pub fn evidence_text(markup: Markup, run: &RunInfo, ev: &Evidence, limit: usize) -> String {
    let mut out = format!(
        "{} ({}):",
        markup.escape(&ev.step),
        markup.escape(&ev.action)
    );
    if !ev.summary.is_empty() {
        out.push('\n');
        out.push_str(&markup.code_block(&ev.summary, limit));
    }
    for a in &ev.artifacts {
        out.push('\n');
        out.push_str(&artifact_link(markup, run, a));
    }
    out
}

/// How to run it again, for runs that can be retried; a killed run's retry would be held by
/// the same switch until it is released.
fn how_to_retry(state: RunState, id: i64) -> String {
    match state {
        RunState::Failed | RunState::Interrupted | RunState::Expired => {
            format!(" To run it again: reflex retry {id}.")
        }
        RunState::Killed => {
            format!(" To run it again once the kill switch is released: reflex retry {id}.")
        }
        _ => String::new(),
    }
}

/// A kill switch engaged (what it holds, until when) or released.
fn switch_text(
    markup: Markup,
    scope: &str,
    engaged: bool,
    actor: &str,
    reason: &str,
    until: Option<Timestamp>,
) -> String {
    let e = |s: &str| markup.escape(s);
    // What it holds: all automation, or one playbook's.
    let held = match scope.strip_prefix("playbook:") {
        Some(name) => format!("Playbook {} does not act", e(name)),
        None => "No automation acts".to_string(),
    };
    let (scope, actor, reason) = (e(scope), e(actor), e(reason.trim_end_matches('.')));
    if engaged {
        let end = match until {
            Some(t) => format!("until {t} (or until it is released)"),
            None => "until it is released".to_string(),
        };
        format!("Kill switch ({scope}) engaged by {actor}: {reason}. {held} {end}.")
    } else {
        format!("Kill switch ({scope}) released by {actor}: {reason}.")
    }
}

/// A duration as people read it in a message: `350ms`, `4s`, `2m 5s`.
pub fn human_duration(seconds: f64) -> String {
    if seconds < 1.0 {
        format!("{}ms", (seconds * 1000.0).round() as u64)
    } else {
        crate::time::format_duration(Duration::from_secs(seconds.round() as u64))
    }
}

/// The markup a message is written in, and so how values are escaped in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Markup {
    /// As is (structured receivers escape for themselves).
    Plain,
    /// Slack's mrkdwn: `<…>` makes links and `<!channel>` mentions, so `&`, `<`, `>` are
    /// written as entities.
    Slack,
    /// Markdown (Mattermost, Teams cards): markup characters are backslash-escaped and
    /// `@mentions` broken with a zero-width space.
    Markdown,
}

impl Markup {
    /// Escapes one value. In every chat markup a line break becomes a space, so that a value
    /// cannot add a line that reads like Reflex's own.
    pub fn escape(self, s: &str) -> String {
        if self == Markup::Plain {
            return s.to_string();
        }
        let mut out = String::with_capacity(s.len() + 8);
        for c in s.chars() {
            match (self, c) {
                (_, '\n' | '\r' | '\u{2028}' | '\u{2029}') => out.push(' '),
                (_, c) if is_bidi_control(c) => out.push_str(&bidi_visible(c)),
                (Markup::Slack, '&') => out.push_str("&amp;"),
                (Markup::Slack, '<') => out.push_str("&lt;"),
                (Markup::Slack, '>') => out.push_str("&gt;"),
                (Markup::Markdown, '@') => out.push_str("@\u{200b}"),
                (
                    Markup::Markdown,
                    '\\' | '`' | '*' | '_' | '~' | '[' | ']' | '<' | '>' | '|' | '#',
                ) => {
                    out.push('\\');
                    out.push(c);
                }
                _ => out.push(c),
            }
        }
        out
    }
}

impl Markup {
    /// A link with a label. `url` must be safe (see [`safe_link`], or Reflex's own).
    pub fn link(self, url: &str, label: &str) -> String {
        match self {
            Markup::Plain => format!("{label}: {url}"),
            Markup::Slack => format!("<{url}|{}>", self.escape(label)),
            Markup::Markdown => format!("[{}]({url})", self.escape(label)),
        }
    }

    /// Text shown as is, lines kept, in a code block of this markup: nothing in it can end the
    /// block, mention anyone or reorder text. Cut at `limit` characters, saying so.
    pub fn code_block(self, text: &str, limit: usize) -> String {
        let total = text.chars().count();
        let mut shown: String = text.chars().take(limit).collect();
        if total > limit {
            shown.push_str(&format!("\n... ({} more characters)", total - limit));
        }
        if self == Markup::Plain {
            return shown;
        }
        let mut out = String::with_capacity(shown.len() + 16);
        out.push_str("```\n");
        for c in shown.chars() {
            match (self, c) {
                // A backtick could close the fence: a look-alike stands for it.
                (_, '`') => out.push('\u{02CB}'),
                (_, c) if is_bidi_control(c) => out.push_str(&bidi_visible(c)),
                (_, '\r') => {}
                (Markup::Slack, '&') => out.push_str("&amp;"),
                (Markup::Slack, '<') => out.push_str("&lt;"),
                (Markup::Slack, '>') => out.push_str("&gt;"),
                _ => out.push(c),
            }
        }
        out.push_str("\n```");
        out
    }
}

/// Whether `c` reorders the text around it (the Unicode bidirectional controls): in a label it
/// can make `rm` read as `mr`, or a hostname read as another ("Trojan Source").
pub fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
    )
}

/// A bidirectional control shown as what it is (`<U+202E>`) instead of acting.
fn bidi_visible(c: char) -> String {
    format!("<U+{:04X}>", u32::from(c))
}

/// `text` with every bidirectional control shown instead of acting. For text whose markup is
/// already escaped (a rendered console page: its templates hold no such characters, so each
/// one came from data).
pub fn neutralize_bidi(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(is_bidi_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    std::borrow::Cow::Owned(
        text.chars()
            .map(|c| {
                if is_bidi_control(c) {
                    format!("&lt;U+{:04X}&gt;", u32::from(c))
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// A failed delivery.
#[derive(Debug, Clone)]
pub struct DeliveryError {
    /// Worth trying again (429, 5xx, connection errors).
    pub retry: bool,
    /// What the receiver asked for (`Retry-After`).
    pub retry_after: Option<Duration>,
    /// What went wrong (never includes URLs or tokens).
    pub message: String,
}

/// One chat or webhook destination.
#[async_trait::async_trait]
pub trait Sink: Send + Sync {
    /// Delivers one event once (the hub retries).
    async fn deliver(&self, event: &Event) -> Result<(), DeliveryError>;
}

struct SinkHandle {
    cfg: SinkConfig,
    queue: mpsc::Sender<(Event, Option<Kept>)>,
}

/// A message kept in the store until it is told (see `store::outbox`): `told` runs once every
/// sink it went to has delivered it or given up on it (a failure for good, or a queue full).
/// One dropped undelivered (a crash, a shutdown that could not wait) never runs it, and the
/// message stays kept for the next start.
#[derive(Clone)]
pub struct Kept(Arc<KeptInner>);

struct KeptInner {
    left: AtomicUsize,
    told: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Kept {
    /// `told` runs once the message is told everywhere it went.
    pub fn new(told: impl FnOnce() + Send + 'static) -> Kept {
        Kept(Arc::new(KeptInner {
            left: AtomicUsize::new(0),
            told: std::sync::Mutex::new(Some(Box::new(told))),
        }))
    }

    fn done(&self) {
        if self.0.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            let told = self.0.told.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(told) = told {
                told();
            }
        }
    }
}

/// Fans events out to the sinks; cheap to clone.
#[derive(Clone, Default)]
pub struct Notifier {
    sinks: Arc<Vec<SinkHandle>>,
    metrics: Option<Arc<Metrics>>,
}

impl Notifier {
    /// Starts one delivery task per sink, on `tasks`: each ends once every `Notifier` clone is
    /// dropped and its queue is empty.
    pub fn start(
        cfg: &NotifyConfig,
        metrics: Arc<Metrics>,
        tasks: &tokio_util::task::TaskTracker,
        store: Option<&crate::store::Store>,
    ) -> Result<Notifier, SinkError> {
        let mattermost = match &cfg.mattermost_app {
            Some(app) => Some(sinks::MattermostButtons {
                url: app.callback_url.clone(),
                secret: (app.secret_ref())
                    .and_then(|r| r.read())
                    .map_err(|why| SinkError {
                        sink: "mattermost_app".into(),
                        why,
                    })?,
            }),
            None => None,
        };
        let mut sinks = Vec::new();
        for sc in &cfg.sinks {
            let sink: Arc<dyn Sink> = build_sink(
                sc,
                cfg.timeout,
                cfg.slack_app.is_some(),
                mattermost.as_ref(),
                store,
            )?;
            let (tx, rx) = mpsc::channel(SINK_QUEUE);
            tasks.spawn(deliver_loop(
                sc.name.clone(),
                sink,
                rx,
                Delivery {
                    attempts: cfg.max_attempts,
                    quiet_for: cfg.quiet_for,
                    events: sc.events.clone(),
                },
                metrics.clone(),
            ));
            sinks.push(SinkHandle {
                cfg: sc.clone(),
                queue: tx,
            });
        }
        Ok(Notifier {
            sinks: Arc::new(sinks),
            metrics: Some(metrics),
        })
    }

    /// Queues an event for every sink whose filters match; never waits.
    pub fn send(&self, event: Event) {
        self.send_kept(event, None);
    }

    /// Whether some sink shows `event` (a kind, as [`Event::kind`] names it) of a run of
    /// `playbook`: such a message is kept until told (see [`Notifier::send_kept`]).
    pub fn shows(&self, playbook: &str, event: &str) -> bool {
        (self.sinks.iter()).any(|s| {
            s.takes(playbook)
                && (s.cfg.events.is_empty() || s.cfg.events.iter().any(|k| k == event))
        })
    }

    /// As [`Notifier::send`], for a message `kept` in the store until every sink it is queued
    /// to is done with it.
    pub fn send_kept(&self, event: Event, kept: Option<Kept>) {
        let playbook = event.run().map(|r| r.playbook.clone());
        let to: Vec<&SinkHandle> = (self.sinks.iter())
            .filter(|s| playbook.as_deref().is_none_or(|p| s.takes(p)))
            .collect();
        if let Some(k) = &kept {
            // One more than the sinks, given back below: none is told before all are queued.
            k.0.left.fetch_add(to.len() + 1, Ordering::AcqRel);
        }
        for s in to {
            if let Err(e) = s.queue.try_send((event.clone(), kept.clone())) {
                tracing::warn!(sink = %s.cfg.name, event = event.kind(), "notification queue full; message dropped");
                if let Some(m) = &self.metrics {
                    m.notify_failures.with_label_values(&[&s.cfg.name]).inc();
                }
                // Given up on, as a delivery that failed for good is: not kept for a restart
                // to flood the sink with what a storm could not get through.
                if let (_, Some(kept)) = e.into_inner() {
                    kept.done();
                }
            }
        }
        if let Some(k) = kept {
            k.done();
        }
    }
}

impl SinkHandle {
    /// Whether the sink takes the events of runs of `playbook`.
    fn takes(&self, playbook: &str) -> bool {
        self.cfg.playbooks.is_empty() || self.cfg.playbooks.iter().any(|p| p == playbook)
    }
}

/// How a sink's queue is delivered.
#[derive(Debug, Clone)]
struct Delivery {
    /// Attempts per message.
    attempts: usize,
    /// How long a run's start is held back (see `NotifyConfig::quiet_for`).
    quiet_for: Duration,
    /// The events the sink shows (empty: all). Every event of a run is queued, shown or not:
    /// an approval asked for releases a held start even where approvals are not shown.
    events: Vec<String>,
}

/// Starts held back until their run ends quietly (then dropped), asks for someone, says more,
/// or its time is up (then sent, in order, before anything else about the run).
#[derive(Default)]
struct Held {
    starts: Vec<(i64, tokio::time::Instant, Event)>,
}

impl Held {
    /// What to send for `event`, in order: a held start of its run first, if one is released.
    fn admit(
        &mut self,
        event: Event,
        now: tokio::time::Instant,
        quiet_for: Duration,
    ) -> Vec<Event> {
        let Some(run) = event.run().map(|r| r.id) else {
            return vec![event];
        };
        let held =
            (self.starts.iter().position(|(id, ..)| *id == run)).map(|i| self.starts.remove(i).2);
        match (&event, held) {
            (Event::RunStarted { .. }, None) if !quiet_for.is_zero() => {
                let until = now + quiet_for;
                self.starts.push((run, until, event));
                Vec::new()
            }
            // Ended within its quiet time: the end is the one message.
            (Event::RunFinished { .. }, Some(_)) => vec![event],
            (_, Some(start)) => vec![start, event],
            (_, None) => vec![event],
        }
    }

    /// The starts whose time is up.
    fn due(&mut self, now: tokio::time::Instant) -> Vec<Event> {
        let (due, kept) = std::mem::take(&mut self.starts)
            .into_iter()
            .partition(|(_, until, _)| *until <= now);
        self.starts = kept;
        due.into_iter().map(|(.., e)| e).collect()
    }

    fn next(&self) -> Option<tokio::time::Instant> {
        self.starts.iter().map(|(_, until, _)| *until).min()
    }
}

async fn deliver_loop(
    name: String,
    sink: Arc<dyn Sink>,
    mut rx: mpsc::Receiver<(Event, Option<Kept>)>,
    delivery: Delivery,
    metrics: Arc<Metrics>,
) {
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(30))
        .with_max_times(delivery.attempts.saturating_sub(1))
        .with_jitter();
    let mut held = Held::default();
    loop {
        let next = held.next();
        let (ready, kept, done) = tokio::select! {
            event = rx.recv() => match event {
                Some((event, kept)) => (held.admit(event, tokio::time::Instant::now(), delivery.quiet_for), kept, false),
                // Shutting down: what was held back is said now.
                None => (held.due(tokio::time::Instant::now() + delivery.quiet_for), None, true),
            },
            () = async { tokio::time::sleep_until(next.unwrap_or_else(tokio::time::Instant::now)).await }, if next.is_some() => {
                (held.due(tokio::time::Instant::now()), None, false)
            }
        };
        let shown =
            |e: &Event| delivery.events.is_empty() || delivery.events.iter().any(|k| k == e.kind());
        for event in ready.into_iter().filter(shown) {
            let result = (|| async { sink.deliver(&event).await })
                .retry(backoff)
                .when(|e: &DeliveryError| e.retry)
                // The receiver's Retry-After wins over our own backoff.
                .adjust(|e: &DeliveryError, d| e.retry_after.or(d))
                .notify(|e: &DeliveryError, d| {
                    tracing::info!(sink = %name, error = %e.message, retry_in = ?d, "notification failed; retrying");
                })
                .await;
            if let Err(e) = result {
                metrics.notify_failures.with_label_values(&[&name]).inc();
                tracing::warn!(sink = %name, event = event.kind(), error = %e.message, "notification given up");
            }
        }
        // Delivered or given up on (or not shown here): this sink is done with it.
        if let Some(kept) = kept {
            kept.done();
        }
        if done {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run() -> RunInfo {
        RunInfo {
            id: 7,
            dry_run: false,
            playbook: "disk-cleanup".into(),
            target: "db-1".into(),
            title: "Disk space low on db-1".into(),
            url: Some("https://reflex.example/ui/runs/7".into()),
            runbook_url: None,
            source_url: None,
        }
    }

    #[test]
    fn finished_runs_read_like_a_status_update() {
        let e = Event::RunFinished {
            run: run(),
            evidence: Vec::new(),
            state: RunState::Succeeded,
            duration_seconds: 4.2,
            summary: "Cleanup ran. Space reclaimed: 5.1 GB".into(),
            report: None,
            error: None,
        };
        assert_eq!(
            e.text(),
            "Disk space low on db-1. Cleanup ran. Space reclaimed: 5.1 GB. Run 7 (disk-cleanup) succeeded in 4s. https://reflex.example/ui/runs/7"
        );
    }

    #[test]
    fn alert_values_are_escaped_for_each_chat() {
        let mut r = run();
        r.title = "<!channel> @here [click](https://evil) *now*\nRun 9 succeeded".into();
        let e = Event::RunStarted { run: r };
        let slack = e.text_for(Markup::Slack);
        assert!(
            slack.starts_with("&lt;!channel&gt; @here [click](https://evil) *now* Run 9"),
            "{slack}"
        );
        let md = e.text_for(Markup::Markdown);
        assert!(
            md.starts_with(
                "\\<!channel\\> @\u{200b}here \\[click\\](https://evil) \\*now\\* Run 9"
            ),
            "{md}"
        );
        assert!(!md.contains('\n') && !slack.contains('\n'));
        assert!(e.text().contains("<!channel>"), "plain text is as sent");
    }

    #[test]
    fn bidi_controls_are_shown_not_obeyed_in_chat() {
        let mut r = run();
        r.title = "disk low on \u{202E}1-bd\u{2066}x".into();
        let e = Event::RunStarted { run: r };
        for m in [Markup::Slack, Markup::Markdown] {
            let t = e.text_for(m);
            assert!(!t.chars().any(is_bidi_control), "{t}");
            assert!(t.contains("U+202E") && t.contains("U+2066"), "{t}");
        }
        assert_eq!(neutralize_bidi("a\u{200F}b"), "a&lt;U+200F&gt;b");
        assert!(matches!(
            neutralize_bidi("plain"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn kill_switch_messages_name_their_scope_and_end() {
        let e = Event::KillSwitch {
            scope: "playbook:rollback".into(),
            engaged: true,
            actor: "alice".into(),
            reason: "INC-4711: bad deploy, hands off".into(),
            until: Some(crate::time::Timestamp::parse("2026-12-05T01:00:00.000Z").unwrap()),
        };
        assert_eq!(
            e.text(),
            "Kill switch (playbook:rollback) engaged by alice: INC-4711: bad deploy, hands off. Playbook rollback does not act until 2026-12-05T01:00:00.000Z (or until it is released)."
        );
        let global = Event::KillSwitch {
            scope: "global".into(),
            engaged: true,
            actor: "alice".into(),
            reason: "x".into(),
            until: None,
        };
        assert!(
            global
                .text()
                .ends_with("No automation acts until it is released.")
        );
    }

    #[test]
    fn approval_messages_say_how_to_answer() {
        let e = Event::ApprovalNeeded {
            run: run(),
            evidence: Vec::new(),
            approval_id: 3,
            action: serde_json::json!({"target": "db-1", "steps": [{"action": "kube.rollback", "args": {"name": "api"}}]}),
            action_hash: "ab12".into(),
            required: 1,
            approvers: vec![],
            expires_at: crate::time::Timestamp::parse("2026-11-22T12:30:00.000Z").unwrap(),
        };
        let t = e.text();
        assert!(t.contains("kube.rollback {\"name\":\"api\"}"), "{t}");
        assert!(
            t.contains("reflex approve 3")
                && t.contains("/api/v1/approvals/3/approve")
                && t.contains("reflex deny 3"),
            "{t}"
        );
    }

    fn finished(run: RunInfo) -> Event {
        Event::RunFinished {
            run,
            evidence: Vec::new(),
            state: RunState::Succeeded,
            duration_seconds: 0.002,
            summary: String::new(),
            report: None,
            error: None,
        }
    }

    fn kinds(events: &[Event]) -> Vec<&'static str> {
        events.iter().map(Event::kind).collect()
    }

    #[test]
    fn a_quick_run_is_one_message_and_a_slow_or_waiting_one_says_it_started() {
        let quiet = Duration::from_secs(10);
        let t0 = tokio::time::Instant::now();
        let mut held = Held::default();
        let (a, mut b, c) = (run(), run(), run());
        b.id = 8;
        let c = RunInfo { id: 9, ..c };
        // Ends within its quiet time: only the end.
        assert!(
            held.admit(Event::RunStarted { run: a.clone() }, t0, quiet)
                .is_empty()
        );
        assert_eq!(kinds(&held.admit(finished(a), t0, quiet)), ["run_finished"]);
        // Asks for someone: its start, then the ask.
        held.admit(Event::RunStarted { run: b.clone() }, t0, quiet);
        let ask = Event::StepFailed {
            run: b.clone(),
            step: "x".into(),
            error: "e".into(),
        };
        assert_eq!(
            kinds(&held.admit(ask, t0, quiet)),
            ["run_started", "step_failed"]
        );
        assert_eq!(kinds(&held.admit(finished(b), t0, quiet)), ["run_finished"]);
        // Runs past its quiet time: the start is due then, not before.
        held.admit(Event::RunStarted { run: c.clone() }, t0, quiet);
        assert!(held.due(t0 + Duration::from_secs(9)).is_empty());
        assert_eq!(held.next(), Some(t0 + quiet));
        assert_eq!(kinds(&held.due(t0 + quiet)), ["run_started"]);
        assert_eq!(kinds(&held.admit(finished(c), t0, quiet)), ["run_finished"]);
        // Other news is never held, and `0s` holds nothing.
        let switch = Event::KillSwitch {
            scope: "global".into(),
            engaged: true,
            actor: "a".into(),
            reason: "r".into(),
            until: None,
        };
        assert_eq!(held.admit(switch, t0, quiet).len(), 1);
        assert_eq!(
            held.admit(Event::RunStarted { run: run() }, t0, Duration::ZERO)
                .len(),
            1
        );
        assert_eq!(held.next(), None);
    }

    #[test]
    fn evidence_is_a_code_block_nothing_in_it_can_end_cut_at_the_limit() {
        let ev = Evidence {
            step: "logs".into(),
            action: "kube.logs".into(),
            summary: "ok\n```\n<!channel> @here\u{202E} done".into(),
            artifacts: vec![crate::store::ArtifactInfo {
                name: "logs-logs.txt".into(),
                content_type: "text/plain".into(),
                size: 9,
                url: "/api/v1/runs/7/artifacts/logs-logs.txt".into(),
            }],
        };
        let slack = evidence_text(Markup::Slack, &run(), &ev, 1000);
        assert_eq!(
            slack,
            "logs (kube.logs):\n```\nok\n\u{2CB}\u{2CB}\u{2CB}\n&lt;!channel&gt; @here<U+202E> done\n```\n<https://reflex.example/ui/runs/7/artifacts/logs-logs.txt|logs-logs.txt>"
        );
        let md = evidence_text(Markup::Markdown, &run(), &ev, 5);
        assert!(md.starts_with("logs (kube.logs):\n```\nok\n\u{2CB}\u{2CB}\n... (24 more characters)\n```\n[logs-logs.txt](https://"), "{md}");
    }

    #[test]
    fn alert_links_are_web_links_that_cannot_break_out_of_markup() {
        assert_eq!(
            safe_link("https://wiki.example/runbooks/disk_full#(fix)").as_deref(),
            Some("https://wiki.example/runbooks/disk%5Ffull#%28fix%29")
        );
        assert_eq!(
            safe_link("https://x.example/a|b>c").as_deref(),
            Some("https://x.example/a%7Cb%3Ec")
        );
        for bad in [
            "javascript:alert(1)",
            "file:///etc/passwd",
            "not a url",
            "//x.example",
        ] {
            assert_eq!(safe_link(bad), None, "{bad}");
        }
        let mut r = run();
        r.runbook_url = safe_link("https://wiki.example/disk");
        let e = Event::RunStarted { run: r };
        assert!(
            e.text_for(Markup::Slack)
                .ends_with(" <https://wiki.example/disk|Runbook>")
        );
        assert!(
            e.text_for(Markup::Markdown)
                .ends_with(" [Runbook](https://wiki.example/disk)")
        );
    }

    /// A sink that records what it is given; `gate`, when set, holds each delivery until
    /// released, then fails it for good.
    struct Fake {
        got: Arc<std::sync::Mutex<Vec<&'static str>>>,
        gate: Option<Arc<tokio::sync::Semaphore>>,
    }

    #[async_trait::async_trait]
    impl Sink for Fake {
        async fn deliver(&self, event: &Event) -> Result<(), DeliveryError> {
            self.got.lock().unwrap().push(event.kind());
            let Some(gate) = &self.gate else {
                return Ok(());
            };
            gate.acquire().await.unwrap().forget();
            Err(DeliveryError {
                retry: false,
                retry_after: None,
                message: "refused".into(),
            })
        }
    }

    fn sink(yaml: &str) -> SinkConfig {
        serde_yaml::from_str(yaml).unwrap()
    }

    /// A notifier over `sinks`, each delivered by a loop of its own when `fakes` gives it one
    /// (else its queue is never read).
    fn notifier(sinks: Vec<(SinkConfig, Option<Fake>)>) -> Notifier {
        let metrics = Arc::new(Metrics::new());
        let handles = sinks
            .into_iter()
            .map(|(cfg, fake)| {
                let (tx, rx) = mpsc::channel(SINK_QUEUE);
                let delivery = Delivery {
                    attempts: 1,
                    quiet_for: Duration::ZERO,
                    events: cfg.events.clone(),
                };
                match fake {
                    Some(fake) => drop(tokio::spawn(deliver_loop(
                        cfg.name.clone(),
                        Arc::new(fake),
                        rx,
                        delivery,
                        metrics.clone(),
                    ))),
                    // Held, never read: what is queued is never delivered.
                    None => std::mem::forget(rx),
                }
                SinkHandle { cfg, queue: tx }
            })
            .collect();
        Notifier {
            sinks: Arc::new(handles),
            metrics: Some(metrics),
        }
    }

    fn told_flag() -> (Kept, tokio::sync::mpsc::UnboundedReceiver<()>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (Kept::new(move || tx.send(()).unwrap()), rx)
    }

    #[tokio::test]
    async fn a_kept_message_is_told_once_every_sink_it_went_to_is_done_with_it() {
        let got = Arc::new(std::sync::Mutex::new(Vec::new()));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let fake = |gate: Option<&Arc<tokio::sync::Semaphore>>| Fake {
            got: got.clone(),
            gate: gate.cloned(),
        };
        let n = notifier(vec![
            (sink("{name: quick, type: webhook}"), Some(fake(None))),
            (sink("{name: slow, type: webhook}"), Some(fake(Some(&gate)))),
            // Not shown there: done with it at once.
            (
                sink("{name: starts, type: webhook, events: [run_started]}"),
                Some(fake(None)),
            ),
            // Another playbook's: not sent there, not waited for.
            (
                sink("{name: other, type: webhook, playbooks: [other]}"),
                None,
            ),
        ]);
        assert!(n.shows("disk-cleanup", "run_finished"));
        let (kept, mut told) = told_flag();
        n.send_kept(finished(run()), Some(kept));
        let both = async {
            while got.lock().unwrap().len() < 2 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), both)
            .await
            .unwrap();
        assert!(told.try_recv().is_err(), "the slow sink still holds it");
        // Given up on there (its answer a failure not worth retrying): done with it too.
        gate.add_permits(1);
        tokio::time::timeout(Duration::from_secs(10), told.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(*got.lock().unwrap(), ["run_finished", "run_finished"]);
        assert!(told.try_recv().is_err(), "told once");
    }

    #[tokio::test]
    async fn a_kept_message_stays_kept_only_while_a_sink_may_still_deliver_it() {
        let got = Arc::new(std::sync::Mutex::new(Vec::new()));
        let n = notifier(vec![
            (
                sink("{name: quick, type: webhook}"),
                Some(Fake {
                    got: got.clone(),
                    gate: None,
                }),
            ),
            (sink("{name: stuck, type: webhook}"), None),
        ]);
        let (kept, mut told) = told_flag();
        n.send_kept(finished(run()), Some(kept));
        let one = async {
            while got.lock().unwrap().is_empty() {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), one)
            .await
            .unwrap();
        drop(n);
        // The stuck sink's copy is still queued, never delivered: the message stays kept.
        tokio::task::yield_now().await;
        assert!(told.try_recv().is_err());
        // A notifier no sink of which shows ends tells a kept message at once.
        let none = notifier(vec![(
            sink("{name: starts, type: webhook, events: [run_started]}"),
            None,
        )]);
        assert!(!none.shows("disk-cleanup", "run_finished"));
        assert!(none.shows("disk-cleanup", "run_started"));
        let (kept, mut told) = told_flag();
        none.send_kept(
            Event::KillSwitch {
                scope: "global".into(),
                engaged: true,
                actor: "a".into(),
                reason: "r".into(),
                until: None,
            },
            Some(kept),
        );
        assert!(told.try_recv().is_err(), "queued to the sink: waits for it");
        // One whose queue is full gives it up, as a failure for good does: told.
        let full = notifier(vec![(sink("{name: full, type: webhook}"), None)]);
        for _ in 0..SINK_QUEUE {
            full.send(finished(run()));
        }
        let (kept, mut told) = told_flag();
        full.send_kept(finished(run()), Some(kept));
        told.try_recv().expect("dropped: given up on");
        let no_sinks = notifier(Vec::new());
        let (kept, mut told) = told_flag();
        no_sinks.send_kept(finished(run()), Some(kept));
        told.try_recv().expect("no sink to wait for");
    }
}
