//! Runs the switch written in C (`tests/c/switch.c`) against the built
//! shared library: it is compiled with the system `cc`, given the path of
//! `libsanpath_ffi.so` (built by cargo next to this test binary, in `deps/`),
//! and must exit 0. Its own checks cover the spec's checklist from the
//! switch's side (see the file's header comment); each of its waits is
//! bounded, and the whole run is bounded here too.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RUN_LIMIT: Duration = Duration::from_secs(180);

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The cdylib cargo built for this test run.
fn library() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("deps directory");
    let name = format!(
        "{}sanpath_ffi{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    for dir in [Some(deps), deps.parent()].into_iter().flatten() {
        let p = dir.join(&name);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{name} not found next to {} (cargo builds the cdylib with the tests)",
        exe.display()
    );
}

fn compile(src: &Path, out: &Path) {
    let o = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-g"])
        .arg("-I")
        .arg(crate_dir().join("include"))
        .arg(src)
        .arg("-o")
        .arg(out)
        .args(["-ldl", "-pthread"])
        .output()
        .expect("running cc (a C compiler is required: apt-get install gcc)");
    assert!(
        o.status.success(),
        "compiling {} failed:\n{}{}",
        src.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn switch_in_c_drives_the_provider() {
    run_c_switch("sanpath-c-switch", None);
}

/// The same switch with the library in run-to-completion mode: no poller
/// threads, so every completion the switch waits for (an upcall, or a
/// `WSPGetOverlappedResult` poll) must come from the SPI calls it makes or
/// from the provider's own upcall helper.
#[test]
fn switch_in_c_drives_the_provider_in_run_to_completion_mode() {
    let config = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sanpath-rtc.toml");
    std::fs::write(&config, "[poller]\nmode = \"run_to_completion\"\n").unwrap();
    run_c_switch("sanpath-c-switch-rtc", Some(&config));
}

/// Compiles the C switch as `name` and runs it against the library, with
/// `SANPATH_CONFIG` naming `config` (or unset).
fn run_c_switch(name: &str, config: Option<&Path>) {
    let lib = library();
    let exe = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    compile(&crate_dir().join("tests/c/switch.c"), &exe);

    let out_path = exe.with_extension("out");
    let out_file = std::fs::File::create(&out_path).unwrap();
    let mut cmd = Command::new(&exe);
    cmd.arg(&lib).env_remove("SANPATH_CONFIG");
    if let Some(c) = config {
        cmd.env("SANPATH_CONFIG", c);
    }
    let mut child = cmd
        .stdout(out_file.try_clone().unwrap())
        .stderr(out_file)
        .stdin(Stdio::null())
        .spawn()
        .expect("starting the C switch");
    let deadline = Instant::now() + RUN_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    match status {
        Some(s) if s.success() => println!("{output}"),
        Some(s) => panic!("the C switch failed ({s}):\n{output}"),
        None => panic!("the C switch did not finish within {RUN_LIMIT:?}:\n{output}"),
    }
}

/// Socket duplication across processes (DUP-1..3) through the C ABI:
/// `tests/c/dup_xproc.c` run three times, as the peer (198.18.0.2), the
/// source (198.18.0.1) and the target (198.18.0.3), each a provider on the
/// shm fabric in a private runtime directory. This test passes the lines
/// between them: the target's pid to the source, the source's
/// `dwProviderReserved` to the target. Every process is killed if the test
/// fails; each also ends itself after a minute (`alarm`).
#[test]
fn duplication_moves_a_connection_to_another_process_over_shm() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::fs::DirBuilderExt;
    use std::process::Child;
    use std::sync::mpsc;

    struct Role {
        name: &'static str,
        child: Child,
        lines: mpsc::Receiver<String>,
    }
    impl Role {
        fn expect(&mut self, word: &str) -> String {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("{}: no {word} line (it failed or hung)", self.name));
            assert!(
                line.starts_with(word),
                "{}: expected {word}, got {line:?}",
                self.name
            );
            line
        }
        fn tell(&mut self, line: &str) {
            let stdin = self.child.stdin.as_mut().expect("stdin");
            writeln!(stdin, "{line}").expect("writing to a role");
        }
    }
    /// Kills whatever still runs when the test ends early.
    struct Roles(Vec<Role>);
    impl Drop for Roles {
        fn drop(&mut self) {
            for r in &mut self.0 {
                let _ = r.child.kill();
                let _ = r.child.wait();
            }
        }
    }

    let lib = library();
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let exe = tmp.join("sanpath-dup-xproc");
    compile(&crate_dir().join("tests/c/dup_xproc.c"), &exe);
    let dir = tmp.join(format!("dup-xproc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
    let logs = dir.join("logs");
    std::fs::create_dir(&logs).unwrap();
    let spawn = |name: &'static str, ip: &str| -> Role {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "[fabric]\nkind = \"shm\"\n[fabric.shm]\naddresses = [\"{ip}\"]\n\
                 runtime_dir = \"{}\"\n",
                dir.display()
            ),
        )
        .unwrap();
        let mut child = Command::new(&exe)
            .arg(&lib)
            .arg(name)
            .env("SANPATH_CONFIG", &config)
            // The duplication records of this test alone.
            .env("XDG_RUNTIME_DIR", &dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(logs.join(name)).unwrap())
            .spawn()
            .expect("starting the C program");
        let (tx, rx) = mpsc::channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Role {
            name,
            child,
            lines: rx,
        }
    };
    let stderr_of = |name: &str| std::fs::read_to_string(logs.join(name)).unwrap_or_default();

    let mut roles = Roles(Vec::new());
    roles.0.push(spawn("peer", "198.18.0.2"));
    roles.0[0].expect("READY");
    roles.0.push(spawn("target", "198.18.0.3"));
    let pid = roles.0[1].expect("PID");
    roles.0.push(spawn("source", "198.18.0.1"));
    roles.0[2].expect("CONNECTED");
    roles.0[0].expect("ACCEPTED");
    roles.0[2].tell(&pid);
    let token = roles.0[2].expect("TOKEN");
    roles.0[1].tell(&token);
    roles.0[0].expect("ANSWERED");
    roles.0[1].expect("DONE");
    for r in &mut roles.0 {
        r.tell("EXIT");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for r in &mut roles.0 {
        let status = loop {
            if let Some(s) = r.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit:\n{}",
                r.name,
                stderr_of(r.name)
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(
            status.success(),
            "{} failed ({status}):\n{}",
            r.name,
            stderr_of(r.name)
        );
        println!("{}", stderr_of(r.name).trim_end());
    }
    // Nothing is left: no duplication record, and no address socket (the
    // C ABI's provider is never dropped; its NIC removes them at exit).
    let dups = dir.join("sanpath-dup");
    if dups.exists() {
        let records = std::fs::read_dir(&dups).unwrap().count();
        assert_eq!(records, 0, "duplication records left behind");
    }
    let socks: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect();
    assert!(socks.is_empty(), "address sockets left behind: {socks:?}");
    drop(roles);
    let _ = std::fs::remove_dir_all(&dir);
}
