//! Guards: conditions over live facts that a step reads just before it acts, and that must
//! hold for it to act. `guard: "ready_fraction >= 0.5"` on `kube.delete_pod` refuses a delete
//! that would leave the pod's workload with fewer than half its replicas ready;
//! `schedulable_nodes_after >= 0.8` on `kube.cordon` / `kube.drain` one that would leave fewer
//! than 80 % of the nodes schedulable. Cordon and drain always carry
//! [`NODE_FLOOR`]: a playbook's guard can only add to it. A guard is comparisons of a fact
//! with a number (`>=`, `>`, `<=`, `<`), joined by `&&`. The facts read and the verdict are
//! kept in the step's output (`guard`), refused or not.

use serde_json::{Map, Value, json};

/// Cordon and drain never leave fewer than half the nodes schedulable.
pub const NODE_FLOOR: &str = "schedulable_nodes_after >= 0.5";

/// One comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    fact: String,
    op: &'static str,
    value: f64,
}

/// Parses `fact >= 0.5 && other < 3`; the facts are checked against `known`.
pub fn parse(text: &str, known: &[&str]) -> Result<Vec<Condition>, String> {
    text.split("&&")
        .map(|part| {
            let part = part.trim();
            let (fact, op, value) = [">=", "<=", ">", "<"]
                .into_iter()
                .find_map(|op| part.split_once(op).map(|(f, v)| (f.trim(), op, v.trim())))
                .ok_or_else(|| {
                    format!("guard {part:?}: expected `fact >= number` (or >, <=, <), joined by &&")
                })?;
            if !known.contains(&fact) {
                return Err(format!(
                    "guard {part:?}: unknown fact {fact:?} here (known: {})",
                    known.join(", ")
                ));
            }
            let value = value
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| format!("guard {part:?}: {value:?} is not a number"))?;
            Ok(Condition {
                fact: fact.to_string(),
                op,
                value,
            })
        })
        .collect()
}

/// Checks every condition against the facts read: the verdict recorded with the step, and
/// `Err` naming the first condition that does not hold.
pub fn check(
    text: &str,
    conditions: &[Condition],
    facts: &Map<String, Value>,
) -> (Value, Result<(), String>) {
    let failed = conditions.iter().find(|c| {
        let v = facts
            .get(&c.fact)
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN);
        !match c.op {
            ">=" => v >= c.value,
            ">" => v > c.value,
            "<=" => v <= c.value,
            _ => v < c.value,
        }
    });
    let record = json!({ "condition": text, "facts": facts, "holds": failed.is_none() });
    let verdict = match failed {
        None => Ok(()),
        Some(c) => Err(format!(
            "refused by its guard: {} {} {} does not hold ({} is {})",
            c.fact,
            c.op,
            c.value,
            c.fact,
            facts
                .get(&c.fact)
                .map_or("unknown".to_string(), |v| format!(
                    "{:.2}",
                    v.as_f64().unwrap_or(f64::NAN)
                ))
        )),
    };
    (record, verdict)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guard_is_comparisons_of_known_facts_with_numbers() {
        let known = ["ready_fraction", "ready"];
        let c = parse("ready_fraction >= 0.5 && ready > 1", &known).unwrap();
        let facts = |f: f64, r: f64| {
            let mut m = Map::new();
            m.insert("ready_fraction".into(), json!(f));
            m.insert("ready".into(), json!(r));
            m
        };
        let (record, verdict) = check("g", &c, &facts(0.5, 2.0));
        assert_eq!((record["holds"].as_bool(), verdict), (Some(true), Ok(())));
        let (record, verdict) = check("g", &c, &facts(0.25, 2.0));
        assert_eq!(record["holds"], false);
        assert_eq!(
            verdict.unwrap_err(),
            "refused by its guard: ready_fraction >= 0.5 does not hold (ready_fraction is 0.25)"
        );
        assert!(
            check("g", &c, &facts(0.9, 1.0)).1.is_err(),
            "every condition must hold"
        );
        for bad in [
            "ready_fraction = 0.5",
            "healthy >= 1",
            "ready > lots",
            "ready >= NaN",
        ] {
            assert!(parse(bad, &known).is_err(), "{bad}");
        }
    }
}
