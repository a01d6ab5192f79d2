//! The README's commands run as printed. The walk-through's `sh` blocks are
//! run one after another with bash against the real binary on the shipped
//! quotad.toml (only its TCP port moved to a free one, and `localhost:7878` in
//! the commands with it), and each answer is checked against what the README
//! shows after `# →` or in the block after the command: every shown fragment
//! appears, in order (times, retry waits and reservation ids vary and are
//! masked). And every `quotad …` command line in a code block of the README or
//! docs/ parses with the binary's own argument parser.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

const BIN: &str = env!("CARGO_BIN_EXE_quotad");

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// A fenced code block: its language and its lines.
#[derive(Debug)]
struct Block {
    lang: String,
    lines: Vec<String>,
}

fn blocks(markdown: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut current: Option<Block> = None;
    for line in markdown.lines() {
        if let Some(fence) = line.strip_prefix("```") {
            match current.take() {
                Some(b) => out.push(b),
                None => {
                    current = Some(Block {
                        lang: fence.trim().to_string(),
                        lines: Vec::new(),
                    })
                }
            }
        } else if let Some(b) = &mut current {
            b.lines.push(line.to_string());
        }
    }
    out
}

/// Masks what differs from run to run: RFC 3339 times, the numbers of retry
/// waits and reset times.
fn mask(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    let shape = b"dddd-dd-ddTdd:dd:dd";
    while i < b.len() {
        let is_time = b.len() - i >= shape.len()
            && shape
                .iter()
                .zip(&b[i..])
                .all(|(p, c)| if *p == b'd' { c.is_ascii_digit() } else { p == c });
        if is_time {
            let mut j = i + shape.len();
            while j < b.len() && (b[j] == b'.' || b[j].is_ascii_digit()) {
                j += 1;
            }
            if b.get(j) == Some(&b'Z') {
                j += 1;
            }
            out.push_str("<time>");
            i = j;
            continue;
        }
        let mut masked = false;
        for prefix in ["\"retry_after_ms\":", "retry-after: ", "x-ratelimit-reset: "] {
            if s[i..].starts_with(prefix) && b.get(i + prefix.len()).is_some_and(u8::is_ascii_digit) {
                out.push_str(prefix);
                out.push_str("<n>");
                i += prefix.len();
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                masked = true;
                break;
            }
        }
        if !masked {
            let c = s[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// The fragments of a shown answer worth checking: split at lines and at
/// "…", trimmed; prose (no quote, no header) is not checked.
fn fragments(shown: &[String]) -> Vec<String> {
    shown
        .iter()
        .flat_map(|l| l.split('…'))
        .map(|f| {
            f.trim()
                .trim_matches(|c: char| c == ',' || c.is_whitespace())
                .to_string()
        })
        .filter(|f| f.chars().filter(|c| c.is_ascii_alphanumeric()).count() >= 3)
        .filter(|f| f.contains('"') || f.starts_with("HTTP/") || f.contains(": "))
        .map(|f| mask(&f))
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_ready(sock: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut s) = UnixStream::connect(sock) {
            s.write_all(b"GET /readyz HTTP/1.1\r\nHost: q\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            if answer.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        assert!(child.try_wait().unwrap().is_none(), "the daemon exited");
        assert!(Instant::now() < deadline, "the daemon did not become ready");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_walk_through_runs_as_printed_and_answers_what_it_shows() {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("curl is not installed: the walk-through was not run");
        return;
    }
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    let start = readme.find("## Five-minute walk-through").expect("the walk-through");
    let end = start + readme[start..].find("\n## Client libraries").expect("its end");
    let all = blocks(&readme[start..end]);
    assert!(all.iter().filter(|b| b.lang == "sh").count() >= 6, "{all:#?}");

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let shipped = std::fs::read_to_string(repo("quotad.toml")).unwrap();
    assert!(shipped.contains("\"127.0.0.1:7878\"") && shipped.contains("\"unix:./quotad.sock\""));
    std::fs::write(
        dir.path().join("quotad.toml"),
        shipped.replace("127.0.0.1:7878", &format!("127.0.0.1:{port}")),
    )
    .unwrap();
    // Started as the README starts it (`cargo run` runs `quotad` in the
    // directory of quotad.toml), with its log kept for a failure message.
    let log = dir.path().join("quotad.log");
    let mut daemon = Command::new(BIN)
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_ready(&dir.path().join("quotad.sock"), &mut daemon);

    let mut failures = Vec::new();
    for (i, block) in all.iter().enumerate() {
        if block.lang != "sh" {
            continue;
        }
        let script: Vec<&str> = block
            .lines
            .iter()
            .map(String::as_str)
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect();
        // What the README shows: `# →` comments (and their continuation
        // lines), and a json or plain block right after this one.
        let mut shown = Vec::new();
        let mut in_comment = false;
        for l in &block.lines {
            if let Some(rest) = l.strip_prefix("# →") {
                shown.push(rest.to_string());
                in_comment = true;
            } else if in_comment && l.starts_with("#  ") {
                shown.push(l[1..].to_string());
            } else {
                in_comment = false;
            }
        }
        if let Some(next) = all.get(i + 1).filter(|n| n.lang != "sh") {
            shown.extend(next.lines.iter().cloned());
        }
        let script = script
            .join("\n")
            .replace("localhost:7878", &format!("localhost:{port}"));
        let o = Command::new("bash")
            .arg("-c")
            .arg(format!("set -euo pipefail\n{script}"))
            .current_dir(dir.path())
            .output()
            .unwrap();
        let output = mask(&String::from_utf8_lossy(&o.stdout));
        if !o.status.success() {
            failures.push(format!(
                "block {i} failed ({}):\n{script}\n{}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            ));
            continue;
        }
        let mut at = 0;
        for f in fragments(&shown) {
            match output[at..].find(&f) {
                Some(p) => at += p + f.len(),
                None => {
                    failures.push(format!(
                        "block {i}:\n{script}\nshows {f:?}, which its answer lacks (after byte {at}):\n{output}"
                    ));
                    break;
                }
            }
        }
    }
    let _ = Command::new("kill").args(["-TERM", &daemon.id().to_string()]).status();
    assert!(
        daemon.wait().unwrap().success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Words of a shell command, for the simple commands the docs print: quotes
/// are removed, a trailing comment and anything after `|`, `>`, `&&` or `;`
/// are dropped.
fn words(command: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quote = None;
    let mut chars = command.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => quote = Some(c),
            (None, '#' | '|' | '>' | ';') => break,
            (None, '&') if chars.peek() == Some(&'&') => break,
            (None, c) if c.is_whitespace() => {
                if !word.is_empty() {
                    out.push(std::mem::take(&mut word));
                }
            }
            (None, c) => word.push(c),
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

#[test]
fn every_quotad_command_in_the_docs_parses() {
    let mut files = vec![repo("README.md")];
    for e in std::fs::read_dir(repo("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            files.push(p);
        }
    }
    let mut checked = 0;
    let mut problems = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for b in blocks(&text)
            .into_iter()
            .filter(|b| b.lang == "sh" || b.lang.is_empty())
        {
            for line in &b.lines {
                // A command may follow `sudo`, `&&` or a pipe.
                for part in line.split("&&").flat_map(|p| p.split('|')) {
                    let w = words(part);
                    let w: Vec<String> = w.into_iter().skip_while(|x| x == "sudo").collect();
                    if w.first().map(String::as_str) != Some("quotad") {
                        continue;
                    }
                    checked += 1;
                    if let Err(e) = quotad::cli::Cli::try_parse_from(&w) {
                        problems.push(format!("{}: {line}\n{e}", f.display()));
                    }
                }
            }
        }
    }
    assert!(checked >= 3, "found only {checked} quotad commands");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The parser used here rejects what the old README printed.
    assert!(quotad::cli::Cli::try_parse_from(words("quotad --socket /run/quotad/quotad.sock usage user:42")).is_err());
}

#[test]
fn the_helpers_split_and_mask_as_meant() {
    assert_eq!(
        words("sudo quotad man --dir '/usr/local/share/man/man1'  # pages"),
        ["sudo", "quotad", "man", "--dir", "/usr/local/share/man/man1"]
    );
    assert_eq!(
        words("quotad completions bash | sudo tee x"),
        ["quotad", "completions", "bash"]
    );
    assert_eq!(
        mask("\"resets_at\":\"2026-11-23T00:00:00.5Z\",\"retry_after_ms\":61,retry-after: 2"),
        "\"resets_at\":\"<time>\",\"retry_after_ms\":<n>,retry-after: <n>"
    );
    assert_eq!(
        fragments(&[
            " {\"allowed\":true, …, \"reservation_id\":\"rsv_…\"}".into(),
            "today's usage is kept".into()
        ]),
        ["{\"allowed\":true", "\"reservation_id\":\"rsv_"]
    );
}
