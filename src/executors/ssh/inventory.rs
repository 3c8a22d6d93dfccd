//! Hosts from a source of truth besides `ssh.hosts`: Ansible's YAML inventory (`all`,
//! `children`, `hosts`, with `ansible_host`, `ansible_port`, `ansible_user`, in host or group
//! `vars`) and Prometheus `file_sd` JSON (the hosts Prometheus scrapes: each target's host is a
//! host, the target itself an alias, so an alert's `instance` label finds it). Only those three
//! settings come from a file; host keys are checked by `ssh.*` as for every host.
//!
//! The files are read again when they change (checked at each step, by size and time).

use super::config::SshHost;
use serde_yaml::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// The hosts of one inventory file, by name.
pub type Hosts = BTreeMap<String, SshHost>;

/// Reads one inventory file: JSON (`file_sd`) by its extension, else Ansible YAML. Errors say
/// the file (and the line, for YAML).
pub fn load(path: &Path) -> Result<Hosts, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let is_json = path.extension().is_some_and(|e| e == "json");
    let hosts = if is_json {
        file_sd(&text)
    } else {
        ansible(&text)
    };
    hosts.map_err(|e| format!("{}: {e}", path.display()))
}

/// Prometheus `file_sd`: `[{"targets": ["host:9100", …], "labels": {…}}, …]`.
fn file_sd(text: &str) -> Result<Hosts, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Group {
        targets: Vec<String>,
        /// Read (so a misspelt key is an error) and not used: hosts are named by targets.
        #[serde(default, rename = "labels")]
        _labels: BTreeMap<String, String>,
    }
    let groups: Vec<Group> = serde_json::from_str(text)
        .map_err(|e| format!("line {}: not a Prometheus file_sd list ({e})", e.line()))?;
    let mut hosts = Hosts::new();
    for target in groups.iter().flat_map(|g| &g.targets) {
        let host = match target.rsplit_once(':') {
            // `[::1]:9100`, `host:9100`; a bare IPv6 address has more colons and no port.
            Some((h, port)) if port.parse::<u16>().is_ok() && !h.ends_with(':') => {
                h.trim_start_matches('[').trim_end_matches(']')
            }
            _ => target.as_str(),
        };
        check_name(host)?;
        let entry = hosts.entry(host.to_string()).or_default();
        if target != host && !entry.aliases.contains(target) {
            entry.aliases.push(target.clone());
        }
    }
    Ok(hosts)
}

/// The connection settings a group passes down to its hosts.
#[derive(Default, Clone)]
struct Vars {
    address: Option<String>,
    port: Option<u16>,
    user: Option<String>,
}

impl Vars {
    /// These, with what `v` (a `vars` map or a host's own) sets over them.
    fn over(&self, v: Option<&Value>) -> Result<Vars, String> {
        let mut out = self.clone();
        let Some(v) = v.and_then(Value::as_mapping) else {
            return Ok(out);
        };
        let text = |k: &str| {
            v.get(k).and_then(|x| match x {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
        };
        if let Some(a) = text("ansible_host") {
            out.address = Some(a);
        }
        if let Some(p) = text("ansible_port") {
            out.port = Some(
                p.parse()
                    .map_err(|_| format!("ansible_port {p:?} is not a port"))?,
            );
        }
        if let Some(u) = text("ansible_user") {
            out.user = Some(u);
        }
        Ok(out)
    }
}

/// Ansible's YAML inventory: groups (top-level, or under `children`) with `hosts` and `vars`.
fn ansible(text: &str) -> Result<Hosts, String> {
    let doc: Value = serde_yaml::from_str(text).map_err(|e| match e.location() {
        Some(at) => format!("line {}: {e}", at.line()),
        None => e.to_string(),
    })?;
    let groups = doc
        .as_mapping()
        .ok_or("not an Ansible YAML inventory (a map of groups, such as all:)")?;
    let mut hosts = Hosts::new();
    for (_, group) in groups {
        walk(group, &Vars::default(), &mut hosts, 0)?;
    }
    Ok(hosts)
}

/// Groups nest at most this deep (a cycle cannot be written in YAML, but depth is bounded).
const MAX_DEPTH: usize = 32;

fn walk(group: &Value, inherited: &Vars, hosts: &mut Hosts, depth: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("groups nest deeper than {MAX_DEPTH}"));
    }
    let vars = inherited.over(group.get("vars"))?;
    if let Some(list) = group.get("hosts").and_then(Value::as_mapping) {
        for (name, own) in list {
            let name = name.as_str().ok_or("a host name must be text")?;
            check_name(name)?;
            let v = vars.over(Some(own))?;
            let entry = hosts.entry(name.to_string()).or_default();
            // A host in several groups: what was said first stands.
            entry.address = entry.address.take().or(v.address);
            entry.port = entry.port.or(v.port);
            entry.user = entry.user.take().or(v.user);
        }
    }
    if let Some(children) = group.get("children").and_then(Value::as_mapping) {
        for (_, child) in children {
            walk(child, &vars, hosts, depth + 1)?;
        }
    }
    Ok(())
}

/// A host name fit for ssh: no option (`-o…`), no space or control character.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']'));
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a host name"))
    }
}

/// Each file's size and modification time when it was last read (none: unreadable).
type Stamps = Vec<Option<(u64, SystemTime)>>;

/// The inventory files, read again when one changes; the last good read stands when a file
/// goes bad (and the error is logged).
pub struct Inventory {
    files: Vec<PathBuf>,
    state: Mutex<(Stamps, std::sync::Arc<Hosts>)>,
}

impl Inventory {
    /// From `ssh.inventory_files`; read now.
    pub fn new(files: Vec<PathBuf>) -> Inventory {
        let inv = Inventory {
            files,
            state: Mutex::new((Vec::new(), std::sync::Arc::new(Hosts::new()))),
        };
        inv.current();
        inv
    }

    fn stamps(&self) -> Stamps {
        (self.files.iter())
            .map(|f| {
                let m = std::fs::metadata(f).ok()?;
                Some((m.len(), m.modified().ok()?))
            })
            .collect()
    }

    /// The hosts of every file, as they are now.
    pub fn current(&self) -> std::sync::Arc<Hosts> {
        if self.files.is_empty() {
            return std::sync::Arc::default();
        }
        let stamps = self.stamps();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.0 == stamps {
            return state.1.clone();
        }
        match load_all(&self.files) {
            Ok(hosts) => {
                tracing::info!(hosts = hosts.len(), "ssh inventory files read");
                *state = (stamps, std::sync::Arc::new(hosts));
            }
            Err(e) => {
                tracing::error!(error = %e, "ssh inventory file unreadable; keeping the hosts read before");
                state.0 = stamps;
            }
        }
        state.1.clone()
    }
}

/// Every file's hosts together; a name in two files is one host, the first file's settings
/// standing.
pub fn load_all(files: &[PathBuf]) -> Result<Hosts, String> {
    let mut all = Hosts::new();
    for f in files {
        for (name, host) in load(f)? {
            let entry = all.entry(name).or_default();
            entry.address = entry.address.take().or(host.address);
            entry.port = entry.port.or(host.port);
            entry.user = entry.user.take().or(host.user);
            for a in host.aliases {
                if !entry.aliases.contains(&a) {
                    entry.aliases.push(a);
                }
            }
        }
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ansible_groups_children_and_vars_give_each_host_its_address_port_and_user() {
        let hosts = ansible(
            r#"
all:
  vars: { ansible_user: deploy }
  hosts:
    bastion.example.internal:
  children:
    db:
      vars: { ansible_port: 2222 }
      hosts:
        db-1: { ansible_host: 10.0.0.11 }
        db-2: { ansible_host: 10.0.0.12, ansible_user: postgres }
    web:
      children:
        web_eu:
          hosts:
            web-1:
"#,
        )
        .unwrap();
        let get = |n: &str| {
            let h = &hosts[n];
            (h.address.as_deref(), h.port, h.user.as_deref())
        };
        assert_eq!(get("db-1"), (Some("10.0.0.11"), Some(2222), Some("deploy")));
        assert_eq!(
            get("db-2"),
            (Some("10.0.0.12"), Some(2222), Some("postgres"))
        );
        assert_eq!(get("web-1"), (None, None, Some("deploy")));
        assert_eq!(
            get("bastion.example.internal"),
            (None, None, Some("deploy"))
        );
        assert_eq!(hosts.len(), 4);
    }

    #[test]
    fn file_sd_targets_are_hosts_with_the_target_as_an_alias() {
        let hosts = file_sd(
            r#"[{"targets": ["db-1.example.internal:9100", "10.0.0.5:9100", "[::1]:9100"], "labels": {"env": "prod"}},
                {"targets": ["db-1.example.internal:9187"]}]"#,
        )
        .unwrap();
        assert_eq!(
            hosts["db-1.example.internal"].aliases,
            ["db-1.example.internal:9100", "db-1.example.internal:9187"]
        );
        assert!(hosts.contains_key("10.0.0.5") && hosts.contains_key("::1"));
    }

    #[test]
    fn bad_files_say_where_and_what() {
        let e = ansible("all:\n  hosts:\n    db-1: {ansible_port: ssh}\n").unwrap_err();
        assert!(e.contains("ansible_port \"ssh\" is not a port"), "{e}");
        let e = ansible("all:\n  hosts: [\n").unwrap_err();
        assert!(e.starts_with("line "), "{e}");
        let e = ansible("all:\n  hosts:\n    \"-oProxyCommand=x\":\n").unwrap_err();
        assert!(e.contains("is not a host name"), "{e}");
        let e = file_sd("{\"targets\": []}").unwrap_err();
        assert!(e.contains("file_sd"), "{e}");
    }
}
