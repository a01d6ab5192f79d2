//! Command line: the daemon (`quotad [serve]`), tools for its files
//! (`config check`, `wal verify`, `wal dump`), and client subcommands that talk
//! to a running daemon over TCP or its Unix socket (`consume`, `check`,
//! `usage`, `set-plan`, `reset`, `credit`, `reload`, `health`, `policy`), and the
//! shell completions and manual page generated from these definitions
//! (`completions`, `man`). Parses arguments, sets up logging and signals, and
//! maps failures to exit codes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use hyper::Method;
use serde_json::{json, Value};

use crate::client::{Client, Target};
use crate::clock::SystemClock;
use crate::config::{Config, ListenAddr, LogFormat};
use crate::engine::Policy;
use crate::server::{Server, ServerError};
use crate::storage::StorageError;

/// Prints a line to stdout, ignoring a closed pipe (`quotad usage u | head`).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

mod browse;
mod policy;

/// Exit code for any other runtime failure.
pub const EXIT_RUNTIME: u8 = 1;
/// Exit code for an invalid configuration.
pub const EXIT_CONFIG: u8 = 2;
/// Exit code when a listen address cannot be bound.
pub const EXIT_BIND: u8 = 3;
/// Exit code when the WAL or snapshot is damaged: quotad refuses to start.
pub const EXIT_CORRUPT: u8 = 4;
/// Exit code when a WAL write or fsync failed while running.
pub const EXIT_STORAGE: u8 = 5;
/// `quotad wal verify|dump`: a running daemon holds the data directory.
pub const EXIT_IN_USE: u8 = 6;

/// Client exit code: the call was denied (`consume`, `check`) or not healthy.
pub const EXIT_DENIED: u8 = 1;
/// Client exit code: the request failed (unreachable, or an error answer).
pub const EXIT_REQUEST: u8 = 3;

/// The exit code for a server error.
pub fn exit_code(e: &ServerError) -> u8 {
    match e {
        ServerError::Config(_) => EXIT_CONFIG,
        ServerError::Bind { .. } => EXIT_BIND,
        ServerError::Recovery(StorageError::Corrupt(_)) => EXIT_CORRUPT,
        ServerError::Recovery(_) => EXIT_RUNTIME,
        ServerError::Storage(_) => EXIT_STORAGE,
        ServerError::Gateway(_) => EXIT_RUNTIME,
    }
}

/// What `quotad --help` says after the options (the manual page has its own,
/// longer sections: [`MAN_SECTIONS`]).
const EXIT_STATUS: &str = "\
Exit status of the daemon (serve): 0 clean stop, 1 runtime failure, 2 invalid \
configuration, 3 a listen address cannot be bound, 4 the WAL or snapshot is \
damaged (it refuses to start), 5 a WAL write or fsync failed while running. \
wal verify and wal dump: 4 damaged, 6 a running daemon holds the directory.

Exit status of the client subcommands: 0 allowed or done, 1 denied (consume, \
check) or not ready (health), 2 bad arguments or configuration, 3 the request \
failed (unreachable, or an error answer, printed to stderr).

The daemon's address comes from --socket or --addr, else from the first \
address in --config (default ./quotad.toml); the token from --token-file or \
the QUOTAD_TOKEN environment variable.";

/// quotad: quota and rate-limit daemon for AI products.
#[derive(Debug, Parser)]
#[command(name = "quotad", version, about, after_long_help = EXIT_STATUS)]
pub struct Cli {
    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Configuration file (default: ./quotad.toml when present, else built-in
    /// defaults). Client subcommands take the daemon's address from it.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Log format (overrides `log.format`).
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormatArg>,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormatArg {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Where the daemon is and how to authenticate (client subcommands and `bench`).
#[derive(Debug, Clone, Args)]
pub struct Reach {
    /// TCP address of the daemon, `host:port` (an `http://host:port` URL is
    /// accepted too), e.g. 127.0.0.1:7878.
    #[arg(long, conflicts_with = "socket", value_parser = tcp_addr)]
    pub addr: Option<String>,
    /// Unix socket of the daemon.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// File holding the bearer token (default: the QUOTAD_TOKEN environment variable).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

/// How client subcommands reach the daemon, and what they print.
#[derive(Debug, Clone, Args)]
pub struct Connect {
    /// Where the daemon is.
    #[command(flatten)]
    pub reach: Reach,
    /// Print the daemon's JSON answer instead of a summary.
    #[arg(long)]
    pub json: bool,
}

/// `--addr`: `host:port`, or the same as an `http://` URL (what curl takes),
/// so that pasting the daemon's URL works. quotad serves plain HTTP only.
fn tcp_addr(s: &str) -> Result<String, String> {
    let rest = if let Some(r) = s.strip_prefix("http://") {
        r
    } else if s.starts_with("https://") {
        return Err("quotad speaks plain HTTP, not HTTPS: give host:port, e.g. 127.0.0.1:7878".into());
    } else if s.contains("://") {
        return Err(format!("{s:?} is not host:port, e.g. 127.0.0.1:7878"));
    } else {
        s
    };
    let hostport = rest.strip_suffix('/').unwrap_or(rest);
    if hostport.contains('/') {
        return Err(format!(
            "{s:?}: give only host:port, without a path (the subcommand picks the endpoint)"
        ));
    }
    match hostport.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => Ok(hostport.to_string()),
        _ => Err(format!("{s:?} is not host:port, e.g. 127.0.0.1:7878")),
    }
}

/// What `consume` and `check` send.
#[derive(Debug, Clone, Args)]
pub struct DecisionArgs {
    /// Who is metered.
    pub subject: String,
    /// The event, e.g. llm.chat.
    #[arg(long)]
    pub event: Option<String>,
    /// An attribute, `key=value` (repeatable).
    #[arg(long = "attr", value_parser = key_value)]
    pub attributes: Vec<(String, String)>,
    /// An amount, `metric=number` (repeatable; requests defaults to 1).
    #[arg(long = "amount", value_parser = key_number)]
    pub amounts: Vec<(String, u64)>,
    /// Idempotency key (consume only: `check` changes nothing and refuses it).
    #[arg(long)]
    pub key: Option<String>,
    /// Connection.
    #[command(flatten)]
    pub connect: Connect,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

fn key_number(s: &str) -> Result<(String, u64), String> {
    let (k, v) = key_value(s)?;
    let n = v.parse().map_err(|_| format!("{v:?} in {s:?} is not a whole number"))?;
    Ok((k, n))
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
    /// Charge a call (POST /v1/consume). Exit 0 if allowed, 1 if denied.
    Consume(DecisionArgs),
    /// Ask without charging (POST /v1/check). Exit 0 if allowed, 1 if denied.
    Check(DecisionArgs),
    /// Show a subject's plan and counters (`quotad usage SUBJECT`), or every
    /// subject's usage: `quotad usage export`, `quotad usage top` (admin).
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Usage {
        /// The subject.
        #[arg(required = true)]
        subject: Option<String>,
        /// Every subject's usage instead.
        #[command(subcommand)]
        action: Option<UsageAction>,
        /// Connection.
        #[command(flatten)]
        connect: Connect,
    },
    /// Known subjects (admin).
    Subjects {
        /// What to do.
        #[command(subcommand)]
        action: SubjectsAction,
    },
    /// Recorded events (admin): a page, or follow new ones.
    Events {
        /// What to do.
        #[command(subcommand)]
        action: EventsAction,
    },
    /// Assign a plan to a subject (keeps its usage).
    SetPlan {
        /// The subject.
        subject: String,
        /// The plan.
        plan: String,
        /// Connection.
        #[command(flatten)]
        connect: Connect,
    },
    /// Zero a subject's counters (one limit, or all).
    Reset {
        /// The subject.
        subject: String,
        /// Only this limit.
        #[arg(long)]
        limit: Option<String>,
        /// Connection.
        #[command(flatten)]
        connect: Connect,
    },
    /// Give back usage, or top up a lifetime limit.
    Credit {
        /// The subject.
        subject: String,
        /// The limit.
        limit: String,
        /// How much.
        amount: u64,
        /// Connection.
        #[command(flatten)]
        connect: Connect,
    },
    /// The policy (plans, limits, prices, breakers, anomalies) of the running
    /// daemon, for people who keep it in git: print it as TOML, show what a
    /// file would change, put a file's policy sections.
    Policy {
        /// What to do with the policy.
        #[command(subcommand)]
        action: PolicyAction,
    },
    /// Make the daemon re-read its configuration file.
    Reload {
        /// Connection.
        #[command(flatten)]
        connect: Connect,
    },
    /// Load generator: many connections of decisions against a running daemon.
    Bench {
        /// Concurrent keep-alive connections.
        #[arg(long, short = 'c', default_value_t = 50)]
        connections: usize,
        /// Measure for this many seconds (after the warm-up).
        #[arg(long, default_value_t = 10.0, conflicts_with = "requests")]
        seconds: f64,
        /// Or stop after this many operations.
        #[arg(long, short = 'n')]
        requests: Option<u64>,
        /// Warm-up seconds, not measured.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Distinct subjects, picked at random.
        #[arg(long, default_value_t = 100_000)]
        subjects: u64,
        /// Subject names are this prefix and a number (fresh subjects for a
        /// run on a daemon whose limits earlier runs used up).
        #[arg(long, default_value = "user:")]
        subject_prefix: String,
        /// The operation.
        #[arg(long, value_enum, default_value = "consume")]
        op: crate::loadgen::BenchOp,
        /// Consumes per request with `--op batch`.
        #[arg(long, default_value_t = 100)]
        batch_size: usize,
        /// Requests each connection sends at once before reading their
        /// answers (HTTP/1.1 pipelining, as redis-benchmark -P), 1 to 128;
        /// with consume, check and noop. Latency is that of the whole group.
        #[arg(long, short = 'P', default_value_t = 1)]
        pipeline: usize,
        /// Tokens per decision (0: none).
        #[arg(long, default_value_t = 0)]
        tokens: u64,
        /// Event of every decision, e.g. llm.chat (none by default).
        #[arg(long)]
        event: Option<String>,
        /// An attribute of every decision, `key=value` (repeatable).
        #[arg(long = "attr", value_parser = key_value)]
        attributes: Vec<(String, String)>,
        /// Client threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Where the daemon is.
        #[command(flatten)]
        reach: Reach,
        /// Print the report as one JSON object instead of a table (no progress line).
        #[arg(long)]
        json: bool,
    },
    /// Ask GET /readyz, for health checks: exit 0 if the daemon is ready, 1 if
    /// it answers but is not ready (recovering its state or shutting down), 3
    /// if it cannot be reached or refuses the request.
    Health {
        /// Connection.
        #[command(flatten)]
        connect: Connect,
    },
    /// Print a shell completion script to stdout.
    ///
    /// bash: `quotad completions bash > /etc/bash_completion.d/quotad` (or
    /// `~/.local/share/bash-completion/completions/quotad`); zsh: into a
    /// directory of `$fpath` as `_quotad`; fish:
    /// `~/.config/fish/completions/quotad.fish`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page quotad(1) (roff) to stdout, or with `--dir` write
    /// it and one page per subcommand (quotad-consume.1, …) into a directory.
    ///
    /// `quotad man | man -l -` reads it; `quotad man --dir /usr/local/share/man/man1`
    /// installs the pages.
    Man {
        /// Write quotad.1 and quotad-<subcommand>.1 here instead of printing quotad.1.
        #[arg(long)]
        dir: Option<PathBuf>,
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

/// `quotad subjects ...` (admin).
#[derive(Debug, Subcommand)]
pub enum SubjectsAction {
    /// Known subjects in byte order with their plan, one per line
    /// (GET /v1/subjects): a page, or with --all every one.
    List {
        /// Start after this subject.
        #[arg(long)]
        after: Option<String>,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        /// Every subject, page after page.
        #[arg(long)]
        all: bool,
        /// Connection.
        #[command(flatten)]
        connect: Connect,
    },
}

/// `quotad usage export|top` (admin).
#[derive(Debug, Subcommand)]
pub enum UsageAction {
    /// Every subject's usage buckets in a time range, for billing
    /// (GET /v1/usage): CSV streamed to stdout (`subject,start,metric,amount`),
    /// or with --json one row per line.
    Export {
        #[command(flatten)]
        range: UsageRange,
        /// Bucket size: day or month.
        #[arg(long, default_value = "day", value_parser = ["day", "month"])]
        granularity: String,
        /// Split buckets by this attribute (one of history.dimensions), adding its column.
        #[arg(long)]
        group_by: Option<String>,
        /// Start after this subject.
        #[arg(long)]
        after: Option<String>,
        /// Connection.
        #[command(flatten)]
        connect: Connect,
    },
    /// The subjects with the most of a metric in a time range (GET /v1/usage/top),
    /// one `amount<TAB>subject` per line, most first.
    Top {
        /// The metric to rank by (requests, tokens, the pricing metric…).
        #[arg(long)]
        metric: String,
        #[command(flatten)]
        range: UsageRange,
        /// How many (1 to 1000).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        /// Connection.
        #[command(flatten)]
        connect: Connect,
    },
}

/// A time range of usage.
#[derive(Debug, Clone, Args)]
pub struct UsageRange {
    /// Start (inclusive): a date (2026-11-01, midnight in --timezone) or an RFC 3339 time.
    #[arg(long)]
    pub from: String,
    /// End (exclusive), as --from.
    #[arg(long)]
    pub to: String,
    /// IANA time zone of days and months (default UTC).
    #[arg(long)]
    pub timezone: Option<String>,
}

/// `quotad events ...` (admin).
#[derive(Debug, Subcommand)]
pub enum EventsAction {
    /// Recorded events, oldest first, one per line (GET /v1/events).
    List {
        /// After this seq (default: from the oldest kept).
        #[arg(long)]
        after: Option<u64>,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        /// One type, or a prefix ending in `*` (`breaker.*`).
        #[arg(long = "type", value_name = "TYPE")]
        kind: Option<String>,
        /// Connection.
        #[command(flatten)]
        connect: Connect,
    },
    /// Print new events as they are recorded, until interrupted.
    Tail {
        /// Start after this seq (default: after the newest now).
        #[arg(long)]
        after: Option<u64>,
        /// One type, or a prefix ending in `*` (`breaker.*`).
        #[arg(long = "type", value_name = "TYPE")]
        kind: Option<String>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// Seconds between polls while nothing is new.
        #[arg(long, default_value_t = 1.0, value_parser = positive_seconds)]
        interval: f64,
        /// Connection.
        #[command(flatten)]
        connect: Connect,
    },
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.05..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds between 0.05 and 3600")),
    }
}

/// `quotad policy ...`: each talks to the running daemon.
#[derive(Debug, Subcommand)]
pub enum PolicyAction {
    /// Print the policy in force (or an earlier version) as TOML, the same
    /// sections and names as quotad.toml (GET /v1/policy).
    Get {
        /// An earlier version (the daemon keeps the last 100).
        #[arg(long)]
        version: Option<u64>,
        /// Connection.
        #[command(flatten)]
        connect: Connect,
    },
    /// Put a file's policy sections (metrics, [pricing], [[limits]], [[plans]],
    /// [[breakers]], [[anomalies]]) in force as a new version (PUT /v1/policy);
    /// any other section of the file is ignored. Needs policy.source = "api".
    /// Writes nothing when the daemon's policy already equals the file's.
    Apply {
        /// A TOML file: a quotad.toml, or only its policy sections.
        file: PathBuf,
        /// Refuse unless the daemon is at this version (If-Match), so a change
        /// made since you last looked is not overwritten.
        #[arg(long)]
        if_version: Option<u64>,
        /// Connection.
        #[command(flatten)]
        connect: Connect,
    },
    /// Show what `apply FILE` would change: a unified diff of the daemon's
    /// policy and the file's (both as TOML, defaults filled in) and the limits
    /// whose counters would start afresh or be dropped. Exit 0 if they are the
    /// same, 1 if they differ.
    Diff {
        /// A TOML file: a quotad.toml, or only its policy sections.
        file: PathBuf,
        /// Connection.
        #[command(flatten)]
        connect: Connect,
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

fn init_logging(config: &Config, flag: Option<LogFormatArg>) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("QUOTAD_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = match (flag, config.log.format) {
        (Some(f), _) => f == LogFormatArg::Json,
        (None, LogFormat::Json) => true,
        (None, LogFormat::Human) => false,
        (None, LogFormat::Auto) => !std::io::stderr().is_terminal(),
    };
    // Colour codes only on a terminal: `--log-format human 2>file` stays plain
    // text. NO_COLOR (no-color.org) turns them off there too.
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Loads `path`, or `./quotad.toml` when present, or the built-in defaults;
/// returns the config and the file it came from.
pub fn load_config(path: Option<&Path>) -> Result<(Config, Option<PathBuf>), crate::config::ConfigError> {
    let default = Path::new("quotad.toml");
    let path = match path {
        Some(p) => Some(p.to_path_buf()),
        None if default.exists() => Some(default.to_path_buf()),
        None => None,
    };
    let config = match &path {
        Some(p) => Config::load(p)?,
        None => Config::from_toml("", "<built-in defaults>")?,
    };
    let with_file = |mut e: crate::config::ConfigError| {
        e.file = config_name(path.as_deref());
        e
    };
    // Token files are read by serve (an unreadable one is named then), not
    // here: `config check` may run where the secrets are not.
    Policy::from_config(&config).map_err(with_file)?;
    crate::webhooks::check_webhooks(&config).map_err(with_file)?;
    Ok((config, path))
}

/// How errors name the configuration: its path, or the built-in defaults.
fn config_name(path: Option<&Path>) -> String {
    path.map_or("<built-in defaults>".into(), |p| p.display().to_string())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
}

fn serve(config_path: Option<&Path>, log_format: Option<LogFormatArg>) -> ExitCode {
    let (config, path) = match load_config(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("quotad: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_logging(&config, log_format);
    if path.is_none() {
        tracing::warn!(
            "no configuration file: --config was not given and there is no quotad.toml in {}; running on \
             the built-in defaults (listen on 127.0.0.1:7878, data in ./data, no plans)",
            std::env::current_dir().map_or(".".into(), |d| d.display().to_string())
        );
    }
    if config.plans.is_empty() {
        tracing::warn!(
            "the configuration defines no plans: every decision answers 404 unknown_subject; add a \
             [[plans]] with default = true (see quotad.toml in the repository)"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("quotad: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    runtime.block_on(async {
        let mut server = match Server::bind(&config, Arc::new(crate::clock::SteadyClock::system())).await {
            Ok(s) => s,
            Err(mut e) => {
                if let crate::server::ServerError::Config(c) = &mut e {
                    if c.file.is_empty() {
                        c.file = config_name(path.as_deref());
                    }
                }
                // Logging is set up and goes to stderr: one line, not two.
                tracing::error!("cannot start: {e}");
                return ExitCode::from(exit_code(&e));
            }
        };
        if let Some(p) = &path {
            server = server.with_config_path(p.clone());
        }
        let name = config_name(path.as_deref());
        for addr in server.local_addrs() {
            tracing::info!(config = %name, %addr, "listening");
        }
        for addr in server.gateway_addrs() {
            tracing::info!(%addr, "the OpenAI gateway is listening");
        }
        if let Some(addr) = server.grpc_addr() {
            tracing::info!(%addr, "Envoy's rate limit service (gRPC) is listening");
        }
        // SIGHUP re-reads the configuration; an invalid file leaves the old one in force.
        let state = server.state();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return;
            };
            while hup.recv().await.is_some() {
                match state.reload().await {
                    Ok(report) if report.usage_reset.is_empty() => {
                        tracing::info!("SIGHUP: configuration reloaded: {report}")
                    }
                    Ok(report) => tracing::warn!("SIGHUP: configuration reloaded: {report}"),
                    Err(e) => {
                        tracing::warn!(error = %e, "SIGHUP: reload rejected; the previous configuration stays in force")
                    }
                }
            }
        });
        match server.run(shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("stopped with an error: {e}");
                ExitCode::from(exit_code(&e))
            }
        }
    })
}

fn config_check(file: &Path) -> ExitCode {
    match load_config(Some(file)) {
        Ok((config, _)) => {
            let policy = Policy::from_config(&config).expect("checked by load_config");
            say!(
                "{}: OK: {} plan(s), {} top-level limit(s), {} limit name(s), default plan: {}; \
                 {} breaker(s), {} anomaly rule(s), {} webhook(s)",
                file.display(),
                policy.plans.len(),
                policy.top_limits.len(),
                policy.shapes.len(),
                policy.default_plan.map_or("none", |i| &*policy.plans[i].name),
                policy.breakers.len(),
                policy.anomalies.len(),
                config.webhooks.len()
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

/// Whether a running daemon holds `data`'s LOCK. Only looks: opens the file
/// read-only if it exists, and never creates it.
fn held_by_daemon(data: &Path) -> bool {
    match std::fs::File::open(data.join("LOCK")) {
        Ok(f) => match f.try_lock_shared() {
            Ok(()) => false,
            Err(std::fs::TryLockError::WouldBlock) => true,
            Err(std::fs::TryLockError::Error(_)) => false,
        },
        Err(_) => false,
    }
}

/// The checks both file tools make before reading a data directory.
fn wal_tool_dirs(dir: &Path) -> Result<(PathBuf, PathBuf), ExitCode> {
    let (data, wal) = wal_paths(dir);
    if !wal.is_dir() {
        eprintln!("{}: no WAL directory here", wal.display());
        return Err(ExitCode::from(EXIT_RUNTIME));
    }
    if held_by_daemon(&data) {
        eprintln!(
            "{}: in use by a running quotad (its LOCK file is held); stop it first, or read a copy of the \
             directory (the files of a running daemon change while they are read)",
            data.display()
        );
        return Err(ExitCode::from(EXIT_IN_USE));
    }
    Ok((data, wal))
}

fn wal_verify(dir: &Path, json: bool) -> ExitCode {
    use crate::storage::{self, io::FsDir, snapshot::SnapshotStore};
    let (data, wal) = match wal_tool_dirs(dir) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let result = (|| {
        let snap = SnapshotStore::open_read_only(&storage::snapshot_path(&data))
            .map_err(|e| StorageError::Corrupt(e.to_string()))?;
        let fs = FsDir::new(&wal).map_err(|e| StorageError::Io(e.to_string()))?;
        let policy = Policy::from_config(&Config::default()).expect("defaults compile");
        let (engine, _, report) = storage::recover(snap.as_ref(), Arc::new(fs), policy, u64::MAX, true)?;
        let cursors = crate::webhooks::verify_cursor_file(&data.join("delivery.redb"), engine.last_event().0)?;
        Ok::<_, StorageError>((
            engine.digest(crate::clock::Clock::now_ms(&SystemClock)),
            report,
            cursors,
        ))
    })();
    match result {
        Ok((digest, r, cursors)) => {
            if json {
                let v = json!({
                    "ok": true, "snapshot": r.snapshot_loaded, "records": r.scan.records,
                    "replayed": r.replayed_records, "first_lsn": r.scan.first_lsn, "last_lsn": r.scan.last_lsn,
                    "segments": r.scan.segments, "torn_tail_bytes": r.scan.torn_tail_bytes, "digest": digest,
                    "delivery_cursors": cursors,
                });
                say!("{v}");
            } else {
                say!(
                    "OK: {} segment(s), {} record(s), LSN {}..{}, snapshot: {}, replayed after it: {}",
                    r.scan.segments,
                    r.scan.records,
                    r.scan.first_lsn.map_or("-".into(), |l| l.to_string()),
                    r.scan.last_lsn.map_or("-".into(), |l| l.to_string()),
                    if r.snapshot_loaded { "yes" } else { "none" },
                    r.replayed_records
                );
                if cursors > 0 {
                    say!("webhook delivery cursors: {cursors}, each checked and within the recorded events");
                }
                if r.scan.torn_tail_bytes > 0 {
                    say!(
                        "torn tail: {} byte(s) at the end of {} (a write cut short by a crash; with durability = \"fsync\" \
                         it was never acknowledged; start-up truncates it)",
                        r.scan.torn_tail_bytes,
                        r.scan.torn_tail_file.unwrap_or_default()
                    );
                }
                say!(
                    "state digest: {:016x} ({} subjects, {} counters, {} reservations, {} idempotency keys)",
                    digest.sum,
                    digest.subjects,
                    digest.counters,
                    digest.reservations,
                    digest.idempotency_keys
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if json {
                say!("{}", json!({"ok": false, "error": e.to_string()}));
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
    let wal_path = match wal_tool_dirs(dir) {
        Ok((_, w)) => w,
        Err(code) => return code,
    };
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
    // `quotad wal dump | head`: a reader that stops early is not damage.
    let mut reader_gone = false;
    let r = wal::verify(&fs, first.saturating_sub(1), &mut |lsn, version, payload| {
        let (at_ms, muts) = codec::decode_record(version, payload).map_err(|e| e.to_string())?;
        let at = crate::period::rfc3339(at_ms);
        writeln!(out, "{}", json!({"lsn": lsn, "at": at, "mutations": muts})).map_err(|e| {
            reader_gone = e.kind() == std::io::ErrorKind::BrokenPipe;
            e.to_string()
        })
    });
    if reader_gone {
        return ExitCode::SUCCESS;
    }
    if let Err(e) = out.flush() {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            return ExitCode::SUCCESS;
        }
    }
    match r {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_CORRUPT)
        }
    }
}

/// A client for the daemon and a runtime to drive it on; a bad address or
/// configuration is reported and answered with its exit code.
fn connected(reach: &Reach, config_path: Option<&Path>) -> Result<(Client, tokio::runtime::Runtime), ExitCode> {
    let client = client_for(reach, config_path).map_err(|e| {
        eprintln!("quotad: {e}");
        ExitCode::from(EXIT_CONFIG)
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    Ok((client, runtime))
}

/// The daemon's address: `--socket`, `--addr`, or the config file's first Unix
/// socket, else its first TCP address.
fn client_for(reach: &Reach, config_path: Option<&Path>) -> Result<Client, String> {
    let target = match (&reach.socket, &reach.addr) {
        (Some(s), _) => Target::Unix(s.clone()),
        (None, Some(a)) => Target::Tcp(a.clone()),
        (None, None) => {
            let (config, _) = load_config(config_path).map_err(|e| e.to_string())?;
            let addrs = config.listen_addrs();
            let unix = addrs.iter().find_map(|a| match a {
                ListenAddr::Unix(p) => Some(Target::Unix(p.clone())),
                ListenAddr::Tcp(_) => None,
            });
            let tcp = addrs.iter().find_map(|a| match a {
                ListenAddr::Tcp(t) => Some(Target::Tcp(t.replace("0.0.0.0", "127.0.0.1"))),
                ListenAddr::Unix(_) => None,
            });
            unix.or(tcp).ok_or("no listen address configured")?
        }
    };
    let token = match &reach.token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| format!("cannot read the token file {}: {e}", f.display()))?
                .trim()
                .to_string(),
        ),
        None => std::env::var("QUOTAD_TOKEN").ok().filter(|t| !t.is_empty()),
    };
    Ok(Client {
        target,
        token,
        timeout: Duration::from_secs(10),
    })
}

/// What to do about a 401 or 403, in the CLI's own terms (the daemon's
/// message speaks of HTTP headers).
fn auth_hint(status: u16, reach: &Reach) -> Option<String> {
    let source = match &reach.token_file {
        Some(f) => Some(format!("the token in {}", f.display())),
        None => std::env::var("QUOTAD_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .map(|_| "the token in QUOTAD_TOKEN".to_string()),
    };
    match (status, source) {
        (401, None) => Some(
            "this daemon requires a token: pass --token-file FILE or set the QUOTAD_TOKEN environment variable".into(),
        ),
        (401, Some(s)) => Some(format!(
            "{s} is not one the daemon accepts (auth.tokens in its configuration)"
        )),
        (403, Some(s)) => Some(format!("{s} has the client role; this needs an admin token")),
        _ => None,
    }
}

/// Runs one client request; prints the answer; returns the exit code.
fn client_call(
    connect: &Connect,
    config_path: Option<&Path>,
    method: Method,
    path: &str,
    body: Option<Value>,
    print: fn(&Value) -> u8,
) -> ExitCode {
    let (client, runtime) = match connected(&connect.reach, config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match runtime.block_on(client.request(method, path, body.as_ref())) {
        Err(e) => {
            eprintln!("quotad: {e}");
            ExitCode::from(EXIT_REQUEST)
        }
        Ok(a) if a.status >= 400 => {
            report_error(&a, connect);
            // `health`: a daemon that answers "not ready" is up but not
            // serving yet (or any more); unreachable stays 3.
            if path == "/readyz" && a.status == 503 {
                return ExitCode::from(EXIT_DENIED);
            }
            ExitCode::from(EXIT_REQUEST)
        }
        Ok(a) if connect.json => {
            say!("{}", a.body);
            ExitCode::from(print_code(&a.body))
        }
        Ok(a) => ExitCode::from(print(&a.body)),
    }
}

/// Sends a request for a command that reads the answer itself: no answer,
/// or an error answer, is reported on stderr and fails with exit 3.
async fn answered(
    client: &Client,
    connect: &Connect,
    method: Method,
    path: &str,
    body: Option<&Value>,
    headers: &[(&str, &str)],
) -> Result<crate::client::Answer, ExitCode> {
    match client.request_with(method, path, body, headers).await {
        Err(e) => {
            eprintln!("quotad: {e}");
            Err(ExitCode::from(EXIT_REQUEST))
        }
        Ok(a) if a.status >= 400 => {
            report_error(&a, connect);
            Err(ExitCode::from(EXIT_REQUEST))
        }
        Ok(a) => Ok(a),
    }
}

/// Prints an error answer: its JSON with `--json`, and its code and message
/// (with a hint for 401/403) on stderr.
fn report_error(a: &crate::client::Answer, connect: &Connect) {
    if connect.json {
        say!("{}", a.body);
    }
    let code = a.body["error"]["code"].as_str().unwrap_or("error");
    let msg = a.body["error"]["message"].as_str().unwrap_or("");
    eprintln!("quotad: {} {code}: {msg}", a.status);
    if let Some(hint) = auth_hint(a.status, &connect.reach) {
        eprintln!("quotad: {hint}");
    }
}

/// Exit code of a JSON answer: denied decisions are 1.
fn print_code(body: &Value) -> u8 {
    if body.get("allowed") == Some(&Value::Bool(false)) {
        EXIT_DENIED
    } else {
        0
    }
}

/// The counters table shared by decisions and subject views.
fn print_counters(body: &Value) {
    let Some(counters) = body["counters"].as_array().filter(|c| !c.is_empty()) else {
        return;
    };
    say!(
        "  {:<28} {:<20} {:>22} {:>12}  resets at",
        "limit",
        "scope",
        "used / max",
        "remaining"
    );
    for c in counters {
        let max = match &c["max"] {
            Value::Number(n) => n.to_string(),
            other => other.as_str().unwrap_or("-").to_string(),
        };
        let remaining = c["remaining"].as_u64().map_or("-".to_string(), |r| r.to_string());
        say!(
            "  {:<28} {:<20} {:>22} {:>12}  {}",
            c["limit"].as_str().unwrap_or(""),
            c["scope"].as_str().unwrap_or(""),
            format!("{} / {max}", c["used"]),
            remaining,
            c["resets_at"].as_str().unwrap_or("never")
        );
    }
}

/// Micro-units as a decimal amount of the currency: 1200 → "0.0012".
fn money(micros: u64) -> String {
    let frac = format!("{:06}", micros % 1_000_000);
    let frac = frac.trim_end_matches('0');
    let frac = if frac.len() < 2 {
        format!("{frac:0<2}")
    } else {
        frac.to_string()
    };
    format!("{}.{frac}", micros / 1_000_000)
}

fn print_decision(body: &Value) -> u8 {
    let decision = body["decision"].as_str().unwrap_or("?");
    let head = match decision {
        "allow" => "allowed".to_string(),
        "degrade" => "allowed, degrade".to_string(),
        _ => match body["retry_after_ms"].as_u64() {
            Some(ms) => format!("denied, retry in {:.1} s", ms as f64 / 1000.0),
            None => "denied".to_string(),
        },
    };
    let replayed = if body["replayed"] == true { " (replayed)" } else { "" };
    say!(
        "{head}{replayed}: {} on plan {}",
        body["subject"].as_str().unwrap_or(""),
        body["plan"].as_str().unwrap_or("")
    );
    if let Some(micros) = body["cost"]["amount_micros"].as_u64() {
        let by = match (body["cost"]["price"].as_str(), body["cost"]["explicit"] == true) {
            (Some(p), _) => format!(" (price {p})"),
            (None, true) => " (given by the caller)".to_string(),
            (None, false) => String::new(),
        };
        say!(
            "  cost: {} {}{by}",
            money(micros),
            body["cost"]["currency"].as_str().unwrap_or("")
        );
    }
    for r in body["reasons"].as_array().into_iter().flatten() {
        say!(
            "  reason: {} {}",
            r["limit"].as_str().unwrap_or("(plan)"),
            r["code"].as_str().unwrap_or("")
        );
    }
    print_counters(body);
    print_code(body)
}

fn print_subject(body: &Value) -> u8 {
    let how = if body["assigned"] == true {
        "assigned"
    } else {
        "default"
    };
    say!(
        "{}: plan {} ({how})",
        body["subject"].as_str().unwrap_or(""),
        body["plan"].as_str().unwrap_or("")
    );
    if let Some(o) = body["overrides"].as_object().filter(|o| !o.is_empty()) {
        for (limit, v) in o {
            say!("  override: {limit} max {}", v["max"]);
        }
    }
    print_counters(body);
    0
}

fn print_reload(body: &Value) -> u8 {
    say!(
        "reloaded: {} plan(s), {} limit(s), {} token(s)",
        body["plans"],
        body["limits"],
        body["tokens"]
    );
    if let Some(r) = body["restart_required"].as_array().filter(|r| !r.is_empty()) {
        say!(
            "  changed, takes effect after a restart: {}",
            r.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")
        );
    }
    0
}

fn print_health(body: &Value) -> u8 {
    say!("{}", body["status"].as_str().unwrap_or("ok"));
    0
}

fn decision_body(a: &DecisionArgs, with_key: bool) -> Value {
    let mut body = json!({"subject": a.subject});
    if let Some(e) = &a.event {
        body["event"] = json!(e);
    }
    if !a.attributes.is_empty() {
        body["attributes"] = a.attributes.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    }
    if !a.amounts.is_empty() {
        body["amounts"] = a.amounts.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    }
    if let (true, Some(k)) = (with_key, &a.key) {
        body["idempotency_key"] = json!(k);
    }
    body
}

/// Percent-encodes a subject for a URL path.
fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' | b'@' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Writes `bytes` to stdout; a reader that stops early (`| head`) is not an error.
fn write_stdout(bytes: &[u8]) -> ExitCode {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quotad: cannot write to stdout: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// What the manual page adds to `--help`: (section title, paragraphs).
const MAN_SECTIONS: &[(&str, &[&str])] = &[
    (
        "EXIT STATUS",
        &[
            "The daemon (serve): 0 clean stop, 1 runtime failure, 2 invalid configuration (the message \
             names the file, the key and the problem), 3 a listen address cannot be bound, 4 the WAL or \
             snapshot is damaged (it refuses to start and names the file and byte offset), 5 a WAL \
             write or fsync failed while running.",
            "wal verify and wal dump: 0 fine, 4 damaged, 6 a running daemon holds the directory.",
            "Client subcommands: 0 allowed or done, 1 denied (consume, check) or not ready (health), \
             2 bad arguments or configuration, 3 the request failed (unreachable, or an error answer, \
             printed to stderr).",
        ],
    ),
    (
        "FILES",
        &[
            "./quotad.toml, or the file given with --config: the configuration (every key is in the \
             README's configuration reference). Client subcommands take the daemon's address from it \
             unless --socket or --addr is given.",
            "storage.data_dir (default ./data): the write-ahead log in wal/, the snapshot \
             snapshot.redb, and LOCK, held while a daemon runs on it.",
        ],
    ),
    (
        "ENVIRONMENT",
        &[
            "QUOTAD_LOG: log level filter, e.g. debug (overrides log.level).",
            "QUOTAD_TOKEN: bearer token of the client subcommands when --token-file is not given.",
            "NO_COLOR: no colour codes in human-readable logs, even on a terminal.",
            "NOTIFY_SOCKET: set by systemd; quotad reports READY=1 on it once its state is recovered.",
        ],
    ),
    (
        "SIGNALS",
        &[
            "SIGHUP re-reads the configuration file. SIGINT and SIGTERM stop gracefully: stop \
           accepting, drain open requests, write a final snapshot.",
        ],
    ),
];

/// Text as roff: backslashes and hyphens escaped, no line starting with a
/// control character.
fn roff_text(s: &str) -> String {
    let t = s.replace('\\', "\\e").replace('-', "\\-");
    if t.starts_with('.') || t.starts_with('\'') {
        format!("\\&{t}")
    } else {
        t
    }
}

/// quotad(1), from the same definitions as `--help` (so the two cannot drift
/// apart) plus the sections above.
fn render_man(out: &mut Vec<u8>) -> std::io::Result<()> {
    use std::io::Write as _;
    let cmd = <Cli as clap::CommandFactory>::command().disable_help_subcommand(true);
    let page = clap_mangen::Man::new(cmd);
    page.render_title(out)?;
    page.render_name_section(out)?;
    page.render_synopsis_section(out)?;
    page.render_description_section(out)?;
    page.render_options_section(out)?;
    page.render_subcommands_section(out)?;
    for (title, paragraphs) in MAN_SECTIONS {
        writeln!(out, ".SH \"{title}\"")?;
        for p in *paragraphs {
            writeln!(out, ".PP\n{}", roff_text(p))?;
        }
    }
    page.render_version_section(out)
}

/// `quotad man [--dir DIR]`.
fn man(dir: Option<&Path>) -> ExitCode {
    let Some(dir) = dir else {
        let mut out = Vec::new();
        if let Err(e) = render_man(&mut out) {
            eprintln!("quotad: cannot render the manual page: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
        return write_stdout(&out);
    };
    // One page per subcommand (quotad-consume.1, …), then quotad.1 over the
    // generated one, with the sections it adds.
    let cmd = <Cli as clap::CommandFactory>::command();
    let written = std::fs::create_dir_all(dir)
        .and_then(|()| clap_mangen::generate_to(cmd, dir))
        .and_then(|()| {
            let mut out = Vec::new();
            render_man(&mut out)?;
            std::fs::write(dir.join("quotad.1"), out)
        });
    match written {
        Ok(()) => {
            say!("wrote the manual pages to {}", dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("quotad: cannot write the manual pages to {}: {e}", dir.display());
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// Entry point of the `quotad` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = cli.config.as_deref();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(cfg, cli.log_format),
        Command::Config {
            action: ConfigAction::Check { file },
        } => config_check(&file),
        Command::Wal {
            action: WalAction::Verify { dir, json },
        } => wal_verify(&dir, json),
        Command::Wal {
            action: WalAction::Dump { dir },
        } => wal_dump(&dir),
        Command::Consume(a) => client_call(
            &a.connect,
            cfg,
            Method::POST,
            "/v1/consume",
            Some(decision_body(&a, true)),
            print_decision,
        ),
        Command::Check(a) if a.key.is_some() => {
            // The API refuses keys on check; dropping it silently would let
            // a user believe the check was made idempotent.
            eprintln!(
                "quotad: check does not take --key: a check changes nothing, so it has no idempotency key \
                 (consume takes one)"
            );
            ExitCode::from(2) // as clap's own usage errors
        }
        Command::Check(a) => client_call(
            &a.connect,
            cfg,
            Method::POST,
            "/v1/check",
            Some(decision_body(&a, false)),
            print_decision,
        ),
        Command::Usage {
            action: Some(action), ..
        } => browse::usage(action, cfg),
        Command::Usage {
            subject: Some(subject),
            connect,
            ..
        } => client_call(
            &connect,
            cfg,
            Method::GET,
            &format!("/v1/subjects/{}", path_segment(&subject)),
            None,
            print_subject,
        ),
        Command::Usage { .. } => unreachable!("clap requires a subject or a subcommand"),
        Command::SetPlan { subject, plan, connect } => client_call(
            &connect,
            cfg,
            Method::PUT,
            &format!("/v1/subjects/{}", path_segment(&subject)),
            Some(json!({"plan": plan})),
            print_subject,
        ),
        Command::Reset {
            subject,
            limit,
            connect,
        } => client_call(
            &connect,
            cfg,
            Method::POST,
            &format!("/v1/subjects/{}/reset", path_segment(&subject)),
            Some(limit.map_or_else(|| json!({}), |l| json!({"limit": l}))),
            print_subject,
        ),
        Command::Credit {
            subject,
            limit,
            amount,
            connect,
        } => client_call(
            &connect,
            cfg,
            Method::POST,
            &format!("/v1/subjects/{}/credit", path_segment(&subject)),
            Some(json!({"limit": limit, "amount": amount})),
            print_subject,
        ),
        Command::Policy { action } => policy::run(action, cfg),
        Command::Subjects { action } => browse::subjects(action, cfg),
        Command::Events { action } => browse::events(action, cfg),
        Command::Reload { connect } => client_call(&connect, cfg, Method::POST, "/v1/admin/reload", None, print_reload),
        Command::Health { connect } => client_call(&connect, cfg, Method::GET, "/readyz", None, print_health),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "quotad", &mut out);
            write_stdout(&out)
        }
        Command::Man { dir } => man(dir.as_deref()),
        Command::Bench {
            connections,
            seconds,
            requests,
            warmup,
            subjects,
            subject_prefix,
            op,
            batch_size,
            pipeline,
            tokens,
            event,
            attributes,
            threads,
            reach,
            json,
        } => {
            use std::io::IsTerminal;
            let client = match client_for(&reach, cfg) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("quotad: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            if connections == 0 || subjects == 0 || !(1..=1000).contains(&batch_size) {
                eprintln!("quotad: --connections and --subjects must be at least 1, --batch-size 1 to 1000");
                return ExitCode::from(EXIT_CONFIG);
            }
            if !(1..=128).contains(&pipeline) {
                // The client writes a whole group before it reads: far
                // deeper, both sides' socket buffers could fill and stall.
                eprintln!("quotad: --pipeline must be 1 to 128");
                return ExitCode::from(EXIT_CONFIG);
            }
            if pipeline > 1 && !op.pipelines() {
                eprintln!("quotad: --pipeline works with --op consume, check and noop (a reserve's commit needs its answer first; a batch is already many decisions)");
                return ExitCode::from(EXIT_CONFIG);
            }
            let report = crate::loadgen::run(crate::loadgen::BenchConfig {
                target: client.target,
                connections,
                duration: requests.is_none().then(|| Duration::from_secs_f64(seconds.max(0.1))),
                requests,
                warmup: Duration::from_secs_f64(if requests.is_some() { 0.0 } else { warmup.max(0.0) }),
                subjects,
                subject_prefix,
                op,
                batch_size,
                pipeline,
                tokens,
                event,
                attributes: attributes.into_iter().collect(),
                token: client.token,
                threads,
                progress: std::io::stderr().is_terminal() && !json,
            });
            if json {
                say!("{}", serde_json::to_string(&report).expect("report serializes"));
            } else {
                say!("{report}");
            }
            ExitCode::from(if report.operations == 0 { EXIT_REQUEST } else { 0 })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::money;

    #[test]
    fn money_prints_micro_units_as_a_decimal() {
        assert_eq!(money(0), "0.00");
        assert_eq!(money(1_200), "0.0012");
        assert_eq!(money(500_000), "0.50");
        assert_eq!(money(1_000_000), "1.00");
        assert_eq!(money(12_345_678), "12.345678");
    }
}
