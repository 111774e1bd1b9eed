#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use tokenproxy::cli::{self, Cli, Command, TokenAction};
use tokenproxy::config::Config;
use tokenproxy::{app, logging};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.as_ref().unwrap_or(&Command::Run);
    let default_level = match command {
        Command::Run => "info",
        Command::Check
        | Command::Ca
        | Command::Demo
        | Command::Status { .. }
        | Command::Authorize { .. }
        | Command::Presets { .. }
        | Command::Token { .. }
        | Command::Iptables { .. } => "warn",
    };
    logging::init(cli.log_format, default_level);
    if let Command::Presets { name } = command {
        return exit(Ok(cli::presets(name.as_deref())));
    }
    if let Command::Demo = command {
        return exit(block_on(tokenproxy::demo::run()).map(|()| true));
    }
    if let Command::Status { admin } = command {
        // The admin address: the flag, else the config's admin.listen, else the default.
        let path = cli.config_path();
        let admin = admin.clone().unwrap_or_else(|| match Config::load(&path) {
            Ok(config) => format!("http://{}", config.admin_listen),
            Err(e) => {
                // Said, not silent: a config with a problem would otherwise send status to
                // another proxy's admin API without a word.
                eprintln!(
                    "note: the admin address could not be read from {} ({}); trying http://127.0.0.1:9090 (use --admin URL)",
                    path.display(),
                    e.problems.first().map(String::as_str).unwrap_or("invalid")
                );
                "http://127.0.0.1:9090".into()
            }
        });
        return exit(block_on(cli::status(&admin)));
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
        Command::Ca => {
            exit(tokenproxy::tls::ca::CertificateAuthority::load_or_create(&config.ca_dir).map(|ca| {
                let path = std::fs::canonicalize(ca.cert_path()).unwrap_or_else(|_| ca.cert_path().into());
                println!("{}", path.display());
                true
            }))
        }
        Command::Check => exit(block_on(async { Ok(cli::check(&config).await) })),
        Command::Iptables { uid } => match config.transparent_listen {
            Some(listen) => {
                print!(
                    "{}",
                    tokenproxy::transparent::iptables_rules(listen.port(), config.admin_listen.port(), *uid)
                );
                ExitCode::SUCCESS
            }
            None => {
                eprintln!(
                    "tokenproxy: [transparent] listen is not set in {}: there is nothing to redirect to",
                    config.source.display()
                );
                ExitCode::FAILURE
            }
        },
        Command::Token { action: TokenAction::Show { provider, account, reveal } } => {
            exit(block_on(tokenproxy::token_command::show(&config, provider, account.as_deref(), *reveal)))
        }
        Command::Token { action: TokenAction::Put { provider, account, file } } => exit(block_on(
            tokenproxy::token_command::put(&config, provider, account.as_deref(), file.as_deref()),
        )),
        Command::Authorize { provider, account, device } => exit(block_on(
            tokenproxy::onboarding::command::authorize(&config, provider, account.as_deref(), *device),
        )),
        Command::Run => {
            let workers = config.proxy.workers;
            exit(runtime(workers).and_then(|runtime| runtime.block_on(app::run(config))).map(|()| true))
        }
        Command::Demo | Command::Status { .. } | Command::Presets { .. } => {
            unreachable!("handled before the config is loaded")
        }
    }
}

/// Runs `work` to completion on a multi-threaded runtime.
fn block_on<T>(work: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    runtime(None)?.block_on(work)
}

/// A multi-threaded runtime with `workers` threads, or by default one per core this process may
/// use (tokio asks `available_parallelism`, which follows CPU affinity and the cgroup's quota;
/// `TOKIO_WORKER_THREADS` overrides it).
fn runtime(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = workers {
        builder.worker_threads(workers);
    }
    builder.enable_all().build().map_err(|e| anyhow::anyhow!("cannot start the runtime: {e}"))
}

/// `Ok(true)` is success; `Ok(false)` a failure already explained; an error is one line.
fn exit(result: anyhow::Result<bool>) -> ExitCode {
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("tokenproxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}
