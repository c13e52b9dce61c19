use autopilot::app::App;
use autopilot::clock::{ManualClock, SharedClock, SystemClock};
use autopilot::config::Config;
use autopilot::platform::sim::{SimOptions, Simulator};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub const STATIC_SECRET: &str = "s3cr3t-static-value";

/// Sources and rules most tests share: the cookbook's, pointed at the samples.
pub const RULES: &str = r#"
[[sources]]
name = "convirza"
auth = { kind = "static", field = "/static/auth_token", secret = { value = "s3cr3t-static-value" } }
id = ["/event", "/call_id"]

[[sources]]
name = "gateway"
auth = { kind = "hmac-sha256", header = "X-Signature", encoding = "hex", prefix = "sha256=", secret = { value = "whsec-test-key" } }

[[sources]]
name = "ops"
auth = { kind = "basic", username = "ops", password = { value = "hunter2-basic" } }

[[rules]]
name = "pause after abandoned calls"
webhook = { source = "convirza", match = { "/event" = "post_call", "/disposition" = { in = ["ABANDONED", "NO ANSWER"] } } }
agent = "/ai_voice_agent_id"
when = { status = "active" }
set = { status = "inactive" }

[[rules]]
name = "note hot leads"
webhook = { source = "convirza", match = { "/event" = "post_call", "/indicators/lead_quality" = { gte = 80 } } }
agent = "/ai_voice_agent_id"
set = { more_information = "Last caller was a hot lead: offer a demo." }

[[rules]]
name = "greet Seattle callers"
webhook = { source = "convirza", match = { "/event" = "pre_call", "/caller_id" = { regex = "^\\+1206" } } }
agent = "/ai_voice_agent_id"
set = { greetings = "Hello, Seattle! How can I help?" }

[[rules]]
name = "gateway: long calls"
webhook = { source = "gateway", match = { "/duration" = { gt = 300 } } }
agent = "/ai_voice_agent_id"
set = { max_call_duration = 600, notification_time = 30 }

[[rules]]
name = "ops: resume"
webhook = { source = "ops", match = { "/action" = "resume" } }
agent = "/agent"
set = { status = "active" }
"#;

pub fn sample(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/webhooks")
            .join(name),
    )
    .expect("sample delivery")
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub sim_addr: SocketAddr,
    pub http: reqwest::Client,
    pub app: Option<App>,
    pub dir: tempfile::TempDir,
    pub config_text: String,
    pub clock: SharedClock,
    pub manual: Option<ManualClock>,
    sim_cancel: CancellationToken,
}

pub struct Options {
    pub rules: String,
    pub queue: String,
    pub manual_clock: Option<chrono::DateTime<chrono::Utc>>,
    pub sim: SimOptions,
    /// Extra keys for the [platform] table.
    pub platform_extra: String,
    /// The [platform] token, as TOML.
    pub token: String,
    /// Point oauth_url at the simulator.
    pub oauth: bool,
    /// Extra keys for the [database] table.
    pub database_extra: String,
    /// Turn the admin API on (loopback, port 0) with [`ADMIN_TOKEN`].
    pub admin: bool,
    /// Extra keys for the [server] table.
    pub server_extra: String,
}

pub const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";

impl Default for Options {
    fn default() -> Self {
        Self {
            rules: RULES.to_string(),
            queue: "workers = 4\nmax_attempts = 5\ninitial_backoff = \"20ms\"\nmax_backoff = \"100ms\"\n".into(),
            manual_clock: None,
            sim: SimOptions::default(),
            platform_extra: String::new(),
            token: "{ value = \"sim-token\" }".into(),
            oauth: false,
            database_extra: String::new(),
            admin: false,
            server_extra: String::new(),
        }
    }
}

pub async fn spawn() -> TestApp {
    spawn_with(Options::default()).await
}

pub async fn spawn_with(opts: Options) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let sim = Simulator::new(opts.sim);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim_addr = listener.local_addr().unwrap();
    let sim_cancel = CancellationToken::new();
    tokio::spawn(sim.serve(listener, sim_cancel.clone()));
    let config_text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{}{}[database]\npath = {:?}\n{}[platform]\nbase_url = \"http://{sim_addr}/v3\"\ntoken = {}\ntimeout = \"2s\"\n{}{}[queue]\n{}\n{}",
        opts.server_extra,
        if opts.admin {
            format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = {{ value = \"{ADMIN_TOKEN}\" }}\n")
        } else {
            String::new()
        },
        dir.path().join("test.db").display().to_string(),
        opts.database_extra,
        opts.token,
        if opts.oauth { format!("oauth_url = \"http://{sim_addr}\"\n") } else { String::new() },
        opts.platform_extra,
        opts.queue,
        opts.rules
    );
    let (clock, manual): (SharedClock, _) = match opts.manual_clock {
        Some(start) => {
            let m = ManualClock::new(start);
            (Arc::new(m.clone()), Some(m))
        }
        None => (Arc::new(SystemClock), None),
    };
    let mut t = TestApp {
        addr: "127.0.0.1:1".parse().unwrap(),
        sim_addr,
        http: reqwest::Client::new(),
        app: None,
        dir,
        config_text,
        clock,
        manual,
        sim_cancel,
    };
    t.start().await;
    t
}

impl TestApp {
    pub fn config(&self) -> Config {
        Config::from_toml(&self.config_text, Path::new("test.toml"), &[])
            .unwrap_or_else(|e| panic!("test config is invalid:\n{e}"))
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("test.db")
    }

    /// Starts the app (again) on the same database.
    pub async fn start(&mut self) {
        let app = App::start(self.config(), self.clock.clone(), CancellationToken::new())
            .await
            .expect("app starts");
        self.addr = app.local_addr();
        self.app = Some(app);
    }

    pub async fn kill(&mut self) {
        if let Some(app) = self.app.take() {
            app.kill().await;
        }
    }

    pub async fn shutdown(&mut self) {
        if let Some(app) = self.app.take() {
            app.shutdown().await;
        }
    }

    /// Writes the config to `<dir>/conf/autopilot.toml` and has the app watch it.
    pub async fn watch_config_file(&mut self) -> PathBuf {
        let dir = self.dir.path().join("conf");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("autopilot.toml");
        std::fs::write(&path, &self.config_text).unwrap();
        self.app
            .as_mut()
            .expect("app running")
            .watch_config(path.clone(), Vec::new());
        // Let the watcher task set up its inotify watch before the test edits the file.
        tokio::time::sleep(Duration::from_millis(100)).await;
        path
    }

    pub fn app(&self) -> &App {
        self.app.as_ref().expect("app running")
    }

    /// A request to the admin API with the right token.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let addr = self.app().admin_addr().expect("admin API on");
        self.http
            .request(method, format!("http://{addr}{path}"))
            .bearer_auth(ADMIN_TOKEN)
    }

    /// `GET` on the admin API, answered as JSON.
    pub async fn admin_json(&self, path: &str) -> Value {
        self.admin(reqwest::Method::GET, path)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// `GET /readyz`: status and body.
    pub async fn readyz(&self) -> (u16, Value) {
        let r = self
            .http
            .get(format!("http://{}/readyz", self.addr))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    /// A second connection to the app's database, as another process would have.
    pub async fn other_connection(&self) -> sqlx::SqliteConnection {
        use sqlx::Connection;
        sqlx::SqliteConnection::connect(&format!("sqlite://{}", self.db_path().display()))
            .await
            .unwrap()
    }

    pub fn store(&self) -> &autopilot::store::Store {
        self.app.as_ref().expect("app running").store()
    }

    pub async fn post(
        &self,
        source: &str,
        content_type: &str,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut req = self
            .http
            .post(format!("http://{}/webhooks/{source}", self.addr))
            .header("content-type", content_type)
            .body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.expect("webhook post")
    }

    pub async fn post_json(&self, source: &str, body: &Value) -> reqwest::Response {
        self.post(
            source,
            "application/json",
            serde_json::to_vec(body).unwrap(),
            &[],
        )
        .await
    }

    pub fn sim_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.sim_addr)
    }

    /// Every request the simulator received, over HTTP.
    pub async fn sim_requests(&self) -> Vec<Value> {
        self.http
            .get(self.sim_url("/_sim/requests"))
            .send()
            .await
            .unwrap()
            .json::<Vec<Value>>()
            .await
            .unwrap()
    }

    pub async fn patches(&self) -> Vec<Value> {
        self.sim_requests()
            .await
            .into_iter()
            .filter(|r| r["method"] == "PATCH")
            .collect()
    }

    pub async fn fault(&self, fault: Value) {
        let r = self
            .http
            .post(self.sim_url("/_sim/faults"))
            .json(&fault)
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success(),
            "fault rejected: {}",
            r.text().await.unwrap_or_default()
        );
    }

    pub async fn sim_agent(&self, id: i64) -> Value {
        self.http
            .get(self.sim_url(&format!("/_sim/agents/{id}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Records agent `id` as known to be active, so a `when = { status = "active" }`
    /// rule sends its PATCH without a GET first.
    pub async fn know_active(&self, id: i64) {
        self.store()
            .save_agent_state(
                id,
                &serde_json::json!({"status": "active"}),
                "get",
                chrono::Utc::now(),
            )
            .await
            .unwrap();
    }

    /// Waits until every job is finished (no pending or leased).
    pub async fn settle(&self) {
        eventually("queue settles", || async {
            self.store().open_jobs().await.unwrap() == 0
        })
        .await;
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.sim_cancel.cancel();
    }
}

/// Polls `check` until it holds, or fails the test after 20 seconds.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The form fields of a recorded PATCH, without the ones the test does not care about.
pub fn field_names(patch: &Value) -> Vec<String> {
    let mut names: Vec<String> = patch["fields"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    names.sort();
    names
}
