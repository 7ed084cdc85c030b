//! The `sandpipe` command line.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// A WebAssembly-sandboxed connector engine.
#[derive(Parser)]
#[command(name = "sandpipe", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Process messages until SIGINT/SIGTERM (or, with --once, until drained).
    Run {
        /// The configuration file.
        #[arg(short, long)]
        config: PathBuf,
        /// Drain the messages that are there, then exit.
        #[arg(long)]
        once: bool,
    },
    /// Validate the configuration and every component; exit 1 on any problem.
    Check {
        /// The configuration file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// List the plugins: name, version, MIME types, imports, limits.
    Plugins {
        /// The configuration file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Put a message file into the configured listener.
    Send {
        /// The configuration file.
        #[arg(short, long)]
        config: PathBuf,
        /// The message (a JSON file).
        message: PathBuf,
    },
    /// Compile every plugin into the code cache ahead of deployment.
    Compile {
        /// The configuration file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Run one plugin on one message with in-memory capabilities and print
    /// what it did (exit 0: done or skip; 1: it failed; 2: usage error).
    Exec(Box<sandpipe::exec::ExecArgs>),
    /// Run a plugin build against a recording made by `exec --record` and
    /// show any difference (exit 0: none; 1: some; 2: usage error).
    Replay(sandpipe::exec::ReplayArgs),
    /// Sync a source into its sink now (exit 0: the job completed; 1: it
    /// failed or was canceled). Ctrl-C cancels it after the page in hand.
    Sync {
        /// The configuration file.
        #[arg(short, long)]
        config: PathBuf,
        /// The source (its name under `sources:`).
        source: String,
        /// A full sync: every document, deleting what the source no
        /// longer has (the default).
        #[arg(long, conflicts_with = "incremental")]
        full: bool,
        /// An incremental sync: what changed since the last sync.
        #[arg(long)]
        incremental: bool,
    },
    /// List the sources: component, sink, documents and their last jobs.
    Sources {
        /// The configuration file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// List the services: component, transports, routes, and whether the
    /// component connects (it is started once, `on-connect`, `on-close`).
    Services {
        /// The configuration file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Make something new: `sandpipe new plugin NAME --lang rust|python|js`.
    #[command(subcommand)]
    New(New),
}

#[derive(Subcommand)]
enum New {
    /// A plugin project that builds and passes its own test: the plugin,
    /// build.sh, test.sh (runs it in the sandbox with `sandpipe exec`), a
    /// README and the WIT package (Rust: plus the guest SDK, vendored).
    Plugin {
        /// The plugin's name (lowercase letters, digits and dashes).
        name: String,
        /// Its language.
        #[arg(long, value_enum)]
        lang: sandpipe::scaffold::Lang,
        /// Where to create it (default: ./NAME). Must not exist or be empty.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // exec and replay print everything themselves.
    let quiet = matches!(cli.command, Command::Exec(_) | Command::Replay(_));
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("SANDPIPE_LOG").unwrap_or_else(|_| {
                EnvFilter::new(if quiet { "off" } else { "warn,sandpipe=info" })
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            // The sandbox cannot go on safely: 75 (EX_TEMPFAIL) asks the
            // supervisor for a restart.
            if e.downcast_ref::<sandpipe::sandbox::Fatal>().is_some() {
                // At once: not after the runtime has waited for whatever
                // blocking work is still running.
                std::process::exit(75);
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    let mut stdout = std::io::stdout();
    match command {
        Command::Run { config, once } => {
            let summary =
                sandpipe::app::run(&config, once, sandpipe::app::shutdown_signal()).await?;
            println!("{summary}");
        }
        Command::Check { config } => {
            if !sandpipe::app::check(&config, &mut stdout).await? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Plugins { config } => sandpipe::app::plugins(&config, &mut stdout).await?,
        Command::Send { config, message } => {
            let at = sandpipe::app::send(&config, &message).await?;
            println!("sent {} to {at}", message.display());
        }
        Command::Compile { config } => sandpipe::app::compile(&config, &mut stdout)?,
        Command::Sync {
            config,
            source,
            full: _,
            incremental,
        } => {
            let kind = if incremental {
                sandpipe::sync::JobKind::Incremental
            } else {
                sandpipe::sync::JobKind::Full
            };
            let job = sandpipe::app::sync(
                &config,
                &source,
                kind,
                sandpipe::app::shutdown_signal(),
                &mut std::io::stderr(),
            )
            .await?;
            writeln!(stdout, "{}", sandpipe::app::job_line(&job))?;
            if job.state != sandpipe::sync::JobState::Completed {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Sources { config } => sandpipe::app::sources(&config, &mut stdout).await?,
        Command::Services { config } => sandpipe::app::services(&config, &mut stdout).await?,
        Command::Exec(args) => return Ok(sandpipe::exec::exec(*args).await),
        Command::Replay(args) => return Ok(sandpipe::exec::replay(args).await),
        Command::New(New::Plugin { name, lang, dir }) => {
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            let files = sandpipe::scaffold::new_plugin(&name, lang, &dir)?;
            let how = match lang {
                sandpipe::scaffold::Lang::Rust => "cargo test && ./test.sh",
                _ => "./test.sh",
            };
            writeln!(
                stdout,
                "created {} ({} files): cd {} && {how}",
                dir.display(),
                files.len(),
                dir.display()
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
