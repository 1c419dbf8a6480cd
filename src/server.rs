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
use crate::edge::stop::{self, Stop};
use crate::edge::{Admission, Edge};
use crate::proxy::Proxy;
use crate::ratelimit::concurrency::{Concurrency, Renewer};
use crate::ratelimit::Limiter;
use crate::redis_probe::RedisProbe;
use crate::reload::Reloader;
use crate::state::{Health, SharedState, State};
use crate::upstream::Maintenance;
use crate::{logging, metrics};
use anyhow::{anyhow, bail, Context};
use arc_swap::ArcSwap;
use pingora::apps::http_app::HttpServer;
use pingora::apps::HttpServerOptions;
use pingora::protocols::http::v2::server::default_h2_options;
use pingora::proxy::HttpProxy;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use pingora::services::ServiceWithDependents;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct ServeOptions<'a> {
    pub config_path: &'a Path,
    pub upgrade: bool,
    pub daemon: bool,
}

fn server_conf(config: &Config, daemon: bool) -> ServerConf {
    // The drain (edge::drain) takes the grace period before idle connections
    // close and the edge one more second for the answers in flight; the
    // process exits as soon as that is done (edge::stop). Pingora's own
    // period, as long, is only the upper bound.
    let grace = config.server.grace_period.as_secs_f64().ceil() as u64 + 1;
    ServerConf {
        daemon,
        threads: config.server.threads,
        pid_file: config
            .server
            .pid_file
            .clone()
            .unwrap_or_else(|| crate::pid_file::DAEMON_DEFAULT.into()),
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

/// Every address tollgate listens on, with its config key.
fn listeners(config: &Config) -> Vec<(String, String)> {
    let plain = config
        .server
        .listen
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("server.listen[{i}]"), a.clone()));
    let tls = config
        .server
        .tls
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("server.tls[{i}].listen"), t.listen.clone()));
    plain.chain(tls).collect()
}

/// Pingora aborts on a port it cannot bind; say which key and why instead.
fn check_ports_free(config: &Config) -> anyhow::Result<()> {
    let admin = ("admin.listen".to_string(), config.admin.listen.clone());
    for (key, addr) in listeners(config).into_iter().chain(std::iter::once(admin)) {
        TcpListener::bind(&addr).map_err(|e| anyhow!("{key}: cannot listen on {addr}: {e}"))?;
    }
    Ok(())
}

/// The long-lived parts every config shares (see ARCHITECTURE.md).
struct Shared {
    state: SharedState,
    health: Arc<Health>,
    limiter: Arc<Limiter>,
    concurrency: Arc<Concurrency>,
    tokens: Arc<TokenStore>,
    analytics: Arc<Analytics>,
    credentials: Arc<Credentials>,
    drain: Arc<Drain>,
    stop: Arc<Stop>,
}

/// Adds services that stop with tollgate's [`Stop`].
struct Stopping<'a> {
    server: &'a mut Server,
    stop: &'a Arc<Stop>,
}

impl Stopping<'_> {
    fn add_service(&mut self, service: impl ServiceWithDependents + 'static) {
        self.server.add_service(self.stop.wrap(service));
    }
}

/// The proxy: the edge in front of Pingora's HTTP handling, on every
/// plain and HTTPS listener (TLS is terminated by the edge itself).
fn proxy_service(server: &Server, config: &Config, shared: &Shared) -> Service<Edge> {
    let proxy = Proxy {
        drain: shared.drain.clone(),
        state: shared.state.clone(),
        health: shared.health.clone(),
        limiter: shared.limiter.clone(),
        concurrency: shared.concurrency.clone(),
        tokens: shared.tokens.clone(),
        analytics: shared.analytics.clone(),
        credentials: shared.credentials.clone(),
    };
    let mut http = HttpProxy::new(proxy, server.configuration.clone());
    http.handle_init_modules();
    // The edge decides which connections are HTTP/2 (ALPN, or the h2c
    // preface when server.h2c is on); Pingora then needs h2c allowed.
    let mut options = HttpServerOptions::default();
    options.h2c = true;
    http.server_options = Some(options);
    let mut h2 = default_h2_options();
    h2.max_header_list_size(u32::try_from(config.server.max_header_bytes).unwrap_or(u32::MAX));
    http.h2_options = Some(h2);
    let edge = Edge {
        proxy: Arc::new(http),
        state: shared.state.clone(),
        drain: shared.drain.clone(),
    };
    let mut service = Service::new("tollgate proxy".to_string(), edge);
    service.set_connection_filter(Arc::new(Admission {
        state: shared.state.clone(),
        drain: shared.drain.clone(),
    }));
    for (_, addr) in listeners(config) {
        service.add_tcp(&addr);
    }
    service
}

fn add_background_services(server: &mut Server, shared: Shared, config_path: PathBuf) {
    let state = &shared.state;
    let stop = shared.stop.clone();
    let mut server = Stopping {
        server,
        stop: &stop,
    };
    server.add_service(background_service(
        "tollgate config watch",
        crate::watch::ConfigWatcher {
            path: config_path.clone(),
            state: state.clone(),
        },
    ));
    server.add_service(background_service(
        "tollgate reload",
        Reloader {
            path: config_path,
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
        "tollgate concurrency",
        Renewer {
            state: state.clone(),
            concurrency: shared.concurrency,
            drain: shared.drain.clone(),
        },
    ));
    server.add_service(background_service(
        "tollgate analytics",
        Flusher {
            state: state.clone(),
            analytics: shared.analytics,
            limiter: shared.limiter,
            drain: shared.drain,
        },
    ));
    server.add_service(background_service(
        "tollgate upstream credentials",
        CredentialsRefresher::new(state.clone(), shared.credentials),
    ));
    let current = state.clone();
    server.add_service(background_service(
        "tollgate jwks",
        JwksRefresher {
            current: Box::new(move || current.load().jwks()),
        },
    ));
    let current = state.clone();
    server.add_service(background_service(
        "tollgate revocations",
        Revocations {
            follow: Box::new(move || current.load().revocations_redis()),
            store: shared.tokens,
        },
    ));
    server.add_service(background_service(
        "tollgate redis probe",
        RedisProbe {
            state: state.clone(),
            health: shared.health,
        },
    ));
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
    // Absolute, but its symlinks unresolved: every reload reads the path as
    // given, so a symlink swapped since start (a Kubernetes ConfigMap's
    // `..data`) is followed to its new target.
    let config_path = std::path::absolute(opts.config_path)
        .with_context(|| format!("cannot resolve {}", opts.config_path.display()))?;
    if opts.upgrade {
        // Left by an upgrade whose old process did not see it.
        let _ = std::fs::remove_file(stop::serving_marker(&config.server.upgrade_sock));
    }
    let opt = Opt {
        upgrade: opts.upgrade,
        daemon: opts.daemon,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, server_conf(&config, opts.daemon));
    server.bootstrap();
    let drain = Drain::new(config.server.grace_period);
    let stop = Stop::new();
    let phases = server.watch_execution_phase();
    let state = State::build(config.clone(), None).map_err(|p| anyhow!(config::join(&p, "\n")))?;
    for warning in state.warnings() {
        log::warn!("{warning}");
    }
    let shared = Shared {
        state: Arc::new(ArcSwap::from_pointee(state)),
        health: Arc::new(Health::default()),
        limiter: Arc::new(Limiter::default()),
        concurrency: Arc::new(Concurrency::default()),
        tokens: Arc::new(TokenStore::default()),
        analytics: Arc::new(Analytics::default()),
        credentials: Arc::new(Credentials::default()),
        drain: drain.clone(),
        stop: stop.clone(),
    };
    let proxy = proxy_service(&server, &config, &shared);
    // A new process tells the old one when it accepts (see edge::stop).
    let marker = stop::serving_marker(&config.server.upgrade_sock);
    server.add_service(stop.wrap_announcing(proxy, opts.upgrade.then_some(marker)));
    let mut admin = Service::new(
        "tollgate admin".to_string(),
        HttpServer::new_app(AdminApp {
            state: shared.state.clone(),
            limiter: shared.limiter.clone(),
        }),
    );
    admin.threads = Some(1);
    admin.add_tcp(&config.admin.listen);
    server.add_service(stop.wrap(admin));
    add_background_services(&mut server, shared, config_path);
    // Now that this process holds the listeners (after a hand-over too)
    // and nothing but serving is left to fail.
    let pid_path =
        crate::pid_file::claim(config.server.pid_file.as_deref(), opts.daemon, opts.upgrade)?;
    stop.remove_at_exit(pid_path.clone());
    let addrs: Vec<String> = listeners(&config).into_iter().map(|(_, a)| a).collect();
    log::info!(
        "tollgate {} serving on {} (admin on {})",
        env!("CARGO_PKG_VERSION"),
        addrs.join(", "),
        config.admin.listen
    );
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals {
            drain,
            stop,
            phases: std::sync::Mutex::new(Some(phases)),
            upgrade_sock: config.server.upgrade_sock.clone(),
        }),
    });
    // After a daemon's fork this is the daemon's pid, the one Pingora wrote.
    if let Some(path) = pid_path {
        crate::pid_file::remove_if_ours(&path, std::process::id());
    }
    Ok(())
}

/// Transparent huge pages off for this process (Linux), before its threads
/// start. With them, the allocator's regions were backed by 2 MiB pages
/// that one live object keeps resident: RSS at rest was 31 MB instead of
/// 18, memory per limited key about 60 bytes higher, and freed memory came
/// back less (README, "Memory per key"); CPU per request was unchanged in
/// an A/B run. mimalloc is also built not to ask for them (`no_thp`); this
/// covers systems where the kernel gives them unasked
/// (`/sys/kernel/mm/transparent_hugepage/enabled` = `always`).
pub fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        // Only memory is at stake; the proxy runs the same.
        eprintln!("tollgate: cannot turn transparent huge pages off ({e})");
    }
}

/// SIGHUP's default action kills the process. Until the reload service takes
/// it over, a SIGHUP (say, from `systemctl reload` during start) is ignored.
#[allow(unsafe_code)] // one of two unsafe places in the crate (the other: edge::linger)
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
