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
