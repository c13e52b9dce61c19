use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = autopilot::cli::Cli::parse();
    autopilot::telemetry::init(cli.log_format);
    autopilot::cli::run(cli)
}
