//! Assembles the Pingora server: the proxy listeners, the admin listener and
//! the background services (reload, health checks, Redis probe).

use crate::admin::AdminApp;
use crate::analytics::{Analytics, Flusher};
use crate::auth::jwks::JwksRefresher;
use crate::auth::store::{Revocations, TokenStore};
use crate::config::{self, Config};
use crate::credentials::{Credentials, CredentialsRefresher};
use crate::echo::EchoApp;
use crate::edge::drain::{Drain, Signals};
use crate::edge::Edge;
use crate::proxy::Proxy;
use crate::ratelimit::Limiter;
use crate::redis_probe::RedisProbe;
use crate::reload::Reloader;
use crate::state::{Health, State};
use crate::upstream::Maintenance;
use crate::{logging, metrics};
use anyhow::{anyhow, bail, Context};
use arc_swap::ArcSwap;
use pingora::apps::http_app::HttpServer;
use pingora::proxy::HttpProxy;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;

pub struct ServeOptions<'a> {
    pub config_path: &'a Path,
    pub upgrade: bool,
    pub daemon: bool,
}

fn server_conf(config: &Config, daemon: bool) -> ServerConf {
    // The drain (edge::drain) takes the grace period before idle connections
    // close; Pingora's own period, one second longer, lets the answers in
    // flight at that moment finish.
    let grace = config.server.grace_period.as_secs_f64().ceil() as u64 + 1;
    ServerConf {
        daemon,
        threads: config.server.threads,
        pid_file: config.server.pid_file.clone(),
        upgrade_sock: config.server.upgrade_sock.clone(),
        grace_period_seconds: Some(grace),
        graceful_shutdown_timeout_seconds: Some(grace),
        upstream_keepalive_pool_size: config.server.upstream_pool_size,
        error_log: config.server.error_log.clone(),
        // A new process started with --upgrade waits this many seconds for
        // the old one to be sent SIGQUIT.
        upgrade_sock_connect_accept_max_retries: Some(30),
        work_stealing: config.server.work_stealing,
        ..ServerConf::default()
    }
}

/// Pingora aborts on a port it cannot bind; say which key and why instead.
fn check_ports_free(config: &Config) -> anyhow::Result<()> {
    let listeners = config
        .server
        .listen
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("server.listen[{i}]"), a.as_str()))
        .chain(std::iter::once((
            "admin.listen".to_string(),
            config.admin.listen.as_str(),
        )));
    for (key, addr) in listeners {
        TcpListener::bind(addr).map_err(|e| anyhow!("{key}: cannot listen on {addr}: {e}"))?;
    }
    Ok(())
}

pub fn serve(opts: ServeOptions<'_>) -> anyhow::Result<()> {
    let config = config::load(opts.config_path).map_err(|e| {
        anyhow!(
            "invalid config {}:\n  {}",
            opts.config_path.display(),
            config::join(&e.problems, "\n  ")
        )
    })?;
    logging::init(&config.log);
    metrics::init();
    if !opts.upgrade {
        check_ports_free(&config)?;
    }
    ignore_sighup_until_reloader_runs();
    let conf = server_conf(&config, opts.daemon);
    let grace_period = config.server.grace_period;
    let listen = config.server.listen.clone();
    let admin_listen = config.admin.listen.clone();
    let state = State::build(config, None).map_err(|p| anyhow!(config::join(&p, "\n")))?;
    for warning in state.warnings() {
        log::warn!("{warning}");
    }
    let state = Arc::new(ArcSwap::from_pointee(state));
    let health = Arc::new(Health::default());

    let opt = Opt {
        upgrade: opts.upgrade,
        daemon: opts.daemon,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let tokens = Arc::new(TokenStore::default());
    let analytics = Arc::new(Analytics::default());
    let credentials = Arc::new(Credentials::default());
    let limiter = Arc::new(Limiter::default());
    let drain = Drain::new(grace_period);
    let proxy = Proxy {
        drain: drain.clone(),
        state: state.clone(),
        health: health.clone(),
        limiter: limiter.clone(),
        tokens: tokens.clone(),
        analytics: analytics.clone(),
        credentials: credentials.clone(),
    };
    let mut http = HttpProxy::new(proxy, server.configuration.clone());
    http.handle_init_modules();
    let edge = Edge {
        proxy: Arc::new(http),
        state: state.clone(),
        drain: drain.clone(),
    };
    let mut proxy_service = Service::new("tollgate proxy".to_string(), edge);
    for addr in &listen {
        proxy_service.add_tcp(addr);
    }
    server.add_service(proxy_service);

    let mut admin = Service::new(
        "tollgate admin".to_string(),
        HttpServer::new_app(AdminApp {
            state: state.clone(),
            limiter: limiter.clone(),
        }),
    );
    admin.threads = Some(1);
    admin.add_tcp(&admin_listen);
    server.add_service(admin);

    let path = opts
        .config_path
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", opts.config_path.display()))?;
    server.add_service(background_service(
        "tollgate reload",
        Reloader {
            path,
            state: state.clone(),
        },
    ));
    server.add_service(background_service(
        "tollgate upstream maintenance",
        Maintenance {
            state: state.clone(),
        },
    ));
    server.add_service(background_service(
        "tollgate analytics",
        Flusher {
            state: state.clone(),
            analytics,
            limiter: limiter.clone(),
            drain: drain.clone(),
        },
    ));
    server.add_service(background_service(
        "tollgate upstream credentials",
        CredentialsRefresher::new(state.clone(), credentials),
    ));
    server.add_service(background_service(
        "tollgate jwks",
        JwksRefresher {
            state: state.clone(),
        },
    ));
    server.add_service(background_service(
        "tollgate revocations",
        Revocations {
            state: state.clone(),
            store: tokens,
        },
    ));
    server.add_service(background_service(
        "tollgate redis probe",
        RedisProbe { state, health },
    ));
    log::info!(
        "tollgate {} serving on {} (admin on {admin_listen})",
        env!("CARGO_PKG_VERSION"),
        listen.join(", ")
    );
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals { drain }),
    });
    Ok(())
}

/// SIGHUP's default action kills the process. Until the reload service takes
/// it over, a SIGHUP (say, from `systemctl reload` during start) is ignored.
fn ignore_sighup_until_reloader_runs() {
    // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
}

pub fn echo(listen: &str, threads: usize) -> anyhow::Result<()> {
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    TcpListener::bind(listen).map_err(|e| anyhow!("cannot listen on {listen}: {e}"))?;
    let conf = ServerConf {
        threads,
        pid_file: format!("/tmp/tollgate-echo-{}.pid", std::process::id()),
        upgrade_sock: format!("/tmp/tollgate-echo-{}.sock", std::process::id()),
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut service = Service::new("tollgate echo".to_string(), HttpServer::new_app(EchoApp));
    service.add_tcp(listen);
    server.add_service(service);
    eprintln!("tollgate echo listening on {listen}");
    server.run_forever()
}
