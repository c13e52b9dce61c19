//! The rule model and its evaluation: pure functions of (rule, trigger, known agent state)
//! to planned patches. No IO in here.

mod matcher;
mod patch;
pub mod shift;

pub use matcher::{Condition, Matcher};
pub use patch::{file_name, listed_files, PatchField, PatchSet};

use chrono::{DateTime, Timelike, Utc};
use chrono_tz::Tz;
use croner::Cron;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;

pub type AgentId = i64;

#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub trigger: Trigger,
    pub target: Target,
    /// Conditions on the agent's last known state (all must hold).
    pub when: Vec<Condition>,
    pub set: PatchSet,
    /// How late a missed scheduled fire may still run after a restart.
    pub catch_up: Duration,
}

#[derive(Debug, Clone)]
pub enum Trigger {
    Schedule(Box<Schedule>),
    Webhook {
        source: String,
        conditions: Vec<Condition>,
    },
}

#[derive(Debug, Clone)]
pub struct Schedule {
    pub expr: String,
    pub cron: Cron,
    pub zone: Tz,
}

impl Schedule {
    /// Interval expressions (minute or hour field starting with `*`, or `@hourly`) fire
    /// at every real instant that matches; the others are fixed-time expressions.
    pub fn is_interval(&self) -> bool {
        let e = self.expr.trim();
        if e.starts_with('@') {
            return e.eq_ignore_ascii_case("@hourly");
        }
        let mut fields = e.split_whitespace();
        let minute = fields.next().unwrap_or("");
        let hour = fields.next().unwrap_or("");
        minute.starts_with('*') || hour.starts_with('*')
    }

    /// The first fire strictly after `after`, computed in the rule's zone for this very
    /// occurrence. Daylight saving (see README): an interval expression fires at every
    /// real instant that matches; a fixed-time expression fires once per matching wall
    /// time, at its first occurrence in a fold and at the first valid instant after a
    /// spring-forward gap.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.is_interval() {
            let from = after.with_timezone(&self.zone);
            return self
                .cron
                .find_next_occurrence(&from, false)
                .ok()
                .map(|t| t.with_timezone(&Utc));
        }
        // Wall times map to instants monotonically under the fixed-time policy (each to
        // its first instant, gap times to the gap's end), so the answer is the first
        // matching wall time from `after`'s own wall time on whose instant is after
        // `after`; no earlier wall time can land after it.
        let mut wall = after.with_timezone(&self.zone).naive_local() - chrono::Duration::minutes(1);
        for _ in 0..100_000 {
            wall = self.cron.find_next_occurrence(&wall, false).ok()?;
            if let Some(at) = self.fixed_instant(wall) {
                if at > after {
                    return Some(at);
                }
            }
        }
        None
    }

    /// Where a fixed-time expression's wall time lands: its only instant, the first of
    /// two in a fold, or the first valid instant after a gap.
    fn fixed_instant(&self, wall: chrono::NaiveDateTime) -> Option<DateTime<Utc>> {
        use chrono::{LocalResult, TimeZone};
        match self.zone.from_local_datetime(&wall) {
            LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
            LocalResult::Ambiguous(first, _) => Some(first.with_timezone(&Utc)),
            LocalResult::None => {
                // In a gap: the first wall minute that exists again starts at the very
                // instant the clocks jumped.
                let mut w = wall.with_second(0)?;
                for _ in 0..(24 * 60) {
                    w += chrono::Duration::minutes(1);
                    match self.zone.from_local_datetime(&w) {
                        LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => {
                            return Some(t.with_timezone(&Utc))
                        }
                        LocalResult::None => continue,
                    }
                }
                None
            }
        }
    }

    /// What about this expression could surprise its author, for `check` to point out.
    pub fn surprises(&self) -> Vec<String> {
        let f: Vec<&str> = self.expr.split_whitespace().collect();
        if f.len() != 5 {
            return Vec::new();
        }
        let mut out = Vec::new();
        let star = |s: &str| s == "*" || s == "?";
        if !f[0].contains('*') && star(f[1]) {
            out.push(format!(
                "fires every hour at minute {}; for once a day give the hour too, e.g. \"{} 18 * * *\"",
                f[0], f[0]
            ));
        }
        if f[0] == "*" && !star(f[1]) {
            out.push(format!("fires every minute of hour {}", f[1]));
        }
        if !star(f[2]) && !star(f[4]) {
            out.push(
                "restricts both day-of-month and day-of-week: standard cron fires when EITHER matches"
                    .into(),
            );
        }
        out
    }

    /// The latest fire at or before `at`.
    pub fn latest_at_or_before(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // Step back a day at a time and walk forward: the schedule's own rule decides.
        let mut from = at - chrono::Duration::days(1);
        for _ in 0..400 {
            let mut last = None;
            let mut t = from;
            while let Some(n) = self.next_after(t) {
                if n > at {
                    break;
                }
                last = Some(n);
                t = n;
            }
            if last.is_some() {
                return last;
            }
            from -= chrono::Duration::days(1);
        }
        None
    }
}

#[derive(Debug, Clone)]
pub enum Target {
    /// A fixed list of agents.
    Agents(Vec<AgentId>),
    /// The agent id is read from the delivery at this JSON pointer.
    FromEvent(String),
}

/// One patch a rule wants sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub agent_id: AgentId,
    pub set: PatchSet,
    /// The rule's `when` conditions, re-checked against the agent's state right before
    /// sending (its state may change while the job waits in line).
    pub guard: Vec<Condition>,
}

/// What a rule decided for one trigger.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The trigger does not concern this rule (a webhook rule whose match failed).
    NotMatched,
    /// The rule matched; one entry per target agent.
    Matched(Vec<AgentOutcome>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum AgentOutcome {
    Patch(Planned),
    Skip {
        agent_id: Option<AgentId>,
        reason: String,
    },
}

impl Rule {
    pub fn is_webhook_for(&self, source: &str) -> bool {
        matches!(&self.trigger, Trigger::Webhook { source: s, .. } if s == source)
    }

    pub fn schedule(&self) -> Option<&Schedule> {
        match &self.trigger {
            Trigger::Schedule(s) => Some(s),
            Trigger::Webhook { .. } => None,
        }
    }

    /// The agents this rule would touch for this payload (empty for a schedule rule's
    /// payload-less fire is not a case: schedule rules always list agents).
    pub fn target_agents(&self, payload: Option<&Value>) -> Result<Vec<AgentId>, String> {
        match &self.target {
            Target::Agents(ids) => Ok(ids.clone()),
            Target::FromEvent(ptr) => {
                let payload =
                    payload.ok_or_else(|| "no delivery to read the agent from".to_string())?;
                match payload.pointer(ptr) {
                    Some(v) => agent_id_from(v)
                        .map(|id| vec![id])
                        .ok_or_else(|| format!("agent at {ptr} is not an agent id: {}", short(v))),
                    None => Err(format!("the delivery has no agent at {ptr}")),
                }
            }
        }
    }
}

fn agent_id_from(v: &Value) -> Option<AgentId> {
    match v {
        Value::Number(n) => n.as_i64().filter(|id| *id > 0),
        Value::String(s) => s.trim().parse::<AgentId>().ok().filter(|id| *id > 0),
        _ => None,
    }
}

/// A value as shown in an audit line: at most 60 bytes of its JSON.
pub fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() <= 60 {
        return s;
    }
    let mut end = 60;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Checks the `when` conditions against a known agent state. `Err` names the first one
/// that failed, for the audit trail.
pub fn guard_holds(guard: &[Condition], state: &Value) -> Result<(), String> {
    for c in guard {
        if !c.matcher.matches(state.pointer(&c.path)) {
            return Err(format!(
                "when {} {}: agent has {}",
                c.path,
                c.matcher,
                state
                    .pointer(&c.path)
                    .map(short)
                    .unwrap_or_else(|| "nothing".into())
            ));
        }
    }
    Ok(())
}

fn plan_for(
    rule: &Rule,
    agents: Vec<AgentId>,
    known: &HashMap<AgentId, Value>,
) -> Vec<AgentOutcome> {
    agents
        .into_iter()
        .map(|agent_id| {
            if let Some(state) = known.get(&agent_id) {
                if let Err(reason) = guard_holds(&rule.when, state) {
                    return AgentOutcome::Skip {
                        agent_id: Some(agent_id),
                        reason,
                    };
                }
            }
            AgentOutcome::Patch(Planned {
                agent_id,
                set: rule.set.clone(),
                guard: rule.when.clone(),
            })
        })
        .collect()
}

/// Evaluates a webhook rule against a verified, parsed delivery.
pub fn evaluate_delivery(
    rule: &Rule,
    source: &str,
    payload: &Value,
    known: &HashMap<AgentId, Value>,
) -> Decision {
    let Trigger::Webhook {
        source: rule_source,
        conditions,
    } = &rule.trigger
    else {
        return Decision::NotMatched;
    };
    if rule_source != source
        || !conditions
            .iter()
            .all(|c| c.matcher.matches(payload.pointer(&c.path)))
    {
        return Decision::NotMatched;
    }
    match rule.target_agents(Some(payload)) {
        Ok(agents) => Decision::Matched(plan_for(rule, agents, known)),
        Err(reason) => Decision::Matched(vec![AgentOutcome::Skip {
            agent_id: None,
            reason,
        }]),
    }
}

/// Evaluates a scheduled rule at one of its fire instants.
pub fn evaluate_fire(rule: &Rule, known: &HashMap<AgentId, Value>) -> Decision {
    match rule.target_agents(None) {
        Ok(agents) => Decision::Matched(plan_for(rule, agents, known)),
        Err(reason) => Decision::Matched(vec![AgentOutcome::Skip {
            agent_id: None,
            reason,
        }]),
    }
}

/// A scheduled change must not land after the next scheduled change of the same fields
/// for the same agent is due: that instant is its `valid_until`.
pub fn valid_until(
    rules: &[Rule],
    rule: &Rule,
    agent_id: AgentId,
    fired_at: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    rules
        .iter()
        .filter(|other| match (&other.target, other.schedule()) {
            (Target::Agents(ids), Some(_)) => {
                ids.contains(&agent_id) && other.set.overlaps(&rule.set)
            }
            _ => false,
        })
        .filter_map(|other| other.schedule()?.next_after(fired_at))
        .min()
}

#[cfg(test)]
mod dst_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(trigger: Trigger, target: Target, when: Vec<Condition>) -> Rule {
        Rule {
            name: "r".into(),
            trigger,
            target,
            when,
            set: PatchSet::from_json(&json!({"status": "inactive"})).unwrap(),
            catch_up: Duration::from_secs(900),
        }
    }

    fn cond(path: &str, spec: Value) -> Condition {
        Condition {
            path: path.into(),
            matcher: Matcher::from_json(&spec).unwrap(),
        }
    }

    #[test]
    fn webhook_rule_matches_and_reads_agent_from_event() {
        let r = rule(
            Trigger::Webhook {
                source: "convirza".into(),
                conditions: vec![
                    cond("/event", json!("post_call")),
                    cond("/disposition", json!({"in": ["ABANDONED", "NO ANSWER"]})),
                ],
            },
            Target::FromEvent("/ai_voice_agent_id".into()),
            vec![cond("/status", json!("active"))],
        );
        let payload =
            json!({"event": "post_call", "disposition": "ABANDONED", "ai_voice_agent_id": "101"});
        let mut known = HashMap::new();
        let d = evaluate_delivery(&r, "convirza", &payload, &known);
        let Decision::Matched(out) = d else {
            panic!("expected a match")
        };
        assert!(matches!(&out[..], [AgentOutcome::Patch(p)] if p.agent_id == 101));

        known.insert(101, json!({"status": "inactive"}));
        let Decision::Matched(out) = evaluate_delivery(&r, "convirza", &payload, &known) else {
            panic!("expected a match")
        };
        assert!(matches!(
            &out[..],
            [AgentOutcome::Skip {
                agent_id: Some(101),
                ..
            }]
        ));

        let answered =
            json!({"event": "post_call", "disposition": "ANSWERED", "ai_voice_agent_id": 101});
        assert_eq!(
            evaluate_delivery(&r, "convirza", &answered, &known),
            Decision::NotMatched
        );
        assert_eq!(
            evaluate_delivery(&r, "other", &payload, &known),
            Decision::NotMatched
        );
    }

    #[test]
    fn missing_agent_is_a_recorded_skip() {
        let r = rule(
            Trigger::Webhook {
                source: "s".into(),
                conditions: vec![],
            },
            Target::FromEvent("/ai_voice_agent_id".into()),
            vec![],
        );
        let Decision::Matched(out) = evaluate_delivery(&r, "s", &json!({"x": 1}), &HashMap::new())
        else {
            panic!("expected a match")
        };
        assert!(
            matches!(&out[..], [AgentOutcome::Skip { agent_id: None, reason }] if reason.contains("/ai_voice_agent_id"))
        );
    }

    #[test]
    fn valid_until_is_next_change_of_same_fields() {
        let night = Rule {
            name: "night".into(),
            trigger: Trigger::Schedule(Box::new(Schedule {
                expr: "0 18 * * *".into(),
                cron: "0 18 * * *".parse().unwrap(),
                zone: chrono_tz::America::New_York,
            })),
            target: Target::Agents(vec![101]),
            when: vec![],
            set: PatchSet::from_json(&json!({"greetings": "night"})).unwrap(),
            catch_up: Duration::from_secs(900),
        };
        let mut day = night.clone();
        day.name = "day".into();
        day.trigger = Trigger::Schedule(Box::new(Schedule {
            expr: "0 8 * * *".into(),
            cron: "0 8 * * *".parse().unwrap(),
            zone: chrono_tz::America::New_York,
        }));
        day.set = PatchSet::from_json(&json!({"greetings": "day"})).unwrap();
        let rules = vec![night.clone(), day];
        // 18:00 EST on 2026-12-01 is 23:00 UTC; the next 08:00 EST is 13:00 UTC next day.
        let fired: DateTime<Utc> = "2026-12-01T23:00:00Z".parse().unwrap();
        let until = valid_until(&rules, &night, 101, fired).unwrap();
        assert_eq!(
            until,
            "2026-12-02T13:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        assert_eq!(valid_until(&rules, &night, 999, fired), None);
    }
}
