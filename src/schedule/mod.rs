//! The scheduler: fires cron rules in each rule's own zone. It sleeps until the earliest
//! next fire (at most a minute, then re-reads the wall clock), and resumes from the last
//! *scheduled* instant stored for each rule, so a restart never fires an instant twice and
//! a missed fire inside the rule's `catch_up` window still runs, once.

use crate::clock::SharedClock;
use crate::rules::shift::Shift;
use crate::rules::{self, Decision, Rule};
use crate::store::{NewRun, Store};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// One PATCH a schedule would send.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlannedFire {
    pub at: DateTime<Utc>,
    pub local: DateTime<chrono::FixedOffset>,
    pub rule: String,
    pub agents: Vec<i64>,
    pub set: serde_json::Value,
}

/// Pure: every fire of every scheduled rule in `[from, until)`, in time order (ties in
/// config order). Reads nothing but the rules.
pub fn plan(
    rules: &[Rule],
    shifts: &[Shift],
    from: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Vec<PlannedFire> {
    let mut out = Vec::new();
    for (index, shift) in shifts.iter().enumerate() {
        let mut t = from;
        while t < until {
            let seg = shift.segment_at(t);
            if let Some(set) = seg.set.as_ref().filter(|_| seg.start >= from) {
                out.push((
                    seg.start,
                    rules.len() + index,
                    PlannedFire {
                        at: seg.start,
                        local: seg.start.with_timezone(&shift.zone).fixed_offset(),
                        rule: format!("shift:{}", shift.name),
                        agents: shift.agents.clone(),
                        set: set.to_json(),
                    },
                ));
            }
            t = seg.end;
        }
    }
    for (index, rule) in rules.iter().enumerate() {
        let Some(schedule) = rule.schedule() else {
            continue;
        };
        let agents = rule.target_agents(None).unwrap_or_default();
        let set = rule.set.to_json();
        let mut t = from - chrono::Duration::seconds(1);
        while let Some(at) = schedule.next_after(t) {
            if at >= until {
                break;
            }
            if at < from {
                t = at;
                continue;
            }
            out.push((
                at,
                index,
                PlannedFire {
                    at,
                    local: at.with_timezone(&schedule.zone).fixed_offset(),
                    rule: rule.name.clone(),
                    agents: agents.clone(),
                    set: set.clone(),
                },
            ));
            t = at;
        }
    }
    out.sort_by_key(|(at, index, _)| (*at, *index));
    out.into_iter().map(|(_, _, p)| p).collect()
}

pub struct Scheduler {
    pub live: Arc<crate::reload::LiveConfig>,
    pub store: Store,
    pub clock: SharedClock,
    pub queue_notify: Arc<Notify>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// What to do about the fires of one rule that are due now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    /// Fire at this scheduled instant; `missed` earlier instants were coalesced into it.
    Fire { at: DateTime<Utc>, missed: usize },
    /// The latest due instant is older than the catch-up window.
    TooLate { at: DateTime<Utc>, missed: usize },
}

/// Pure: given the first unfired instant `first` (≤ now), decide what to run.
pub fn due(rule: &Rule, first: DateTime<Utc>, now: DateTime<Utc>) -> Option<Due> {
    let schedule = rule.schedule()?;
    if first > now {
        return None;
    }
    let latest = schedule
        .latest_at_or_before(now)
        .unwrap_or(first)
        .max(first);
    let mut missed = 0;
    let mut t = first;
    while t < latest && missed < 100_000 {
        missed += 1;
        match schedule.next_after(t) {
            Some(n) => t = n,
            None => break,
        }
    }
    let late = (now - latest).to_std().unwrap_or_default();
    Some(if late <= rule.catch_up.max(ON_TIME) {
        Due::Fire { at: latest, missed }
    } else {
        Due::TooLate { at: latest, missed }
    })
}

/// A fire this late is still on time (scheduler wake-up latency), even with `catch_up = "0s"`.
pub const ON_TIME: std::time::Duration = std::time::Duration::from_secs(10);

impl Scheduler {
    /// Each scheduled rule's first unfired instant: after its last recorded fire, or
    /// after `now` for a rule that never fired. Called before the daemon answers anything.
    pub async fn first_fires(
        &self,
    ) -> Result<HashMap<String, DateTime<Utc>>, crate::store::StoreError> {
        let now = self.clock.now();
        let mut next = HashMap::new();
        for rule in &self.live.current().rules {
            let Some(schedule) = rule.schedule() else {
                continue;
            };
            let first = match self.store.last_fire(&rule.name).await? {
                Some(last) => schedule.next_after(last),
                None => {
                    // A new rule starts from now; the mark lets a later restart catch up
                    // a fire missed before the rule ever fired.
                    self.store.mark_fired_until(&rule.name, now).await?;
                    schedule.next_after(now)
                }
            };
            if let Some(first) = first {
                info!(rule = %rule.name, next = %first.with_timezone(&schedule.zone), "rule scheduled");
                next.insert(rule.name.clone(), first);
            }
        }
        Ok(next)
    }

    /// A shift's current segment: what should hold now, sent once per segment and only
    /// for the fields not already in place. Returns when the segment ends.
    async fn apply_shift(
        &self,
        shift: &Shift,
        now: DateTime<Utc>,
        changed_at: Option<DateTime<Utc>>,
    ) -> Result<DateTime<Utc>, crate::store::StoreError> {
        let seg = shift.segment_at(now);
        let Some(set) = &seg.set else {
            return Ok(seg.end);
        };
        let known = self.store.agent_states(&shift.agents).await?;
        let mut jobs = Vec::new();
        let mut in_place = Vec::new();
        for agent in &shift.agents {
            let todo = match known.get(agent) {
                Some(state) => set.not_yet_in(state),
                None => set.clone(),
            };
            if todo.is_empty() {
                in_place.push(agent.to_string());
                continue;
            }
            jobs.push(crate::store::NewJob {
                agent_id: *agent,
                fields: todo.to_json(),
                guard: None,
                cause_at: seg.start,
                valid_until: Some(seg.end),
            });
        }
        let mut detail = format!(
            "{} (until {})",
            seg.label,
            seg.end.with_timezone(&shift.zone)
        );
        if !in_place.is_empty() {
            detail.push_str(&format!(
                "; already in place for agent(s) {}",
                in_place.join(",")
            ));
        }
        if changed_at.is_some() {
            detail.push_str("; the shift changed in a config reload");
        }
        let run = NewRun {
            rule: format!("shift:{}", shift.name),
            trigger: "shift",
            scheduled_for: Some(changed_at.unwrap_or(seg.start).max(seg.start)),
            happened_at: seg.start,
            detail: Some(detail),
            skipped: in_place.len(),
            jobs,
        };
        if let Some(run_id) = self.store.record_fire(&run, now).await? {
            info!(shift = %shift.name, run_id, segment = %seg.label, jobs = run.jobs.len(), "shift applied");
            self.metrics.inc(
                "autopilot_rule_fires_total",
                &[("rule", &run.rule), ("trigger", "shift")],
            );
            if run.skipped > 0 {
                self.metrics.add(
                    "autopilot_rule_skips_total",
                    &[("rule", &run.rule), ("reason", "in_place")],
                    run.skipped as f64,
                );
            }
            if !run.jobs.is_empty() {
                self.queue_notify.notify_waiters();
            }
        }
        Ok(seg.end)
    }

    pub async fn run(self, mut next: HashMap<String, DateTime<Utc>>, cancel: CancellationToken) {
        // Shifts are level-triggered: apply what should hold now (after any downtime),
        // then again at every boundary.
        let mut shift_next: HashMap<String, DateTime<Utc>> = HashMap::new();
        // Shifts a reload changed: applied again now, keyed by the reload instant, so
        // the new definition is sent even inside a stretch that was already applied.
        let mut shift_changed: HashMap<String, DateTime<Utc>> = HashMap::new();
        let mut reloads = self.live.subscribe();
        let mut config = self.live.current();
        loop {
            let now = self.clock.now();
            self.metrics.set(
                "autopilot_scheduler_last_tick_timestamp_seconds",
                &[],
                now.timestamp() as f64,
            );
            for rule in &config.rules {
                let Some(first) = next.get(&rule.name).copied() else {
                    continue;
                };
                let Some(due) = due(rule, first, now) else {
                    continue;
                };
                let at = match &due {
                    Due::Fire { at, .. } | Due::TooLate { at, .. } => *at,
                };
                match self.fire(rule, &due, now, &config.rules).await {
                    Ok(()) => {
                        if let Some(n) = rule.schedule().and_then(|s| s.next_after(at)) {
                            next.insert(rule.name.clone(), n);
                        } else {
                            next.remove(&rule.name);
                        }
                    }
                    Err(e) => {
                        error!(rule = %rule.name, error = %e, "could not record a fire; will retry")
                    }
                }
            }
            for shift in &config.shifts {
                let changed_at = shift_changed.get(&shift.name).copied();
                if changed_at.is_none() && shift_next.get(&shift.name).is_some_and(|t| *t > now) {
                    continue;
                }
                match self.apply_shift(shift, now, changed_at).await {
                    Ok(end) => {
                        shift_next.insert(shift.name.clone(), end);
                        shift_changed.remove(&shift.name);
                    }
                    Err(e) => {
                        error!(shift = %shift.name, error = %e, "could not apply a shift; will retry")
                    }
                }
            }
            let wake = next
                .values()
                .chain(shift_next.values())
                .min()
                .copied()
                .unwrap_or(now + chrono::Duration::minutes(1));
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.clock.sleep_until(wake) => {}
                Ok(()) = reloads.changed() => {
                    let old = config;
                    config = reloads.borrow_and_update().clone();
                    let changes = crate::reload::compare(&old, &config);
                    // A rule whose schedule changed starts over from the reload, like a
                    // new rule: instants of the new schedule before it are not "missed",
                    // so an edit never fires at once.
                    let now = self.clock.now();
                    for name in &changes.schedules_changed {
                        if let Err(e) = self.store.mark_fired_until(name, now).await {
                            error!(rule = %name, error = %e, "could not restart a changed schedule from now");
                        }
                    }
                    // Each rule resumes from its stored last fire, exactly as at a
                    // restart: an unchanged rule keeps its next instant and an instant
                    // already fired (unique per rule and instant) never fires again.
                    match self.first_fires().await {
                        Ok(n) => next = n,
                        Err(e) => error!(error = %e, "could not read the rules' last fires after a reload; keeping the old plan"),
                    }
                    shift_next.retain(|name, _| config.shifts.iter().any(|s| &s.name == name));
                    for name in changes.shifts_changed {
                        shift_changed.insert(name, now);
                    }
                }
            }
        }
        info!("scheduler stopped");
    }

    async fn fire(
        &self,
        rule: &Rule,
        due: &Due,
        now: DateTime<Utc>,
        all_rules: &[Rule],
    ) -> Result<(), crate::store::StoreError> {
        let (at, missed, late) = match due {
            Due::Fire { at, missed } => (*at, *missed, false),
            Due::TooLate { at, missed } => (*at, *missed, true),
        };
        let mut run = if late {
            NewRun::from_outcomes(rule, Vec::new(), at, Some(at), all_rules)
        } else {
            let agents = rule.target_agents(None).unwrap_or_default();
            let known = self.store.agent_states(&agents).await?;
            match rules::evaluate_fire(rule, &known) {
                Decision::Matched(outcomes) => {
                    NewRun::from_outcomes(rule, outcomes, at, Some(at), all_rules)
                }
                Decision::NotMatched => return Ok(()),
            }
        };
        let mut notes = Vec::new();
        if late {
            notes.push(format!(
                "missed: due at {at}, now {now}, outside the catch-up window of {}",
                humantime::format_duration(rule.catch_up)
            ));
        } else if now - at > chrono::Duration::seconds(60) {
            notes.push(format!("catch-up: due at {at}, fired at {now}"));
        }
        if missed > 0 {
            notes.push(format!(
                "{missed} earlier missed fire(s) coalesced into this one"
            ));
        }
        if let Some(d) = run.detail.take() {
            notes.push(d);
        }
        run.detail = (!notes.is_empty()).then(|| notes.join("; "));
        match self.store.record_fire(&run, now).await? {
            Some(run_id) => {
                let m = &self.metrics;
                let name = rule.name.as_str();
                if late {
                    m.inc(
                        "autopilot_rule_skips_total",
                        &[("rule", name), ("reason", "missed")],
                    );
                } else {
                    m.inc(
                        "autopilot_rule_fires_total",
                        &[("rule", name), ("trigger", "schedule")],
                    );
                    if now - at > chrono::Duration::seconds(60) {
                        m.inc("autopilot_rule_catchups_total", &[("rule", name)]);
                    }
                    if run.skipped > 0 {
                        m.add(
                            "autopilot_rule_skips_total",
                            &[("rule", name), ("reason", "condition")],
                            run.skipped as f64,
                        );
                    }
                }
                if late {
                    warn!(rule = %rule.name, run_id, scheduled_for = %at, "scheduled fire missed and skipped");
                } else {
                    info!(rule = %rule.name, run_id, scheduled_for = %at, jobs = run.jobs.len(), "rule fired");
                }
                if !run.jobs.is_empty() {
                    self.queue_notify.notify_waiters();
                }
            }
            None => {
                info!(rule = %rule.name, scheduled_for = %at, "already fired for this instant; not again")
            }
        }
        Ok(())
    }
}
