//! README's "Recipes", run as written: every `$ ` line of every recipe, in
//! one shell per recipe, in a scratch directory that sees the repository's
//! `conf/`, `tests/` and `.venv/`, with `tollgate` the binary under test.
//! Lines ending in `&` start servers and are waited for (each port the line
//! or its config names must accept connections); every other line's output
//! must be the one printed under it in the README, up to what changes from
//! run to run (request ids, tokens, times: `mask`).
//!
//! The README's ports (8080, 6379, ...) are mapped to free ones: in the
//! lines, in `TOLLGATE_*` overrides of the example config's addresses, and
//! back in the output. `TOLLGATE_UPDATE_RECIPES=1 cargo nextest run --test
//! recipes -j 1` writes the outputs of a real run into README.md instead.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

mod common;
use common::*;
use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Every port the recipes name.
const PORTS: [u16; 11] = [
    8080, 8081, 8082, 8089, 8443, 8444, 8765, 9090, 9091, 6379, 50051,
];

#[derive(Debug, Clone)]
struct Step {
    command: String,
    background: bool,
    output: Vec<String>,
}

#[derive(Debug)]
struct Recipe {
    title: String,
    steps: Vec<Step>,
    /// Lines of README.md inside the block's fences.
    lines: std::ops::Range<usize>,
}

fn readme() -> String {
    std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap()
}

/// The `### ` subsections of `## Recipes`, one ```console block each.
fn recipes(text: &str) -> Vec<Recipe> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| *l == "## Recipes")
        .expect("README has a Recipes section");
    let mut out = Vec::new();
    let mut title = String::new();
    let mut i = start + 1;
    while i < lines.len() && !lines[i].starts_with("## ") {
        if let Some(t) = lines[i].strip_prefix("### ") {
            title = t.to_string();
        } else if lines[i] == "```console" {
            let first = i + 1;
            let mut steps: Vec<Step> = Vec::new();
            i += 1;
            while lines[i] != "```" {
                match lines[i].strip_prefix("$ ") {
                    Some(cmd) => {
                        let background = cmd.ends_with(" &");
                        steps.push(Step {
                            command: cmd.trim_end_matches(" &").to_string(),
                            background,
                            output: Vec::new(),
                        });
                    }
                    None => steps
                        .last_mut()
                        .expect("output before any command")
                        .output
                        .push(lines[i].to_string()),
                }
                i += 1;
            }
            assert!(
                out.iter().all(|r: &Recipe| r.title != title),
                "two blocks in recipe {title:?}"
            );
            out.push(Recipe {
                title: title.clone(),
                steps,
                lines: first..i,
            });
        }
        i += 1;
    }
    out
}

/// Replaces whole numbers found in `map` (not parts of longer numbers).
fn map_numbers(text: &str, map: &BTreeMap<u16, u16>) -> String {
    let mut out = String::with_capacity(text.len());
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let end = (i..bytes.len())
                .find(|&j| !bytes[j].is_ascii_digit())
                .unwrap_or(bytes.len());
            let digits = &text[i..end];
            match digits.parse::<u16>().ok().and_then(|n| map.get(&n)) {
                Some(to) => out.push_str(&to.to_string()),
                None => out.push_str(digits),
            }
            i = end;
        } else {
            let c = text[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

fn ports_in(text: &str) -> Vec<u16> {
    let mut found = Vec::new();
    for word in text.split(|c: char| !c.is_ascii_digit()) {
        if let Ok(n) = word.parse::<u16>() {
            if PORTS.contains(&n) && !found.contains(&n) {
                found.push(n);
            }
        }
    }
    found
}

/// `TOLLGATE_*` overrides that move every address of an example config
/// naming a README port to its mapped port.
fn overrides(config: &serde_yaml::Value, map: &BTreeMap<u16, u16>) -> Vec<(String, String)> {
    fn walk(
        v: &serde_yaml::Value,
        path: &mut Vec<String>,
        map: &BTreeMap<u16, u16>,
        out: &mut Vec<(String, String)>,
    ) {
        let name = |path: &[String]| format!("TOLLGATE_{}", path.join("__").to_uppercase());
        match v {
            serde_yaml::Value::Mapping(m) => {
                for (k, child) in m {
                    path.push(k.as_str().unwrap().to_string());
                    walk(child, path, map, out);
                    path.pop();
                }
            }
            serde_yaml::Value::Sequence(items) => {
                let strings: Vec<&str> = items.iter().filter_map(|i| i.as_str()).collect();
                if strings.len() == items.len() && strings.iter().any(|s| !ports_in(s).is_empty()) {
                    let moved: Vec<String> = strings.iter().map(|s| map_numbers(s, map)).collect();
                    out.push((name(path), serde_json::to_string(&moved).unwrap()));
                    return;
                }
                for (i, item) in items.iter().enumerate() {
                    path.push(i.to_string());
                    walk(item, path, map, out);
                    path.pop();
                }
            }
            serde_yaml::Value::String(s) if !ports_in(s).is_empty() => {
                out.push((
                    name(path),
                    serde_json::to_string(&map_numbers(s, map)).unwrap(),
                ));
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(config, &mut Vec::new(), map, &mut out);
    out
}

fn example_of(command: &str) -> Option<String> {
    let start = command.find("conf/examples/")?;
    let rest = &command[start..];
    let end = rest.find(".yaml")? + ".yaml".len();
    Some(rest[..end].to_string())
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// What changes from run to run, in the README's output and a run's alike.
fn mask(line: &str) -> String {
    let mut out = line.to_string();
    // JWTs.
    while let Some(i) = out.find("eyJ") {
        let end = out[i..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.'))
            .map_or(out.len(), |e| i + e);
        out.replace_range(i..end, "<token>");
    }
    // Numbers after these markers: seconds to a reset, expiry times, the
    // length of the current calendar month.
    for marker in [
        ";t=",
        "\"reset\":",
        "\"expires_at\":",
        "-month\";q=100000;w=",
        "\"window_seconds\":",
    ] {
        let mut from = 0;
        while let Some(i) = out[from..].find(marker) {
            let start = from + i + marker.len();
            let end = out[start..]
                .find(|c: char| !c.is_ascii_digit())
                .map_or(out.len(), |e| start + e);
            out.replace_range(start..end, "N");
            from = start + 1;
        }
    }
    // Request ids (32 hex digits).
    let chars: Vec<char> = out.chars().collect();
    let mut masked = String::new();
    let mut i = 0;
    while i < chars.len() {
        let run = chars[i..]
            .iter()
            .take_while(|c| c.is_ascii_hexdigit())
            .count();
        if run == 32 {
            masked.push_str("<id>");
            i += run;
        } else if run > 0 {
            masked.extend(&chars[i..i + run]);
            i += run;
        } else {
            masked.push(chars[i]);
            i += 1;
        }
    }
    masked
}

/// Kills the recipe's shell and every server it started.
struct Group(i32);

impl Drop for Group {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group this test created.
        unsafe {
            libc::kill(-self.0, libc::SIGKILL);
        }
    }
}

/// One run of a recipe's lines: each foreground line's output, or why not.
fn run(recipe: &Recipe, map: &BTreeMap<u16, u16>) -> Result<Vec<Vec<String>>, String> {
    let dir = tempfile::tempdir().unwrap();
    for link in ["conf", "tests"] {
        std::os::unix::fs::symlink(Path::new(ROOT).join(link), dir.path().join(link)).unwrap();
    }
    // `.venv/bin/python3` is whatever Python the tests use.
    std::fs::create_dir_all(dir.path().join(".venv/bin")).unwrap();
    let python = dir.path().join(".venv/bin/python3");
    std::fs::write(&python, format!("#!/bin/sh\nexec {} \"$@\"\n", python3())).unwrap();
    std::fs::set_permissions(&python, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let bin_dir = Path::new(BIN).parent().unwrap();
    let mut script = String::from(
        "wait_port() {\n  for _ in $(seq 1 400); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.05; done\n  echo \"recipe: nothing listens on port $1 after 20 s\" >&2; exit 97\n}\n",
    );
    let mut seen_configs = Vec::new();
    for step in &recipe.steps {
        if let Some(example) = example_of(&step.command) {
            if !seen_configs.contains(&example) {
                let config: serde_yaml::Value = serde_yaml::from_str(
                    &std::fs::read_to_string(Path::new(ROOT).join(&example)).unwrap(),
                )
                .unwrap();
                for (k, v) in overrides(&config, map) {
                    script.push_str(&format!("export {k}={}\n", shell_quote(&v)));
                }
                seen_configs.push(example);
            }
        }
    }
    for (i, step) in recipe.steps.iter().enumerate() {
        let command = map_numbers(&step.command, map);
        if step.background {
            script.push_str(&format!("{command} > bg-{i}.log 2>&1 &\n"));
            let mut ports = ports_in(&step.command);
            if step.command.contains("tollgate serve") {
                let example = example_of(&step.command).unwrap();
                let text = std::fs::read_to_string(Path::new(ROOT).join(example)).unwrap();
                // The listeners (the upstreams' ports were started before).
                for p in ports_in(&text) {
                    if !ports.contains(&p) {
                        ports.push(p);
                    }
                }
            }
            for p in ports {
                script.push_str(&format!("wait_port {}\n", map[&p]));
            }
        } else {
            script.push_str(&format!("printf '\\n@@@{i}@@@\\n'\n{command}\n"));
        }
    }
    script.push_str("printf '\\n@@@end@@@\\n'\n");

    let stderr_path = dir.path().join("stderr.log");
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .env(
            "PATH",
            format!(
                "{}:{}",
                bin_dir.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .process_group(0)
        .spawn()
        .unwrap();
    let _group = Group(child.id() as i32);
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            return Err(format!("{}: no end in 90 s", recipe.title));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = reader.join().unwrap();
    let logs = || {
        let mut all = format!(
            "script stderr:\n{}",
            std::fs::read_to_string(&stderr_path).unwrap_or_default()
        );
        for i in 0..recipe.steps.len() {
            if let Ok(log) = std::fs::read_to_string(dir.path().join(format!("bg-{i}.log"))) {
                all.push_str(&format!("\n--- {}:\n{log}", recipe.steps[i].command));
            }
        }
        all
    };
    if !status.success() || !text.contains("@@@end@@@") {
        return Err(format!(
            "{}: the shell failed ({status})\n{text}\n{}",
            recipe.title,
            logs()
        ));
    }
    let back: BTreeMap<u16, u16> = map.iter().map(|(a, b)| (*b, *a)).collect();
    let mut outputs = Vec::new();
    for (i, step) in recipe.steps.iter().enumerate() {
        if step.background {
            outputs.push(Vec::new());
            continue;
        }
        let start = text.find(&format!("@@@{i}@@@\n")).unwrap() + format!("@@@{i}@@@\n").len();
        let end = start + text[start..].find("\n@@@").unwrap();
        let lines: Vec<String> = text[start..end]
            .lines()
            .map(|l| map_numbers(l, &back))
            .collect();
        outputs.push(lines);
    }
    if std::env::var("TOLLGATE_RECIPE_LOGS").is_ok() {
        eprintln!("{}", logs());
    }
    Ok(outputs)
}

fn run_recipe(title_start: &str) {
    let text = readme();
    let all = recipes(&text);
    let recipe = all
        .iter()
        .find(|r| r.title.starts_with(title_start))
        .unwrap_or_else(|| panic!("no recipe titled {title_start:?}"));
    let mut last_error = String::new();
    for _attempt in 0..3 {
        let map: BTreeMap<u16, u16> = PORTS.iter().map(|p| (*p, free_port())).collect();
        let outputs = match run(recipe, &map) {
            Ok(o) => o,
            Err(e) if lost_port_race(&e) => {
                last_error = e;
                continue;
            }
            Err(e) => panic!("{e}"),
        };
        if std::env::var("TOLLGATE_UPDATE_RECIPES").is_ok() {
            write_outputs(recipe, &outputs);
            return;
        }
        for (step, actual) in recipe.steps.iter().zip(&outputs) {
            if step.background {
                continue;
            }
            let want: Vec<String> = step.output.iter().map(|l| mask(l)).collect();
            let got: Vec<String> = actual.iter().map(|l| mask(l)).collect();
            assert_eq!(
                got,
                want,
                "{}: `{}` printed\n{}\nwhere README.md shows\n{}",
                recipe.title,
                step.command,
                actual.join("\n"),
                step.output.join("\n")
            );
        }
        return;
    }
    panic!("{last_error}");
}

/// Puts a run's outputs under the commands in README.md (update mode).
fn write_outputs(recipe: &Recipe, outputs: &[Vec<String>]) {
    let text = readme();
    let fresh = recipes(&text);
    let now = fresh.iter().find(|r| r.title == recipe.title).unwrap();
    let mut block = Vec::new();
    for (step, output) in now.steps.iter().zip(outputs) {
        let amp = if step.background { " &" } else { "" };
        block.push(format!("$ {}{amp}", step.command));
        block.extend(output.iter().cloned());
    }
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines.splice(now.lines.clone(), block);
    std::fs::write(Path::new(ROOT).join("README.md"), lines.join("\n") + "\n").unwrap();
}

#[test]
fn every_recipe_has_a_test() {
    let names: Vec<String> = recipes(&readme()).into_iter().map(|r| r.title).collect();
    let tested = [
        "TLS with two certificates",
        "HTTP/2 without TLS",
        "WebSocket",
        "A fleet on one Redis",
        "Requests in flight",
        "The admin API",
        "An upstream over TLS",
    ];
    assert_eq!(names.len(), tested.len(), "{names:#?}");
    for name in &names {
        assert!(
            tested.iter().any(|t| name.starts_with(t)),
            "recipe {name:?} has no test"
        );
    }
    // Each recipe uses an example config that `check` accepts (see tests/cli.rs).
    for recipe in recipes(&readme()) {
        assert!(
            recipe
                .steps
                .iter()
                .any(|s| example_of(&s.command).is_some()),
            "{} names no conf/examples file",
            recipe.title
        );
    }
}

#[test]
fn masking_keeps_what_a_reader_checks() {
    assert_eq!(
        mask(r#"RateLimit: "default-1m";r=2;t=47, "monthly-month";r=99997;t=2334"#),
        r#"RateLimit: "default-1m";r=2;t=N, "monthly-month";r=99997;t=N"#
    );
    assert_eq!(
        mask("x-request-id: 0123456789abcdef0123456789abcdef"),
        "x-request-id: <id>"
    );
    assert_eq!(
        mask("{\"token\":\"eyJa.b-c.d_e\"}"),
        "{\"token\":\"<token>\"}"
    );
    let map: BTreeMap<u16, u16> = [(8080, 23456)].into_iter().collect();
    assert_eq!(
        map_numbers("127.0.0.1:8080 18080 8080", &map),
        "127.0.0.1:23456 18080 23456"
    );
}

#[test]
fn recipe_tls_sni() {
    run_recipe("TLS with two certificates");
}

#[test]
fn recipe_h2c_grpc() {
    run_recipe("HTTP/2 without TLS");
}

#[test]
fn recipe_websocket() {
    run_recipe("WebSocket");
}

#[test]
fn recipe_fleet() {
    run_recipe("A fleet on one Redis");
}

#[test]
fn recipe_concurrency() {
    run_recipe("Requests in flight");
}

#[test]
fn recipe_admin() {
    run_recipe("The admin API");
}

#[test]
fn recipe_upstream_tls() {
    run_recipe("An upstream over TLS");
}
