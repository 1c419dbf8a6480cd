//! What can be checked of the Dockerfile, docker-compose.yml, the Grafana
//! dashboard and the systemd unit without a Docker engine or systemd.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

mod common;
use common::*;
use std::collections::BTreeSet;
use std::path::Path;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .unwrap()
        .trim_matches(|c| c == '"' || c == ']')
        .parse()
        .unwrap()
}

fn yaml(path: &str) -> serde_yaml::Value {
    serde_yaml::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn dockerfile_matches_the_repository_and_the_spec() {
    let dockerfile = read("Dockerfile");
    let mut copies = 0;
    for line in dockerfile.lines().map(str::trim) {
        if let Some(args) = line.strip_prefix("COPY ") {
            if args.starts_with("--from") {
                continue;
            }
            let parts: Vec<&str> = args.split_whitespace().collect();
            for src in &parts[..parts.len() - 1] {
                assert!(
                    Path::new(ROOT).join(src).exists(),
                    "Dockerfile copies missing {src}"
                );
                copies += 1;
            }
        }
    }
    assert!(copies >= 4);
    let config = yaml("conf/tollgate.yaml");
    let listen = config["server"]["listen"][0].as_str().unwrap();
    assert!(
        dockerfile.contains(&format!("EXPOSE {} 9090", port_of(listen))),
        "EXPOSE"
    );
    assert!(dockerfile.contains("TOLLGATE_ADMIN__LISTEN=0.0.0.0:9090"));
    let health = config["server"]["health_path"].as_str().unwrap();
    assert!(
        dockerfile.contains(&format!("http://127.0.0.1:{}{health}", port_of(listen))),
        "HEALTHCHECK"
    );
    assert!(dockerfile.contains("STOPSIGNAL SIGTERM"));
    assert!(dockerfile.contains("USER tollgate"));
    assert!(dockerfile.contains("cmake"));
    assert!(dockerfile.contains(r#"CMD ["serve", "-c", "/etc/tollgate/tollgate.yaml"]"#));
    assert!(read(".dockerignore").lines().any(|l| l.trim() == "target"));

    // The image's environment overrides are valid on the shipped config.
    let env: Vec<(String, String)> = dockerfile
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter(|(k, _)| k.starts_with("TOLLGATE_"))
        .map(|(k, v)| (k.to_string(), v.trim_end_matches('\\').to_string()))
        .collect();
    assert_eq!(env.len(), 3, "{env:?}");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (code, _, err) = run_cli(
        &["check", "-c", &format!("{ROOT}/conf/tollgate.yaml")],
        &env,
    );
    assert_eq!(code, 0, "{err}");
}

#[test]
fn compose_file_wires_the_services_together() {
    let compose = yaml("docker-compose.yml");
    let services = &compose["services"];
    for name in ["tollgate", "redis", "upstream", "prometheus", "grafana"] {
        assert!(services.get(name).is_some(), "service {name} missing");
    }
    // An image of tollgate exists nowhere but here: every service that runs
    // it builds it, or compose would try to pull `tollgate:latest`.
    for (name, service) in services.as_mapping().unwrap() {
        if service["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("tollgate"))
        {
            assert_eq!(
                service["build"].as_str(),
                Some("."),
                "service {name:?} runs the tollgate image without building it"
            );
        }
    }
    for (_, service) in services.as_mapping().unwrap() {
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let src = volume.as_str().unwrap().split(':').next().unwrap();
            assert!(
                Path::new(ROOT).join(src).exists(),
                "compose mounts missing {src}"
            );
        }
    }
    let config = yaml("conf/compose.yaml");
    let proxy_port = port_of(config["server"]["listen"][0].as_str().unwrap());
    let admin_port = port_of(config["admin"]["listen"].as_str().unwrap());
    let ports: Vec<&str> = services["tollgate"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(
        ports.contains(&format!("{proxy_port}:{proxy_port}").as_str()),
        "{ports:?}"
    );
    assert!(
        ports.contains(&format!("{admin_port}:{admin_port}").as_str()),
        "{ports:?}"
    );

    // The upstream and Redis the config names are the compose services.
    let peer = config["upstreams"]["backend"]["peers"][0].as_str().unwrap();
    let echo_cmd: Vec<&str> = services["upstream"]["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(echo_cmd[0], "echo");
    assert_eq!(peer, format!("upstream:{}", port_of(echo_cmd[2])));
    assert_eq!(
        config["redis"]["url"].as_str().unwrap(),
        "redis://redis:6379"
    );

    // Prometheus scrapes the admin listener.
    let prom = yaml("deploy/prometheus/prometheus.yml");
    let target = prom["scrape_configs"][0]["static_configs"][0]["targets"][0]
        .as_str()
        .unwrap();
    assert_eq!(target, format!("tollgate:{admin_port}"));

    // The environment names are real overrides: with the service names
    // pointed at this machine, the compose config passes `check`.
    let env_names: Vec<String> = services["tollgate"]["environment"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        env_names,
        ["TOLLGATE_AUTH__JWT__SECRET", "TOLLGATE_ADMIN__TOKEN"]
    );
    let mut env: Vec<(&str, &str)> = env_names.iter().map(|k| (k.as_str(), "from-env")).collect();
    env.push(("TOLLGATE_UPSTREAMS__BACKEND__PEERS", "[\"127.0.0.1:8081\"]"));
    let (code, _, err) = run_cli(&["check", "-c", &format!("{ROOT}/conf/compose.yaml")], &env);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn dashboard_uses_only_metrics_tollgate_exports() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/dashboards/tollgate.json")).unwrap();
    let mut used = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("tollgate_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                let family = name.strip_suffix("_bucket").unwrap_or(&name).to_string();
                used.insert(family);
            }
        }
    }
    for metric in [
        "tollgate_requests_total",
        "tollgate_request_duration_seconds",
        "tollgate_auth_failures_total",
        "tollgate_ratelimit_decisions_total",
        "tollgate_redis_calls_total",
        "tollgate_redis_errors_total",
        "tollgate_config_reloads_total",
    ] {
        assert!(
            used.contains(metric),
            "the dashboard has no panel for {metric}"
        );
    }

    // Cross-check with a live /metrics after traffic that moves every family.
    let echo = Echo::start();
    let redis = Redis::start();
    let secret = "packaging-secret-0123456789abcdef";
    let t = Tollgate::start(&format!(
        r#"
server: {{ listen: ["127.0.0.1:{{port}}"], threads: 1, pid_file: "{{dir}}/t.pid", upgrade_sock: "{{dir}}/t.sock" }}
admin: {{ listen: "127.0.0.1:{{admin}}" }}
redis: {{ url: "{}" }}
auth: {{ jwt: {{ algorithms: [HS256], secret: "{secret}" }} }}
upstreams:
  backend: {{ peers: ["{}"] }}
  dead: {{ peers: ["127.0.0.1:{}"] }}
routes:
  - {{ name: api, path_prefix: /api/, upstream: backend }}
  - {{ name: dead, path_prefix: /dead/, upstream: dead, auth: none }}
limits:
  rules: [{{ name: per-ip, key: client_ip, windows: [{{ requests: 1, window: 1h }}], shadow: true }}]
"#,
        redis.url(),
        echo.addr(),
        free_port()
    ));
    let token = pyjwt(
        serde_json::json!({"alg": "HS256", "key": secret, "claims": {
        "api_key": "dash", "exp": unix_now() + 600, "allowed_routes": ["/*"]}}),
    );
    let r = request(t.port, &format!("GET /api/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n")).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(t.get("/api/x").status, 401);
    assert_eq!(t.get("/dead/x").status, 502);
    t.wait_metric(r#"tollgate_requests_total{route="dead",status="502"}"#, 1.0);
    let live = t.metrics();
    for family in &used {
        assert!(
            live.contains(&format!("# TYPE {family} ")),
            "dashboard uses {family}, which /metrics does not export"
        );
    }
}

#[test]
fn systemd_unit_reloads_with_sighup_and_is_hardened() {
    let unit = read("deploy/tollgate.service");
    assert!(unit
        .lines()
        .any(|l| l == "ExecReload=/bin/kill -HUP $MAINPID"));
    for option in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "KillSignal=SIGTERM",
    ] {
        assert!(unit.lines().any(|l| l == option), "{option} missing");
    }
    // The environment it sets is made of valid overrides.
    let env: Vec<(String, String)> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert!(env.len() >= 3);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (code, _, err) = run_cli(
        &["check", "-c", &format!("{ROOT}/conf/tollgate.yaml")],
        &env,
    );
    assert_eq!(code, 0, "{err}");
    let upgrade = read("deploy/tollgate-upgrade");
    assert!(upgrade.contains("serve --upgrade --daemon") && upgrade.contains("kill -QUIT"));
}

#[test]
fn gitignore_lists_no_committed_file_and_setup_keeps_test_packages_apart() {
    let out = std::process::Command::new("git")
        .args(["ls-files", "--cached", "--ignored", "--exclude-standard"])
        .current_dir(ROOT)
        .output();
    match out {
        Ok(out) if out.status.success() => {
            let listed = String::from_utf8_lossy(&out.stdout);
            assert!(
                listed.trim().is_empty(),
                "committed files that .gitignore lists:\n{listed}"
            );
        }
        // Not a git checkout (an exported tree): nothing to compare.
        _ => eprintln!("not a git checkout; .gitignore not checked"),
    }
    let gitignore = read(".gitignore");
    assert!(gitignore.lines().any(|l| l.trim() == "/.venv/"));
    assert!(read(".dockerignore").lines().any(|l| l.trim() == ".venv"));

    // `make run` sets up only what running needs; the test-only Python
    // packages go into .venv, never into the system Python.
    let makefile = read("Makefile");
    let target = |name: &str| {
        makefile
            .lines()
            .find(|l| l.starts_with(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} target"))
            .to_string()
    };
    assert_eq!(target("build"), "build: setup-run");
    assert!(target("run").starts_with("run: build"));
    assert_eq!(target("test"), "test: setup");
    let setup = read("scripts/setup.sh");
    assert!(setup.contains(".venv/bin/python3 -m pip install"));
    assert!(!setup.contains("--break-system-packages"));
    let run_part: String = setup
        .split("if [ \"$mode\" = test ]; then")
        .next()
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    for test_only in [
        "redis-server",
        "prometheus",
        "grpcio",
        "websockets",
        "pip install",
    ] {
        assert!(
            !run_part.contains(test_only),
            "`setup.sh run` would install {test_only}"
        );
    }
    let requirements = read("tests/requirements.txt");
    for package in ["PyJWT", "cryptography", "grpcio", "websockets"] {
        assert!(requirements.contains(package), "{package}");
    }
}
