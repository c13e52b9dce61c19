//! Scheduling at scale: `plan` for 10,000 rules over 7 days (as a ratio to croner's bare
//! next-occurrence loop over the same expressions, measured in the same run), and the
//! scheduler's idle CPU with 10,000 rules loaded (as a ratio to the same daemon with no
//! rules). Run with `cargo bench --bench schedule`.

use autopilot::app::App;
use autopilot::clock::SystemClock;
use autopilot::config::Config;
use std::fmt::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const RULES: usize = 10_000;
const ZONES: [&str; 8] = [
    "America/New_York",
    "Europe/Berlin",
    "Europe/London",
    "Australia/Lord_Howe",
    "America/Santiago",
    "America/Havana",
    "Pacific/Chatham",
    "Asia/Kolkata",
];

fn config(db: &Path, rules: usize, yearly: bool) -> String {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[database]\npath = {:?}\n[platform]\nbase_url = \"http://127.0.0.1:9/v3\"\ntoken = {{ value = \"t\" }}\n",
        db.display().to_string()
    );
    for i in 0..rules {
        let (m, h) = (i * 7 % 60, i * 13 % 24);
        let cron = if yearly {
            // Far from any instant the idle measurement covers.
            format!("{m} {h} {} 2 *", 1 + i % 28)
        } else {
            format!("{m} {h} * * mon-fri")
        };
        write!(
            text,
            "[[rules]]\nname = \"r{i}\"\nschedule = {{ cron = \"{cron}\", timezone = \"{}\" }}\nagents = [{}]\nset = {{ greetings = \"g{i}\" }}\n",
            ZONES[i % ZONES.len()],
            100 + i % 50
        )
        .unwrap();
    }
    text
}

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line (11 and 12 after ")").
    (ticks(11) + ticks(12)) / 100.0
}

async fn idle_cpu(rules: usize) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let text = config(&dir.path().join("idle.db"), rules, true);
    let config = Config::from_toml(&text, Path::new("bench.toml"), &[])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let cancel = CancellationToken::new();
    let app = App::start(config, Arc::new(SystemClock), cancel.clone()).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (c0, t0) = (cpu_seconds(), Instant::now());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let used = (cpu_seconds() - c0) / t0.elapsed().as_secs_f64();
    app.shutdown().await;
    Ok(used)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let text = config(&dir.path().join("plan.db"), RULES, false);
    let started = Instant::now();
    let config = Config::from_toml(&text, Path::new("bench.toml"), &[])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let load = started.elapsed();

    let from = chrono::Utc::now();
    let until = from + chrono::Duration::days(7);
    let started = Instant::now();
    let fires = autopilot::schedule::plan(&config.rules, &config.shifts, from, until);
    let plan = started.elapsed();

    // Baseline: croner's own next-occurrence loop over the same expressions and zones.
    let started = Instant::now();
    let mut bare = 0usize;
    for rule in &config.rules {
        let s = rule.schedule().expect("scheduled");
        let mut t = from.with_timezone(&s.zone);
        while let Ok(n) = s.cron.find_next_occurrence(&t, false) {
            if n.with_timezone(&chrono::Utc) >= until {
                break;
            }
            bare += 1;
            t = n;
        }
    }
    let baseline = started.elapsed();

    println!("schedule bench: {RULES} rules in 8 zones, 7 days");
    println!(
        "  config load and validation:  {:>8.0} ms",
        load.as_secs_f64() * 1000.0
    );
    println!(
        "  plan: {} fires in            {:>8.0} ms",
        fires.len(),
        plan.as_secs_f64() * 1000.0
    );
    println!(
        "  bare croner loop: {bare} fires in {:>8.0} ms",
        baseline.as_secs_f64() * 1000.0
    );
    println!(
        "  ratio plan / bare croner:    {:>8.2}",
        plan.as_secs_f64() / baseline.as_secs_f64()
    );

    let none = idle_cpu(0).await?;
    let loaded = idle_cpu(RULES).await?;
    println!(
        "  idle CPU, no rules:          {:>8.3} % of one core",
        none * 100.0
    );
    println!(
        "  idle CPU, {RULES} rules:      {:>8.3} % of one core",
        loaded * 100.0
    );
    println!(
        "  idle CPU added by the rules: {:>8.3} percentage points",
        (loaded - none) * 100.0
    );
    Ok(())
}
