//! fwnode binary: configuration, logging, signals and the worker threads around the sans-IO
//! cores. Everything that decides about packets lives in the library.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use fwnode::api::{Datapath as ApiDatapath, DatapathCounters, SyncView as ApiSyncView};
use fwnode::cluster;
use fwnode::config::Config;
use fwnode::conntrack::Conntrack;
use fwnode::datapath::log::{Installer, Logging};
use fwnode::datapath::nfqueue::QueueConfig;
use fwnode::datapath::nudge::shell::Nudge;
use fwnode::datapath::rules::{self, RuleSpec};
use fwnode::datapath::worker::{self, Pipeline, WorkerConfig, WorkerStats};
use fwnode::ha::{HaHandle, HaServer};
use fwnode::metrics::{self, DatapathSource, MetricsServer, Scope, Sources};
use fwnode::packet::proto;
use fwnode::policy::PolicyStore;
use fwnode::raft::Role;
use fwnode::sync::defer::DeferConfig;
use fwnode::sync::feed::FeedMaker;
use fwnode::sync::shell::SyncHandle;
use fwnode::time::Timestamp;
use fwnode::tls::{Credentials, Members};
use fwnode::transport::{Security, Transport};

/// keepstate gateway daemon.
#[derive(Debug, Parser)]
#[command(name = "fwnode", version, about)]
struct Cli {
    /// Run with this configuration file.
    #[arg(long, value_name = "FILE", required_unless_present = "check_config")]
    config: Option<PathBuf>,
    /// Validate a configuration file, its policy and its certificates, then exit (0 = valid).
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,
    /// Remove this instance's iptables rules and exit (decommissioning; with --config).
    #[arg(long, requires = "config")]
    remove_rules: bool,
    /// Log lines on stderr as text (colours only on a terminal, never in a journal or a file)
    /// or as one JSON object per line.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Tell systemd `state` (a no-op unless it set NOTIFY_SOCKET); a failure is logged, never fatal.
fn notify_systemd(state: sd_notify::NotifyState) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::warn!(error = %e, "telling systemd our state (NOTIFY_SOCKET) failed");
    }
}

/// Logging to stderr, as `format` says; RUST_LOG filters (default: info, openraft warn).
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

fn load_policy(store: &PolicyStore, path: &Path, version: u64) -> Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading policy {}", path.display()))?;
    let active = store.load_text(version, &path.display().to_string(), &text)?;
    for w in &active.warnings {
        tracing::warn!("{w}");
    }
    tracing::info!(version, rules = active.compiled.rule_count(), file = %path.display(), "policy loaded");
    Ok(())
}

/// The node's policy store: it refuses policies that log more rules than the log mark numbers.
fn policy_store(cfg: &Config) -> PolicyStore {
    let max = cfg.datapath.log_marks().unwrap_or_default().max_slots();
    PolicyStore::new(Box::new(ifindex)).with_max_logged(max)
}

fn rule_spec(cfg: &Config) -> RuleSpec {
    let helper_ports: Vec<(String, u16)> = cfg
        .conntrack
        .helper_ports
        .iter()
        .filter_map(|h| match h.proto {
            proto::TCP => Some(("tcp".to_string(), h.port)),
            proto::UDP => Some(("udp".to_string(), h.port)),
            _ => None,
        })
        .collect();
    let d = &cfg.datapath;
    // The node's own listeners: its control plane (the cluster's members use the same ports).
    let own: Vec<std::net::SocketAddr> = cfg
        .cluster
        .iter()
        .map(|c| c.listen)
        .chain(cfg.sync.iter().flat_map(|s| s.listen.iter().copied()))
        .chain(cfg.metrics.iter().map(|m| m.listen))
        .collect();
    RuleSpec {
        name: d.chain.clone(),
        first_queue: d.first_queue,
        queues: d.queues,
        helper_queue: (!helper_ports.is_empty()).then_some(d.first_queue + d.queues),
        helper_ports,
        reject_mark: d.reject_mark,
        // Checked by `Config::load`.
        log_marks: d.log_marks().unwrap_or_default(),
        fail_open: d.fail_open,
        control_plane: match &cfg.cluster {
            Some(c) if !d.forward_to_control_plane => Some(rules::ControlPlane {
                addr: c.listen.ip(),
                ports: own.iter().map(|a| a.port()).collect(),
                iface: None,
            }),
            _ => None,
        },
        local_ports: if d.guard_ports { own } else { vec![] },
    }
}

/// The stats file (`[datapath] stats_file`), rewritten by the main loop every 200 ms, for scripts
/// and benchmarks (people use `fwctl stats`, monitoring the `[metrics]` endpoint). One JSON
/// object:
/// - `node`; `published_unix_ms`: every worker published its queue counters (packets, bytes,
///   GSO, netlink and verdict counts, about every 100 ms) at or after this time (0 without
///   workers, as on a witness);
/// - `unix_ms` and `metrics`: every metric family exactly as `fwctl stats -o json` shows it
///   (the same collection and the same rendering, `fwnode::metrics::stats_json`), but the
///   families that walk the connection table (`Metric::scan`) and the per-rule ones
///   (`Metric::per_rule`; `policy` below has the rules' packets);
/// - `ha`: role, ready, in_sync, since_ms and promoted_unsynced, or `null` without `[ha]`;
/// - `policy`: the enforced version and the packets per rule of that version, in order, and of
///   the default (`hits`, `default_hits`: the packets of the same counters as the
///   `keepstate_rule_*` families in `metrics`).
fn stats_json(
    sources: &Sources,
    raft: Option<&fwnode::raft::Raft>,
    store: &PolicyStore,
    workers: &[Arc<WorkerStats>],
    ha: Option<&HaHandle>,
) -> serde_json::Value {
    use serde_json::{json, Value};
    let families = sources.collect(raft, Scope::NoScan);
    let mut v = metrics::stats_json(&metrics::to_proto(&sources.node, &families));
    let policy = store.current();
    let (hits, default_hits) = policy.compiled.hits();
    let ha = ha.map(|h| {
        let s = h.status();
        json!({
            "role": s.role, "ready": s.ready, "in_sync": s.in_sync, "since_ms": s.since_ms,
            "promoted_unsynced": s.promoted_unsynced,
        })
    });
    if let Value::Object(o) = &mut v {
        // Every worker has published its counters at or after this time (Unix ms).
        let published = workers
            .iter()
            .map(|w| w.published_unix_ms.load(Relaxed))
            .min()
            .unwrap_or(0);
        o.insert("published_unix_ms".into(), Value::from(published));
        o.insert("ha".into(), ha.unwrap_or(Value::Null));
        o.insert(
            "policy".into(),
            json!({ "version": policy.version, "hits": hits, "default_hits": default_hits }),
        );
    }
    v
}

/// Replaces the stats file at once: written beside it (same name, extension `.tmp`), then
/// renamed over it, so a reader never sees half a file.
fn write_stats(path: &Path, v: &serde_json::Value) {
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, v.to_string())
        .and_then(|_| std::fs::rename(&tmp, path))
        .is_err()
    {
        tracing::warn!(path = %path.display(), "cannot write stats file");
    }
}

/// The workers' `defer` counters, summed.
fn defer_stats(wait: Duration, workers: &[Arc<WorkerStats>]) -> keepstate_proto::v1::SyncDefer {
    let sum = |f: &dyn Fn(&WorkerStats) -> u64| workers.iter().map(|w| f(w)).sum::<u64>();
    keepstate_proto::v1::SyncDefer {
        defer_ms: wait.as_millis() as u64,
        held: sum(&|w| w.defer_held.load(Relaxed)),
        acked: sum(&|w| w.defer_acked.load(Relaxed)),
        timed_out: sum(&|w| w.defer_timed_out.load(Relaxed)),
        abandoned: sum(&|w| w.defer_abandoned.load(Relaxed)),
        full: sum(&|w| w.defer_full.load(Relaxed)),
        wait_us: sum(&|w| w.defer_wait_us.load(Relaxed)),
    }
}

/// Sums the workers' counters for the control API's status call.
fn datapath_counters(
    ct: Arc<Conntrack>,
    workers: Vec<Arc<WorkerStats>>,
) -> Arc<dyn Fn() -> DatapathCounters + Send + Sync> {
    Arc::new(move || {
        let sum = |f: &dyn Fn(&WorkerStats) -> u64| workers.iter().map(|w| f(w)).sum::<u64>();
        DatapathCounters {
            packets: sum(&|w| w.packets.load(Relaxed)),
            accepted: sum(&|w| w.accepted.load(Relaxed)),
            dropped: sum(&|w| w.dropped.load(Relaxed)),
            rejected: sum(&|w| w.rejected.load(Relaxed)),
            invalid: ct.counters().invalid.iter().sum(),
        }
    })
}

/// The datapath: one worker thread per queue, then the iptables rules once all are bound.
struct Datapath {
    handles: Vec<std::thread::JoinHandle<Result<()>>>,
    spec: RuleSpec,
    /// A worker that stopped on its own (an error or a panic) reports here, once.
    died: std::sync::mpsc::Receiver<String>,
}

/// Why a worker thread ended: its error, or the panic's message.
fn worker_outcome(r: std::thread::Result<std::io::Result<()>>) -> Result<()> {
    match r {
        Ok(r) => r.map_err(anyhow::Error::from),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(anyhow::anyhow!("panicked: {msg}"))
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn start_datapath(
    cfg: &Config,
    ct: &Arc<Conntrack>,
    store: &Arc<PolicyStore>,
    all_stats: &[Arc<WorkerStats>],
    origin: Instant,
    stop: &Arc<AtomicBool>,
    replication: Option<(&FeedMaker, Option<DeferConfig>)>,
    nudge: Option<&Arc<Nudge>>,
) -> Result<Datapath> {
    let spec = rule_spec(cfg);
    let d = &cfg.datapath;
    let mut queues: Vec<(u16, u32)> = (0..d.queues)
        .map(|i| (d.first_queue + i, d.copy_range))
        .collect();
    if let Some(h) = spec.helper_queue {
        queues.push((h, 0xffff));
    }
    let n = queues.len();
    let mut handles = vec![];
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (died_tx, died) = std::sync::mpsc::channel();
    for (index, ((num, copy_range), stats)) in queues.into_iter().zip(all_stats).enumerate() {
        let wc = WorkerConfig {
            queue: QueueConfig {
                num,
                copy_range,
                maxlen: d.queue_maxlen,
                gso: d.gso,
                fail_open: d.fail_open,
                rcvbuf: d.rcvbuf,
                poll_timeout: Duration::from_millis(200),
            },
            batch_datagrams: d.batch_datagrams.max(1),
            index,
            workers: n,
            sweep_budget: 256,
            defer: replication.as_ref().and_then(|(_, d)| d.clone()),
        };
        let pipeline = Pipeline {
            ct: ct.clone(),
            policy: store.clone(),
            ftp: cfg.ftp.clone(),
            stats: stats.clone(),
            reject_mark: d.reject_mark,
            feed: replication.as_ref().map(|(f, _)| f.feed(index)),
            nudge: nudge.cloned(),
            log: Logging::new(
                spec.log_marks,
                Logging::share(d.log_rate, n),
                Logging::share(d.log_burst, n),
            ),
        };
        let stop = stop.clone();
        let ready = ready_tx.clone();
        let died = died_tx.clone();
        let h = std::thread::Builder::new()
            .name(format!("queue-{num}"))
            .spawn(move || {
                // A worker that ends while fwnode runs (an error or a panic) ends fwnode: its
                // queue has no listener any more, so the kernel drops that queue's packets, and
                // a daemon that forwards only part of its traffic must not look healthy. The
                // supervisor (systemd) restarts it; fail-closed rules stay meanwhile. A panic
                // is caught here rather than aborting so the other queues send what they owe.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    worker::run(wc, pipeline, origin, stop.clone(), ready)
                }));
                let r = worker_outcome(r);
                if let Err(e) = &r {
                    tracing::error!(queue = num, error = %e, "datapath worker died");
                    let _ = died.send(format!("the worker of queue {num} died: {e:#}"));
                    stop.store(true, Relaxed);
                }
                r
            })?;
        handles.push(h);
    }
    // Every queue is bound before traffic is sent to it.
    for _ in 0..n {
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(num)) => tracing::debug!(queue = num, "queue bound"),
            Ok(Err(e)) => {
                stop.store(true, Relaxed);
                bail!("binding an NFQUEUE queue failed: {e}");
            }
            Err(_) => {
                stop.store(true, Relaxed);
                bail!("a datapath worker did not bind its queue within 5 s");
            }
        }
    }
    if d.install_rules {
        rules::install(&spec).context("installing iptables rules")?;
        tracing::info!(chain = %spec.name, queues = d.queues, fail_open = d.fail_open, "rules installed");
    }
    Ok(Datapath {
        handles,
        spec,
        died,
    })
}

fn worker_count(cfg: &Config) -> usize {
    usize::from(cfg.datapath.queues) + usize::from(!rule_spec(cfg).helper_ports.is_empty())
}

/// Stops what runs beside the datapath, in this order: the metrics endpoint (it reads Raft, on
/// the control plane's runtime when there is one), the control plane (Raft and the control
/// API), then replication. A part that was not started is `None`.
fn stop_services(
    metrics: Option<MetricsServer>,
    control: Option<cluster::ControlPlane>,
    sync: Option<SyncHandle>,
) {
    if let Some(m) = metrics {
        m.shutdown();
    }
    if let Some(c) = control {
        c.shutdown();
    }
    if let Some(s) = sync {
        s.shutdown();
    }
}

fn run(cfg: Config) -> Result<()> {
    let started_unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let store = Arc::new(policy_store(&cfg));
    if let Some(p) = &cfg.policy {
        // In a cluster this is the bootstrap policy (version 0) until Raft has committed one;
        // the store restores the last committed version right after, before any packet.
        let version = if cfg.cluster.is_some() { 0 } else { 1 };
        load_policy(&store, &p.file, version)?;
    }
    let gateway = cfg.cluster.as_ref().is_none_or(|c| c.role == Role::Gateway);
    let replicate = gateway && cfg.sync.is_some();
    let mut ct_cfg = cfg.conntrack.clone();
    if !replicate {
        // Nobody consumes tracker events: the tracker builds none.
        ct_cfg.event_queue = 0;
    }
    let ct = Arc::new(Conntrack::new(&ct_cfg));
    let origin = Instant::now();
    let origin_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let all_stats: Vec<Arc<WorkerStats>> = if gateway {
        (0..worker_count(&cfg))
            .map(|_| Arc::new(WorkerStats::default()))
            .collect()
    } else {
        vec![]
    };

    let stop = Arc::new(AtomicBool::new(false));
    let reload = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    signal_hook::flag::register(signal_hook::consts::SIGHUP, reload.clone())?;
    if gateway {
        fwnode::datapath::links::spawn(store.interfaces().clone(), stop.clone())
            .context("subscribing to rtnetlink link events")?;
    }

    // Every gRPC port (Raft, control, sync) is secured alike; the config loader has checked
    // that a [cluster] has [tls] files or an explicit plaintext.
    let credentials = match cfg.tls.as_ref().map(|t| t.files()) {
        Some(Ok(Some(files))) => {
            Some(Credentials::load(files).context("loading the [tls] certificates")?)
        }
        Some(Err(e)) => bail!("{e}"),
        Some(Ok(None)) | None => None,
    };
    let transport = match &credentials {
        Some(c) => Transport::new(Security::Mtls(c.clone())),
        None => Transport::new(Security::Plaintext),
    };
    let members = Members::default();
    // A node without replication has no peer table to wait for: in sync from the start. With
    // it, readiness follows the sync sessions (`on_ready` below).
    let ha = cfg.ha.as_ref().map(|_| HaHandle::new(!replicate));
    if let Some(h) = &ha {
        let ct = ct.clone();
        h.on_handover(move || {
            let t = Instant::now();
            let now = Timestamp::from_millis(origin.elapsed().as_millis() as u64);
            let n = ct.handover(now);
            tracing::info!(
                connections = n,
                took = ?t.elapsed(),
                "HA: the VIPs move; TCP bounds re-learn from the next segments, liberal for a while"
            );
        });
    }
    let nudge = match cfg.ha.as_ref().filter(|h| h.takeover_nudge) {
        Some(h) => Some(
            Nudge::start(h.takeover_nudge_mtu, ct.clone(), origin)
                .context("starting the takeover nudge ([ha] takeover_nudge needs CAP_NET_RAW)")?,
        ),
        None => None,
    };
    if let (Some(h), Some(n)) = (&ha, &nudge) {
        let n = n.clone();
        h.on_takeover(move || n.takeover());
    }
    // Replication starts before the datapath so that no event of the first packets is lost.
    let (sync, feeds) = match (&cfg.sync, &cfg.cluster) {
        (Some(s), Some(c)) if replicate => {
            let (maker, events) = fwnode::sync::feed::channel(s.channel_batches, all_stats.len());
            let handle = fwnode::sync::shell::start(
                s,
                ct.clone(),
                events,
                origin,
                Box::new({
                    let ha = ha.clone();
                    move |ready| {
                        tracing::info!(ready, "replication readiness changed");
                        if let Some(h) = &ha {
                            h.set_synced(ready);
                        }
                    }
                }),
                fwnode::sync::shell::Net {
                    node_id: c.id,
                    transport: transport.clone(),
                    members: members.clone(),
                },
            )?;
            (Some(handle), Some(maker))
        }
        _ => (None, None),
    };
    // Keeps the kernel's NFLOG rules those of the enforced policy (when we install rules).
    let mut log_rules = (gateway && cfg.datapath.install_rules).then(|| {
        let spec = rule_spec(&cfg);
        Installer::new(&spec.name, spec.log_marks, cfg.datapath.log_group)
    });
    // What Prometheus and `fwctl stats` read, at their own time.
    let sources = Arc::new(Sources {
        node: cfg.node.name.clone(),
        started_unix_s,
        policy: store.clone(),
        datapath: gateway.then(|| {
            let spec = rule_spec(&cfg);
            DatapathSource {
                ct: ct.clone(),
                origin,
                origin_unix_ms,
                workers: all_stats.clone(),
                queues: (0..spec.queues)
                    .map(|i| spec.first_queue + i)
                    .chain(spec.helper_queue)
                    .collect(),
                sync: sync.as_ref().map(|h| {
                    let v = h.view();
                    Arc::new(move || v.status()) as Arc<dyn Fn() -> _ + Send + Sync>
                }),
                nudge: nudge.clone(),
                log: log_rules.as_ref().map(|l| l.status.clone()),
            }
        }),
        ha: ha.clone(),
        tls: credentials.clone(),
        raft_rates: transport.raft_rates.clone(),
    });
    let control = match &cfg.cluster {
        Some(c) => {
            let dp = gateway.then(|| ApiDatapath {
                ct: ct.clone(),
                origin,
                counters: datapath_counters(ct.clone(), all_stats.clone()),
                sync: sync.as_ref().map(|h| {
                    let (a, b) = (h.view(), h.view());
                    let defer = h.defer().map(|d| (d.wait, all_stats.clone()));
                    ApiSyncView {
                        status: Arc::new(move || {
                            let mut r = a.status();
                            r.defer = defer.as_ref().map(|(wait, w)| defer_stats(*wait, w));
                            r
                        }),
                        resync: Arc::new(move || b.resync()),
                    }
                }),
                ha: ha.clone(),
            });
            Some(cluster::start(
                c,
                &cfg.node.name,
                store.clone(),
                dp,
                transport.clone(),
                members.clone(),
                sources.clone(),
            )?)
        }
        None => None,
    };
    // On the control plane's runtime when there is one.
    let metrics = match &cfg.metrics {
        Some(m) => match MetricsServer::start(
            m.listen,
            control.as_ref().map(|c| c.runtime()),
            sources.clone(),
            control.as_ref().map(|c| c.raft.clone()),
        ) {
            Ok(s) => Some(s),
            Err(e) => {
                stop_services(None, control, sync);
                return Err(e.into());
            }
        },
        None => None,
    };
    let datapath = if gateway {
        let defer = sync.as_ref().and_then(|s| s.defer());
        let replication = feeds.as_ref().map(|f| (f, defer));
        match start_datapath(
            &cfg,
            &ct,
            &store,
            &all_stats,
            origin,
            &stop,
            replication,
            nudge.as_ref(),
        ) {
            Ok(d) => {
                // The chain exists now: the policy's NFLOG rules at once, not a tick later.
                if let Some(l) = log_rules.as_mut() {
                    l.sync(&store.current(), Instant::now());
                }
                Some(d)
            }
            Err(e) => {
                stop_services(metrics, control, sync);
                return Err(e);
            }
        }
    } else {
        tracing::info!("witness: no datapath");
        None
    };
    let mut died = None;
    // The HA socket opens only once the datapath forwards, so that `fwctl ha check` never
    // tells keepalived that a node which cannot forward yet may hold the VIPs.
    let ha_server = match (&cfg.ha, &ha) {
        (Some(c), Some(h)) => match HaServer::start(&c.socket, h.clone()) {
            Ok(s) => Some(s),
            Err(e) => {
                died = Some(e.to_string());
                stop.store(true, Relaxed);
                None
            }
        },
        _ => None,
    };
    tracing::info!(node = %cfg.node.name, "running");
    // systemd (Type=notify): ready now that the datapath forwards and the HA socket serves; the
    // watchdog is fed from this loop, which ends when a worker dies. Without NOTIFY_SOCKET
    // (not under systemd) these do nothing.
    if !stop.load(Relaxed) {
        notify_systemd(sd_notify::NotifyState::Ready);
    }
    let watchdog = sd_notify::watchdog_enabled().map(|every| every / 2);
    let mut fed = Instant::now();

    let mut version = 1;
    while !stop.load(Relaxed) {
        if watchdog.is_some_and(|every| fed.elapsed() >= every) {
            notify_systemd(sd_notify::NotifyState::Watchdog);
            fed = Instant::now();
        }
        // Sleeps 200 ms, or less when a worker dies: then fwnode stops at once.
        if let Some(d) = &datapath {
            if let Ok(why) = d.died.recv_timeout(Duration::from_millis(200)) {
                died = Some(why);
                break;
            }
        } else {
            std::thread::sleep(Duration::from_millis(200));
        }
        if reload.swap(false, Relaxed) {
            match (&cfg.cluster, &cfg.policy) {
                (Some(_), _) => tracing::warn!(
                    "SIGHUP ignored: in a cluster the policy comes from Raft; use `fwctl policy apply FILE`"
                ),
                (None, Some(p)) => match load_policy(&store, &p.file, version + 1) {
                    Ok(()) => version += 1,
                    Err(e) => tracing::error!(
                        "policy reload rejected, still enforcing version {version}: {e:#}"
                    ),
                },
                (None, None) => {}
            }
        }
        // Whatever enforced a new policy (SIGHUP above, Raft, a restore), its NFLOG rules
        // follow within a tick.
        if let Some(l) = log_rules.as_mut() {
            l.sync(&store.current(), Instant::now());
        }
        if let Some(p) = &cfg.datapath.stats_file {
            let raft = control.as_ref().map(|c| &c.raft);
            write_stats(
                p,
                &stats_json(&sources, raft, &store, &all_stats, ha.as_ref()),
            );
        }
    }
    stop.store(true, Relaxed);
    notify_systemd(sd_notify::NotifyState::Stopping);
    // keepalived's scripts fail from here on (socket gone), as they should for a stopping node.
    drop(ha_server);
    match &died {
        Some(why) => tracing::error!("{why}; stopping (exit status 1)"),
        None => tracing::info!("stopping"),
    }
    stop_services(metrics, control, sync);
    let Some(Datapath { handles, spec, .. }) = datapath else {
        return Ok(());
    };
    let mut failed = false;
    for h in handles {
        failed |= !matches!(h.join(), Ok(Ok(())));
    }
    let d = &cfg.datapath;
    if d.install_rules && d.fail_open {
        rules::remove(&spec).context("removing iptables rules")?;
        tracing::info!("fail-open: rules removed, traffic passes unfiltered");
    } else if d.install_rules {
        tracing::info!(
            "fail-closed: rules stay in place; forwarded traffic is dropped until fwnode is back"
        );
    }
    if let Some(why) = died {
        bail!("{why}");
    }
    if failed {
        bail!("a datapath worker failed");
    }
    Ok(())
}

fn main() -> Result<()> {
    // `fwnode --generate-assets DIR` (packaging): the man page and completions, then exit.
    if let Some(written) =
        fwnode::cli_assets::generate_if_asked(<Cli as clap::CommandFactory>::command)
    {
        return Ok(written?);
    }
    let cli = Cli::parse();
    init_logging(cli.log_format);
    if let Some(path) = cli.check_config {
        let cfg = Config::load(&path)?;
        let store = policy_store(&cfg);
        if let Some(p) = &cfg.policy {
            load_policy(&store, &p.file, 1)?;
        }
        if let Some(Ok(Some(files))) = cfg.tls.as_ref().map(|t| t.files()) {
            Credentials::load(files).context("loading the [tls] certificates")?;
        }
        println!("{}: configuration and policy are valid", path.display());
        return Ok(());
    }
    let Some(path) = cli.config else {
        bail!("--config FILE is required")
    };
    let cfg = Config::load(&path)?;
    if cli.remove_rules {
        rules::remove(&rule_spec(&cfg))?;
        println!("rules of chain {} removed", cfg.datapath.chain);
        return Ok(());
    }
    run(cfg)
}
