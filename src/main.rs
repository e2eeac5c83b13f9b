//! The `wharf` binary: parse the command line, set up logging, run. The only place `anyhow` appears.

use anyhow::Context;
use clap::Parser;
use std::time::Duration;
use tokio_util::task::TaskTracker;
use wharf::cli::{Cli, Command};
use wharf::config::Config;

fn main() -> anyhow::Result<()> {
    // glibc gives every thread that allocates its own arena; with a blocking pool moving 1 MiB buffers that
    // fragments into resident memory that grows with the number of clients. Two arenas are plenty here.
    // SAFETY: called before any other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let config = Config::load(args.config.as_deref(), &args.overrides())?;
            let _log = wharf::telemetry::init(config.log_format);
            tokio::runtime::Builder::new_multi_thread()
                .max_blocking_threads(64)
                .enable_all()
                .build()?
                .block_on(serve(config))
        }
        Command::Config(args) => {
            let config = Config::load(args.config.as_deref(), &args.overrides())?;
            print!("{}", toml::to_string(&config.redacted())?);
            Ok(())
        }
        Command::NodeSetup(args) => Ok(wharf::node_setup::run(&args)?),
        Command::Prefetch(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let summary = runtime.block_on(wharf::prefetch::run(&args))?;
            if !summary.failed.is_empty() {
                let failed: Vec<String> = summary.failed.iter().map(|(image, e)| format!("{image}: {e}")).collect();
                anyhow::bail!("{} of {} images failed:\n  {}", failed.len(), args.images.len(), failed.join("\n  "));
            }
            Ok(())
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    match wharf::server::raise_open_files_limit() {
        Ok((before, soft, hard)) => tracing::info!(before, soft, hard, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open files limit"),
    }
    let listen = config.listen;
    let grace = Duration::from_secs(config.shutdown_grace);
    let data_dir = config.data_dir.clone();
    let tasks = TaskTracker::new();
    let tasks2 = tasks.clone();
    let state = tokio::task::spawn_blocking(move || wharf::state::AppState::open(config, tasks2))
        .await?
        .with_context(|| format!("opening data directory {}", data_dir.display()))?;
    let listen_opts =
        wharf::server::Listen::from_settings(&state.config.server).context("loading the TLS certificate")?;
    let scheme = if listen_opts.tls.is_some() { "https" } else { "http" };
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    // Background work stops when shutdown begins; the tracker then waits for it.
    let stop = tokio_util::sync::CancellationToken::new();
    state.cache.spawn_gc_loop(stop.clone());
    let in_runtime = wharf::warm::spawn(state.clone(), &tasks, stop.clone());
    if let Some(admin) = wharf::admin::bind(&state).await.context("binding admin.listen")? {
        let (router, stopped) = (
            wharf::admin::router(state.clone(), in_runtime, tasks.clone(), stop.clone()),
            stop.clone().cancelled_owned(),
        );
        tokio::spawn(async move {
            if let Err(e) =
                wharf::server::serve_until(admin, router, &wharf::server::Listen::plain(), stopped, grace).await
            {
                tracing::error!(error = %e, "admin API listener failed");
            }
        });
    }
    if let Some(cluster) = state.cache.cluster().cloned() {
        let peer_listen = &state.config.cluster.peer_listen;
        let listener =
            tokio::net::TcpListener::bind(peer_listen).await.with_context(|| format!("binding {peer_listen}"))?;
        tracing::info!(id = cluster.id(), "peer API listening on http://{}", listener.local_addr()?);
        cluster.spawn_membership(stop.clone()).await;
        let router = wharf::api::peer::router(state.clone());
        let mut listen = wharf::server::Listen::plain();
        // Every node may stream several blobs from this one at once.
        listen.max_connections = 1024;
        let stopped = stop.clone().cancelled_owned();
        cluster.set_listening(true);
        tokio::spawn(async move {
            if let Err(e) = wharf::server::serve_until(listener, router, &listen, stopped, grace).await {
                tracing::error!(error = %e, "peer API listener failed");
            }
            cluster.set_listening(false);
        });
    }
    tracing::info!(data_dir = %data_dir.display(), "wharf {} listening on {scheme}://{addr}", env!("CARGO_PKG_VERSION"));
    let shutdown = async move {
        wharf::server::shutdown_signal().await;
        stop.cancel();
    };
    wharf::server::run(listener, listen_opts, state, tasks, shutdown, grace).await?;
    Ok(())
}
