//! The audit sink (`audit.sink`): every audit row, soon after it is written, POSTed oldest
//! first as a CloudEvents 1.0 JSON batch. The last row the sink accepted (a 2xx answer) is
//! kept in the store, so an outage of the sink or a restart of Reflex loses nothing: the rows
//! wait (retention keeps them) and go out when the sink is back, with backoff between tries.
//! One replica sends at a time (it holds the sink for a while, renewed every round); a row
//! may reach the sink twice when a replica dies mid-request, with the same event `id`.

use super::*;

/// How often new rows are looked for.
const EVERY: Duration = Duration::from_secs(1);
/// How long one replica keeps the right to send without renewing it.
const HOLD_MS: i64 = 30_000;
/// The longest wait between tries while the sink fails.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

impl Engine {
    /// Sends the audit to its sink until shutdown (a config without one sends nothing; a
    /// reload can add or change it).
    pub async fn keep_audit_sink(self: Arc<Self>) {
        let mut client: Option<(Duration, reqwest::Client)> = None;
        let mut wait = EVERY;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shutdown.cancelled() => {
                    if self.live().audit_sink.is_some() {
                        let _ = self.store.audit_sink_release().await;
                    }
                    return;
                }
            }
            let Some((sink, credential)) = self.live().audit_sink.clone() else {
                wait = EVERY;
                continue;
            };
            let http = match &client {
                Some((timeout, http)) if *timeout == sink.timeout => http.clone(),
                _ => {
                    let built = reqwest::Client::builder()
                        .connect_timeout(sink.timeout)
                        .timeout(sink.timeout)
                        .build();
                    match built {
                        Ok(http) => client.insert((sink.timeout, http)).1.clone(),
                        Err(e) => {
                            tracing::warn!(error = %e, "audit sink: cannot build an HTTP client");
                            wait = MAX_BACKOFF;
                            continue;
                        }
                    }
                }
            };
            wait = match self.send_audit(&http, &sink, credential.as_ref()).await {
                Ok(true) => Duration::ZERO,
                Ok(false) => EVERY,
                Err(e) => {
                    self.metrics.audit_sink_errors.inc();
                    let next = (wait * 2).clamp(EVERY, MAX_BACKOFF);
                    tracing::warn!(error = %e, retry_in = ?next, "audit sink: rows not sent; trying again");
                    next
                }
            };
        }
    }

    /// One round: the rows after the last one sent, in one request. `Ok(true)` when the batch
    /// was full (more may wait).
    async fn send_audit(
        &self,
        http: &reqwest::Client,
        sink: &crate::config::AuditSinkConfig,
        credential: Option<&crate::config::Credential>,
    ) -> Result<bool, String> {
        let text = |e: crate::store::StoreError| e.to_string();
        let Some(sent) = self.store.audit_sink_claim(HOLD_MS).await.map_err(text)? else {
            return Ok(false);
        };
        let rows = (self.store.audit_after(sent, sink.batch).await).map_err(text)?;
        let Some(last) = rows.last().map(|r| r.id) else {
            return Ok(false);
        };
        let source = (self.live().public_url.clone()).unwrap_or_else(|| "reflex".into());
        let events: Vec<serde_json::Value> = (rows.iter())
            .map(|r| {
                let row = serde_json::to_value(r).unwrap_or_default();
                crate::client::audit_cloudevent(&row, &source)
            })
            .collect();
        let body = serde_json::to_vec(&events).map_err(|e| e.to_string())?;
        let mut request = (http.post(&sink.url))
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/cloudevents-batch+json",
            )
            .body(body);
        if let Some(c) = credential {
            request = request.header(&c.header, c.value()?);
        }
        let answer = (request.send().await).map_err(|e| e.without_url().to_string())?;
        if !answer.status().is_success() {
            return Err(format!("the sink answered {}", answer.status()));
        }
        if self.store.audit_sink_sent(last).await.map_err(text)? {
            self.metrics.audit_sent.inc_by(rows.len() as u64);
        }
        Ok(rows.len() == sink.batch as usize)
    }
}
