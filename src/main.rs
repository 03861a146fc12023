//! The `pgferry` binary: parse the command line, load the config, start logging, hand over to
//! the library, and turn the outcome into an exit code.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use pgferry::config::redact;

/// `println!` through [`write_out`].
macro_rules! say {
    ($($arg:tt)*) => { write_out(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `print!` through [`write_out`].
macro_rules! say_raw {
    ($($arg:tt)*) => { write_out(format_args!($($arg)*)) };
}

/// Change-data-capture sidecar: PostgreSQL logical replication -> Kafka.
#[derive(Parser)]
#[command(name = "pgferry", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every role the config enables: capture, apply, or both.
    Run {
        /// Path to the YAML config.
        #[arg(long, short, env = "PGFERRY_CONFIG")]
        config: PathBuf,
    },
    /// Validate the config and check every server it names; exit 0 only when ready.
    Check {
        /// Path to the YAML config.
        #[arg(long, short, env = "PGFERRY_CONFIG")]
        config: PathBuf,
    },
    /// Print the change topics as messages arrive (topic, key, value per line).
    Tail {
        /// Path to the YAML config.
        #[arg(long, short, env = "PGFERRY_CONFIG")]
        config: PathBuf,
        /// Only topics whose name contains this text.
        #[arg(long)]
        filter: Option<String>,
        /// Exit after this many messages.
        #[arg(long)]
        max_messages: Option<u64>,
        /// Exit after this many seconds without a message.
        #[arg(long)]
        idle_exit_secs: Option<u64>,
    },
    /// Print the SQL that creates least-privilege roles for the config's connections (run it
    /// as a superuser: `pgferry roles -c f.yaml | psql`); `check` verifies the result.
    Roles {
        /// Path to the YAML config.
        #[arg(long, short, env = "PGFERRY_CONFIG")]
        config: PathBuf,
    },
    /// Re-snapshot tables while streaming goes on: queues a request the running capture picks
    /// up (the same as `INSERT INTO pgferry.snapshot_requests (table_name) VALUES (...)`).
    Snapshot {
        /// Path to the YAML config.
        #[arg(long, short, env = "PGFERRY_CONFIG")]
        config: PathBuf,
        /// A published table, `schema.table`; repeat for several.
        #[arg(long, required = true)]
        table: Vec<String>,
    },
    /// Print the slot, lag, last applied position per node, and recent conflicts.
    Status {
        /// Path to the YAML config.
        #[arg(long, short, env = "PGFERRY_CONFIG")]
        config: PathBuf,
    },
    /// Seed this (empty) multi-master node from a running peer's consistent snapshot, with
    /// row versions and starting positions, so that it can join the cluster; then start it and
    /// add its node_id to every peer's apply.nodes.
    Join {
        /// Path to this node's YAML config (multi_master, source.snapshot: never).
        #[arg(long, short, env = "PGFERRY_CONFIG")]
        config: PathBuf,
        /// The peer's node_id (one of apply.nodes).
        #[arg(long)]
        peer: String,
        /// Connection URL of the peer's database (a user that may create a replication slot).
        #[arg(long, env = "PGFERRY_PEER_URL")]
        peer_url: String,
    },
    /// Fill this replica's (empty) target tables straight from the source database's snapshot,
    /// in parallel, and record where the node stream takes over; then start the applier.
    /// Capture must run (or its slot exist) first.
    Seed {
        /// Path to the replica's YAML config (apply.mode: replica).
        #[arg(long, short, env = "PGFERRY_CONFIG")]
        config: PathBuf,
        /// The source node (one of apply.nodes); default: the only one.
        #[arg(long)]
        node: Option<String>,
        /// The source database (a role that may create a replication slot and read the
        /// published tables, such as capture's); default: source.url of this config's own node.
        #[arg(long, env = "PGFERRY_SOURCE_URL")]
        source_url: Option<String>,
        /// Capture's slot on the source; default: pgferry_<node>.
        #[arg(long)]
        slot: Option<String>,
        /// Capture's publication; default: pgferry.
        #[arg(long)]
        publication: Option<String>,
        /// Sessions that copy in parallel (on each side), 1-16.
        #[arg(long, default_value_t = 2)]
        readers: usize,
    },
    /// Inspect, replay or resolve the changes apply dead-lettered (each target's
    /// `pgferry.dead_letters`).
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Exit 0 when a running pgferry answers its health endpoint (for container HEALTHCHECKs).
    Healthcheck {
        /// Address of the running pgferry's metrics endpoint.
        #[arg(long, default_value = "127.0.0.1:9187")]
        addr: String,
        /// Endpoint to ask: /healthz (liveness) or /readyz (readiness).
        #[arg(long, default_value = "/healthz")]
        path: String,
    },
}

#[derive(Subcommand)]
enum DeadLetterAction {
    /// List unresolved dead letters per target.
    List {
        /// Path to the YAML config.
        #[arg(long, short, env = "PGFERRY_CONFIG")]
        config: PathBuf,
        /// Resolved letters too.
        #[arg(long)]
        all: bool,
        /// Only this table (`schema.table`).
        #[arg(long)]
        table: Option<String>,
    },
    /// Re-apply dead letters after fixing their cause; each that applies is marked resolved.
    Replay {
        /// Path to the YAML config.
        #[arg(long, short, env = "PGFERRY_CONFIG")]
        config: PathBuf,
        #[command(flatten)]
        which: Which,
    },
    /// Mark dead letters handled without applying them (repaired by hand, table re-copied).
    Resolve {
        /// Path to the YAML config.
        #[arg(long, short, env = "PGFERRY_CONFIG")]
        config: PathBuf,
        #[command(flatten)]
        which: Which,
        /// Why, recorded with the letters.
        #[arg(long, default_value = "resolved by an operator")]
        note: String,
    },
}

/// Which letters `replay` and `resolve` act on: one of them is required.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct Which {
    /// These letter ids (repeat the flag for several).
    #[arg(long)]
    id: Vec<i64>,
    /// Every unresolved letter of this table (`schema.table`).
    #[arg(long)]
    table: Option<String>,
    /// Every unresolved letter.
    #[arg(long)]
    all: bool,
}

impl Which {
    fn selection(self) -> pgferry::apply::dead_letters::Selection {
        pgferry::apply::dead_letters::Selection {
            ids: self.id,
            table: self.table,
            include_resolved: false,
        }
    }
}

fn load(path: &std::path::Path) -> anyhow::Result<pgferry::config::Config> {
    pgferry::config::load(path).with_context(|| format!("invalid config {}", path.display()))
}

async fn try_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { config } => {
            let config = load(&config)?;
            pgferry::telemetry::init_logging(&config.log);
            pgferry::app::run(config).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config } => {
            let config = load(&config)?;
            // librdkafka's own warnings (a failed SASL handshake, a TLS error) explain the
            // problems check reports; they go to stderr, redacted like every log line.
            pgferry::telemetry::init_logging(&config.log);
            let problems = pgferry::check::run(&config).await;
            for p in &problems {
                say!("{}", redact(&p.to_string()));
            }
            if problems.is_empty() {
                say!("ready: config valid, source and broker checks passed");
                Ok(ExitCode::SUCCESS)
            } else {
                say!("{} problem(s) found", problems.len());
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Join {
            config,
            peer,
            peer_url,
        } => {
            let config = load(&config)?;
            pgferry::telemetry::init_logging(&config.log);
            let joined = pgferry::apply::join::join(&config, &peer, &peer_url).await?;
            for (table, rows) in &joined.tables {
                say!("copied {table}: {rows} rows");
            }
            say!(
                "copied {} versions; {peer}'s stream starts at offset {} after LSN {}",
                joined.versions,
                joined.peer_offset,
                joined.consistent
            );
            say!(
                "next: start this node's pgferry, then add {:?} to apply.nodes on every peer and \
                 restart them one by one",
                config.node_id
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Seed {
            config,
            node,
            source_url,
            slot,
            publication,
            readers,
        } => {
            let config = load(&config)?;
            pgferry::telemetry::init_logging(&config.log);
            let options = pgferry::apply::seed::SeedOptions {
                node,
                source_url,
                slot,
                publication,
                readers,
            };
            for seeded in pgferry::apply::seed::seed(&config, &options).await? {
                if !seeded.emptied.is_empty() {
                    say!(
                        "{}: emptied what an unfinished seed had copied into {}",
                        seeded.target,
                        seeded.emptied.join(", ")
                    );
                }
                for (table, rows) in &seeded.tables {
                    say!("{}: copied {table}: {rows} rows", seeded.target);
                }
                say!(
                    "{}: the applier starts at offset {} and applies what committed from LSN {} on",
                    seeded.target,
                    seeded.offset,
                    seeded.consistent
                );
            }
            say!("next: start the applier");
            Ok(ExitCode::SUCCESS)
        }
        Command::Roles { config } => {
            let config = load(&config)?;
            say_raw!("{}", redact(&pgferry::roles::script(&config)));
            Ok(ExitCode::SUCCESS)
        }
        Command::Snapshot { config, table } => {
            let config = load(&config)?;
            let source = config
                .source
                .as_ref()
                .context("the config has no source: snapshots are taken by capture")?;
            for name in pgferry::source::snapshot::request(source, &table).await? {
                say!(
                    "requested a snapshot of {name}; the running capture starts it within {:?} \
                     (source.snapshot_poll_interval); `pgferry status` shows its progress",
                    source.snapshot_poll_interval
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { config } => {
            let config = load(&config)?;
            say_raw!("{}", redact(&pgferry::status::report(&config).await));
            Ok(ExitCode::SUCCESS)
        }
        Command::DeadLetters { action } => {
            use pgferry::apply::dead_letters;
            match action {
                DeadLetterAction::List { config, all, table } => {
                    let config = load(&config)?;
                    let selection = dead_letters::Selection {
                        ids: Vec::new(),
                        table,
                        include_resolved: all,
                    };
                    say_raw!(
                        "{}",
                        redact(&dead_letters::list(&config, &selection).await?)
                    );
                    Ok(ExitCode::SUCCESS)
                }
                DeadLetterAction::Replay { config, which } => {
                    let config = load(&config)?;
                    let (text, failed) = dead_letters::replay(&config, &which.selection()).await?;
                    say_raw!("{}", redact(&text));
                    // Exit 1 when a letter could not be replayed, so scripts notice.
                    Ok(if failed > 0 {
                        ExitCode::FAILURE
                    } else {
                        ExitCode::SUCCESS
                    })
                }
                DeadLetterAction::Resolve {
                    config,
                    which,
                    note,
                } => {
                    let config = load(&config)?;
                    let n = dead_letters::resolve(&config, &which.selection(), &note).await?;
                    say!("{n} dead letter(s) resolved");
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
        Command::Healthcheck { addr, path } => {
            match pgferry::telemetry::http::probe(&addr, &path, Duration::from_secs(3)) {
                Ok(200) => Ok(ExitCode::SUCCESS),
                Ok(status) => {
                    eprintln!("{addr}{path} answered {status}");
                    Ok(ExitCode::FAILURE)
                }
                Err(e) => {
                    eprintln!("{addr}{path}: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Tail {
            config,
            filter,
            max_messages,
            idle_exit_secs,
        } => {
            let config = load(&config)?;
            let options = pgferry::tail::TailOptions {
                filter,
                max_messages,
                idle_exit: idle_exit_secs.map(Duration::from_secs),
            };
            tokio::task::spawn_blocking(move || pgferry::tail::run(&config.kafka, &options))
                .await??;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Writes to standard output. A reader that went away (`pgferry status | head`) ends the
/// command quietly: `println!` panics on a closed pipe.
fn write_out(text: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(text).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to standard output: {e}");
        std::process::exit(2);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(try_main(cli)) {
        Ok(code) => code,
        Err(e) => {
            let chain = pgferry::error::ErrorChain(e.as_ref()).to_string();
            eprintln!("error: {}", redact(&chain));
            ExitCode::from(2)
        }
    }
}
