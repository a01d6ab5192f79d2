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
use crate::storage::StorageError;

/// Exit code for an invalid configuration.
pub const EXIT_CONFIG: u8 = 2;
/// Exit code when a listen address cannot be bound.
pub const EXIT_BIND: u8 = 3;
/// Exit code for any other runtime failure.
pub const EXIT_RUNTIME: u8 = 1;
/// Exit code when the WAL or snapshot is damaged: quotad refuses to start.
pub const EXIT_CORRUPT: u8 = 4;
/// Exit code when a WAL write or fsync failed while running.
pub const EXIT_STORAGE: u8 = 5;

/// The exit code for a server error.
pub fn exit_code(e: &ServerError) -> u8 {
    match e {
        ServerError::Config(_) => EXIT_CONFIG,
        ServerError::Bind { .. } => EXIT_BIND,
        ServerError::Recovery(StorageError::Corrupt(_)) => EXIT_CORRUPT,
        ServerError::Recovery(_) => EXIT_RUNTIME,
        ServerError::Storage(_) => EXIT_STORAGE,
    }
}

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
    /// Write-ahead log tools, for a stopped daemon's data directory.
    Wal {
        /// What to do with the log.
        #[command(subcommand)]
        action: WalAction,
    },
}

/// `quotad wal ...`.
#[derive(Debug, Subcommand)]
pub enum WalAction {
    /// Check the snapshot and every WAL record; report records, LSN range, torn
    /// tail or corruption, and the digest of the recovered state. Changes nothing.
    Verify {
        /// The data directory (or its `wal` subdirectory).
        dir: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print every WAL record as one JSON line: the audit log of every change
    /// with its idempotency key.
    Dump {
        /// The data directory (or its `wal` subdirectory).
        dir: PathBuf,
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
                return ExitCode::from(exit_code(&e));
            }
        };
        for addr in server.local_addrs() {
            tracing::info!(config = %name, %addr, "listening");
        }
        match server.run(shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "stopped with an error");
                eprintln!("quotad: {e}");
                ExitCode::from(exit_code(&e))
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

/// Splits `dir` into (data dir, wal dir): either may be given.
fn wal_paths(dir: &Path) -> (PathBuf, PathBuf) {
    if dir.join("wal").is_dir() {
        (dir.to_path_buf(), crate::storage::wal_dir(dir))
    } else {
        (dir.parent().unwrap_or(dir).to_path_buf(), dir.to_path_buf())
    }
}

fn wal_verify(dir: &Path, json: bool) -> ExitCode {
    use crate::storage::{self, io::FsDir, snapshot::SnapshotStore};
    let (data, wal) = wal_paths(dir);
    if !wal.is_dir() {
        eprintln!("{}: no WAL directory here", wal.display());
        return ExitCode::from(EXIT_RUNTIME);
    }
    let result = (|| {
        let snap = SnapshotStore::open_existing(&storage::snapshot_path(&data))
            .map_err(|e| StorageError::Corrupt(e.to_string()))?;
        let fs = FsDir::new(&wal).map_err(|e| StorageError::Io(e.to_string()))?;
        let policy = Policy::compile(&Config::default()).expect("defaults compile");
        let (engine, _, report) = storage::recover(snap.as_ref(), std::sync::Arc::new(fs), policy, u64::MAX, true)?;
        Ok::<_, StorageError>((
            engine.digest(crate::clock::Clock::now_ms(&crate::clock::SystemClock)),
            report,
        ))
    })();
    match result {
        Ok((digest, r)) => {
            if json {
                let v = serde_json::json!({
                    "ok": true, "snapshot": r.snapshot_loaded, "records": r.scan.records,
                    "replayed": r.replayed_records, "first_lsn": r.scan.first_lsn, "last_lsn": r.scan.last_lsn,
                    "segments": r.scan.segments, "torn_tail_bytes": r.scan.torn_tail_bytes, "digest": digest,
                });
                println!("{v}");
            } else {
                println!(
                    "OK: {} segment(s), {} record(s), LSN {}..{}, snapshot: {}, replayed after it: {}",
                    r.scan.segments,
                    r.scan.records,
                    r.scan.first_lsn.map_or("-".into(), |l| l.to_string()),
                    r.scan.last_lsn.map_or("-".into(), |l| l.to_string()),
                    if r.snapshot_loaded { "yes" } else { "none" },
                    r.replayed_records
                );
                if r.scan.torn_tail_bytes > 0 {
                    println!(
                        "torn tail: {} byte(s) at the end of {} (an unacknowledged write; start-up truncates it)",
                        r.scan.torn_tail_bytes,
                        r.scan.torn_tail_file.unwrap_or_default()
                    );
                }
                println!(
                    "state digest: {:016x} ({} subjects, {} counters, {} reservations, {} idempotency keys)",
                    digest.sum, digest.subjects, digest.counters, digest.reservations, digest.idempotency_keys
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if json {
                println!("{}", serde_json::json!({"ok": false, "error": e.to_string()}));
            } else {
                eprintln!("{e}");
            }
            ExitCode::from(if matches!(e, StorageError::Corrupt(_)) {
                EXIT_CORRUPT
            } else {
                EXIT_RUNTIME
            })
        }
    }
}

fn wal_dump(dir: &Path) -> ExitCode {
    use crate::storage::{codec, io::FsDir, io::WalDir, wal};
    use std::io::Write;
    let (_, wal_path) = wal_paths(dir);
    let fs = match FsDir::new(&wal_path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{}: {e}", wal_path.display());
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let first = fs
        .list()
        .unwrap_or_default()
        .iter()
        .filter_map(|n| n.strip_prefix("wal-")?.strip_suffix(".log")?.parse::<u64>().ok())
        .min()
        .unwrap_or(1);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let r = wal::verify(&fs, first.saturating_sub(1), &mut |lsn, version, payload| {
        let muts = codec::decode_mutations(version, payload).map_err(|e| e.to_string())?;
        let line = serde_json::json!({"lsn": lsn, "mutations": muts});
        writeln!(out, "{line}").map_err(|e| e.to_string())
    });
    let _ = out.flush();
    match r {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_CORRUPT)
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
        Command::Wal {
            action: WalAction::Verify { dir, json },
        } => wal_verify(&dir, json),
        Command::Wal {
            action: WalAction::Dump { dir },
        } => wal_dump(&dir),
    }
}
