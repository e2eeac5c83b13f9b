//! The `wharf` binary: parse the command line, set up logging, run. The only place `anyhow` appears.

use anyhow::Context;
use clap::Parser;
use std::time::Duration;
use tokio_util::task::TaskTracker;
use wharf::cli::{Cli, Command};
use wharf::config::Config;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let config = Config::load(args.config.as_deref(), &args.overrides())?;
            wharf::telemetry::init(config.log_format);
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(serve(config))
        }
        Command::Config(args) => {
            let mut config = Config::load(args.config.as_deref(), &args.overrides())?;
            for reg in config.registries.values_mut() {
                for secret in [&mut reg.password, &mut reg.token] {
                    if secret.is_some() {
                        *secret = Some("<redacted>".into());
                    }
                }
            }
            print!("{}", toml::to_string(&config)?);
            Ok(())
        }
        Command::NodeSetup(args) => Ok(wharf::node_setup::run(&args)?),
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listen = config.listen;
    let grace = Duration::from_secs(config.shutdown_grace);
    let data_dir = config.data_dir.clone();
    let tasks = TaskTracker::new();
    let tasks2 = tasks.clone();
    let state = tokio::task::spawn_blocking(move || wharf::state::AppState::open(config, tasks2))
        .await?
        .with_context(|| format!("opening data directory {}", data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(data_dir = %data_dir.display(), "wharf {} listening on http://{addr}", env!("CARGO_PKG_VERSION"));
    wharf::server::run(listener, state, tasks, wharf::server::shutdown_signal(), grace).await?;
    Ok(())
}
