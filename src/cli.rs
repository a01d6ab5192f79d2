//! Command line: `quotad [serve] [--config FILE]` and `quotad config check FILE`.
//! Parses arguments, sets up logging and signals, and maps failures to exit codes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};

use crate::clock::SystemClock;
use crate::config::Config;
use crate::engine::Policy;
use crate::server::{Server, ServerError};

/// Exit code for an invalid configuration.
pub const EXIT_CONFIG: u8 = 2;
/// Exit code when a listen address cannot be bound.
pub const EXIT_BIND: u8 = 3;
/// Exit code for any other runtime failure.
pub const EXIT_RUNTIME: u8 = 1;

/// quotad: quota and rate-limit daemon for AI products.
#[derive(Debug, Parser)]
#[command(name = "quotad", version, about)]
pub struct Cli {
    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Configuration file (default: ./quotad.toml when present, else built-in defaults).
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
    /// Log format: human on a terminal, JSON lines otherwise, unless set.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Serve,
    /// Configuration tools.
    Config {
        /// What to do with the configuration.
        #[command(subcommand)]
        action: ConfigAction,
    },
}

/// `quotad config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Check a configuration file and print a summary.
    Check {
        /// The file.
        file: PathBuf,
    },
}

fn init_logging(format: Option<LogFormat>) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("QUOTAD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = match format {
        Some(f) => f == LogFormat::Json,
        None => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Loads `path`, or `./quotad.toml` when present, or the built-in defaults.
pub fn load_config(path: Option<&Path>) -> Result<(Config, String), crate::config::ConfigError> {
    let default = Path::new("quotad.toml");
    let path = match path {
        Some(p) => Some(p),
        None if default.exists() => Some(default),
        None => None,
    };
    let (config, name) = match path {
        Some(p) => (Config::load(p)?, p.display().to_string()),
        None => (
            Config::from_toml("", "<built-in defaults>")?,
            "<built-in defaults>".to_string(),
        ),
    };
    Policy::compile(&config).map_err(|mut e| {
        e.file = name.clone();
        e
    })?;
    Ok((config, name))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
}

fn serve(config_path: Option<&Path>) -> ExitCode {
    let (config, name) = match load_config(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("quotad: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("quotad: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    runtime.block_on(async {
        let server = match Server::bind(&config, Arc::new(SystemClock)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("quotad: {e}");
                return ExitCode::from(match e {
                    ServerError::Config(_) => EXIT_CONFIG,
                    ServerError::Bind { .. } => EXIT_BIND,
                });
            }
        };
        for addr in server.local_addrs() {
            tracing::info!(config = %name, %addr, "listening");
        }
        match server.run(shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "stopped with an error");
                ExitCode::from(EXIT_RUNTIME)
            }
        }
    })
}

fn config_check(file: &Path) -> ExitCode {
    match load_config(Some(file)) {
        Ok((config, name)) => {
            let policy = Policy::compile(&config).expect("checked by load_config");
            println!(
                "{name}: OK: {} plan(s), {} top-level limit(s), {} limit name(s), default plan: {}",
                policy.plans.len(),
                policy.top_limits.len(),
                policy.shapes.len(),
                policy.default_plan.map_or("none", |i| policy.plans[i].name.as_str())
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// Entry point of the `quotad` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            init_logging(cli.log_format);
            serve(cli.config.as_deref())
        }
        Command::Config {
            action: ConfigAction::Check { file },
        } => config_check(&file),
    }
}
