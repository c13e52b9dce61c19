//! Integration tests: the real app on port 0 with a fresh SQLite file, the simulator
//! in-process on its own port, and HTTP between them.

mod helpers;

mod cli;
mod crash;
mod faults;
mod ingest;
mod oauth;
mod ops;
mod queue;
mod redaction;
mod schedule;
mod webhooks;
