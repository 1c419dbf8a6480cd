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

/// Every document of every file in deploy/kubernetes, by kind.
fn kubernetes() -> std::collections::BTreeMap<String, serde_yaml::Value> {
    use serde::Deserialize;
    let mut by_kind = std::collections::BTreeMap::new();
    let dir = Path::new(ROOT).join("deploy/kubernetes");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let kind = value["kind"].as_str().unwrap().to_string();
            assert!(
                by_kind.insert(kind.clone(), value).is_none(),
                "two {kind} documents"
            );
        }
    }
    by_kind
}

fn seconds(duration: &str) -> u64 {
    let (n, unit) = duration.split_at(duration.len() - 1);
    assert_eq!(unit, "s", "{duration}");
    n.parse().unwrap()
}

#[test]
fn kubernetes_manifests_agree_with_each_other_and_the_config() {
    let k = kubernetes();
    for kind in ["Deployment", "ConfigMap", "Service", "PodDisruptionBudget"] {
        assert!(k.contains_key(kind), "no {kind} in deploy/kubernetes");
    }
    let (deployment, configmap) = (&k["Deployment"], &k["ConfigMap"]);
    let (service, pdb) = (&k["Service"], &k["PodDisruptionBudget"]);
    let pod = &deployment["spec"]["template"];
    let labels = pod["metadata"]["labels"].as_mapping().unwrap();
    let selects_the_pods = |selector: &serde_yaml::Value, who: &str| {
        let selector = selector.as_mapping().unwrap();
        assert!(!selector.is_empty(), "{who}: empty selector");
        for (key, value) in selector {
            assert_eq!(
                labels.get(key),
                Some(value),
                "{who} selects {key:?}={value:?}"
            );
        }
    };
    selects_the_pods(&deployment["spec"]["selector"]["matchLabels"], "Deployment");
    selects_the_pods(&service["spec"]["selector"], "Service");
    selects_the_pods(
        &pdb["spec"]["selector"]["matchLabels"],
        "PodDisruptionBudget",
    );
    assert!(
        pdb["spec"]["minAvailable"].as_u64().unwrap()
            < deployment["spec"]["replicas"].as_u64().unwrap()
    );

    // The config the pods read: the ConfigMap, mounted as a directory (a
    // subPath mount never sees an update) where `serve -c` looks.
    let container = &pod["spec"]["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[..2], ["serve", "-c"]);
    let config_path = Path::new(args[2]);
    let volume = pod["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["configMap"]["name"] == configmap["metadata"]["name"])
        .expect("a volume of the ConfigMap");
    let mount = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("the ConfigMap volume is mounted");
    assert!(
        mount.get("subPath").is_none(),
        "subPath mounts are never updated"
    );
    assert_eq!(
        Path::new(mount["mountPath"].as_str().unwrap()),
        config_path.parent().unwrap()
    );
    let file_name = config_path.file_name().unwrap().to_str().unwrap();
    let text = configmap["data"][file_name]
        .as_str()
        .expect("the config in the ConfigMap");
    let config: serde_yaml::Value = serde_yaml::from_str(text).unwrap();
    assert_eq!(config["server"]["watch_config"].as_bool(), Some(true));

    // Ports by name, probes on the configured paths.
    let port_named = |name: &str| {
        container["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no container port {name}")) as u16
    };
    assert_eq!(
        port_named("http"),
        port_of(config["server"]["listen"][0].as_str().unwrap())
    );
    assert_eq!(
        port_named("admin"),
        port_of(config["admin"]["listen"].as_str().unwrap())
    );
    let probe = |which: &str| {
        (
            container[which]["httpGet"]["path"].as_str().unwrap(),
            container[which]["httpGet"]["port"].as_str().unwrap(),
        )
    };
    assert_eq!(
        probe("readinessProbe"),
        (
            config["server"]["ready_path"].as_str().unwrap_or("/ready"),
            "http"
        )
    );
    assert_eq!(
        probe("livenessProbe"),
        (
            config["server"]["health_path"]
                .as_str()
                .unwrap_or("/health"),
            "http"
        )
    );
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"].as_str(),
        Some("http")
    );

    // Prometheus finds /metrics on the admin port.
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(
        annotations["prometheus.io/port"].as_str(),
        Some(port_named("admin").to_string().as_str())
    );
    assert_eq!(annotations["prometheus.io/path"].as_str(), Some("/metrics"));

    // The pod is given the preStop pause, the drain and Pingora's extra
    // second before it is killed; and not a minute more.
    let pause: u64 = container["lifecycle"]["preStop"]["exec"]["command"][1]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let grace = seconds(config["server"]["grace_period"].as_str().unwrap_or("5s"));
    let termination = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(
        termination >= pause + grace + 2 && termination <= pause + grace + 30,
        "terminationGracePeriodSeconds {termination} for a {pause} s pause and a {grace} s grace period"
    );

    // The embedded config passes `check`, with the Secret's variables set.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(file_name);
    std::fs::write(&file, text).unwrap();
    let env: Vec<(String, String)> = container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                "from-the-secret".to_string(),
            )
        })
        .collect();
    assert!(env.iter().any(|(k, _)| k == "TOLLGATE_AUTH__JWT__SECRET"));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (code, out, err) = run_cli(&["check", "-c", file.to_str().unwrap()], &env);
    assert_eq!(code, 0, "{out}{err}");
    // The image's own overrides apply as well (pid file, upgrade socket on the emptyDir).
    let run_mount = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|m| m["mountPath"] == "/run/tollgate");
    assert!(
        run_mount,
        "/run/tollgate (the image's pid file and socket) needs a writable volume"
    );
}
