//! `include/sanpath.h` is generated from the Rust definitions by cbindgen (as
//! a library). This test regenerates it and fails if the committed header
//! differs. Refresh it with:
//!
//! ```sh
//! SANPATH_BLESS=1 cargo test -p sanpath-ffi --test header
//! ```
//!
//! cbindgen only emits `extern "C"` functions, while the SPI functions are
//! `extern "system"` (`WSPAPI`). On the 64-bit targets this crate supports
//! both name the platform's C convention, so the generator reads a copy of
//! `src/` in which `extern "system"` is spelled `extern "C"`; nothing else
//! changes.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const REFRESH: &str = "SANPATH_BLESS=1 cargo test -p sanpath-ffi --test header";

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Copies `src` to `dst` (recursively), rewriting the ABI string.
fn copy_for_cbindgen(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for entry in fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        let to = dst.join(entry.file_name());
        if path.is_dir() {
            copy_for_cbindgen(&path, &to);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = fs::read_to_string(&path).unwrap();
            // Private callbacks for C (`atexit`) are `extern "C"`.
            assert!(
                !text.contains("pub extern \"C\" fn")
                    && !text.contains("pub unsafe extern \"C\" fn"),
                "{}: exported functions use extern \"system\" (WSPAPI)",
                path.display()
            );
            fs::write(&to, text.replace("extern \"system\"", "extern \"C\"")).unwrap();
        }
    }
}

/// The generated header (generated once per test process: the tests run
/// in parallel and share the scratch copy of the sources).
fn generate() -> String {
    static HEADER: OnceLock<String> = OnceLock::new();
    HEADER.get_or_init(generate_now).clone()
}

fn generate_now() -> String {
    let dir = crate_dir();
    let scratch = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sanpath-ffi-header-src");
    let _ = fs::remove_dir_all(&scratch);
    copy_for_cbindgen(&dir.join("src"), &scratch);
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(scratch.join("lib.rs"))
        .generate()
        .expect("cbindgen could not generate the header");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("header is UTF-8")
}

#[test]
fn header_is_up_to_date() {
    let generated = generate();
    let path = crate_dir().join("include").join("sanpath.h");
    if std::env::var_os("SANPATH_BLESS").is_some_and(|v| v == "1") {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = fs::read_to_string(&path).unwrap_or_default();
    if committed != generated {
        let fresh = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sanpath.h.generated");
        fs::write(&fresh, &generated).unwrap();
        panic!(
            "{} is stale (the freshly generated header is in {}).\nRefresh it with:\n    {REFRESH}",
            path.display(),
            fresh.display()
        );
    }
}

#[test]
fn header_declares_the_whole_abi() {
    let h = generate();
    for name in [
        "WSPStartupEx",
        "WSPAccept",
        "WSPAddressToString",
        "WSPAsyncSelect",
        "WSPBind",
        "WSPCancelBlockingCall",
        "WSPCleanup",
        "WSPCloseSocket",
        "WSPConnect",
        "WSPDuplicateSocket",
        "WSPEnumNetworkEvents",
        "WSPEventSelect",
        "WSPGetOverlappedResult",
        "WSPGetPeerName",
        "WSPGetSockName",
        "WSPGetSockOpt",
        "WSPGetQOSByName",
        "WSPIoctl",
        "WSPJoinLeaf",
        "WSPListen",
        "WSPRecv",
        "WSPRecvDisconnect",
        "WSPRecvFrom",
        "WSPSelect",
        "WSPSend",
        "WSPSendDisconnect",
        "WSPSendTo",
        "WSPSetSockOpt",
        "WSPShutdown",
        "WSPSocket",
        "WSPStringToAddress",
        "WSPRegisterMemory",
        "WSPDeregisterMemory",
        "WSPRegisterRdmaMemory",
        "WSPDeregisterRdmaMemory",
        "WSPRdmaWrite",
        "WSPRdmaRead",
        "WSPMemoryRegistrationCacheCallback",
        "sanpath_event_create",
        "sanpath_event_set",
        "sanpath_event_reset",
        "sanpath_event_wait",
        "sanpath_event_set_count",
        "sanpath_event_close",
    ] {
        assert!(
            h.contains(&format!(" {name}(")),
            "the header lacks a prototype for {name}"
        );
    }
    for ty in [
        "WSPDATA",
        "WSAPROTOCOL_INFOW",
        "WSPUPCALLTABLEEX",
        "WSPPROC_TABLE",
        "WSAOVERLAPPED",
        "WSANETWORKEVENTS",
        "SOCKADDR_IN",
        "SOCKET_ADDRESS_LIST",
        "GUID",
        "WSATHREADID",
        "LPWSPSTARTUPEX",
        "LPFN_WSPRDMAWRITE",
    ] {
        assert!(
            h.contains(&format!("}} {ty};")) || h.contains(&format!("(*{ty})")),
            "{ty}"
        );
    }
    assert!(h.contains("SANPATH_USE_WINSOCK_HEADERS"));
}
