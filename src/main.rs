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
        Command::Check | Command::Ca => "warn",
    };
    logging::init(cli.log_format, default_level);

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
        Command::Run => {
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("tokenproxy: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(app::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tokenproxy: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
