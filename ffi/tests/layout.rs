//! Layout and prototype checks against the real Windows headers.
//!
//! A C file is generated with `_Static_assert`s of `sizeof`/`_Alignof` of
//! every structure, `offsetof` and size of every field (values computed here
//! with `offset_of!`), so also the order of the `WSPPROC_TABLE` and
//! `WSPUPCALLTABLEEX` members, the size and signedness of the scalar types,
//! and the value of every constant in `include/sanpath.h`. It is compiled
//! with `x86_64-w64-mingw32-gcc -c` on top of `<winsock2.h>`, `<ws2spi.h>`
//! and `<ddk/ws2san.h>` from mingw-w64, with `sanpath.h` included in its
//! `SANPATH_USE_WINSOCK_HEADERS` mode: then the C compiler also checks every
//! prototype of ours against the SDK (`ws2san.h` declares `WSPStartupEx` and
//! the extension functions; the procedure table is initialised with our
//! functions; our function-pointer typedefs are compared with the SDK's).
//!
//! The mingw-w64 cross compiler is required: without it the test fails
//! (install the Debian packages `mingw-w64-x86-64-dev` and
//! `gcc-mingw-w64-x86-64`), unless `SANPATH_SKIP_MINGW=1` is set.
//!
//! The same structure checks are also compiled with the host `cc` against
//! `sanpath.h` alone, to check that the generated header reproduces the Rust
//! layouts.

use sanpath_ffi::win::*;
use std::fmt::Write as _;
use std::mem::{align_of, offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::Command;

const MINGW_CC: &str = "x86_64-w64-mingw32-gcc";
const MINGW_PACKAGES: &str = "mingw-w64-x86-64-dev gcc-mingw-w64-x86-64";

fn field_size<T, F>(_: impl Fn(&T) -> &F) -> usize {
    size_of::<F>()
}

/// `CHECK_*` lines for structures: size, alignment, and each field's offset
/// and size.
macro_rules! structs {
    ($out:ident; $($t:ident { $($f:ident),* $(,)? })*) => {$(
        writeln!($out, "CHECK_SIZE({}, {});", stringify!($t), size_of::<$t>()).unwrap();
        writeln!($out, "CHECK_ALIGN({}, {});", stringify!($t), align_of::<$t>()).unwrap();
        $(
            writeln!(
                $out,
                "CHECK_FIELD({}, {}, {}, {});",
                stringify!($t),
                stringify!($f),
                offset_of!($t, $f),
                field_size(|x: &$t| &x.$f),
            )
            .unwrap();
        )*
    )*};
}

/// `CHECK_SCALAR` lines: size and signedness of integer typedefs.
macro_rules! integers {
    ($out:ident; $($t:ident),* $(,)?) => {$(
        writeln!(
            $out,
            "CHECK_SCALAR({}, {}, {});",
            stringify!($t),
            size_of::<$t>(),
            i32::from(<$t>::MIN != 0),
        )
        .unwrap();
    )*};
}

/// `CHECK_SIZE` lines for pointer typedefs.
macro_rules! pointers {
    ($out:ident; $($t:ident),* $(,)?) => {$(
        writeln!($out, "CHECK_SIZE({}, {});", stringify!($t), size_of::<$t>()).unwrap();
    )*};
}

/// The table member names, in the order of the Rust structures.
macro_rules! names {
    ($($f:ident),* $(,)?) => {
        &[$(stringify!($f)),*]
    };
}

const PROC_TABLE: &[&str] = names!(
    lpWSPAccept,
    lpWSPAddressToString,
    lpWSPAsyncSelect,
    lpWSPBind,
    lpWSPCancelBlockingCall,
    lpWSPCleanup,
    lpWSPCloseSocket,
    lpWSPConnect,
    lpWSPDuplicateSocket,
    lpWSPEnumNetworkEvents,
    lpWSPEventSelect,
    lpWSPGetOverlappedResult,
    lpWSPGetPeerName,
    lpWSPGetSockName,
    lpWSPGetSockOpt,
    lpWSPGetQOSByName,
    lpWSPIoctl,
    lpWSPJoinLeaf,
    lpWSPListen,
    lpWSPRecv,
    lpWSPRecvDisconnect,
    lpWSPRecvFrom,
    lpWSPSelect,
    lpWSPSend,
    lpWSPSendDisconnect,
    lpWSPSendTo,
    lpWSPSetSockOpt,
    lpWSPShutdown,
    lpWSPSocket,
    lpWSPStringToAddress,
);

fn struct_checks() -> String {
    let mut out = String::new();
    structs!(out;
        GUID { Data1, Data2, Data3, Data4 }
        WSPDATA { wVersion, wHighVersion, szDescription }
        WSAPROTOCOLCHAIN { ChainLen, ChainEntries }
        WSAPROTOCOL_INFOW {
            dwServiceFlags1, dwServiceFlags2, dwServiceFlags3, dwServiceFlags4,
            dwProviderFlags, ProviderId, dwCatalogEntryId, ProtocolChain, iVersion,
            iAddressFamily, iMaxSockAddr, iMinSockAddr, iSocketType, iProtocol,
            iProtocolMaxOffset, iNetworkByteOrder, iSecurityScheme, dwMessageSize,
            dwProviderReserved, szProtocol,
        }
        WSAOVERLAPPED { Internal, InternalHigh, Offset, OffsetHigh, hEvent }
        WSABUF { len, buf }
        WSABUFEX { len, buf, handle }
        WSATHREADID { ThreadHandle, Reserved }
        WSANETWORKEVENTS { lNetworkEvents, iErrorCode }
        SOCKADDR { sa_family, sa_data }
        IN_ADDR { s_addr }
        SOCKADDR_IN { sin_family, sin_port, sin_addr, sin_zero }
        SOCKET_ADDRESS { lpSockaddr, iSockaddrLength }
        SOCKET_ADDRESS_LIST { iAddressCount, Address }
        WSPUPCALLTABLEEX {
            lpWPUCloseEvent, lpWPUCloseSocketHandle, lpWPUCreateEvent,
            lpWPUCreateSocketHandle, lpWPUFDIsSet, lpWPUGetProviderPath,
            lpWPUModifyIFSHandle, lpWPUPostMessage, lpWPUQueryBlockingCallback,
            lpWPUQuerySocketHandleContext, lpWPUQueueApc, lpWPUResetEvent, lpWPUSetEvent,
            lpWPUOpenCurrentThread, lpWPUCloseThread, lpWPUCompleteOverlappedRequest,
        }
        WSPPROC_TABLE {
            lpWSPAccept, lpWSPAddressToString, lpWSPAsyncSelect, lpWSPBind,
            lpWSPCancelBlockingCall, lpWSPCleanup, lpWSPCloseSocket, lpWSPConnect,
            lpWSPDuplicateSocket, lpWSPEnumNetworkEvents, lpWSPEventSelect,
            lpWSPGetOverlappedResult, lpWSPGetPeerName, lpWSPGetSockName, lpWSPGetSockOpt,
            lpWSPGetQOSByName, lpWSPIoctl, lpWSPJoinLeaf, lpWSPListen, lpWSPRecv,
            lpWSPRecvDisconnect, lpWSPRecvFrom, lpWSPSelect, lpWSPSend, lpWSPSendDisconnect,
            lpWSPSendTo, lpWSPSetSockOpt, lpWSPShutdown, lpWSPSocket, lpWSPStringToAddress,
        }
    );
    // Each table member is one pointer, in this order (spec §2.2, §2.4).
    for (i, name) in PROC_TABLE.iter().enumerate() {
        writeln!(out, "CHECK_FIELD(WSPPROC_TABLE, {name}, {}, 8);", i * 8).unwrap();
    }
    integers!(out;
        CHAR, WCHAR, WORD, USHORT, DWORD, ULONG, UINT, INT, LONG, BOOL, ULONG_PTR,
        DWORD_PTR, UINT_PTR, LONG_PTR, SIZE_T, WPARAM, LPARAM, SOCKET, GROUP, ADDRESS_FAMILY,
    );
    pointers!(out; HANDLE, HWND, WSAEVENT, LPWSTR);
    out
}

const PRELUDE: &str = r#"
#include <stddef.h>
#define CHECK_SIZE(T, n) _Static_assert(sizeof(T) == (n), "sizeof(" #T ")")
#define CHECK_ALIGN(T, n) _Static_assert(_Alignof(T) == (n), "_Alignof(" #T ")")
#define CHECK_FIELD(T, f, off, sz)                                              \
    _Static_assert(offsetof(T, f) == (off), "offsetof(" #T ", " #f ")");       \
    _Static_assert(sizeof(((T *)0)->f) == (sz), "sizeof(" #T "." #f ")")
#define CHECK_SCALAR(T, sz, is_signed)                                          \
    _Static_assert(sizeof(T) == (sz), "sizeof(" #T ")");                        \
    _Static_assert((((T)-1) < (T)0) == (is_signed), "signedness of " #T)
"#;

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn header_text() -> String {
    std::fs::read_to_string(crate_dir().join("include/sanpath.h")).expect("include/sanpath.h")
}

/// `(name, value)` of every `#define` of the header that mirrors a Windows
/// constant (not the include guard, not sanpath's own, not GUIDs).
fn header_constants(h: &str) -> Vec<(String, String)> {
    h.lines()
        .filter_map(|l| l.strip_prefix("#define "))
        .filter_map(|l| l.split_once(' '))
        .filter(|(n, v)| !n.starts_with("SANPATH_") && !v.starts_with("(GUID)"))
        .map(|(n, v)| (n.to_string(), v.trim().to_string()))
        .collect()
}

/// `(name, full typedef text)` of every function-pointer typedef.
fn header_fn_typedefs(h: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = h;
    while let Some(start) = rest.find("typedef ") {
        let tail = &rest[start..];
        let end = tail.find(';').expect("typedef ends with ;");
        let text = &tail[..=end];
        if let Some(p) = text.find("(*") {
            let name_end = text[p + 2..].find(')').unwrap() + p + 2;
            out.push((text[p + 2..name_end].to_string(), text.to_string()));
        }
        rest = &tail[end..];
    }
    out
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let o = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed:\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ))
    }
}

fn write_source(name: &str, text: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sanpath-ffi-layout");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn compile(cc: &str, src: &Path) -> Result<(), String> {
    let obj = src.with_extension("o");
    run(Command::new(cc)
        .args([
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wno-type-limits",
            "-c",
        ])
        .arg("-I")
        .arg(crate_dir().join("include"))
        .arg(src)
        .arg("-o")
        .arg(obj))
}

fn mingw_available() -> bool {
    Command::new(MINGW_CC)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The Windows-header check source.
fn mingw_source() -> String {
    let h = header_text();
    let mut c = String::from(
        "#include <winsock2.h>\n#include <ws2spi.h>\n#include <ddk/ws2san.h>\n\
         #define SANPATH_USE_WINSOCK_HEADERS\n#include \"sanpath.h\"\n",
    );
    c.push_str(PRELUDE);
    c.push_str("\n/* Structures, tables, scalar types (values from Rust). */\n");
    c.push_str(&struct_checks());
    c.push_str("\n/* Constants of sanpath.h against the Windows headers. */\n");
    for (name, value) in header_constants(&h) {
        writeln!(c, "_Static_assert(({name}) == ({value}), \"{name}\");").unwrap();
    }
    c.push_str("\n/* Function-pointer typedefs of sanpath.h against the SDK's. */\n");
    for (name, text) in header_fn_typedefs(&h) {
        let mine = format!("sanpath_check_{name}");
        writeln!(
            c,
            "{}",
            text.replacen(&format!("(*{name})"), &format!("(*{mine})"), 1)
        )
        .unwrap();
        writeln!(
            c,
            "_Static_assert(__builtin_types_compatible_p({mine}, {name}), \"typedef {name}\");"
        )
        .unwrap();
    }
    c.push_str("\n/* Our functions have the SDK's types (slot by slot). */\n");
    c.push_str("const WSPPROC_TABLE sanpath_check_table = {\n");
    for slot in PROC_TABLE {
        writeln!(c, "    .{slot} = {},", &slot[2..]).unwrap();
    }
    c.push_str("};\n");
    for (ty, f) in [
        ("LPWSPSTARTUPEX", "WSPStartupEx"),
        ("LPFN_WSPREGISTERMEMORY", "WSPRegisterMemory"),
        ("LPFN_WSPDEREGISTERMEMORY", "WSPDeregisterMemory"),
        ("LPFN_WSPREGISTERRDMAMEMORY", "WSPRegisterRdmaMemory"),
        ("LPFN_WSPDEREGISTERRDMAMEMORY", "WSPDeregisterRdmaMemory"),
        ("LPFN_WSPRDMAWRITE", "WSPRdmaWrite"),
        ("LPFN_WSPRDMAREAD", "WSPRdmaRead"),
        (
            "LPFN_WSPMEMORYREGISTRATIONCACHECALLBACK",
            "WSPMemoryRegistrationCacheCallback",
        ),
    ] {
        writeln!(c, "const {ty} sanpath_check_{f} = {f};").unwrap();
    }
    c
}

/// The GUID macros of `ddk/ws2san.h` (from the preprocessor's macro dump).
fn mingw_guids() -> Result<Vec<(String, GUID)>, String> {
    let src = write_source(
        "guids.c",
        "#include <winsock2.h>\n#include <ws2spi.h>\n#include <ddk/ws2san.h>\n",
    );
    let o = Command::new(MINGW_CC)
        .args(["-E", "-dM"])
        .arg(&src)
        .output()
        .map_err(|e| e.to_string())?;
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    let dump = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut out = Vec::new();
    for line in dump.lines() {
        let Some(rest) = line.strip_prefix("#define WSAID_") else {
            continue;
        };
        let Some((name, value)) = rest.split_once(' ') else {
            continue;
        };
        let nums: Vec<u64> = value
            .split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|t| t.starts_with("0x") || t.starts_with("0X"))
            .map(|t| u64::from_str_radix(&t[2..], 16).unwrap())
            .collect();
        if nums.len() != 11 {
            continue; // not a GUID (or not one of the SAN ones)
        }
        let mut d4 = [0u8; 8];
        for (d, n) in d4.iter_mut().zip(&nums[3..]) {
            *d = *n as u8;
        }
        out.push((
            format!("WSAID_{name}"),
            GUID {
                Data1: nums[0] as u32,
                Data2: nums[1] as u16,
                Data3: nums[2] as u16,
                Data4: d4,
            },
        ));
    }
    Ok(out)
}

#[test]
fn layouts_and_prototypes_match_the_windows_headers() {
    if !mingw_available() {
        if std::env::var_os("SANPATH_SKIP_MINGW").is_some_and(|v| v == "1") {
            eprintln!("SKIPPED: {MINGW_CC} not found and SANPATH_SKIP_MINGW=1");
            return;
        }
        panic!(
            "{MINGW_CC} not found: the Windows layout check needs mingw-w64. Install it with\n    \
             apt-get install -y {MINGW_PACKAGES}\nor set SANPATH_SKIP_MINGW=1 to skip this test."
        );
    }
    let src = write_source("windows_layout.c", &mingw_source());
    if let Err(e) = compile(MINGW_CC, &src) {
        panic!(
            "the Windows layout check failed (source: {}):\n{e}",
            src.display()
        );
    }

    let ours = [
        ("WSAID_REGISTERMEMORY", WSAID_REGISTERMEMORY),
        ("WSAID_DEREGISTERMEMORY", WSAID_DEREGISTERMEMORY),
        ("WSAID_REGISTERRDMAMEMORY", WSAID_REGISTERRDMAMEMORY),
        ("WSAID_DEREGISTERRDMAMEMORY", WSAID_DEREGISTERRDMAMEMORY),
        ("WSAID_RDMAWRITE", WSAID_RDMAWRITE),
        ("WSAID_RDMAREAD", WSAID_RDMAREAD),
        (
            "WSAID_MEMORYREGISTRATIONCACHECALLBACK",
            WSAID_MEMORYREGISTRATIONCACHECALLBACK,
        ),
    ];
    let theirs = mingw_guids().expect("preprocessing ws2san.h");
    for (name, guid) in ours {
        let found = theirs.iter().find(|(n, _)| n == name);
        assert_eq!(
            found.map(|(_, g)| *g),
            Some(guid),
            "{name} differs from ws2san.h"
        );
    }
}

#[test]
fn generated_header_reproduces_the_rust_layouts() {
    let mut c = String::from("#include \"sanpath.h\"\n");
    c.push_str(PRELUDE);
    c.push_str(&struct_checks());
    let src = write_source("header_layout.c", &c);
    if let Err(e) = compile("cc", &src) {
        panic!(
            "sanpath.h does not reproduce the Rust layouts (source: {}):\n{e}",
            src.display()
        );
    }
}

#[test]
fn constant_and_typedef_extraction_sees_the_header() {
    let h = header_text();
    let consts = header_constants(&h);
    assert!(consts.iter().any(|(n, v)| n == "WSAEFAULT" && v == "10014"));
    assert!(consts.iter().any(|(n, _)| n == "SIO_ADDRESS_LIST_QUERY"));
    let typedefs = header_fn_typedefs(&h);
    for name in [
        "LPWSPACCEPT",
        "LPWPUCOMPLETEOVERLAPPEDREQUEST",
        "LPFN_WSPRDMAREAD",
    ] {
        assert!(typedefs.iter().any(|(n, _)| n == name), "{name}");
    }
    assert!(typedefs.len() >= 30 + 16 + 8, "{}", typedefs.len());
}
