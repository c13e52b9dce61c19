//! Shifts: level-triggered schedules. At any instant a shift says which fields should
//! hold for its agents: a dated override for today, else the weekly window containing
//! now, else `otherwise`. Pure functions of (shift, instant).

use super::PatchSet;
use chrono::{
    DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc,
};
use chrono_tz::Tz;
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
pub struct Shift {
    pub name: String,
    pub agents: Vec<i64>,
    pub zone: Tz,
    pub windows: Vec<Window>,
    pub otherwise: Option<PatchSet>,
    pub overrides: BTreeMap<NaiveDate, PatchSet>,
}

/// A weekly window. `to <= from` crosses midnight into the next day; `days` are the days
/// it starts on (Monday = 0).
#[derive(Debug, Clone)]
pub struct Window {
    pub label: String,
    pub days: [bool; 7],
    pub from: NaiveTime,
    pub to: NaiveTime,
    pub set: PatchSet,
}

/// What should hold at an instant, and for how long.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// When this state began (a boundary), the key that makes it apply once.
    pub start: DateTime<Utc>,
    /// When the next state begins.
    pub end: DateTime<Utc>,
    pub label: String,
    pub set: Option<PatchSet>,
}

/// A wall time's instant under the fixed-time policy: the first of two in a fold, the
/// first valid instant after a gap.
pub fn wall_to_instant(zone: Tz, wall: NaiveDateTime) -> DateTime<Utc> {
    match zone.from_local_datetime(&wall) {
        LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => t.with_timezone(&Utc),
        LocalResult::None => {
            let mut w = wall;
            for _ in 0..(24 * 60) {
                w += Duration::minutes(1);
                if let LocalResult::Single(t) | LocalResult::Ambiguous(t, _) =
                    zone.from_local_datetime(&w)
                {
                    return t.with_timezone(&Utc);
                }
            }
            wall.and_utc()
        }
    }
}

impl Window {
    fn span_on(&self, day: NaiveDate, zone: Tz) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        if !self.days[day.weekday().num_days_from_monday() as usize] {
            return None;
        }
        let end_day = if self.to <= self.from {
            day.succ_opt()?
        } else {
            day
        };
        Some((
            wall_to_instant(zone, day.and_time(self.from)),
            wall_to_instant(zone, end_day.and_time(self.to)),
        ))
    }
}

impl Shift {
    fn midnight(&self, day: NaiveDate) -> DateTime<Utc> {
        wall_to_instant(self.zone, day.and_time(NaiveTime::MIN))
    }

    /// Every instant where what should hold may change, within a few days of `t`.
    fn boundaries_near(&self, t: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        let today = t.with_timezone(&self.zone).date_naive();
        let mut out = Vec::new();
        for offset in -8..=8 {
            let Some(day) = today.checked_add_signed(Duration::days(offset)) else {
                continue;
            };
            for w in &self.windows {
                if let Some((a, b)) = w.span_on(day, self.zone) {
                    out.push(a);
                    out.push(b);
                }
            }
        }
        // Overrides can be months apart: take the nearest on each side too.
        let near = self
            .overrides
            .range(..=today)
            .next_back()
            .into_iter()
            .chain(self.overrides.range(today..).take(2))
            .map(|(d, _)| *d)
            .chain(
                self.overrides
                    .range(today - Duration::days(8)..=today + Duration::days(8))
                    .map(|(d, _)| *d),
            )
            .collect::<Vec<_>>();
        for day in near {
            out.push(self.midnight(day));
            if let Some(next) = day.succ_opt() {
                out.push(self.midnight(next));
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// What should hold at `t`: an override of the local date, else the window that
    /// contains `t`, else `otherwise` (or nothing).
    pub fn desired_at(&self, t: DateTime<Utc>) -> (String, Option<PatchSet>) {
        let day = t.with_timezone(&self.zone).date_naive();
        if let Some(set) = self.overrides.get(&day) {
            return (format!("override {day}"), Some(set.clone()));
        }
        for offset in [0, -1] {
            let Some(d) = day.checked_add_signed(Duration::days(offset)) else {
                continue;
            };
            for w in &self.windows {
                if let Some((a, b)) = w.span_on(d, self.zone) {
                    if a <= t && t < b {
                        return (w.label.clone(), Some(w.set.clone()));
                    }
                }
            }
        }
        ("otherwise".into(), self.otherwise.clone())
    }

    /// The segment containing `t`: its start and end boundaries and what holds in it.
    /// Boundaries where nothing changes are merged away.
    pub fn segment_at(&self, t: DateTime<Utc>) -> Segment {
        let (label, set) = self.desired_at(t);
        let bounds = self.boundaries_near(t);
        let same = |b: DateTime<Utc>| self.desired_at(b) == (label.clone(), set.clone());
        // With no boundary behind `t` (a shift of future overrides only) the stretch has
        // always been: a fixed start keeps it the same stretch across restarts.
        let mut start = DateTime::<Utc>::UNIX_EPOCH;
        for b in bounds.iter().rev().filter(|b| **b <= t) {
            // Walk back over boundaries that do not change the state.
            let before = *b - Duration::seconds(1);
            if self.desired_at(before) != (label.clone(), set.clone()) {
                start = *b;
                break;
            }
        }
        let end = bounds
            .iter()
            .copied()
            .filter(|b| *b > t && !same(*b))
            .min()
            .unwrap_or(t + Duration::days(366));
        Segment {
            start,
            end,
            label,
            set,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn shift() -> Shift {
        let set = |g: &str| PatchSet::from_json(&json!({ "greetings": g })).unwrap();
        let t = |s: &str| NaiveTime::parse_from_str(s, "%H:%M").unwrap();
        Shift {
            name: "desk".into(),
            agents: vec![101],
            zone: chrono_tz::America::New_York,
            windows: vec![
                Window {
                    label: "weekdays 08:00-18:00".into(),
                    days: [true, true, true, true, true, false, false],
                    from: t("08:00"),
                    to: t("18:00"),
                    set: set("day"),
                },
                Window {
                    label: "saturday 22:00-02:00".into(),
                    days: [false, false, false, false, false, true, false],
                    from: t("22:00"),
                    to: t("02:00"),
                    set: set("party"),
                },
            ],
            otherwise: Some(set("night")),
            overrides: [(
                NaiveDate::from_ymd_opt(2026, 12, 25).unwrap(),
                set("holiday"),
            )]
            .into_iter()
            .collect(),
        }
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn greeting(s: &Segment) -> String {
        s.set.as_ref().unwrap().to_json()["greetings"]
            .as_str()
            .unwrap()
            .to_string()
    }

    #[test]
    fn windows_otherwise_and_overrides() {
        let s = shift();
        // Tuesday 2026-12-01 10:57 EST: the day window, since 08:00.
        let seg = s.segment_at(at("2026-12-01T10:57:00-05:00"));
        assert_eq!(greeting(&seg), "day");
        assert_eq!(seg.start, at("2026-12-01T08:00:00-05:00"));
        assert_eq!(seg.end, at("2026-12-01T18:00:00-05:00"));
        // Monday 23:00 is night, from Monday 18:00 to Tuesday 08:00.
        let seg = s.segment_at(at("2026-11-30T23:00:00-05:00"));
        assert_eq!(greeting(&seg), "night");
        assert_eq!(
            (seg.start, seg.end),
            (
                at("2026-11-30T18:00:00-05:00"),
                at("2026-12-01T08:00:00-05:00")
            )
        );
        // A window across midnight: Saturday 22:00 to Sunday 02:00.
        let seg = s.segment_at(at("2026-12-06T01:00:00-05:00"));
        assert_eq!(greeting(&seg), "party");
        assert_eq!(
            (seg.start, seg.end),
            (
                at("2026-12-05T22:00:00-05:00"),
                at("2026-12-06T02:00:00-05:00")
            )
        );
        // Christmas (a Friday) holds all day, whatever the windows say.
        let seg = s.segment_at(at("2026-12-25T12:00:00-05:00"));
        assert_eq!(greeting(&seg), "holiday");
        assert_eq!(
            (seg.start, seg.end),
            (
                at("2026-12-25T00:00:00-05:00"),
                at("2026-12-26T00:00:00-05:00")
            )
        );
        // The weekend night runs from Friday 18:00 to Saturday 22:00.
        let seg = s.segment_at(at("2026-12-05T12:00:00-05:00"));
        assert_eq!(greeting(&seg), "night");
        assert_eq!(
            (seg.start, seg.end),
            (
                at("2026-12-04T18:00:00-05:00"),
                at("2026-12-05T22:00:00-05:00")
            )
        );
    }

    #[test]
    fn boundaries_follow_daylight_saving() {
        let s = shift();
        // Monday 2026-03-09, the first weekday after the spring change: 08:00 EDT.
        let seg = s.segment_at(at("2026-03-09T09:00:00-04:00"));
        assert_eq!(seg.start, at("2026-03-09T08:00:00-04:00"));
    }
}

#[cfg(test)]
mod override_only {
    use super::*;
    use serde_json::json;

    #[test]
    fn far_apart_overrides_keep_stable_segments() {
        let set = |g: &str| PatchSet::from_json(&json!({ "greetings": g })).unwrap();
        let s = Shift {
            name: "x".into(),
            agents: vec![1],
            zone: chrono_tz::America::New_York,
            windows: vec![],
            otherwise: Some(set("normal")),
            overrides: [(NaiveDate::from_ymd_opt(2026, 12, 25).unwrap(), set("xmas"))]
                .into_iter()
                .collect(),
        };
        let at = |x: &str| DateTime::parse_from_rfc3339(x).unwrap().with_timezone(&Utc);
        let a = s.segment_at(at("2026-12-01T12:00:00Z"));
        let b = s.segment_at(at("2026-12-10T12:00:00Z"));
        assert_eq!(a.start, b.start, "the same stretch, whenever it is asked");
        assert_eq!(
            a.end,
            at("2026-12-25T05:00:00Z"),
            "ends at the override's midnight"
        );
        let after = s.segment_at(at("2026-12-26T12:00:00Z"));
        assert_eq!(after.start, at("2026-12-26T05:00:00Z"));
    }
}
