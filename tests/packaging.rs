//! The packaging as an operator uses it: the daemon run from
//! `packaging/quotad.prod.toml` (paths redirected to a temp dir) and reached
//! through its Unix socket with the CLI; `systemd-analyze verify` on the unit
//! (and its man page); the sysusers/tmpfiles files and the install steps of
//! the unit's comment and the README, which must agree;
//! readiness over `NOTIFY_SOCKET`; SIGHUP reload; the Docker config's rule that
//! a non-loopback listener needs tokens.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_quotad");

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn my_gid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    tempfile::NamedTempFile::new()
        .unwrap()
        .as_file()
        .metadata()
        .unwrap()
        .gid()
}

/// The production config with its paths moved under `dir` and the socket group
/// set to one this test process is in.
fn prod_config(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo("packaging/quotad.prod.toml"))
        .unwrap()
        .replace("/run/quotad", &dir.join("run").display().to_string())
        .replace("/var/lib/quotad", &dir.join("lib").display().to_string())
        .replace("\"quotad-clients\"", &format!("\"{}\"", my_gid()));
    std::fs::create_dir_all(dir.join("run")).unwrap();
    let path = dir.join("quotad.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn cli(config: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn start(config: &Path, env: &[(&str, &Path)]) -> Child {
    let mut c = Command::new(BIN);
    c.args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

fn wait_healthy(config: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cli(config, &["health"]).status.success() {
        assert!(Instant::now() < deadline, "daemon did not become ready");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop(mut child: Child) {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn the_production_config_runs_and_the_cli_reaches_it_over_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let config = prod_config(dir.path());
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let child = start(&config, &[("NOTIFY_SOCKET", &notify_path)]);
    // systemd readiness: READY=1 only once recovery has finished.
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    wait_healthy(&config);
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(dir.path().join("run/quotad.sock")).unwrap();
        assert_eq!(
            (meta.permissions().mode() & 0o777, meta.gid()),
            (0o660, my_gid()),
            "socket mode and group"
        );
    }
    // The CLI finds the socket through the same config file.
    let o = cli(
        &config,
        &["consume", "user:42", "--amount", "tokens=1200", "--key", "k1"],
    );
    assert!(
        o.status.success(),
        "{}{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        stdout(&o).starts_with("allowed: user:42 on plan free"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("tokens-per-day"));
    let o = cli(
        &config,
        &["consume", "user:42", "--amount", "tokens=1200", "--key", "k1", "--json"],
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["replayed"], true);
    let o = cli(&config, &["check", "user:42", "--amount", "tokens=99000"]);
    assert_eq!(o.status.code(), Some(1), "denied is exit 1: {}", stdout(&o));
    assert!(stdout(&o).contains("denied, retry in"), "{}", stdout(&o));
    let o = cli(&config, &["set-plan", "user:42", "pro"]);
    assert!(stdout(&o).contains("plan pro (assigned)"), "{}", stdout(&o));
    let o = cli(&config, &["credit", "user:42", "tokens-per-day", "200"]);
    assert!(stdout(&o).contains("1000 / 1000000"), "{}", stdout(&o));
    let o = cli(&config, &["reset", "user:42", "--limit", "tokens-per-day"]);
    assert!(stdout(&o).contains("0 / 1000000"), "{}", stdout(&o));
    let o = cli(&config, &["usage", "user:42", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["plan"], "pro");
    let o = cli(&config, &["reset", "user:42", "--limit", "nope"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&o.stderr).contains("404 unknown_limit"));
    // SIGHUP re-reads the file.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("max = 100000", "max = 150000");
    std::fs::write(&config, text).unwrap();
    let pid = child.id().to_string();
    Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = cli(&config, &["usage", "someone-new"]);
        if stdout(&o).contains("0 / 150000") {
            break;
        }
        assert!(Instant::now() < deadline, "SIGHUP reload did not apply: {}", stdout(&o));
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = cli(&config, &["reload"]);
    assert!(stdout(&o).starts_with("reloaded: 2 plan(s)"), "{}", stdout(&o));
    stop(child);
    let n = notify.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    assert!(
        !dir.path().join("run/quotad.sock").exists(),
        "socket removed at shutdown"
    );
}

#[test]
fn the_systemd_unit_verifies() {
    verify_unit("packaging/quotad.service", "quotad.service");
}

/// `systemd-analyze verify` of the unit at `src`, installed as `name`, with
/// ExecStart pointed at the binary under test (it is not in /usr/local/bin here).
fn verify_unit(src: &str, name: &str) {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("systemd-analyze is not installed; .ci/run installs it");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(repo(src))
        .unwrap()
        .replace("/usr/local/bin/quotad", BIN);
    let path = dir.path().join(name);
    std::fs::write(&path, unit).unwrap();
    // Documentation=man:quotad(1): verify runs `man quotad`, which finds the
    // pages `quotad man --dir` writes, as the README installs them.
    let o = Command::new(BIN)
        .args(["man", "--dir"])
        .arg(dir.path().join("man/man1"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut verify = Command::new("systemd-analyze");
    verify.arg("verify").env("MANPATH", dir.path().join("man"));
    if Command::new("man").arg("--version").output().is_err() {
        eprintln!("man is not installed: the Documentation= page is not checked");
        verify.arg("--man=no");
    }
    let o = verify.arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && err.trim().is_empty(),
        "systemd-analyze verify: {err}"
    );
}

#[test]
fn the_docker_config_checks_and_refuses_0_0_0_0_without_tokens() {
    let o = Command::new(BIN)
        .args(["config", "check"])
        .arg(repo("packaging/quotad.docker.toml"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new(BIN)
        .args(["config", "check"])
        .arg(repo("packaging/quotad.prod.toml"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Both show what a new user should see: prices, a money cap with alerts,
    // and a breaker.
    for f in ["packaging/quotad.prod.toml", "packaging/quotad.docker.toml"] {
        let text = std::fs::read_to_string(repo(f)).unwrap();
        for part in [
            "[pricing]",
            "metric = \"cost_micros\"",
            "alerts = [0.8, 1.0]",
            "[[breakers]]",
        ] {
            assert!(text.contains(part), "{f} has no {part}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repo("packaging/quotad.docker.toml")).unwrap();
    let no_auth = &text[..text.find("[auth]").unwrap()];
    let path = dir.path().join("q.toml");
    std::fs::write(&path, no_auth).unwrap();
    let o = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("server.listen[0]") && err.contains("auth.tokens"), "{err}");
}

/// Docker cannot run here, so the dependency stage's RUN is run as the
/// Dockerfile has it, in a directory holding only what that stage copies, with
/// `cargo` standing for a check that the manifest's every target file exists
/// (what `cargo build` reads first, and failed on when a bench had no stub).
#[test]
fn the_docker_dependency_stage_stubs_every_target_cargo_reads() {
    let dockerfile = std::fs::read_to_string(repo("packaging/Dockerfile")).unwrap();
    let start = dockerfile
        .find("COPY Cargo.toml Cargo.lock ./")
        .expect("the dependency stage");
    let run = dockerfile[start..]
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty() && !l.starts_with("COPY"))
        // Docker joins continued lines, dropping the backslash and newline.
        .map(|l| l.strip_suffix('\\').unwrap_or(l))
        .collect::<Vec<_>>()
        .join("");
    let run = run.strip_prefix("RUN ").expect("a RUN line");
    let dir = tempfile::tempdir().unwrap();
    for f in ["Cargo.toml", "Cargo.lock"] {
        std::fs::copy(repo(f), dir.path().join(f)).unwrap();
    }
    let bin = dir.path().join("fakebin");
    std::fs::create_dir_all(&bin).unwrap();
    let real = String::from_utf8(Command::new("which").arg("cargo").output().unwrap().stdout).unwrap();
    let fake = format!(
        "#!/usr/bin/env bash\nset -e\n'{}' metadata --no-deps --format-version 1 --offline | python3 -c '\n\
         import json, os, sys\n\
         missing = [t[\"src_path\"] for p in json.load(sys.stdin)[\"packages\"] for t in p[\"targets\"] if not os.path.exists(t[\"src_path\"])]\n\
         print(\"missing:\", missing) if missing else None\n\
         sys.exit(1 if missing else 0)'\n",
        real.trim()
    );
    std::fs::write(bin.join("cargo"), fake).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bin.join("cargo"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let o = Command::new("sh")
        .arg("-c")
        .arg(run)
        .current_dir(dir.path())
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// sysusers and tmpfiles, applied to an empty root as `systemd-sysusers` and
/// `systemd-tmpfiles --create` apply them on a host: the daemon's user and
/// groups, and /etc/quotad as root:quotad 0750 for the config.
#[test]
fn sysusers_and_tmpfiles_make_the_user_groups_and_config_directory() {
    if Command::new("systemd-sysusers").arg("--version").output().is_err() {
        eprintln!("systemd-sysusers is not installed; .ci/run installs systemd");
        return;
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let root = tempfile::tempdir().unwrap();
    let etc = root.path().join("etc");
    for (src, dst) in [
        ("packaging/quotad.sysusers.conf", "sysusers.d/quotad.conf"),
        ("packaging/quotad.tmpfiles.conf", "tmpfiles.d/quotad.conf"),
    ] {
        std::fs::create_dir_all(etc.join(dst).parent().unwrap()).unwrap();
        std::fs::copy(repo(src), etc.join(dst)).unwrap();
    }
    for tool in [&["systemd-sysusers"][..], &["systemd-tmpfiles", "--create"]] {
        let o = Command::new(tool[0])
            .args(&tool[1..])
            .arg(format!("--root={}", root.path().display()))
            .output()
            .unwrap();
        assert!(o.status.success(), "{tool:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let group = std::fs::read_to_string(etc.join("group")).unwrap();
    let gid = |name: &str| -> u32 {
        group
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:x:")))
            .unwrap_or_else(|| panic!("no group {name}: {group}"))
            .split(':')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    gid("quotad-clients");
    let passwd = std::fs::read_to_string(etc.join("passwd")).unwrap();
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("quotad:") && l.contains(":/var/lib/quotad:")),
        "{passwd}"
    );
    let meta = std::fs::metadata(etc.join("quotad")).unwrap();
    assert_eq!(
        (meta.permissions().mode() & 0o7777, meta.uid(), meta.gid()),
        (0o750, 0, gid("quotad")),
        "/etc/quotad is root:quotad 0750, so the config must be installed with -g quotad"
    );
}

/// The install steps are printed twice, in the unit's header comment and in the
/// README; both must be the same steps in the same order (the config after
/// sysusers/tmpfiles and with `-g quotad`, the man page that
/// `Documentation=` names), and every file they install must exist.
#[test]
fn the_install_steps_in_the_unit_and_the_readme_agree() {
    let unit = std::fs::read_to_string(repo("packaging/quotad.service")).unwrap();
    let from_unit: Vec<String> = unit
        .lines()
        .take_while(|l| l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("#   "))
        .flat_map(|l| l.split(" && "))
        .map(|c| c.trim().to_string())
        .collect();
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    let section = &readme[readme.find("## Install as a systemd service").unwrap()..];
    let block = &section[section.find("```sh\n").unwrap() + 6..];
    let block = &block[..block.find("```").unwrap()];
    let from_readme: Vec<String> = block
        .lines()
        .flat_map(|l| l.split(" && "))
        .map(|c| c.split("  #").next().unwrap().trim())
        .map(|c| c.strip_prefix("sudo ").unwrap_or(c).to_string())
        .collect();
    let installs = |cmds: &[String]| -> Vec<String> {
        cmds.iter()
            .filter(|c| {
                c.starts_with("install ")
                    || c.starts_with("systemd-")
                    || c.starts_with("quotad man")
                    || c.starts_with("systemctl enable")
            })
            .cloned()
            .collect()
    };
    assert_eq!(installs(&from_unit), installs(&from_readme), "unit comment vs README");
    let steps = installs(&from_readme);
    let pos = |prefix: &str| {
        steps
            .iter()
            .position(|c| c.starts_with(prefix))
            .unwrap_or_else(|| panic!("no step {prefix}: {steps:#?}"))
    };
    assert!(pos("systemd-sysusers") < pos("install -m 0640 -g quotad packaging/quotad.prod.toml"));
    assert!(pos("systemd-tmpfiles") < pos("install -m 0640 -g quotad packaging/quotad.prod.toml"));
    assert!(unit.contains("Documentation=man:quotad(1)") && steps.iter().any(|c| c.starts_with("quotad man --dir")));
    for c in steps.iter().filter(|c| c.starts_with("install ")) {
        let src = c.split_whitespace().rev().nth(1).unwrap();
        if src.starts_with("packaging/") {
            assert!(repo(src).exists(), "{c}: {src} is not in the repository");
        }
    }
}

#[test]
fn the_cluster_demo_configs_check_and_a_cluster_refuses_batch_and_a_file_policy() {
    for i in 1..=3 {
        let o = Command::new(BIN)
            .args(["config", "check"])
            .arg(repo(&format!("packaging/cluster/node{i}.toml")))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "node{i}.toml: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let text = std::fs::read_to_string(repo("packaging/cluster/node1.toml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (from, to, key) in [
        ("durability = \"fsync\"", "durability = \"batch\"", "storage.durability"),
        ("source = \"api\"", "source = \"file\"", "policy.source"),
        (
            "election_timeout = \"1s\"",
            "election_timeout = \"200ms\"",
            "cluster.election_timeout",
        ),
    ] {
        assert!(text.contains(from), "{from}");
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text.replace(from, to)).unwrap();
        let o = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(key), "{key}: {err}");
    }
}

#[test]
fn the_cluster_node_unit_verifies() {
    // A template is verified through an instance of it.
    verify_unit("packaging/quotad@.service", "quotad@1.service");
}
