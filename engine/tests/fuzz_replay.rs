//! Replays the fuzz targets' committed inputs on stable: the seed corpora
//! (`fuzz/corpus/<target>/`) and the crash reproducers kept as regression
//! tests (`fuzz/regressions/<target>/`), through the same functions the
//! libFuzzer targets call (`sanpath::testkit::fuzz`).

use sanpath::testkit::fuzz::TARGETS;
use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries {
            let path = e.expect("read a corpus directory").path();
            if path.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn replay(target: &str) {
    let (_, body) = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .expect("a known target");
    let files = inputs(target);
    assert!(!files.is_empty(), "no committed inputs for {target}");
    for path in files {
        let data = std::fs::read(&path).expect("read an input");
        eprintln!("{target}: {}", path.display());
        body(&data);
    }
}

#[test]
fn every_target_has_a_replay_test() {
    let names: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        ["descriptor", "spi_calls", "session_msg", "shm_cell"],
        "add a replay test below"
    );
}

#[test]
fn descriptor_corpus() {
    replay("descriptor");
}

#[test]
fn spi_calls_corpus() {
    replay("spi_calls");
}

#[test]
fn session_msg_corpus() {
    replay("session_msg");
}

#[test]
fn shm_cell_corpus() {
    replay("shm_cell");
}
