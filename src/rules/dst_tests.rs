//! Daylight-saving policy, checked against expectations computed independently of the
//! code under test: walk every UTC minute through the zone and apply the README's policy.
//!
//! - An *interval* expression (minute or hour field starts with `*`) fires at every real
//!   instant whose wall time matches: twice for a wall time repeated in a fall-back fold,
//!   never for wall times that do not exist.
//! - Any other (*fixed-time*) expression fires once per matching wall time: in a fold at
//!   the first occurrence; in a spring-forward gap at the first valid instant after it.

use super::Schedule;
use chrono::{DateTime, Duration, NaiveDate, Offset, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use std::collections::BTreeSet;

struct Spec {
    expr: &'static str,
    minutes: &'static [u32],
    hours: Option<&'static [u32]>,
    interval: bool,
}

const SPECS: &[Spec] = &[
    Spec {
        expr: "30 2 * * *",
        minutes: &[30],
        hours: Some(&[2]),
        interval: false,
    },
    Spec {
        expr: "0 2 * * *",
        minutes: &[0],
        hours: Some(&[2]),
        interval: false,
    },
    Spec {
        expr: "0,30 1 * * *",
        minutes: &[0, 30],
        hours: Some(&[1]),
        interval: false,
    },
    Spec {
        expr: "15 1 * * *",
        minutes: &[15],
        hours: Some(&[1]),
        interval: false,
    },
    Spec {
        expr: "0 0 * * *",
        minutes: &[0],
        hours: Some(&[0]),
        interval: false,
    },
    Spec {
        expr: "30 23 * * *",
        minutes: &[30],
        hours: Some(&[23]),
        interval: false,
    },
    Spec {
        expr: "*/30 * * * *",
        minutes: &[0, 30],
        hours: None,
        interval: true,
    },
    Spec {
        expr: "*/15 2 * * *",
        minutes: &[0, 15, 30, 45],
        hours: Some(&[2]),
        interval: true,
    },
    Spec {
        expr: "0 * * * *",
        minutes: &[0],
        hours: None,
        interval: true,
    },
];

const ZONES: &[&str] = &[
    "America/New_York",
    "Europe/Berlin",
    "Europe/London",
    "Australia/Lord_Howe",
    "America/Santiago",
    "America/Havana",
    "Pacific/Chatham",
    "Asia/Kolkata",
];

fn matches(spec: &Spec, hour: u32, minute: u32) -> bool {
    spec.minutes.contains(&minute) && spec.hours.is_none_or(|h| h.contains(&hour))
}

/// The policy, applied by walking UTC minutes.
fn expected(zone: Tz, spec: &Spec, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    let mut out = Vec::new();
    let mut fired: BTreeSet<(NaiveDate, u32, u32)> = BTreeSet::new();
    let mut m = from;
    let mut prev_local = (m - Duration::minutes(1))
        .with_timezone(&zone)
        .naive_local();
    while m < to {
        let local = m.with_timezone(&zone).naive_local();
        let (h, min) = (local.hour(), local.minute());
        if spec.interval {
            if matches(spec, h, min) {
                out.push(m);
            }
        } else {
            let mut fire = false;
            if matches(spec, h, min) && fired.insert((local.date(), h, min)) {
                fire = true;
            }
            // Wall minutes skipped by a jump forward fire now, once.
            if local - prev_local > Duration::minutes(1) {
                let mut w = prev_local + Duration::minutes(1);
                while w < local {
                    if matches(spec, w.hour(), w.minute())
                        && fired.insert((w.date(), w.hour(), w.minute()))
                    {
                        fire = true;
                    }
                    w += Duration::minutes(1);
                }
            }
            if fire {
                out.push(m);
            }
        }
        prev_local = local;
        m += Duration::minutes(1);
    }
    out
}

fn actual(schedule: &Schedule, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    let mut out = Vec::new();
    let mut t = from - Duration::seconds(1);
    while let Some(n) = schedule.next_after(t) {
        if n >= to {
            break;
        }
        out.push(n);
        t = n;
    }
    out
}

/// Instants in 2026 where the zone's UTC offset changes (found by walking hours).
fn transitions(zone: Tz) -> Vec<DateTime<Utc>> {
    let mut out = Vec::new();
    let start = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let offset = |t: DateTime<Utc>| {
        zone.offset_from_utc_datetime(&t.naive_utc())
            .fix()
            .local_minus_utc()
    };
    let mut t = start;
    let mut last = offset(t);
    while t < Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap() {
        t += Duration::minutes(30);
        let o = offset(t);
        if o != last {
            out.push(t);
            last = o;
        }
    }
    out
}

#[test]
fn every_zone_every_transition_matches_the_policy() {
    let mut checked = 0;
    for name in ZONES {
        let zone: Tz = name.parse().unwrap();
        let mut windows = transitions(zone);
        if windows.is_empty() {
            // No DST (Kolkata): an ordinary day still has to be right.
            windows.push(Utc.with_ymd_and_hms(2026, 3, 8, 0, 0, 0).unwrap());
        }
        for at in windows {
            let (from, to) = (at - Duration::hours(36), at + Duration::hours(36));
            for spec in SPECS {
                let schedule = Schedule {
                    expr: spec.expr.into(),
                    cron: crate::config::parse_cron(spec.expr).unwrap(),
                    zone,
                };
                let want = expected(zone, spec, from, to);
                let got = actual(&schedule, from, to);
                assert_eq!(
                    got.iter()
                        .map(|t| t.with_timezone(&zone).to_rfc3339())
                        .collect::<Vec<_>>(),
                    want.iter()
                        .map(|t| t.with_timezone(&zone).to_rfc3339())
                        .collect::<Vec<_>>(),
                    "{name} {:?} around {at}",
                    spec.expr
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 100, "only {checked} windows checked");
}

#[test]
fn new_york_2026_examples_from_the_readme() {
    let zone: Tz = "America/New_York".parse().unwrap();
    let s = |expr: &str| Schedule {
        expr: expr.into(),
        cron: crate::config::parse_cron(expr).unwrap(),
        zone,
    };
    // 02:30 does not exist on 2026-03-08: it fires at 03:00 EDT.
    let n = s("30 2 * * *")
        .next_after("2026-03-08T05:00:00Z".parse().unwrap())
        .unwrap();
    assert_eq!(
        n.with_timezone(&zone).to_rfc3339(),
        "2026-03-08T03:00:00-04:00"
    );
    // 01:30 happens twice on 2026-11-01: a fixed time fires at the first.
    let n = s("30 1 * * *")
        .next_after("2026-11-01T04:00:00Z".parse().unwrap())
        .unwrap();
    assert_eq!(
        n.with_timezone(&zone).to_rfc3339(),
        "2026-11-01T01:30:00-04:00"
    );
    let after = s("30 1 * * *").next_after(n).unwrap();
    assert_eq!(
        after.with_timezone(&zone).to_rfc3339(),
        "2026-11-02T01:30:00-05:00"
    );
}
