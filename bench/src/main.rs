//! sanbench: perftest-style benchmarks of the sanpath engine on the embedded
//! soft fabric, each printed beside the baselines measured in the same run
//! (cache-line ping-pong, memcpy, TCP loopback) as ratios; or, as perftest,
//! between two processes (`sanbench --server`, `sanbench HOST`).

mod baseline;
mod clock;
mod conn_scale;
mod engine;
mod plot;
mod remote;
mod stats;
mod stream;

use baseline::Cores;
use clap::{Parser, ValueEnum};
use sanpath::config::FabricKind;
use serde_json::{json, Value};
use stats::{Bw, Lat};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Test {
    SendLat,
    WriteLat,
    ReadLat,
    SendBw,
    WriteBw,
    ReadBw,
    StreamLat,
    StreamBw,
    ConnScale,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Run to completion: the waiting thread polls its socket's CQ itself
    /// (no engine threads).
    Rtc,
    /// Poller threads reap CQs into rings; a dispatcher completes ops.
    Threads,
}

/// perftest-style benchmarks of sanpath, each figure beside baselines
/// measured in the same run (cache-line ping-pong floor, memcpy, TCP loopback).
#[derive(Parser, Debug)]
#[command(name = "sanbench", version)]
struct Cli {
    /// Tests to run: send_lat write_lat read_lat send_bw write_bw read_bw
    /// (the default), stream_lat stream_bw (over the reference switch's
    /// streams, when named); and a HOST: run them against `sanbench
    /// --server` there (the data over --fabric, which must not be soft).
    #[arg(value_name = "TEST|HOST")]
    args: Vec<String>,
    /// Serve the tests a `sanbench HOST` client asks for, then exit.
    #[arg(long)]
    server: bool,
    /// With --server: serve client after client until killed.
    #[arg(long, requires = "server")]
    persistent: bool,
    /// Control port (TCP) of the server.
    #[arg(short = 'p', long, default_value_t = remote::DEFAULT_PORT)]
    port: u16,
    /// Message size in bytes (default: 8 B for latency, 1 MiB for
    /// bandwidth); a list runs each test at each size, e.g. `-s 8,4096`.
    #[arg(short = 's', long, value_delimiter = ',')]
    size: Vec<usize>,
    /// Sweep sizes 2 B .. 8 MiB (powers of two).
    #[arg(short = 'a', long, conflicts_with = "size")]
    all: bool,
    /// Iterations per latency test / messages per bandwidth test.
    #[arg(short = 'n', long, conflicts_with = "duration")]
    iters: Option<usize>,
    /// Run each test for about this many seconds instead of a fixed count.
    #[arg(short = 'D', long)]
    duration: Option<f64>,
    /// Fabric, as the engine config's `fabric.kind` names it: soft
    /// (in-process), verbs (needs the `verbs` cargo feature).
    #[arg(long, default_value = "soft", value_parser = parse_fabric)]
    fabric: FabricKind,
    /// RDMA device for --fabric verbs (`rxe0`, `mlx5_0`; default: the first
    /// with an active port).
    #[arg(short = 'd', long = "ib-dev")]
    ib_dev: Option<String>,
    /// Port of the RDMA device (default 1).
    #[arg(short = 'i', long = "ib-port")]
    ib_port: Option<u8>,
    /// Progress mode (engine `poller.mode`): rtc = run_to_completion.
    #[arg(long, value_enum, default_value = "rtc")]
    mode: Mode,
    /// The cores of the two sides, e.g. `0,1` (default: 0,1 when there are
    /// two or more; not pinned on one core, nor in two processes, where the
    /// client takes the first and the server the last).
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
    /// Write a latency-percentile chart (SVG) here (with -a: of the 2 B
    /// runs), and with -a a bandwidth-by-size chart next to it (NAME-bw.svg).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Small iteration counts (CI smoke run, a few seconds).
    #[arg(long)]
    quick: bool,
    /// Print the engine's counters (sockets by state, ops, completions by
    /// status, registrations) after the tests (conn_scale: with all pairs
    /// connected).
    #[arg(long)]
    stats: bool,
    /// conn_scale on verbs: the RDMA device of the connecting sockets (the
    /// accepted ones are on -d); default: the -d device (loopback).
    #[arg(long)]
    peer_dev: Option<String>,
    /// conn_scale: the connection counts to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 100, 1_000, 10_000])]
    conns: Vec<usize>,
    /// conn_scale: measure only these APIs (default: both; streams only on
    /// the soft fabric), e.g. `--conn-api stream` to time the streams'
    /// close alone.
    #[arg(long, value_enum, value_delimiter = ',')]
    conn_api: Vec<conn_scale::Api>,
}

/// A fabric kind by its config name: every kind the engine knows.
fn parse_fabric(s: &str) -> Result<FabricKind, String> {
    serde_json::from_value(Value::String(s.into())).map_err(|_| format!("unknown fabric {s:?}"))
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(&cli) {
        eprintln!("sanbench: {e}");
        std::process::exit(1);
    }
}

/// Rounds of (engine, memcpy) a bandwidth figure alternates; each side's
/// figure is the median of its rounds, so that a burst of noise on this
/// shared machine hits one round of one side, not the ratio.
const BW_ROUNDS: usize = 3;
/// Rounds of (floor, engine) a latency figure alternates; the samples of
/// all rounds make each distribution.
const LAT_ROUNDS: usize = 5;

/// Where the tests run: both sides in this process, or against a server.
enum Target {
    Local {
        bench: engine::Bench,
        /// The stream pair (made at the first stream test) and the engine
        /// config it is made from.
        stream: Option<stream::StreamBench>,
        stream_config: sanpath::Config,
    },
    Remote(remote::Client),
}

/// What the run measures and where it goes.
struct Runner<'a> {
    cli: &'a Cli,
    target: Target,
    cores: Cores,
    mode: &'static str,
    lat_iters: usize,
    /// Bytes a latency test moves each way at most (large messages get
    /// fewer iterations).
    lat_bytes: usize,
    bw_bytes: usize,
    results: Vec<Value>,
    curves: Vec<plot::Series>,
    bw_points: Vec<plot::Series>,
    notes: Vec<&'static str>,
    /// Kind of the last table row printed (a header precedes a change).
    last: Option<Kind>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Lat,
    Bw,
}

fn run(cli: &Cli) -> Result<(), String> {
    if cfg!(debug_assertions) {
        eprintln!("sanbench: warning: a debug build; run with --release for meaningful figures");
    }
    let mut config = match &cli.config {
        Some(p) => sanpath::Config::load(p).map_err(|e| format!("{}: {e}", p.display()))?,
        None => sanpath::Config::default(),
    };
    if cli.fabric == FabricKind::Verbs && !cfg!(feature = "verbs") {
        return Err(
            "--fabric verbs: not built in: this sanbench was built without the \
                    `verbs` cargo feature (cargo run --release -p sanpath-bench --features \
                    verbs; needs libibverbs-dev librdmacm-dev libclang-dev and an RDMA device)"
                .into(),
        );
    }
    config.fabric.kind = cli.fabric;
    if let Some(d) = &cli.ib_dev {
        config.fabric.verbs.device = d.clone();
    }
    if let Some(p) = cli.ib_port {
        config.fabric.verbs.port = p;
    }
    engine::tune(&mut config, cli.mode);
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Two processes: each pins its side only when told (as perftest; the
    // client takes the first core given, the server the last).
    let two_processes = cli.server || cli.args.iter().any(|a| Test::from_str(a, false).is_err());
    let cores: Cores = match cli.cores.as_slice() {
        [] if ncpu >= 2 && !two_processes => Some((0, 1)),
        [] => None,
        [a] => Some((*a, *a)),
        [a, b] => Some((*a, *b)),
        _ => return Err("--cores takes one or two cores, e.g. --cores 0,1".into()),
    };
    if let Some((a, b)) = cores {
        let ids: Vec<usize> = core_affinity::get_core_ids()
            .unwrap_or_default()
            .iter()
            .map(|c| c.id)
            .collect();
        if let Some(bad) = [a, b].into_iter().find(|c| !ids.contains(c)) {
            return Err(format!(
                "--cores: core {bad} is not available (have {ids:?})"
            ));
        }
    }
    let mut tests = Vec::new();
    let mut host = None;
    for a in &cli.args {
        match Test::from_str(a, false) {
            Ok(t) => tests.push(t),
            Err(_) if host.is_none() && !cli.server => host = Some(a.as_str()),
            Err(_) => {
                return Err(format!(
                    "{a:?} is not a test ({})",
                    Test::value_variants()
                        .iter()
                        .map(|t| name(*t))
                        .collect::<Vec<_>>()
                        .join(" ")
                ))
            }
        }
    }
    if cli.server {
        return serve(cli, config, cores);
    }
    let suite: Vec<Test> = if tests.is_empty() {
        vec![
            Test::SendLat,
            Test::WriteLat,
            Test::ReadLat,
            Test::SendBw,
            Test::WriteBw,
            Test::ReadBw,
        ]
    } else {
        tests
    };
    let mode = match cli.mode {
        Mode::Rtc => "rtc",
        Mode::Threads => "threads",
    };
    let load = loadavg();
    let fabric = remote::fabric_name(cli.fabric);
    println!(
        "sanbench {}: {} fabric{}, poller mode {} ({}), {} cpus, sides on {}{}",
        env!("CARGO_PKG_VERSION"),
        fabric,
        match host {
            Some(h) => format!(" to the server at {h}:{}", cli.port),
            None => String::new(),
        },
        mode,
        match cli.mode {
            Mode::Rtc => "run_to_completion",
            Mode::Threads => "threads",
        },
        ncpu,
        match (cores, host) {
            (Some((a, _)), Some(_)) => format!("core {a} (client)"),
            (Some((a, b)), None) => format!("cores {a},{b}"),
            (None, _) => "no pinned cores".into(),
        },
        if cli.quick { ", quick" } else { "" }
    );
    if let Some(l) = load.first().filter(|l| **l > 0.5 * ncpu as f64) {
        println!(
            "note: load average {l:.2} at start on {ncpu} cpus: other work shares these cores; \
             absolute figures are noisy, the same-run ratios less so"
        );
    }
    let target = match host {
        Some(h) => Target::Remote(remote::Client::connect(h, cli.port, &config, cores)?),
        None => Target::Local {
            bench: engine::Bench::new(config.clone(), cores)?,
            stream: None,
            stream_config: config.clone(),
        },
    };
    let mut r = Runner {
        cli,
        target,
        cores,
        mode,
        lat_iters: cli
            .iters
            .unwrap_or(if cli.quick { 10_000 } else { 100_000 }),
        lat_bytes: if cli.quick { 256 << 20 } else { 2 << 30 },
        bw_bytes: if cli.quick { 256 << 20 } else { 4 << 30 },
        results: Vec::new(),
        curves: Vec::new(),
        bw_points: Vec::new(),
        notes: Vec::new(),
        last: None,
    };
    if let Some(dir) = &cli.hgrm {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let started = Instant::now();
    for t in suite {
        let sizes: Vec<usize> = if t == Test::ConnScale {
            vec![conn_scale::MSG]
        } else if cli.all {
            (1..=23).map(|k| 1usize << k).collect()
        } else if !cli.size.is_empty() {
            cli.size.clone()
        } else {
            vec![match t {
                Test::SendLat | Test::WriteLat | Test::ReadLat | Test::StreamLat => 8,
                _ => 1 << 20,
            }]
        };
        for size in sizes {
            progress(&format!("running {} {} ...", name(t), human(size)));
            if is_stream(t) {
                match &mut r.target {
                    Target::Local {
                        stream: s @ None,
                        stream_config,
                        ..
                    } => *s = Some(stream::StreamBench::new(stream_config.clone(), cores)?),
                    Target::Local { .. } => {}
                    Target::Remote(c) => c.open_stream()?,
                }
            }
            match t {
                Test::SendLat | Test::WriteLat | Test::ReadLat | Test::StreamLat => {
                    r.latency(t, size)?
                }
                Test::SendBw | Test::WriteBw | Test::ReadBw | Test::StreamBw => {
                    r.bandwidth(t, size)?
                }
                Test::ConnScale => r.results.extend(conn_scale::suite(
                    &config,
                    cli.mode,
                    cli.peer_dev.as_deref(),
                    &cli.conns,
                    &cli.conn_api,
                    cli.iters,
                    cli.quick,
                    cli.stats,
                )?),
            }
        }
    }
    progress("");
    if let (true, Target::Local { bench, .. }) = (cli.stats, &r.target) {
        println!("engine stats (benchmark pair): {:?}", bench.stats());
    }
    let elapsed = started.elapsed();
    let stream_paths = match &r.target {
        Target::Local { stream, .. } => stream
            .as_ref()
            .map(|s| (s.rdma_threshold(), s.path(usize::MAX))),
        Target::Remote(c) => c.stream_path(usize::MAX),
    };
    let remote = matches!(r.target, Target::Remote(_));
    drop(r.target);
    if r.results.is_empty() {
        return Ok(());
    }
    println!();
    println!("latency: half round trip for send/write/stream, full for read (perftest); t_typ = median of raw samples (HdrHistogram).");
    let stamps = clock::Clock::start().source();
    if stamps == "tsc" {
        println!(
            "  send/write/read_lat and conn_scale stamped with the TSC (as perftest): reading the OS clock here costs more than {} ns.",
            clock::SLOW_OS_CLOCK_NS
        );
    }
    if remote {
        println!("  measured on the client, {LAT_ROUNDS} rounds; no floor or tcp baselines: they describe one host, not two.");
        println!(
            "bandwidth: MB/s = 10^6 B/s, window {} ops, median of {BW_ROUNDS} rounds, timed on the client.",
            engine::WINDOW
        );
    } else {
        println!("  floor = cache-line ping-pong between the same two cores (x2 for read) plus one memcpy of the message,");
        println!("  alternating with the test in {LAT_ROUNDS} rounds; tcp = the same ping-pong over 127.0.0.1 (TCP_NODELAY),");
        println!("  best of three placements (same two cores, one core, unpinned).");
        println!(
            "bandwidth: MB/s = 10^6 B/s, window {} ops; memcpy = one copy between buffers of the message size;",
            engine::WINDOW
        );
        println!("  median of {BW_ROUNDS} alternating rounds; tcp = one-way stream over 127.0.0.1, best of the same placements.");
    }
    if let Some((threshold, rdma)) = stream_paths {
        println!(
            "stream: a connected pair of sanpath::switch::Stream (blocking write_all/read_exact; stream_bw reads up to 1 MiB,"
        );
        println!("  as tcp does), in the mode above; copy path up to {threshold} B, {rdma} above.");
    }
    for n in &r.notes {
        println!("note: {n}");
    }
    if let Some(dir) = &cli.hgrm {
        println!("wrote percentile files to {}", dir.display());
    }
    if let Some(path) = &cli.plot {
        let write = |p: &std::path::Path, svg: String| -> Result<(), String> {
            std::fs::write(p, svg).map_err(|e| format!("{}: {e}", p.display()))?;
            println!("wrote {}", p.display());
            Ok(())
        };
        if !r.curves.is_empty() {
            write(path, plot::latency(&r.curves))?;
        }
        if r.bw_points.iter().any(|(_, p)| p.len() > 1) {
            let stem = path
                .file_stem()
                .map_or("sanbench".into(), |s| s.to_string_lossy().into_owned());
            write(
                &path.with_file_name(format!("{stem}-bw.svg")),
                plot::bandwidth(&r.bw_points),
            )?;
        }
    }
    if let Some(path) = &cli.json {
        let doc = json!({
            "tool": "sanbench",
            "version": env!("CARGO_PKG_VERSION"),
            "environment": {
                "git": git_rev(),
                "rustc": env!("SANBENCH_RUSTC_VERSION"),
                "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
                "cpus": ncpu,
                "cpu_model": cpu_model(),
                "kernel": kernel(),
                "loadavg_start": load,
                "loadavg_end": loadavg(),
                "sides_on_cores": cores.map(|(a, b)| [a, b]),
                "lat_stamps": stamps,
                "fabric": fabric,
                "server": host.map(|h| format!("{h}:{}", cli.port)),
                "mode": mode,
                "quick": cli.quick,
                "args": std::env::args().skip(1).collect::<Vec<_>>(),
                "seconds": elapsed.as_secs_f64(),
                "config": serde_json::to_value(&config).unwrap_or(Value::Null),
            },
            "results": r.results,
        });
        let mut f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        writeln!(f, "{}", serde_json::to_string_pretty(&doc).unwrap())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

impl Runner<'_> {
    fn header(&mut self, kind: Kind) {
        if self.last == Some(kind) {
            return;
        }
        self.last = Some(kind);
        println!();
        match kind {
            Kind::Lat => println!(
                "{:<10} {:>7} {:<7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}  | {:<18} tcp loopback (tcp/t_typ)",
                "latency",
                "size",
                "mode",
                "t_min",
                "t_typ",
                "t_p99",
                "t_p99.9",
                "t_max",
                "t_stdev",
                "floor (t_typ/floor)",
            ),
            Kind::Bw => println!(
                "{:<10} {:>7} {:<7} {:>10} {:>10}  | {:<24} tcp loopback (MB/s / tcp)",
                "bandwidth", "size", "mode", "MB/s", "Mmsg/s", "memcpy (MB/s / memcpy)"
            ),
        }
        if kind == Kind::Lat {
            println!("{:<10} {:>7} {:<7} {:>47}", "", "", "", "(microseconds)");
        }
    }

    /// Iterations of a latency test at `size`: `-n`; or sized from a probe
    /// run to last about `-D` seconds; or the default count, fewer for large
    /// messages (at most `lat_bytes` moved each way, at least 1000 samples).
    fn lat_count(
        &self,
        size: usize,
        probe: impl Fn(usize) -> Result<Lat, String>,
    ) -> Result<usize, String> {
        if let Some(n) = self.cli.iters {
            return Ok(n);
        }
        let default = (self.lat_bytes / size.max(1)).clamp(1_000, self.lat_iters);
        let Some(d) = self.cli.duration else {
            return Ok(default);
        };
        let n = default.min(1_000);
        let t0 = Instant::now();
        probe(n)?;
        let per = t0.elapsed().as_secs_f64() / (n + n / 10) as f64;
        Ok(((d / per) as usize).clamp(n, 20_000_000))
    }

    fn latency(&mut self, t: Test, size: usize) -> Result<(), String> {
        let full = t == Test::ReadLat;
        let run = |n: usize| -> Result<Lat, String> {
            let err = |e: &dyn std::fmt::Display| format!("{} {}: {e}", name(t), human(size));
            let bench = match &self.target {
                Target::Remote(c) => return c.lat(t, size, n).map_err(|e| err(&e)),
                Target::Local { bench, .. } => bench,
            };
            match t {
                Test::SendLat => bench.send_lat(size, n),
                Test::WriteLat => bench.write_lat(size, n),
                Test::StreamLat => return self.stream().lat(size, n).map_err(|e| err(&e)),
                _ => bench.read_lat(size, n),
            }
            .map_err(|e| err(&e))
        };
        let n = fresh(|| self.lat_count(size, run))?;
        // The floor alternates with the engine in rounds on the same cores,
        // so that both see the same placement of this VM's vCPUs (the
        // floor moves between ~60 and ~220 ns when the host moves them).
        let cores = self.cores;
        let per = n.div_ceil(LAT_ROUNDS);
        let floor_per = per.min(40_000);
        let remote = self.remote();
        let (mut lats, mut floors) = (Vec::new(), Vec::new());
        for _ in 0..LAT_ROUNDS {
            if !remote {
                floors.push(fresh(|| baseline::pingpong(cores, floor_per)));
            }
            lats.push(fresh(|| run(per))?);
        }
        let lat = Lat::merge(&lats);
        self.header(Kind::Lat);
        let row = format!(
            "{:<10} {:>7} {:<7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}",
            name(t),
            human(size),
            self.mode,
            us(lat.min_ns()),
            us(lat.median_ns()),
            us(lat.p(99.0)),
            us(lat.p(99.9)),
            us(lat.max_ns()),
            us(lat.stdev_ns()),
        );
        let mut result = json!({
            "test": name(t), "size": size, "mode": self.mode, "iters": n,
            "round_trip": if full { "full" } else { "half" },
            "lat_ns": lat.json(),
        });
        if remote {
            // Baselines of this host say nothing about a path to another.
            println!("{row}  | {:<18} -", "-");
        } else {
            self.lat_baselines(t, size, &lat, &floors, &row, &mut result);
        }
        self.lat_notes(&lat);
        if let Some(dir) = &self.cli.hgrm {
            let path = dir.join(format!("{}_{}.hgrm", name(t), size));
            std::fs::write(&path, lat.hgrm()).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        // One curve per test and size; in a sweep (-a) only the smallest
        // size's, or the chart would be unreadable.
        if !self.cli.all || size == 2 {
            self.curves.push((
                format!("{} {}", name(t), human(size)),
                lat.percentile_curve(),
            ));
        }
        self.push_result(t, size, result);
        Ok(())
    }

    /// The latency row's baselines (floor, TCP loopback) measured beside
    /// the engine's rounds `lat`, printed after `row` and added to `result`.
    fn lat_baselines(
        &mut self,
        t: Test,
        size: usize,
        lat: &Lat,
        floors: &[Lat],
        row: &str,
        result: &mut Value,
    ) {
        let full = t == Test::ReadLat;
        let cores = self.cores;
        // A one-copy transfer between two cores takes at least the line
        // handoff(s) plus one copy of the message: the copy is timed here
        // (memcpy between buffers of `size`), negligible for small messages.
        let copy_ns = if size <= 64 {
            0.0
        } else {
            let m = fresh(|| {
                baseline::pin(cores.map(|c| c.0));
                baseline::memcpy_bw(size, Duration::from_millis(20))
            });
            m.secs * 1e9 / m.msgs as f64
        };
        let floor = Lat::merge(floors)
            .scaled(if full { 2.0 } else { 1.0 })
            .shifted(copy_ns);
        let tcp_iters = (self.lat_bytes / 16 / size.max(1)).clamp(100, self.lat_iters / 10);
        let tcp_all = tcp_placements(cores, |c| baseline::tcp_lat(c, size, tcp_iters, full));
        let (tcp_where, tcp) = tcp_all
            .iter()
            .min_by(|a, b| a.1.median_ns().total_cmp(&b.1.median_ns()))
            .cloned()
            .expect("a TCP placement");
        let ratio_floor = lat.median_ns() / floor.median_ns();
        let ratio_tcp = tcp.median_ns() / lat.median_ns();
        println!(
            "{row}  | {:<18} {}",
            format!("{} ({})", us(floor.median_ns()), times(ratio_floor)),
            if ratio_tcp >= 1.0 {
                format!("{} ({} below)", us(tcp.median_ns()), times(ratio_tcp))
            } else {
                format!(
                    "{} ({} above: slower)",
                    us(tcp.median_ns()),
                    times(1.0 / ratio_tcp)
                )
            },
        );
        if full && ratio_floor < 1.0 {
            self.note(
                "read_lat below the floor: on the soft fabric an RDMA read is a copy the \
                 initiator's own thread makes at post time; no second core takes part, so one \
                 read round trip can be cheaper than the cache-line floor of two core crossings",
            );
        }
        let more = json!({
            "floor_ns": floor.json(), "floor_copy_ns": copy_ns, "tcp_ns": tcp.json(),
            "tcp_placement": tcp_where,
            "tcp_by_placement_ns": tcp_all.iter().map(|(w, l)| (w.to_string(), l.json())).collect::<serde_json::Map<_, _>>(),
            "ratio_floor": ratio_floor, "ratio_tcp": ratio_tcp,
        });
        if let (Some(r), Value::Object(more)) = (result.as_object_mut(), more) {
            r.extend(more);
        }
    }

    fn lat_notes(&mut self, lat: &Lat) {
        if lat.p(99.9) > 100.0 * lat.median_ns() {
            self.note(
                "t_p99.9/t_max of milliseconds are scheduler preemptions of a spinning side \
                 (2 shared vCPUs), not engine stalls; compare t_typ",
            );
        }
    }

    fn bandwidth(&mut self, t: Test, size: usize) -> Result<(), String> {
        let run = |msgs: usize| -> Result<Bw, String> {
            let err = |e: &dyn std::fmt::Display| format!("{} {}: {e}", name(t), human(size));
            let bench = match &self.target {
                Target::Remote(c) => return c.bw(t, size, msgs).map_err(|e| err(&e)),
                Target::Local { bench, .. } => bench,
            };
            match t {
                Test::SendBw => bench.send_bw(size, msgs),
                Test::WriteBw => bench.write_bw(size, msgs),
                Test::StreamBw => return self.stream().bw(size, msgs).map_err(|e| err(&e)),
                _ => bench.read_bw(size, msgs),
            }
            .map_err(|e| err(&e))
        };
        let run = |msgs: usize| fresh(|| run(msgs));
        let msgs = match (self.cli.iters, self.cli.duration) {
            (Some(n), _) => n,
            (None, Some(d)) => {
                let probe = run(4 * engine::WINDOW)?;
                ((d * probe.msgs as f64 / probe.secs) as usize).clamp(engine::WINDOW, 1 << 30)
            }
            (None, None) => (self.bw_bytes / size.max(1)).clamp(1_000, 4_000_000),
        };
        let per_round = msgs.div_ceil(BW_ROUNDS);
        let mut eng = Vec::new();
        let mut mem = Vec::new();
        for _ in 0..BW_ROUNDS {
            let b = run(per_round)?;
            if !self.remote() {
                // memcpy for as long as the engine round took (at least 20 ms).
                let cores = self.cores;
                mem.push(fresh(|| {
                    baseline::pin(cores.map(|c| c.0));
                    baseline::memcpy_bw(size, Duration::from_secs_f64(b.secs.max(0.02)))
                }));
            }
            eng.push(b);
        }
        let mid = |v: &[Bw]| -> (f64, f64) {
            let mut x: Vec<(f64, f64)> = v.iter().map(|b| (b.mb_s(), b.mmsg_s())).collect();
            x.sort_by(|a, b| a.0.total_cmp(&b.0));
            x[x.len() / 2]
        };
        let (mb, mmsg) = mid(&eng);
        self.header(Kind::Bw);
        let row = format!(
            "{:<10} {:>7} {:<7} {:>10.0} {:>10.3}",
            name(t),
            human(size),
            self.mode,
            mb,
            mmsg
        );
        let mut result = json!({
            "test": name(t), "size": size, "mode": self.mode, "msgs": per_round * BW_ROUNDS,
            "window": engine::WINDOW, "mb_s": mb, "mmsg_s": mmsg,
        });
        if self.remote() {
            println!("{row}  | {:<24} -", "-");
            result["rounds"] = eng
                .iter()
                .map(|e| json!({"mb_s": e.mb_s(), "msgs": e.msgs, "secs": e.secs}))
                .collect();
        } else {
            self.bw_baselines(t, size, mb, &eng, &mem, &row, &mut result);
        }
        match self.bw_points.iter_mut().find(|(l, _)| l == name(t)) {
            Some((_, pts)) => pts.push((size as f64, mb)),
            None => self
                .bw_points
                .push((name(t).to_string(), vec![(size as f64, mb)])),
        }
        self.push_result(t, size, result);
        Ok(())
    }

    /// The bandwidth row's baselines (memcpy in rounds `mem` beside the
    /// engine's `eng`, TCP loopback), printed after `row`, added to `result`.
    #[allow(clippy::too_many_arguments)]
    fn bw_baselines(
        &mut self,
        t: Test,
        size: usize,
        mb: f64,
        eng: &[Bw],
        mem: &[Bw],
        row: &str,
        result: &mut Value,
    ) {
        let tcp_time = Duration::from_millis(match (self.cli.quick, self.cli.all) {
            (true, _) => 100,
            (false, true) => 150,
            (false, false) => 300,
        });
        let tcp_all = tcp_placements(self.cores, |c| baseline::tcp_bw(c, size, tcp_time));
        let (tcp_where, tcp) = tcp_all
            .iter()
            .max_by(|a, b| a.1.mb_s().total_cmp(&b.1.mb_s()))
            .expect("a TCP placement");
        let mut x: Vec<f64> = mem.iter().map(Bw::mb_s).collect();
        x.sort_by(f64::total_cmp);
        let mem_mb = x[x.len() / 2];
        let ratio_memcpy = mb / mem_mb;
        let ratio_tcp = mb / tcp.mb_s();
        println!(
            "{row}  | {:<24} {:.0} ({})",
            format!("{mem_mb:.0} ({})", times(ratio_memcpy)),
            tcp.mb_s(),
            times(ratio_tcp),
        );
        if t == Test::SendBw && size >= 1 << 16 && ratio_memcpy < 0.5 {
            self.note(
                "send_bw below memcpy: the receiving thread copies each send into its posted \
                 receive (the sender only when the receiver does not poll), pulling the lines \
                 the sender wrote from the other core; on a loaded machine that thread also \
                 gets less of its core than the memcpy baseline did",
            );
        }
        let rounds: Vec<Value> = eng
            .iter()
            .zip(mem)
            .map(|(e, m)| json!({"mb_s": e.mb_s(), "msgs": e.msgs, "secs": e.secs, "memcpy_mb_s": m.mb_s()}))
            .collect();
        let more = json!({
            "memcpy_mb_s": mem_mb, "tcp_mb_s": tcp.mb_s(),
            "tcp_placement": tcp_where,
            "tcp_by_placement_mb_s": tcp_all.iter().map(|(w, b)| (w.to_string(), json!(b.mb_s()))).collect::<serde_json::Map<_, _>>(),
            "ratio_memcpy": ratio_memcpy, "ratio_tcp": ratio_tcp, "rounds": rounds,
        });
        if let (Some(r), Value::Object(more)) = (result.as_object_mut(), more) {
            r.extend(more);
        }
    }

    /// The stream pair of a one-process run (made before its tests run).
    fn stream(&self) -> &stream::StreamBench {
        match &self.target {
            Target::Local {
                stream: Some(s), ..
            } => s,
            _ => unreachable!("a one-process stream test runs on its pair"),
        }
    }

    fn remote(&self) -> bool {
        matches!(self.target, Target::Remote(_))
    }

    /// Records a result; a stream test's with the path its sends took.
    fn push_result(&mut self, t: Test, size: usize, mut v: Value) {
        if is_stream(t) {
            let (threshold, path) = match &self.target {
                Target::Local { .. } => (self.stream().rdma_threshold(), self.stream().path(size)),
                Target::Remote(c) => c.stream_path(size).expect("stream opened before its tests"),
            };
            v["path"] = json!(path);
            v["rdma_threshold"] = json!(threshold);
        }
        self.results.push(v);
    }

    fn note(&mut self, n: &'static str) {
        if !self.notes.contains(&n) {
            self.notes.push(n);
        }
    }
}

/// Runs a TCP baseline in each placement of its two threads: on the
/// engine's two cores, both on the first of them, and unpinned (the
/// scheduler often puts a blocking ping-pong on one core, which is faster
/// than two on this VM). The table shows the best: the alternative a user
/// could have.
fn tcp_placements<T: Send>(cores: Cores, f: impl Fn(Cores) -> T + Sync) -> Vec<(&'static str, T)> {
    let mut v = Vec::new();
    if let Some((a, b)) = cores {
        v.push(("same_cores", fresh(|| f(Some((a, b))))));
        if a != b {
            v.push(("one_core", fresh(|| f(Some((a, a))))));
        }
    }
    v.push(("unpinned", fresh(|| f(None))));
    v
}

/// Runs `f` on a new thread: benchmarks pin the thread they run on, and
/// the main thread stays unpinned (threads inherit its affinity).
fn fresh<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| s.spawn(f).join().expect("benchmark thread panicked"))
}

/// A one-line progress note on stderr, only when it is a terminal; the next
/// table line overwrites it (an empty note clears it).
fn progress(what: &str) {
    use std::io::IsTerminal;
    let mut err = std::io::stderr();
    if err.is_terminal() {
        let _ = write!(err, "\r\x1b[2K{what}\r");
        let _ = err.flush();
    }
}

/// Microseconds with about four significant digits.
fn us(ns: f64) -> String {
    let v = ns / 1000.0;
    match v {
        v if v < 10.0 => format!("{v:.3}"),
        v if v < 100.0 => format!("{v:.2}"),
        v if v < 1000.0 => format!("{v:.1}"),
        v => format!("{v:.0}"),
    }
}

/// A ratio as `2.2x` / `27x`.
fn times(r: f64) -> String {
    if r < 10.0 {
        format!("{r:.2}x")
    } else {
        format!("{r:.0}x")
    }
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
        Test::ConnScale => "conn_scale",
    }
}

/// Whether `t` runs over the reference switch's streams.
fn is_stream(t: Test) -> bool {
    matches!(t, Test::StreamLat | Test::StreamBw)
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{}MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{}KiB", n >> 10),
        n => format!("{n}B"),
    }
}

/// `git rev-parse --short HEAD` of the source tree this was built from,
/// `-dirty` when it has uncommitted changes; None without git.
fn git_rev() -> Option<String> {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let rev = git(&["rev-parse", "--short", "HEAD"])?;
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty { format!("{rev}-dirty") } else { rev })
}

fn loadavg() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| {
            s.split_whitespace()
                .take(3)
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

fn kernel() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_string())
}

/// `sanbench --server`: serves clients on the control port.
fn serve(cli: &Cli, config: sanpath::Config, cores: Cores) -> Result<(), String> {
    remote::check_fabric(&config)?;
    let listener = std::net::TcpListener::bind(("0.0.0.0", cli.port))
        .map_err(|e| format!("control port {}: {e}", cli.port))?;
    println!(
        "sanbench {} server: {} fabric, control port {}{}",
        env!("CARGO_PKG_VERSION"),
        remote::fabric_name(config.fabric.kind),
        cli.port,
        if cli.persistent { ", persistent" } else { "" }
    );
    let opts = remote::ServerOpts {
        config,
        core: cores.map(|c| c.1),
        hello_timeout: remote::HELLO_TIMEOUT,
    };
    remote::serve(&listener, &opts, cli.persistent)
}
