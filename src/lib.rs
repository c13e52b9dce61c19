//! autopilot: keeps Convirza AI voice agents configured on schedule and on webhook events.
//!
//! Data flow: webhook → `http` (verify, parse) → `rules` (pure) → `store` (delivery, run
//! and jobs in one transaction) → `queue` (lease, PATCH via `platform`, record). The
//! `schedule` loop feeds `rules` from cron fires the same way. `app` wires it all under
//! one cancellation token; `cli` is the command line.

pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod http;
pub mod metrics;
pub mod platform;
pub mod queue;
pub mod reload;
pub mod rules;
pub mod schedule;
pub mod store;
pub mod telemetry;
