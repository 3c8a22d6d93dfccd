//! The `Alert` model and the wire formats it arrives in. Pure data: no I/O.
//!
//! One alert of an Alertmanager group is one [`Alert`]. The generic format is a minimal JSON
//! object (or a list of them) for senders other than Alertmanager:
//!
//! ```json
//! {"labels": {"alertname": "DiskSpaceLow", "instance": "db-1"},
//!  "annotations": {"summary": "..."}, "status": "firing",
//!  "startsAt": "2026-11-22T12:00:21Z", "fingerprint": "optional", "generatorURL": "optional"}
//! ```
//! Only `labels` is required. The fingerprint is always computed from the labels, as
//! Alertmanager computes it (FNV-1a 64 over the sorted label set), never taken from the sender:
//! a sender-chosen fingerprint could end or join another alert's runs. A generic alert may
//! still carry `fingerprint`, which must then equal the computed one. Without `startsAt`, the
//! receipt time is used, so each post is a new occurrence and only the playbook cooldown keeps
//! it from acting again.
//!
//! Bodies are parsed strictly: trailing bytes after the JSON document, a key given twice and
//! oversized label sets are refused, so that what is recorded is exactly what was sent.

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;

/// Label or annotation set; sorted so that rendering and fingerprints are stable.
pub type Labels = BTreeMap<String, String>;

/// Whether an alert is firing or resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertStatus {
    /// The condition holds.
    Firing,
    /// The condition no longer holds.
    Resolved,
}

impl AlertStatus {
    /// The lowercase wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertStatus::Firing => "firing",
            AlertStatus::Resolved => "resolved",
        }
    }
}

impl std::fmt::Display for AlertStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One alert, whatever format it arrived in.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Alert {
    /// Which intake it came through: `alertmanager` or `generic`.
    pub source: &'static str,
    /// Firing or resolved.
    pub status: AlertStatus,
    /// Identifying labels (untrusted input).
    pub labels: Labels,
    /// Annotations (untrusted input).
    pub annotations: Labels,
    /// When the alert started, as the sender wrote it; with `fingerprint` it identifies one occurrence.
    pub starts_at: String,
    /// When the alert ended (resolved alerts), if known.
    pub ends_at: Option<String>,
    /// Stable hash of the label set.
    pub fingerprint: String,
    /// Link back to the source of the alert.
    pub generator_url: Option<String>,
    /// Alertmanager's group key, for cooldowns per group.
    pub group_key: Option<String>,
}

impl Alert {
    /// The alert with each NUL in its text written as U+FFFD ([`crate::text::storable`]):
    /// PostgreSQL cannot store one (SQLite can), and an alert's text reaches its columns (the
    /// group key, the times, the link) and what is derived from it (a cooldown key, a target).
    /// A `groupKey` holding NUL failed the whole webhook with 503 on PostgreSQL, which
    /// Alertmanager retries without end. The fingerprint stays the one of the labels as sent.
    fn storable(mut self) -> Alert {
        use crate::text::storable;
        let nul = |s: &str| s.contains('\0');
        let texts = [&self.ends_at, &self.generator_url, &self.group_key];
        if !(self.labels.iter().chain(&self.annotations)).any(|(k, v)| nul(k) || nul(v))
            && !nul(&self.starts_at)
            && !texts.iter().any(|t| t.as_deref().is_some_and(nul))
        {
            return self;
        }
        let map = |m: Labels| -> Labels {
            m.into_iter()
                .map(|(k, v)| (storable(&k).into_owned(), storable(&v).into_owned()))
                .collect()
        };
        self.labels = map(self.labels);
        self.annotations = map(self.annotations);
        let text = |t: Option<String>| t.map(|t| storable(&t).into_owned());
        self.starts_at = storable(&self.starts_at).into_owned();
        self.ends_at = text(self.ends_at);
        self.generator_url = text(self.generator_url);
        self.group_key = text(self.group_key);
        self
    }

    /// The alert's name (`alertname` label), or "" when absent.
    pub fn name(&self) -> &str {
        self.labels.get("alertname").map_or("", String::as_str)
    }

    /// What messages call it: see [`title`].
    pub fn title(&self, target: &str) -> String {
        title(&self.labels, &self.annotations, target)
    }
}

/// What messages call an alert: its `summary` annotation, else "<alertname> on <target>".
pub fn title(labels: &Labels, annotations: &Labels, target: &str) -> String {
    match annotations.get("summary") {
        Some(summary) => summary.clone(),
        None => {
            let name = labels.get("alertname").map_or("", String::as_str);
            format!("{name} on {target}")
        }
    }
}

/// Alertmanager webhook payload, version 4. Unknown fields are ignored so that newer
/// Alertmanager versions keep working.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AlertmanagerPayload {
    /// Payload version; only "4" is accepted.
    pub version: String,
    /// Key of the alert group.
    pub group_key: String,
    /// Alerts Alertmanager left out because of `max_alerts`.
    #[serde(default)]
    pub truncated_alerts: u64,
    /// Status of the group.
    pub status: AlertStatus,
    /// Receiver name.
    pub receiver: String,
    /// The alerts of the group.
    pub alerts: Vec<AlertmanagerAlert>,
}

/// One alert inside an Alertmanager payload.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AlertmanagerAlert {
    /// Firing or resolved.
    pub status: AlertStatus,
    /// Labels.
    #[serde(deserialize_with = "unique_map")]
    pub labels: Labels,
    /// Annotations.
    #[serde(default, deserialize_with = "unique_map")]
    pub annotations: Labels,
    /// Start time.
    pub starts_at: String,
    /// End time; `0001-01-01T00:00:00Z` while firing.
    #[serde(default)]
    pub ends_at: String,
    /// Link to the source.
    #[serde(default, rename = "generatorURL")]
    pub generator_url: String,
    /// Fingerprint of the label set (ignored: Reflex computes it from the labels).
    #[serde(default)]
    pub fingerprint: String,
}

/// Most labels an alert may carry.
pub const MAX_LABELS: usize = 128;
/// Longest label value, in bytes: far above real label values, far below what could make
/// template or script work on it expensive.
pub const MAX_LABEL_VALUE_BYTES: usize = 16 * 1024;
/// Longest annotation value, in bytes (the Rhai sandbox's string limit).
pub const MAX_ANNOTATION_VALUE_BYTES: usize = crate::playbook::script::MAX_STRING_SIZE;

/// A JSON object of strings in which every key appears once (serde's maps keep the last of
/// duplicated keys silently; a second `instance` must not override the first unseen).
pub(crate) fn unique_map<'de, D: Deserializer<'de>>(d: D) -> Result<Labels, D::Error> {
    struct Unique;
    impl<'de> Visitor<'de> for Unique {
        type Value = Labels;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object of string values")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Labels, A::Error> {
            let mut out = Labels::new();
            while let Some((k, v)) = map.next_entry::<String, String>()? {
                if out.contains_key(&k) {
                    return Err(serde::de::Error::custom(format!("duplicate key {k:?}")));
                }
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Unique)
}

/// The zero time Alertmanager writes as `endsAt` of a firing alert.
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// An [`Alert`] as stored and exported (its `source` a name, not a static one): the deferred
/// alerts' rows, `reflex export alerts`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AlertRecord {
    /// `alertmanager` or `generic`.
    pub source: String,
    /// `firing` or `resolved`.
    pub status: AlertStatus,
    /// Labels.
    pub labels: Labels,
    /// Annotations.
    #[serde(default)]
    pub annotations: Labels,
    /// `startsAt`.
    pub starts_at: String,
    /// `endsAt`.
    #[serde(default)]
    pub ends_at: Option<String>,
    /// Fingerprint.
    pub fingerprint: String,
    /// `generatorURL`.
    #[serde(default)]
    pub generator_url: Option<String>,
    /// Alertmanager's group key.
    #[serde(default)]
    pub group_key: Option<String>,
}

impl AlertRecord {
    /// An alert's record.
    pub fn of(a: &Alert) -> AlertRecord {
        AlertRecord {
            source: a.source.to_string(),
            status: a.status,
            labels: a.labels.clone(),
            annotations: a.annotations.clone(),
            starts_at: a.starts_at.clone(),
            ends_at: a.ends_at.clone(),
            fingerprint: a.fingerprint.clone(),
            generator_url: a.generator_url.clone(),
            group_key: a.group_key.clone(),
        }
    }

    /// The alert again.
    pub fn alert(self) -> Alert {
        Alert {
            source: if self.source == "alertmanager" {
                "alertmanager"
            } else {
                "generic"
            },
            status: self.status,
            labels: self.labels,
            annotations: self.annotations,
            starts_at: self.starts_at,
            ends_at: self.ends_at,
            fingerprint: self.fingerprint,
            generator_url: self.generator_url,
            group_key: self.group_key,
        }
    }
}

impl AlertmanagerPayload {
    /// Checks the version and splits the group into alerts.
    pub fn into_alerts(self) -> Result<Vec<Alert>, String> {
        if self.version != "4" {
            return Err(format!(
                "unsupported Alertmanager payload version {:?} (expected \"4\")",
                self.version
            ));
        }
        let group_key = self.group_key;
        self.alerts
            .into_iter()
            .enumerate()
            .map(|(i, a)| {
                validate_labels(&a.labels, &a.annotations)
                    .map_err(|e| format!("alerts[{i}]: {e}"))?;
                let fingerprint = fingerprint(&a.labels);
                Ok(Alert {
                    source: "alertmanager",
                    status: a.status,
                    labels: a.labels,
                    annotations: a.annotations,
                    starts_at: a.starts_at,
                    ends_at: (!a.ends_at.is_empty() && a.ends_at != ZERO_TIME).then_some(a.ends_at),
                    fingerprint,
                    generator_url: (!a.generator_url.is_empty()).then_some(a.generator_url),
                    group_key: Some(group_key.clone()),
                }
                .storable())
            })
            .collect()
    }
}

/// The generic alert format (see the module docs).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GenericAlert {
    /// Labels; at least one.
    #[serde(deserialize_with = "unique_map")]
    pub labels: Labels,
    /// Annotations.
    #[serde(default, deserialize_with = "unique_map")]
    pub annotations: Labels,
    /// Defaults to firing.
    pub status: Option<AlertStatus>,
    /// RFC 3339; defaults to the receipt time.
    pub starts_at: Option<String>,
    /// RFC 3339.
    pub ends_at: Option<String>,
    /// Link to the source.
    #[serde(rename = "generatorURL")]
    pub generator_url: Option<String>,
    /// Optional; if given, it must equal Alertmanager's fingerprint of the labels.
    pub fingerprint: Option<String>,
    /// Optional grouping key for group cooldowns.
    pub group_key: Option<String>,
}

impl GenericAlert {
    /// Validates and converts; `now` is the receipt time (RFC 3339).
    pub fn into_alert(self, now: &str) -> Result<Alert, String> {
        validate_labels(&self.labels, &self.annotations)?;
        let computed = fingerprint(&self.labels);
        if let Some(sent) = self.fingerprint.as_deref().filter(|f| *f != computed) {
            return Err(format!(
                "fingerprint {sent:?} is not the fingerprint of these labels ({computed}); \
                 omit it and Reflex computes it"
            ));
        }
        for (field, value) in [("startsAt", &self.starts_at), ("endsAt", &self.ends_at)] {
            if let Some(v) = value {
                crate::time::Timestamp::parse(v).map_err(|e| format!("{field}: {e}"))?;
            }
        }
        Ok(Alert {
            source: "generic",
            status: self.status.unwrap_or(AlertStatus::Firing),
            fingerprint: computed,
            labels: self.labels,
            annotations: self.annotations,
            starts_at: self.starts_at.unwrap_or_else(|| now.to_string()),
            ends_at: self.ends_at,
            generator_url: self.generator_url,
            group_key: self.group_key,
        }
        .storable())
    }
}

/// Parses a complete JSON document of type `T`: nothing but white space may follow it. Errors
/// name where in the document they are.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            format!("malformed JSON: {inner}")
        } else if path == "." || path == "?" {
            inner.to_string()
        } else {
            format!("at {path}: {inner}")
        }
    })?;
    de.end()
        .map_err(|e| format!("malformed JSON: {e} (after the end of the document)"))?;
    Ok(value)
}

/// Parses a generic webhook body: one alert object or a list of them.
pub fn parse_generic(body: &[u8], now: &str) -> Result<Vec<Alert>, String> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let items = match first {
        Some(b'[') => parse_json::<Vec<GenericAlert>>(body)?,
        Some(b'{') => vec![parse_json::<GenericAlert>(body)?],
        _ => {
            // Let the parser say what is wrong with it.
            parse_json::<serde::de::IgnoredAny>(body).and(Err(
                "expected an alert object or a list of alert objects".to_string(),
            ))?
        }
    };
    let many = matches!(first, Some(b'['));
    items
        .into_iter()
        .enumerate()
        .map(|(i, g)| {
            g.into_alert(now)
                .map_err(|e| if many { format!("[{i}]: {e}") } else { e })
        })
        .collect()
}

pub(crate) fn validate_labels(labels: &Labels, annotations: &Labels) -> Result<(), String> {
    if labels.is_empty() {
        return Err("an alert needs at least one label".into());
    }
    if labels.len() > MAX_LABELS || annotations.len() > MAX_LABELS {
        return Err(format!(
            "more than {MAX_LABELS} labels or annotations in one alert"
        ));
    }
    // Any UTF-8 name but the empty one, as Alertmanager takes since 0.27 (Prometheus 3 sends
    // `service.name`): refusing one refused the webhook, and Alertmanager does not retry a 4xx,
    // so its whole group was lost. Names are keys, never code or a command's text.
    if labels.contains_key("") {
        return Err("invalid label name \"\": a label needs a name".into());
    }
    for (set, map, max) in [
        ("label", labels, MAX_LABEL_VALUE_BYTES),
        ("annotation", annotations, MAX_ANNOTATION_VALUE_BYTES),
    ] {
        if let Some((k, v)) = map.iter().find(|(_, v)| v.len() > max) {
            return Err(format!(
                "{set} {k:?} is {} bytes long (at most {max})",
                v.len()
            ));
        }
    }
    Ok(())
}

/// Prometheus label names: `[a-zA-Z_][a-zA-Z0-9_]*`.
pub fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Alertmanager's fingerprint of a label set: FNV-1a 64 over the sorted names and values,
/// each followed by the separator byte 0xff, as 16 hex digits.
pub fn fingerprint(labels: &Labels) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for (k, v) in labels {
        for b in k.bytes().chain([0xff]).chain(v.bytes()).chain([0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(PRIME);
        }
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DISK: &str = include_str!("../tests/fixtures/alertmanager-disk.json");

    #[test]
    fn splits_alertmanager_group_into_alerts() {
        let p: AlertmanagerPayload = serde_json::from_str(DISK).unwrap();
        let alerts = p.into_alerts().unwrap();
        assert_eq!(alerts.len(), 2);
        assert_eq!(alerts[0].name(), "DiskSpaceLow");
        assert_eq!(alerts[0].fingerprint, "339f402cd6bc7eb6");
        assert_eq!(alerts[0].starts_at, "2026-11-22T12:00:21.820032982Z");
        assert_eq!(
            alerts[0].ends_at, None,
            "the zero endsAt of a firing alert is dropped"
        );
        assert_eq!(alerts[1].labels["instance"], "db-2.example.internal:9100");
        assert_eq!(
            alerts[1].group_key.as_deref(),
            Some("{}:{alertname=\"DiskSpaceLow\"}")
        );
    }

    #[test]
    fn fingerprint_matches_alertmanager() {
        // Alertmanager computed 339f402cd6bc7eb6 for this label set (fixture).
        let p: AlertmanagerPayload = serde_json::from_str(DISK).unwrap();
        for a in p.into_alerts().unwrap() {
            assert_eq!(fingerprint(&a.labels), a.fingerprint);
        }
    }

    #[test]
    fn rejects_other_versions_and_bad_labels() {
        let v3 = DISK.replace("\"version\": \"4\"", "\"version\": \"3\"");
        let p: AlertmanagerPayload = serde_json::from_str(&v3).unwrap();
        assert!(p.into_alerts().unwrap_err().contains("version"));
        let err = parse_generic(br#"{"labels": {"": "x"}}"#, "now").unwrap_err();
        assert!(err.contains("label name"), "{err}");
        assert!(parse_generic(br#"{"labels": {}}"#, "now").is_err());
    }

    /// Prometheus 3 and Alertmanager 0.27 take any UTF-8 label name; refusing one refused the
    /// webhook, and Alertmanager does not retry a 4xx: the group was lost.
    #[test]
    fn utf8_label_names_are_taken_as_alertmanager_sends_them() {
        let body = DISK.replace(
            "\"job\": \"node\"",
            "\"service.name\": \"api\", \"k8s.pod\": \"p-1\"",
        );
        assert_ne!(body, DISK);
        let p: AlertmanagerPayload = serde_json::from_str(&body).unwrap();
        let alerts = p.into_alerts().unwrap();
        assert_eq!(alerts[0].labels["service.name"], "api");
        assert_eq!(fingerprint(&alerts[0].labels), alerts[0].fingerprint);
        let a = parse_generic(
            br#"{"labels": {"alertname": "X", "service.name": "api"}}"#,
            "now",
        );
        assert_eq!(a.unwrap()[0].labels["service.name"], "api");
    }

    #[test]
    fn generic_accepts_one_or_many_and_fills_defaults() {
        let one =
            parse_generic(br#"{"labels": {"alertname": "X"}}"#, "2026-01-01T00:00:00Z").unwrap();
        assert_eq!(one[0].status, AlertStatus::Firing);
        assert_eq!(one[0].starts_at, "2026-01-01T00:00:00Z");
        assert_eq!(one[0].fingerprint, fingerprint(&one[0].labels));
        let many = parse_generic(
            br#"[{"labels": {"alertname": "X"}}, {"labels": {"alertname": "Y"}, "status": "resolved"}]"#,
            "t",
        )
        .unwrap();
        assert_eq!(many.len(), 2);
        assert_eq!(many[1].status, AlertStatus::Resolved);
    }

    #[test]
    fn duplicate_keys_trailing_bytes_and_foreign_fingerprints_are_refused() {
        let e = parse_generic(br#"{"labels": {"a": "b"}, "labels": {"a": "c"}}"#, "t").unwrap_err();
        assert!(e.contains("duplicate field `labels`"), "{e}");
        let e = parse_generic(br#"{"labels": {"a": "b", "a": "c"}}"#, "t").unwrap_err();
        assert!(e.contains("duplicate key \"a\""), "{e}");
        let e = parse_generic(br#"{"labels": {"a": "b"}} {"x": 1}"#, "t").unwrap_err();
        assert!(e.contains("trailing"), "{e}");
        let e = parse_generic(
            br#"{"labels": {"a": "b"}, "fingerprint": "0000000000000001"}"#,
            "t",
        )
        .unwrap_err();
        assert!(e.contains("not the fingerprint"), "{e}");
        let long = format!(
            r#"{{"labels": {{"a": "{}"}}}}"#,
            "x".repeat(MAX_LABEL_VALUE_BYTES + 1)
        );
        assert!(
            parse_generic(long.as_bytes(), "t")
                .unwrap_err()
                .contains("at most")
        );

        let forged = DISK.replace("339f402cd6bc7eb6", "0123456789abcdef");
        let alerts = parse_json::<AlertmanagerPayload>(forged.as_bytes())
            .unwrap()
            .into_alerts()
            .unwrap();
        assert_eq!(
            alerts[0].fingerprint, "339f402cd6bc7eb6",
            "computed, not taken"
        );
        let dup = DISK.replacen("\"labels\": {", "\"labels\": {\"instance\": \"evil\",", 1);
        let e = parse_json::<AlertmanagerPayload>(dup.as_bytes()).unwrap_err();
        assert!(
            e.contains("duplicate key \"instance\"") && e.contains("alerts[0]"),
            "{e}"
        );
        let e = parse_json::<AlertmanagerPayload>(format!("{DISK}x").as_bytes()).unwrap_err();
        assert!(e.contains("trailing"), "{e}");
    }

    #[test]
    fn generic_errors_name_the_problem() {
        let e = parse_generic(br#"{"labels": {"a": "b"}, "colour": 1}"#, "t").unwrap_err();
        assert!(e.contains("colour"), "{e}");
        let e = parse_generic(br#"[{"labels": {"a": "b"}}, {"labels": 3}]"#, "t").unwrap_err();
        assert!(e.starts_with("at [1].labels"), "{e}");
        let e =
            parse_generic(br#"{"labels": {"a": "b"}, "startsAt": "yesterday"}"#, "t").unwrap_err();
        assert!(e.contains("startsAt"), "{e}");
        assert!(parse_generic(b"42", "t").is_err());
        assert!(parse_generic(b"{", "t").unwrap_err().contains("malformed"));
    }
}
