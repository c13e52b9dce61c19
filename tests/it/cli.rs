//! The real binary: `check` on good and bad configs.

use std::process::Command;

fn autopilot() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_autopilot"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

#[test]
fn check_passes_on_the_shipped_configs_and_prints_next_fires() {
    let out = autopilot()
        .args(["check", "--config", "config/autopilot.toml"])
        .env("CONVIRZA_TOKEN", "t")
        .env("CONVIRZA_WEBHOOK_SECRET", "s")
        .env("GATEWAY_SECRET", "g")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("rule \"night greeting\""), "{stdout}");
    assert_eq!(
        stdout.matches("    next ").count(),
        6,
        "3 fires for each of 2 scheduled rules:\n{stdout}"
    );
    assert!(
        stdout.contains("18:00 EST") || stdout.contains("18:00 EDT"),
        "{stdout}"
    );

    let out = autopilot()
        .args(["check", "--config", "config/demo.toml"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_fails_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[platform]\nbase_url = \"http://x/v3\"\ntoken = { value = \"x\" }\n[[rules]]\nname = \"r\"\nschedule = { cron = \"0 18 * * *\", timezone = \"Mars/Base\" }\nagents = [1]\nset = { greeting = \"hi\" }\n",
    )
    .unwrap();
    let out = autopilot()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let p = path.display();
    assert!(
        stderr.contains(&format!("{p}:6:46: unknown time zone \"Mars/Base\"")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{p}:8:9: unknown PATCH field `greeting`; did you mean `greetings`?"
        )),
        "{stderr}"
    );
}

#[test]
fn check_on_shipped_config_without_secrets_names_each_missing_variable() {
    let out = autopilot()
        .args(["check", "--config", "config/autopilot.toml"])
        .env_remove("CONVIRZA_TOKEN")
        .env_remove("CONVIRZA_WEBHOOK_SECRET")
        .env_remove("GATEWAY_SECRET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for var in [
        "CONVIRZA_TOKEN",
        "CONVIRZA_WEBHOOK_SECRET",
        "GATEWAY_SECRET",
    ] {
        assert!(
            stderr.contains(&format!("environment variable {var} is not set")),
            "{stderr}"
        );
    }
}
