#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use tokenproxy::cli::{self, Cli, Command};
use tokenproxy::config::Config;
use tokenproxy::{app, logging};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.as_ref().unwrap_or(&Command::Run);
    let default_level = match command {
        Command::Run => "info",
        Command::Check | Command::Ca | Command::Demo => "warn",
    };
    logging::init(cli.log_format, default_level);
    if let Command::Demo = command {
        return run_async(tokenproxy::demo::run());
    }

    // The config is loaded and validated before anything is bound.
    let path = cli.config_path();
    let config = match Config::load(&path) {
        Ok(config) => config,
        Err(e) => {
            match command {
                Command::Check => {
                    for problem in &e.problems {
                        println!("problem: {problem}");
                    }
                }
                _ => eprintln!("tokenproxy: invalid config: {}", e.problems.join("; ")),
            }
            return ExitCode::FAILURE;
        }
    };

    match command {
        Command::Ca => match tokenproxy::tls::ca::CertificateAuthority::load_or_create(&config.ca_dir) {
            Ok(ca) => {
                let path = std::fs::canonicalize(ca.cert_path()).unwrap_or_else(|_| ca.cert_path().into());
                println!("{}", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tokenproxy: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Check => {
            if cli::check(&config) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Run => run_async(app::run(config)),
        Command::Demo => unreachable!("handled before the config is loaded"),
    }
}

/// Runs `work` on a multi-threaded runtime; an error is one line on stderr and exit code 1.
fn run_async(work: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokenproxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokenproxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}
