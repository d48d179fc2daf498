//! sanbench: perftest-style benchmarks of the sanpath engine on the embedded
//! soft fabric, each printed beside the baselines measured in the same run
//! (cache-line ping-pong, memcpy, TCP loopback) as ratios.

mod baseline;
mod engine;
mod plot;
mod stats;

use clap::{Parser, ValueEnum};
use stats::{Bw, Lat};
use std::io::Write;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
enum Test {
    SendLat,
    WriteLat,
    ReadLat,
    SendBw,
    WriteBw,
    ReadBw,
    StreamLat,
    StreamBw,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Fabric {
    Soft,
    Verbs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// The waiting thread polls the CQ itself (no engine threads).
    Rtc,
    /// Poller threads and a dispatcher.
    Threads,
}

/// perftest-style benchmarks of sanpath with their baselines beside them.
#[derive(Parser, Debug)]
#[command(name = "sanbench", version)]
struct Cli {
    /// Tests to run (default: the standard suite).
    #[arg(value_enum)]
    tests: Vec<Test>,
    /// Message size in bytes (default: per test, 8 B for latency, 1 MiB for bandwidth).
    #[arg(short = 's', long)]
    size: Option<usize>,
    /// Sweep sizes 2 B .. 8 MiB (powers of two).
    #[arg(short = 'a', long)]
    all: bool,
    /// Iterations per latency test / messages per bandwidth test.
    #[arg(short = 'n', long)]
    iters: Option<usize>,
    /// Fabric.
    #[arg(long, value_enum, default_value = "soft")]
    fabric: Fabric,
    /// Progress mode.
    #[arg(long, value_enum, default_value = "rtc")]
    mode: Mode,
    /// Two cores for the two sides, e.g. `0,1`.
    #[arg(long, value_delimiter = ',')]
    cores: Vec<usize>,
    /// Engine config file (TOML), applied before the benchmark's own settings.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Write every figure and the environment as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write HdrHistogram percentile files (.hgrm) of each latency test here.
    #[arg(long)]
    hgrm: Option<PathBuf>,
    /// Write a latency-percentile chart (SVG) here; with -a also a
    /// bandwidth-by-size chart next to it (NAME-bw.svg).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Small iteration counts (CI smoke run).
    #[arg(long)]
    quick: bool,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(&cli) {
        eprintln!("sanbench: {e}");
        std::process::exit(1);
    }
}

fn run(cli: &Cli) -> Result<(), String> {
    let mut config = match &cli.config {
        Some(p) => sanpath::Config::load(p).map_err(|e| e.to_string())?,
        None => sanpath::Config::default(),
    };
    if cli.fabric == Fabric::Verbs {
        if !cfg!(feature = "verbs") {
            return Err("--fabric verbs: build with `--features verbs` (needs libibverbs-dev librdmacm-dev libclang-dev)".into());
        }
        config.fabric.kind = sanpath::config::FabricKind::Verbs;
    }
    engine::tune(&mut config, cli.mode);
    let cores = match cli.cores.as_slice() {
        [] => (0, 1),
        [a, b, ..] => (*a, *b),
        [a] => (*a, *a),
    };
    let suite: Vec<Test> = if cli.tests.is_empty() {
        vec![
            Test::SendLat,
            Test::WriteLat,
            Test::ReadLat,
            Test::SendBw,
            Test::WriteBw,
            Test::ReadBw,
        ]
    } else {
        cli.tests.clone()
    };
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "sanbench {}: {} fabric, {} mode, {} cores, sides on cores {},{}{}",
        env!("CARGO_PKG_VERSION"),
        match cli.fabric {
            Fabric::Soft => "soft",
            Fabric::Verbs => "verbs",
        },
        match cli.mode {
            Mode::Rtc => "run-to-completion",
            Mode::Threads => "threads",
        },
        ncpu,
        cores.0,
        cores.1,
        if cli.quick { ", quick" } else { "" }
    );
    let lat_iters = cli.iters.unwrap_or(if cli.quick { 2_000 } else { 50_000 });
    let bench = engine::Bench::new(config, cores).map_err(|e| e.to_string())?;
    // Baselines measured once per size, in this run.
    let floor = baseline::pingpong(cores, lat_iters);
    let mut json = Vec::new();
    let mut curves: Vec<plot::Series> = Vec::new();
    let mut bw_points: Vec<plot::Series> = Vec::new();
    if let Some(dir) = &cli.hgrm {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    println!();
    println!(
        "{:<10} {:>8}  {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}  | baselines (same run)",
        "test", "size", "t_min", "t_typ", "t_p99", "t_p99.9", "t_max", "t_stdev"
    );
    for t in suite {
        let sizes: Vec<usize> = if cli.all {
            (1..=23).map(|k| 1usize << k).collect()
        } else {
            vec![cli.size.unwrap_or(match t {
                Test::SendLat | Test::WriteLat | Test::ReadLat | Test::StreamLat => 8,
                _ => 1 << 20,
            })]
        };
        for size in sizes {
            progress(&format!("running {} {} ...", name(t), human(size)));
            match t {
                Test::StreamLat | Test::StreamBw => {
                    println!(
                        "{:<10} {:>8}  not available yet: needs the reference switch (issue 3)",
                        name(t),
                        human(size)
                    );
                }
                Test::SendLat | Test::WriteLat | Test::ReadLat => {
                    let lat = match t {
                        Test::SendLat => bench.send_lat(size, lat_iters),
                        Test::WriteLat => bench.write_lat(size, lat_iters),
                        _ => bench.read_lat(size, lat_iters),
                    }
                    .map_err(|e| format!("{}: {e}", name(t)))?;
                    let tcp = baseline::tcp_lat(size, (lat_iters / 4).max(200), t == Test::ReadLat);
                    let fl = if t == Test::ReadLat {
                        floor.scaled(2.0)
                    } else {
                        floor.clone()
                    };
                    print_lat(t, size, &lat, &fl, &tcp);
                    if let Some(dir) = &cli.hgrm {
                        let path = dir.join(format!("{}_{}.hgrm", name(t), size));
                        std::fs::write(&path, lat.hgrm())
                            .map_err(|e| format!("{}: {e}", path.display()))?;
                    }
                    curves.push((
                        format!("{} {}", name(t), human(size)),
                        lat.percentile_curve(),
                    ));
                    json.push(serde_json::json!({
                        "test": name(t), "size": size, "mode": format!("{:?}", cli.mode).to_lowercase(),
                        "lat_ns": lat.json(), "floor_ns": fl.json(), "tcp_ns": tcp.json(),
                        "ratio_floor": lat.median_ns() / fl.median_ns(), "ratio_tcp": tcp.median_ns() / lat.median_ns(),
                    }));
                }
                Test::SendBw | Test::WriteBw | Test::ReadBw => {
                    let total: usize = if cli.quick { 64 << 20 } else { 2 << 30 };
                    let msgs = cli.iters.unwrap_or((total / size).clamp(1_000, 2_000_000));
                    let bw = match t {
                        Test::SendBw => bench.send_bw(size, msgs),
                        Test::WriteBw => bench.write_bw(size, msgs),
                        _ => bench.read_bw(size, msgs),
                    }
                    .map_err(|e| format!("{}: {e}", name(t)))?;
                    let memcpy = baseline::memcpy_bw(size, msgs.min(100_000));
                    let tcp = baseline::tcp_bw(size, (total / 4).max(size * 16));
                    print_bw(t, size, &bw, &memcpy, &tcp);
                    match bw_points.iter_mut().find(|(l, _)| l == name(t)) {
                        Some((_, pts)) => pts.push((size as f64, bw.mb_s())),
                        None => {
                            bw_points.push((name(t).to_string(), vec![(size as f64, bw.mb_s())]))
                        }
                    }
                    json.push(serde_json::json!({
                        "test": name(t), "size": size, "mode": format!("{:?}", cli.mode).to_lowercase(),
                        "mb_s": bw.mb_s(), "mmsg_s": bw.mmsg_s(), "memcpy_mb_s": memcpy.mb_s(), "tcp_mb_s": tcp.mb_s(),
                        "ratio_memcpy": bw.mb_s() / memcpy.mb_s(), "ratio_tcp": bw.mb_s() / tcp.mb_s(),
                    }));
                }
            }
        }
    }
    drop(bench);
    println!();
    println!("latency: half round trip for send/write, full for read (perftest convention); ns from raw samples.");
    println!("floor = cache-line ping-pong between the same two cores; tcp = same pattern over 127.0.0.1.");
    if let Some(dir) = &cli.hgrm {
        println!("wrote percentile files to {}", dir.display());
    }
    if let Some(path) = &cli.plot {
        let write = |p: &std::path::Path, svg: String| -> Result<(), String> {
            std::fs::write(p, svg).map_err(|e| format!("{}: {e}", p.display()))?;
            println!("wrote {}", p.display());
            Ok(())
        };
        if !curves.is_empty() {
            write(path, plot::latency(&curves))?;
        }
        if bw_points.iter().any(|(_, p)| p.len() > 1) {
            let stem = path
                .file_stem()
                .map_or("sanbench".into(), |s| s.to_string_lossy().into_owned());
            write(
                &path.with_file_name(format!("{stem}-bw.svg")),
                plot::bandwidth(&bw_points),
            )?;
        }
    }
    if let Some(path) = &cli.json {
        let doc = serde_json::json!({
            "tool": "sanbench", "version": env!("CARGO_PKG_VERSION"),
            "git": git_rev(), "cores": ncpu, "sides_on_cores": [cores.0, cores.1],
            "mode": format!("{:?}", cli.mode).to_lowercase(), "quick": cli.quick,
            "results": json,
        });
        let mut f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        writeln!(f, "{}", serde_json::to_string_pretty(&doc).unwrap())
            .map_err(|e| e.to_string())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// A one-line progress note on stderr, only when it is a terminal; the next
/// table line overwrites it.
fn progress(what: &str) {
    use std::io::IsTerminal;
    let mut err = std::io::stderr();
    if err.is_terminal() {
        let _ = write!(err, "\r\x1b[2K{what}\r");
        let _ = err.flush();
    }
}

fn print_lat(t: Test, size: usize, l: &Lat, floor: &Lat, tcp: &Lat) {
    println!(
        "{:<10} {:>8}  {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}  | floor {} ({:.1}x)  tcp {} ({:.0}x below)",
        name(t),
        human(size),
        us(l.min_ns()),
        us(l.median_ns()),
        us(l.p(99.0)),
        us(l.p(99.9)),
        us(l.max_ns()),
        us(l.stdev_ns()),
        us(floor.median_ns()),
        l.median_ns() / floor.median_ns(),
        us(tcp.median_ns()),
        tcp.median_ns() / l.median_ns(),
    );
}

fn print_bw(t: Test, size: usize, b: &Bw, memcpy: &Bw, tcp: &Bw) {
    println!(
        "{:<10} {:>8}  {:>9.0} MB/s {:>7.3} Mmsg/s {:>23}  | memcpy {:.0} MB/s ({:.2}x)  tcp {:.0} MB/s ({:.1}x)",
        name(t),
        human(size),
        b.mb_s(),
        b.mmsg_s(),
        "",
        memcpy.mb_s(),
        b.mb_s() / memcpy.mb_s(),
        tcp.mb_s(),
        b.mb_s() / tcp.mb_s(),
    );
}

fn us(ns: f64) -> String {
    format!("{:.3}us", ns / 1000.0)
}

fn name(t: Test) -> &'static str {
    match t {
        Test::SendLat => "send_lat",
        Test::WriteLat => "write_lat",
        Test::ReadLat => "read_lat",
        Test::SendBw => "send_bw",
        Test::WriteBw => "write_bw",
        Test::ReadBw => "read_bw",
        Test::StreamLat => "stream_lat",
        Test::StreamBw => "stream_bw",
    }
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

fn git_rev() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}
