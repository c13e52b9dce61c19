use super::*;

fn env() -> Vec<(String, String)> {
    vec![
        ("CONVIRZA_TOKEN".into(), "t".into()),
        ("CONVIRZA_WEBHOOK_SECRET".into(), "s".into()),
        ("GATEWAY_SECRET".into(), "g".into()),
    ]
}

fn load(text: &str) -> Result<Config, ConfigErrors> {
    Config::from_toml(text, Path::new("test.toml"), &env())
}

fn errors(text: &str) -> String {
    load(text)
        .expect_err("config should be rejected")
        .to_string()
}

const HEAD: &str = r#"[platform]
base_url = "http://127.0.0.1:1/v3"
token = { value = "x" }
"#;

#[test]
fn shipped_configs_are_valid() {
    let c = Config::load(Path::new("config/autopilot.toml"), &env()).unwrap();
    assert_eq!(c.rules.len(), 5);
    assert_eq!(c.sources.len(), 2);
    Config::from_toml(crate::cli::DEMO_CONFIG, Path::new("config/demo.toml"), &[]).unwrap();
    let mut prod_env = env();
    prod_env.push(("CRM_WEBHOOK_SECRET".into(), "whsec_c2VjcmV0LWtleQ==".into()));
    prod_env.push(("ADMIN_API_TOKEN".into(), "0123456789abcdef0123".into()));
    let prod = Config::load(Path::new("config/production.toml"), &prod_env)
        .unwrap_or_else(|e| panic!("config/production.toml:\n{e}"));
    assert!(prod.admin.token.is_some());
    // Every secret comes from the environment: without it, each one is named.
    let e = Config::load(Path::new("config/production.toml"), &[])
        .unwrap_err()
        .to_string();
    for var in [
        "CONVIRZA_TOKEN",
        "CONVIRZA_WEBHOOK_SECRET",
        "GATEWAY_SECRET",
        "CRM_WEBHOOK_SECRET",
        "ADMIN_API_TOKEN",
    ] {
        assert!(e.contains(var), "{var} not named in:\n{e}");
    }
    // Offline tools (plan, healthcheck) need none of them.
    Config::load_offline(Path::new("config/production.toml"), &[]).unwrap();
}

#[test]
fn unknown_key_names_line_and_column() {
    let e = errors(&format!("{HEAD}[queue]\nworkers = 2\nretries = 3\n"));
    assert!(
        e.starts_with("test.toml:6:1: unknown field `retries`"),
        "{e}"
    );
}

#[test]
fn greeting_suggests_greetings_at_the_key() {
    let text = format!(
        "{HEAD}[[rules]]\nname = \"r\"\nschedule = {{ cron = \"0 18 * * *\", timezone = \"America/New_York\" }}\nagents = [1]\nset = {{ greeting = \"hi\" }}\n"
    );
    let e = errors(&text);
    assert!(
        e.contains("test.toml:8:9: unknown PATCH field `greeting`; did you mean `greetings`?"),
        "{e}"
    );
}

#[test]
fn bad_cron_and_zone_are_located() {
    let text = format!(
        "{HEAD}[[rules]]\nname = \"r\"\nschedule = {{ cron = \"0 25 * * *\", timezone = \"America/New_Yrok\" }}\nagents = [1]\nset = {{ status = \"active\" }}\n"
    );
    let e = errors(&text);
    assert!(
        e.contains("test.toml:6:21: bad cron expression \"0 25 * * *\""),
        "{e}"
    );
    assert!(
        e.contains("test.toml:6:46: unknown time zone \"America/New_Yrok\""),
        "{e}"
    );
}

#[test]
fn six_field_cron_is_rejected() {
    let text = format!(
        "{HEAD}[[rules]]\nname = \"r\"\nschedule = {{ cron = \"0 0 18 * * *\", timezone = \"UTC\" }}\nagents = [1]\nset = {{ status = \"active\" }}\n"
    );
    assert!(errors(&text).contains("has 6 fields; a seconds field is not supported"));
}

#[test]
fn missing_secret_names_the_variable_and_place() {
    let text = "[platform]\nbase_url = \"http://x/v3\"\ntoken = { env = \"NOPE_TOKEN\" }\n";
    let e = errors(text);
    assert!(
        e.contains("test.toml:3:9: platform token: environment variable NOPE_TOKEN is not set"),
        "{e}"
    );
}

#[test]
fn webhook_rule_needs_a_known_source() {
    let text = format!(
        "{HEAD}[[rules]]\nname = \"r\"\nwebhook = {{ source = \"nope\" }}\nagent = \"/a\"\nset = {{ status = \"active\" }}\n"
    );
    assert!(errors(&text).contains("test.toml:6:22: webhook source \"nope\" is not defined"));
}

#[test]
fn lease_must_exceed_timeout() {
    let e = errors(&format!(
        "{HEAD}timeout = \"30s\"\n[queue]\nlease = \"20s\"\n"
    ));
    assert!(
        e.contains("lease 20s must be at least the platform timeout"),
        "{e}"
    );
}

#[test]
fn environment_overrides_any_key() {
    let mut env = env();
    env.push(("AUTOPILOT_SERVER__LISTEN".into(), "0.0.0.0:9999".into()));
    env.push(("AUTOPILOT_QUEUE__WORKERS".into(), "7".into()));
    env.push(("AUTOPILOT_RULES__0__CATCH_UP".into(), "1h".into()));
    env.push((
        "AUTOPILOT_SOURCES__0__AUTH__SECRET".into(),
        "{ env = \"GATEWAY_SECRET\" }".into(),
    ));
    let c = Config::load(Path::new("config/autopilot.toml"), &env).unwrap();
    assert_eq!(c.server.listen.port(), 9999);
    assert_eq!(c.queue.workers, 7);
    assert_eq!(c.rules[0].catch_up, Duration::from_secs(3600));

    env.push(("AUTOPILOT_QUEUE__WORKRS".into(), "7".into()));
    let e = Config::load(Path::new("config/autopilot.toml"), &env)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unknown field `workrs`") && e.contains("AUTOPILOT_QUEUE__WORKRS"),
        "{e}"
    );
}

#[test]
fn several_errors_are_reported_together() {
    let text = format!(
        "{HEAD}[[rules]]\nname = \"a\"\nschedule = {{ cron = \"bad\", timezone = \"UTC\" }}\nagents = [1]\nset = {{ greeting = \"x\" }}\n"
    );
    let e = load(&text).unwrap_err();
    assert_eq!(e.messages().len(), 2, "{e}");
}

#[test]
fn a_secret_in_the_wrong_shape_is_not_echoed() {
    let e = errors("[platform]\nbase_url = \"http://x/v3\"\ntoken = \"Sup3rS3cretTok\"\n");
    assert!(
        e.contains("test.toml:3:9:") && e.contains("must be a table"),
        "{e}"
    );
    assert!(!e.contains("Sup3rS3cretTok"), "the secret leaked into: {e}");
    let e = errors(&format!(
        "{HEAD}[[sources]]\nname = \"s\"\nauth = {{ kind = \"static\", field = \"/t\", secret = \"MyHookS3cret\" }}\n"
    ));
    assert!(!e.contains("MyHookS3cret"), "the secret leaked into: {e}");
}

#[test]
fn absurd_numbers_are_refused_not_panicked_on() {
    for (extra, want) in [
        (
            "timeout = \"18446744073709551615s\"\n",
            "longer than the limit",
        ),
        ("timeout = \"500000000years\"\n", "longer than the limit"),
        ("timeout = \"1h\"\n", "at most 10m"),
        ("requests_per_second = 1e-300\n", "between 0.01 and 100000"),
        (
            "max_in_flight = 9223372036854775807\n",
            "between 1 and 100000",
        ),
    ] {
        let e = errors(&format!("{HEAD}{extra}"));
        assert!(e.contains(want), "{extra}: {e}");
    }
    let e = errors(&format!(
        "{HEAD}[queue]\nlease = \"500000000years\"\nmax_age = \"9999years\"\n"
    ));
    assert!(e.matches("longer than the limit").count() == 2, "{e}");
}

#[test]
fn syntax_error_is_located_even_with_overrides() {
    // Found by tests/fuzz.rs: the override editor's own parse error had no file:line:col.
    let env = vec![("AUTOPILOT_QUEUE__WORKERS".into(), "3".into())];
    let e = Config::from_toml(
        &format!("{HEAD}[queue]\n[queue]\n"),
        Path::new("test.toml"),
        &env,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(e, "test.toml:5:2: duplicate key");
}

#[test]
fn override_errors_keep_file_positions_or_name_the_override() {
    let text = format!(
        "{HEAD}[[rules]]\nname = \"r\"\nschedule = {{ cron = \"0 18 * * *\", timezone = \"UTC\" }}\nagents = [1]\nset = {{ greeting = \"hi\" }}\n"
    );
    let mut env = env();
    env.push(("AUTOPILOT_QUEUE__LEASE".into(), "60s".into()));
    let e = Config::from_toml(&text, Path::new("test.toml"), &env)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("test.toml:8:9: unknown PATCH field `greeting`"),
        "{e}"
    );

    let env = vec![("AUTOPILOT_QUEUE__WORKERS".into(), "0".into())];
    let e = Config::from_toml(HEAD, Path::new("test.toml"), &env)
        .unwrap_err()
        .to_string();
    assert!(e.contains("workers must be between 1 and 256 (after the environment overrides AUTOPILOT_QUEUE__WORKERS)"), "{e}");

    let env = vec![("AUTOPILOT_".into(), "x".into())];
    let e = Config::from_toml(HEAD, Path::new("test.toml"), &env)
        .unwrap_err()
        .to_string();
    assert!(e.contains("AUTOPILOT_ names no key"), "{e}");
}

#[test]
fn never_firing_cron_and_nan_are_errors() {
    let text = format!(
        "{HEAD}[[rules]]\nname = \"r\"\nschedule = {{ cron = \"0 8 31 2 *\", timezone = \"UTC\" }}\nagents = [1]\nset = {{ config = {{ volume = nan }} }}\n"
    );
    let e = errors(&text);
    assert!(e.contains("never fires"), "{e}");
    assert!(e.contains("NaN and infinity cannot be sent"), "{e}");
}

#[test]
fn a_missing_source_secret_does_not_also_undefine_the_source() {
    let text = format!(
        "{HEAD}[[sources]]\nname = \"s\"\nauth = {{ kind = \"static\", field = \"/t\", secret = {{ env = \"NOT_SET_ANYWHERE\" }} }}\n[[rules]]\nname = \"r\"\nwebhook = {{ source = \"s\" }}\nagent = \"/a\"\nset = {{ status = \"active\" }}\n"
    );
    let e = load(&text).unwrap_err();
    assert_eq!(e.messages().len(), 1, "{e}");
}

#[test]
fn non_utf8_file_is_located() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bin.toml");
    std::fs::write(&p, b"[platform]\nbase_url = \"\xff\"\n").unwrap();
    let e = Config::load(&p, &[]).unwrap_err().to_string();
    assert!(
        e.contains("bin.toml:2:13: the file is not UTF-8 text"),
        "{e}"
    );
}

#[test]
fn files_must_exist_and_are_resolved_from_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("guide.pdf"), b"%PDF").unwrap();
    let rule = |files: &str| {
        format!(
            "{HEAD}[[rules]]\nname = \"r\"\nschedule = {{ cron = \"0 18 * * *\", timezone = \"UTC\" }}\nagents = [1]\nset = {{ files = {files} }}\n"
        )
    };
    let origin = dir.path().join("autopilot.toml");
    let c = Config::from_toml(&rule("[\"guide.pdf\"]"), &origin, &[]).unwrap();
    let files = c.rules[0].set.files();
    assert!(
        files[0].ends_with("guide.pdf") && Path::new(&files[0]).is_absolute(),
        "{files:?}"
    );
    let e = Config::from_toml(&rule("[\"missing.pdf\"]"), &origin, &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("autopilot.toml:8:17: `files`: cannot read"),
        "{e}"
    );
}

#[test]
fn shifts_are_validated_where_they_stand() {
    let shift = |windows: &str| {
        format!("{HEAD}[[shifts]]\nname = \"desk\"\nagents = [101]\ntimezone = \"America/New_York\"\nwindows = [{windows}]\n")
    };
    let ok = Config::from_toml(
        &shift("{ days = \"mon-fri\", from = \"08:00\", to = \"18:00\", set = { status = \"active\" } }, { days = \"fri\", from = \"18:00\", to = \"02:00\", set = { status = \"inactive\" } }"),
        Path::new("test.toml"),
        &[],
    );
    assert!(ok.is_ok(), "{}", ok.unwrap_err());
    let e = errors(&shift("{ days = \"mon-fri\", from = \"08:00\", to = \"18:00\", set = { status = \"active\" } }, { days = \"fri\", from = \"17:00\", to = \"02:00\", set = { status = \"inactive\" } }"));
    assert!(e.contains("overlaps window 1"), "{e}");
    let e = errors(&shift(
        "{ days = \"mon-fry\", from = \"8am\", to = \"18:00\", set = { greeting = \"x\" } }",
    ));
    assert!(e.contains("unknown day \"fry\""), "{e}");
    assert!(e.contains("time \"8am\" must be HH:MM"), "{e}");
    assert!(e.contains("did you mean `greetings`?"), "{e}");
    // Overnight windows crossing into the next window's day are checked on the weekly circle.
    let e = errors(&shift("{ days = \"sun\", from = \"22:00\", to = \"09:00\", set = { status = \"active\" } }, { days = \"mon\", from = \"08:00\", to = \"18:00\", set = { status = \"inactive\" } }"));
    assert!(e.contains("overlaps"), "{e}");
}

#[test]
fn a_zone_comes_from_the_rule_or_an_explicit_default_never_silently() {
    let rule = "[[rules]]\nname = \"r\"\nschedule = { cron = \"0 18 * * *\" }\nagents = [1]\nset = { status = \"active\" }\n";
    let e = errors(&format!("{HEAD}{rule}"));
    assert!(
        e.contains("test.toml:6:12: schedule names no time zone"),
        "{e}"
    );
    let c = load(&format!(
        "{HEAD}[defaults]\ntimezone = \"Europe/Berlin\"\n{rule}"
    ))
    .unwrap();
    assert_eq!(
        c.rules[0].schedule().unwrap().zone,
        chrono_tz::Europe::Berlin
    );
    let e = errors(&format!(
        "{HEAD}[defaults]\ntimezone = \"Europe/Berlni\"\n{rule}"
    ));
    assert!(e.contains("unknown time zone \"Europe/Berlni\""), "{e}");
}

#[test]
fn whole_day_windows_reserved_names_and_one_report_per_overlap() {
    let base = |extra: &str| {
        format!("{HEAD}[[shifts]]\nname = \"desk\"\nagents = [101]\ntimezone = \"UTC\"\n{extra}")
    };
    let c = load(&base("windows = [{ days = \"Daily\", from = \"00:00\", to = \"24:00\", set = { status = \"active\" } }]\n"));
    assert!(c.is_ok(), "{}", c.unwrap_err());
    let e = errors(&base("windows = [{ days = \"sat\", from = \"24:00\", to = \"06:00\", set = { status = \"active\" } }]\n"));
    assert!(e.contains("`from` cannot be 24:00"), "{e}");
    let e = errors(&base("windows = [{ days = \"daily\", from = \"08:00\", to = \"18:00\", set = { status = \"active\" } }, { days = \"daily\", from = \"09:00\", to = \"10:00\", set = { status = \"inactive\" } }]\n"));
    assert_eq!(e.matches("overlaps").count(), 1, "{e}");
    let e = errors(&format!(
        "{HEAD}[[rules]]\nname = \"shift:desk\"\nschedule = {{ cron = \"0 8 * * *\", timezone = \"UTC\" }}\nagents = [1]\nset = {{ status = \"active\" }}\n"
    ));
    assert!(e.contains("reserved for shifts"), "{e}");
}

#[test]
fn a_secret_of_the_wrong_type_is_not_echoed() {
    let text = format!("{HEAD}[[sources]]\nname = \"s\"\nauth = {{ kind = \"basic\", username = \"u\", password = {{ value = 123456789012345 }} }}\n");
    let e = errors(&text);
    assert!(!e.contains("123456789012345"), "{e}");
    assert!(e.contains("not shown"), "{e}");
}
