//! Artifacts: what a step produced besides its JSON output (a graph as PNG, a pod's log as
//! text), kept with the run and deleted with it. Sizes are capped per artifact and per run, so
//! that a chatty log cannot fill the disk through the store.

use super::{Store, StoreError};
use serde::{Deserialize, Serialize};

/// Caps on what a run may keep (`engine.artifacts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ArtifactCaps {
    /// Largest artifact kept, in bytes.
    pub max_bytes: usize,
    /// All of one run's artifacts together, in bytes.
    pub max_run_bytes: usize,
}

impl Default for ArtifactCaps {
    fn default() -> Self {
        ArtifactCaps {
            max_bytes: 1 << 20,
            max_run_bytes: 4 << 20,
        }
    }
}

/// One artifact as a step hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    /// Its name within the step (`graph.png`, `logs.txt`); stored as `<step>-<name>`.
    pub name: String,
    /// Its media type (`image/png`, `text/plain; charset=utf-8`).
    pub content_type: String,
    /// The bytes.
    pub data: Vec<u8>,
}

/// What a run's JSON says of an artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ArtifactInfo {
    /// Its name in the run (`<step>-<name>`).
    pub name: String,
    /// Its media type.
    pub content_type: String,
    /// Bytes.
    pub size: i64,
    /// Where it is served (`/api/v1/runs/{id}/artifacts/{name}`, viewer role).
    pub url: String,
}

impl ArtifactInfo {
    fn new(run_id: i64, name: String, content_type: String, size: i64) -> ArtifactInfo {
        // Names are URL-safe (see `valid_name`).
        let url = format!("/api/v1/runs/{run_id}/artifacts/{name}");
        ArtifactInfo {
            name,
            content_type,
            size,
            url,
        }
    }
}

/// Whether `name` is fit to be an artifact's name: it appears in URLs and file names.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.')
}

impl Store {
    /// Keeps a step's artifacts with its run. Each is stored, or refused with the reason (over
    /// a cap, a bad name); a refusal changes nothing stored. A name the run already has is
    /// replaced (a step that runs again after a restart).
    pub async fn save_artifacts(
        &self,
        run_id: i64,
        step_idx: i64,
        step: &str,
        artifacts: Vec<Artifact>,
        caps: ArtifactCaps,
    ) -> Result<Vec<Result<ArtifactInfo, String>>, StoreError> {
        let step = step.to_string();
        self.write(move |c| {
            let mut out = Vec::with_capacity(artifacts.len());
            for a in &artifacts {
                let name = format!("{step}-{}", a.name);
                let size = a.data.len();
                if !valid_name(&name) {
                    out.push(Err(format!(
                        "artifact {name:?} refused: names are letters, digits, '-', '_' and '.'"
                    )));
                    continue;
                }
                if size > caps.max_bytes {
                    out.push(Err(format!(
                        "artifact {name} refused: {size} bytes is over engine.artifacts.max_bytes ({})",
                        caps.max_bytes
                    )));
                    continue;
                }
                let others: i64 = c.one(
                    "SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM artifacts WHERE run_id = ?1 AND name != ?2",
                    &[&run_id, &name],
                    |r| r.get(0),
                )?;
                if others as usize + size > caps.max_run_bytes {
                    out.push(Err(format!(
                        "artifact {name} refused: the run's artifacts would take {} bytes, over \
                         engine.artifacts.max_run_bytes ({})",
                        others as usize + size,
                        caps.max_run_bytes
                    )));
                    continue;
                }
                c.exec(
                    "INSERT INTO artifacts (run_id, name, step_idx, content_type, size, data)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (run_id, name) DO UPDATE SET step_idx = excluded.step_idx,
                       content_type = excluded.content_type, size = excluded.size, data = excluded.data",
                    &[&run_id, &name, &step_idx, &a.content_type, &(size as i64), &a.data],
                )?;
                out.push(Ok(ArtifactInfo::new(run_id, name, a.content_type.clone(), size as i64)));
            }
            Ok(out)
        })
        .await
    }

    /// One artifact of a run: its media type and bytes; none when the run has no artifact of
    /// that name (or the run is gone).
    pub async fn artifact(
        &self,
        run_id: i64,
        name: &str,
    ) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        let name = name.to_string();
        self.read(move |c| {
            c.row(
                "SELECT content_type, data FROM artifacts WHERE run_id = ?1 AND name = ?2",
                &[&run_id, &name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
        .await
    }
}

/// The artifacts of a run's steps, by step index, in name order (for the run's JSON).
pub(super) fn step_artifacts(
    c: &super::Db,
    run_id: i64,
) -> Result<Vec<(i64, ArtifactInfo)>, StoreError> {
    c.rows(
        "SELECT step_idx, name, content_type, size FROM artifacts WHERE run_id = ?1 ORDER BY step_idx, name",
        &[&run_id],
        |r| Ok((r.get(0)?, ArtifactInfo::new(run_id, r.get(1)?, r.get(2)?, r.get(3)?))),
    )
}

/// What an evidence step (a step that only reads: logs, events, a graph) found: shown where a
/// decision is made (an approval, the run page, chat).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Evidence {
    /// The step's name.
    pub step: String,
    /// Its action (`kube.logs`, `prometheus.graph`, …).
    pub action: String,
    /// What it found, in a few lines.
    pub summary: String,
    /// Its artifacts (a graph, the whole log).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<ArtifactInfo>,
}

/// The evidence a run's steps before `before_idx` gathered, in step order.
pub(super) fn run_evidence(
    c: &super::Db,
    run_id: i64,
    before_idx: i64,
) -> Result<Vec<Evidence>, StoreError> {
    let steps: Vec<(
        i64,
        String,
        crate::playbook::actions::Action,
        Option<String>,
    )> = c.rows(
        "SELECT idx, name, action, output FROM steps
         WHERE run_id = ?1 AND idx < ?2 AND state IN ('succeeded', 'shadow') ORDER BY idx",
        &[&run_id, &before_idx],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    )?;
    if !steps.iter().any(|s| s.2.reads_only()) {
        return Ok(Vec::new());
    }
    let mut artifacts = step_artifacts(c, run_id)?;
    Ok(steps
        .into_iter()
        .filter(|s| s.2.reads_only())
        .map(|(idx, step, action, output)| {
            let output: serde_json::Value = output
                .and_then(|o| serde_json::from_str(&o).ok())
                .unwrap_or_default();
            let (own, rest) = std::mem::take(&mut artifacts)
                .into_iter()
                .partition(|(i, _)| *i == idx);
            artifacts = rest;
            Evidence {
                step,
                action: action.name().to_string(),
                summary: output["summary"].as_str().unwrap_or_default().to_string(),
                artifacts: own.into_iter().map(|(_, a)| a).collect(),
            }
        })
        .collect())
}

impl Store {
    /// The evidence run `run_id`'s steps before step `before_idx` gathered.
    pub async fn evidence(
        &self,
        run_id: i64,
        before_idx: i64,
    ) -> Result<Vec<Evidence>, StoreError> {
        self.read(move |c| run_evidence(c, run_id, before_idx))
            .await
    }
}
