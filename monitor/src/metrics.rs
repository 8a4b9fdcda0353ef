//! Prometheus metrics (`monitor_` prefix, OpenMetrics text) of the daemon, served by
//! `--metrics-addr`. The capture loop takes a [`Snapshot`] of every component's counters once a
//! second; the snapshot is a `prometheus_client` collector that encodes them as const metrics
//! with names, types, units, help and labels (the README's metrics table lists them all).

use std::{
    fmt,
    os::fd::{AsRawFd, BorrowedFd},
    sync::atomic::{AtomicU64, Ordering},
};

use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeMetric,
        text::encode as encode_text,
    },
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};

use crate::{
    detect::DetectStats,
    identity::{IdentityStats, kube::KubeStats},
    notify::{WebhookStats, file::FileStats},
    pipeline::PipelineStats,
    probe::{ProgCpuStats, ProgramRuns, attacher::AttachStats},
    sink::SinkStats,
};
use monitor_common::{
    STAT_EVENTS, STAT_HITS, STAT_LOST, STAT_READ_ERRORS, STAT_SKIPPED, STAT_TRUNCATED,
};

/// Content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Positions of the ring buffer (bytes since it was created, headers included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingSnapshot {
    pub size: u64,
    pub produced: u64,
    pub consumed: u64,
    /// Most bytes found waiting when a drain started, since the previous snapshot.
    pub peak_pending: u64,
}

/// Everything `/metrics` shows, copied from the components once per tick.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub version: String,
    pub git_sha: String,
    pub kernel: String,
    pub ready: bool,
    /// Per-program kernel counters, per CPU.
    pub probes: Vec<ProgCpuStats>,
    /// The kernel keeps run counts and times: `kernel.bpf_stats_enabled` is 1, or the daemon
    /// holds a `BPF_ENABLE_STATS` fd (`--bpf-stats`), which the sysctl does not show.
    pub bpf_stats_enabled: bool,
    pub program_runs: Vec<ProgramRuns>,
    pub ring: Option<RingSnapshot>,
    pub decode_errors: u64,
    pub attach: AttachStats,
    pub pipeline: PipelineStats,
    pub detect: DetectStats,
    pub identity: IdentityStats,
    pub kube: Option<KubeStats>,
    pub clickhouse: Option<SinkStats>,
    pub webhook: Option<WebhookStats>,
    pub alerts_file: Option<FileStats>,
    pub alert_render_errors: u64,
    /// Lines (records, alerts) stdout's reader did not take in time.
    pub stdout_dropped_lines: u64,
    pub stdout_queued_bytes: u64,
    /// `--record`: what reached the event log.
    pub record: Option<crate::event::LogWriteStats>,
}

impl Snapshot {
    /// A snapshot with the build and kernel filled in.
    pub fn new() -> Self {
        Snapshot {
            version: env!("CARGO_PKG_VERSION").into(),
            git_sha: option_env!("MONITOR_GIT_SHA").unwrap_or("unknown").into(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            bpf_stats_enabled: bpf_stats_enabled(),
            ..Default::default()
        }
    }
}

/// Whether `kernel.bpf_stats_enabled` is set (by anyone: it stays 0 while stats are on only
/// through a `BPF_ENABLE_STATS` fd).
pub fn bpf_stats_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() == "1")
}

/// The snapshot in the OpenMetrics text format (`# EOF` included).
pub fn render(snapshot: Snapshot) -> String {
    let mut registry = Registry::with_prefix("monitor");
    registry.register_collector(Box::new(snapshot));
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode_text(&mut out, &registry);
    out
}

type Labels = Vec<(&'static str, String)>;

fn labels<const N: usize>(l: [(&'static str, &str); N]) -> Labels {
    l.into_iter().map(|(k, v)| (k, v.to_string())).collect()
}

/// Writes families into the collector's encoder.
struct Out<'a>(DescriptorEncoder<'a>);

impl Out<'_> {
    fn counter<N: EncodeCounterValue>(&mut self, name: &str, help: &str, v: N) -> fmt::Result {
        self.counter_unit(name, help, None, v)
    }

    fn counter_unit<N: EncodeCounterValue>(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        v: N,
    ) -> fmt::Result {
        let m = self
            .0
            .encode_descriptor(name, help, unit, MetricType::Counter)?;
        ConstCounter::new(v).encode(m)
    }

    fn counters<N: EncodeCounterValue>(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        samples: impl IntoIterator<Item = (Labels, N)>,
    ) -> fmt::Result {
        let mut m = self
            .0
            .encode_descriptor(name, help, unit, MetricType::Counter)?;
        for (l, v) in samples {
            ConstCounter::new(v).encode(m.encode_family(&l)?)?;
        }
        Ok(())
    }

    fn gauge<N: EncodeGaugeValue>(&mut self, name: &str, help: &str, v: N) -> fmt::Result {
        self.gauge_unit(name, help, None, v)
    }

    fn gauge_unit<N: EncodeGaugeValue>(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        v: N,
    ) -> fmt::Result {
        let m = self
            .0
            .encode_descriptor(name, help, unit, MetricType::Gauge)?;
        ConstGauge::new(v).encode(m)
    }

    fn gauges<N: EncodeGaugeValue>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, N)>,
    ) -> fmt::Result {
        let mut m = self
            .0
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (l, v) in samples {
            ConstGauge::new(v).encode(m.encode_family(&l)?)?;
        }
        Ok(())
    }

    /// A per-program family of one kernel counter, summed over CPUs.
    fn per_program(&mut self, s: &Snapshot, name: &str, help: &str, stat: u32) -> fmt::Result {
        self.counters(
            name,
            help,
            None,
            s.probes.iter().map(|p| {
                let n: u64 = p.cpus.iter().map(|c| c[stat as usize]).sum();
                (labels([("program", p.program)]), n)
            }),
        )
    }

    /// A per-program, per-CPU family of one kernel counter (CPUs that counted nothing are
    /// left out, except CPU 0 so that every program has a series).
    fn per_cpu(&mut self, s: &Snapshot, name: &str, help: &str, stat: u32) -> fmt::Result {
        self.counters(
            name,
            help,
            None,
            s.probes.iter().flat_map(|p| {
                p.cpus
                    .iter()
                    .enumerate()
                    .filter(|(cpu, c)| *cpu == 0 || c[stat as usize] > 0)
                    .map(move |(cpu, c)| {
                        (
                            vec![("program", p.program.to_string()), ("cpu", cpu.to_string())],
                            c[stat as usize],
                        )
                    })
            }),
        )
    }
}

impl Snapshot {
    fn encode_all(&self, o: &mut Out) -> fmt::Result {
        let s = self;
        o.gauges(
            "build_info",
            "Build of the running monitor and the kernel it runs on (always 1).",
            [(
                labels([
                    ("version", &s.version),
                    ("git_sha", &s.git_sha),
                    ("kernel", &s.kernel),
                ]),
                1u64,
            )],
        )?;
        o.gauge(
            "ready",
            "1 once the probes are attached and the capture loop runs.",
            s.ready as u64,
        )?;

        // Kernel programs.
        o.per_program(
            s,
            "probe_hits",
            "Runs of each kernel program (its own count).",
            STAT_HITS,
        )?;
        o.per_cpu(
            s,
            "events",
            "Records put in the ring buffer, per kernel program and CPU.",
            STAT_EVENTS,
        )?;
        o.per_cpu(
            s,
            "events_lost",
            "Records the ring buffer had no room for, per kernel program and CPU.",
            STAT_LOST,
        )?;
        o.per_program(
            s,
            "events_truncated",
            "Calls whose data was copied only in part, per kernel program.",
            STAT_TRUNCATED,
        )?;
        o.per_program(
            s,
            "events_skipped",
            "Writes kept in the kernel because they start an HTTP response (skip-responses).",
            STAT_SKIPPED,
        )?;
        o.per_program(
            s,
            "probe_read_errors",
            "Buffers a kernel program could not read (bpf_probe_read failures).",
            STAT_READ_ERRORS,
        )?;
        o.gauge(
            "bpf_stats_enabled",
            "1 when the kernel counts BPF program runs and time (--bpf-stats or kernel.bpf_stats_enabled).",
            s.bpf_stats_enabled as u64,
        )?;
        // Without bpf stats the kernel counts nothing: no series rather than zeros.
        let runs: &[ProgramRuns] = if s.bpf_stats_enabled {
            &s.program_runs
        } else {
            &[]
        };
        o.counters(
            "program_runs",
            "Runs of each loaded BPF program as the kernel counts them (with bpf stats on).",
            None,
            runs.iter()
                .map(|p| (labels([("program", &p.program)]), p.runs)),
        )?;
        o.counters(
            "program_run",
            "Time spent in each loaded BPF program (with bpf stats on).",
            Some(&Unit::Seconds),
            runs.iter()
                .map(|p| (labels([("program", &p.program)]), p.run_time.as_secs_f64())),
        )?;
        if let Some(r) = &s.ring {
            o.gauge_unit(
                "ringbuf_size",
                "Size of the event ring buffer.",
                Some(&Unit::Bytes),
                r.size,
            )?;
            o.gauge_unit(
                "ringbuf_pending",
                "Bytes in the ring buffer not yet consumed (producer minus consumer position).",
                Some(&Unit::Bytes),
                r.produced.saturating_sub(r.consumed),
            )?;
            o.gauge_unit(
                "ringbuf_pending_peak",
                "Most bytes found waiting when a drain started, during the last second.",
                Some(&Unit::Bytes),
                r.peak_pending,
            )?;
            o.counter_unit(
                "ringbuf_produced",
                "Bytes the kernel programs reserved in the ring buffer (headers included).",
                Some(&Unit::Bytes),
                r.produced,
            )?;
            o.counter_unit(
                "ringbuf_consumed",
                "Bytes userspace consumed from the ring buffer (headers included).",
                Some(&Unit::Bytes),
                r.consumed,
            )?;
        }
        o.counter(
            "events_undecodable",
            "Ring buffer records userspace could not decode.",
            s.decode_errors,
        )?;

        // TLS attachment.
        o.counters(
            "tls_attach",
            "Attach results per TLS stack (result: attached, failed, detached).",
            None,
            s.attach.by_stack.iter().flat_map(|(stack, results)| {
                results
                    .iter()
                    .map(move |(result, n)| (labels([("stack", stack), ("result", result)]), *n))
            }),
        )?;
        o.gauges(
            "tls_probe_sites",
            "TLS probes attached now, by where they sit: kind entry or return; placement \
             emulated (the kernel emulates the instruction: one trap), single-step (copied \
             out of line: a second trap) or uretprobe.",
            s.attach
                .sites
                .iter()
                .map(|((stack, function, kind, placement), n)| {
                    (
                        labels([
                            ("stack", stack),
                            ("function", function),
                            ("kind", kind.name()),
                            ("placement", placement.name()),
                        ]),
                        *n,
                    )
                }),
        )?;
        o.gauge(
            "tls_files_attached",
            "Files (TLS libraries and programs) with probes attached now.",
            s.attach.attached_now as u64,
        )?;
        o.counter(
            "tls_files_inspected",
            "Files whose ELF symbols were read, whatever the verdict.",
            s.attach.inspected,
        )?;
        o.counter(
            "tls_inspect_errors",
            "Files that could not be read or parsed.",
            s.attach.inspect_errors,
        )?;
        o.counters(
            "tls_inspect_failures",
            "Files not inspected, or not to the end, by reason (not_regular, replaced, byte_budget, time_budget, read_error, malformed, queue_full, stuck).",
            None,
            s.attach
                .inspect_failures
                .iter()
                .map(|(reason, n)| (labels([("reason", reason)]), *n)),
        )?;
        o.counter(
            "tls_mmap_misses",
            "Mapped files no longer among the process's mappings when looked up.",
            s.attach.mmap_misses,
        )?;
        o.gauge_unit(
            "tls_arrival_to_attach_max",
            "Longest time from a program's exec or a library's mmap to its TLS probes attached.",
            Some(&Unit::Seconds),
            s.attach.arrival_to_attach_max_us as f64 / 1e6,
        )?;

        // Parsing.
        let p = &s.pipeline;
        o.counter(
            "pipeline_events",
            "Events (data, TLS bindings, closes, execs) through the pipeline.",
            p.events,
        )?;
        o.counter_unit(
            "pipeline_data",
            "Captured payload bytes through the pipeline.",
            Some(&Unit::Bytes),
            p.bytes,
        )?;
        let by = |m: &std::collections::BTreeMap<&'static str, u64>, key: &'static str| {
            m.iter()
                .map(move |(k, n)| (labels([(key, k)]), *n))
                .collect::<Vec<_>>()
        };
        o.counters(
            "requests",
            "Requests (HTTP) and logins (Redis, PostgreSQL) parsed, per protocol.",
            None,
            by(&p.requests_by_protocol, "protocol"),
        )?;
        o.counters(
            "responses",
            "Responses parsed, per protocol.",
            None,
            by(&p.responses_by_protocol, "protocol"),
        )?;
        o.counters(
            "parse_errors",
            "Streams that failed to parse and were resynchronised, per protocol.",
            None,
            by(&p.parse_errors_by_protocol, "protocol"),
        )?;
        o.counter(
            "parse_drops",
            "Fields or header blocks stepped over undecoded (HTTP/2 joined mid-stream).",
            p.parse_drops,
        )?;
        o.counter(
            "streams_unrecognized",
            "Streams no parser recognised (ignored from then on).",
            p.streams_not_http,
        )?;
        o.counter(
            "stream_gaps",
            "Holes in a stream (data not copied or lost): parsing resynchronised.",
            p.gaps,
        )?;
        o.gauge("connections", "Connections tracked now.", p.conns as u64)?;
        o.counter(
            "connections_evicted",
            "Connections dropped to bound memory (least recently used first).",
            p.conns_evicted,
        )?;
        o.counter(
            "connections_expired",
            "Connections forgotten after a long time without events (their close was not seen).",
            p.conns_expired,
        )?;
        o.counter(
            "connection_budget_resets",
            "Streams reset because their connection held more than its byte budget.",
            p.conn_budget_resets,
        )?;
        o.gauge_unit(
            "pipeline_held",
            "Bytes held by all tracked connections (bounded by the node budget).",
            Some(&Unit::Bytes),
            p.bytes_held as u64,
        )?;
        o.gauge(
            "tls_connections_bound",
            "TLS connections whose socket is known.",
            p.tls_bound as u64,
        )?;
        o.counter(
            "stdout_dropped_lines",
            "Lines (records, alerts) dropped because stdout was not read fast enough.",
            s.stdout_dropped_lines,
        )?;
        o.gauge_unit(
            "stdout_queued",
            "Bytes printed and not yet taken by stdout's reader.",
            Some(&Unit::Bytes),
            s.stdout_queued_bytes,
        )?;
        if let Some(r) = &s.record {
            o.counter(
                "record_events",
                "Events written to the --record event log.",
                r.events,
            )?;
            o.counter(
                "record_dropped_events",
                "Events missing from the --record event log (best effort: a failed write drops its batch; capturing goes on).",
                r.dropped,
            )?;
            o.counters(
                "record_write_errors",
                "Failed writes to the --record event log, per error kind.",
                None,
                r.errors
                    .iter()
                    .map(|(k, v)| (labels([("kind", k.as_str())]), *v)),
            )?;
        }
        o.counters(
            "credentials",
            "Credentials found, per kind (fingerprinted, never exported).",
            None,
            by(&p.credentials_by_kind, "kind"),
        )?;

        // Detection.
        let d = &s.detect;
        o.counter(
            "detect_observations",
            "Requests checked by the detector.",
            d.observations,
        )?;
        o.counter(
            "detect_server_side_duplicates",
            "Server-side records skipped because the client side was already checked.",
            d.server_side_duplicates,
        )?;
        o.counters(
            "alerts",
            "Alerts raised (new, not repeats), per rule and severity.",
            None,
            d.alerts_by_rule_severity
                .iter()
                .map(|((rule, sev), n)| (labels([("rule", rule), ("severity", sev.as_str())]), *n)),
        )?;
        o.counter(
            "alerts_deduplicated",
            "Repeats folded into an open alert's count.",
            d.deduplicated,
        )?;
        o.gauge(
            "bindings",
            "Credential bindings tracked now.",
            d.bindings as u64,
        )?;
        o.counter(
            "bindings_evicted",
            "Credential bindings dropped to bound memory.",
            d.bindings_evicted,
        )?;
        o.gauge(
            "open_alerts",
            "Alerts whose deduplication window is open now.",
            d.open_alerts as u64,
        )?;
        o.counter(
            "open_alerts_evicted",
            "Open alerts closed before their window passed, to bound memory (final count sent).",
            d.open_alerts_evicted,
        )?;
        o.counter(
            "detect_state_entries_dropped",
            "State file entries dropped at load because they failed validation.",
            d.state_entries_dropped,
        )?;
        o.counter(
            "detect_unnormalisable_paths",
            "Requests whose path has no normal form (learn mode learns nothing from them).",
            d.unnormalisable_paths,
        )?;

        // Identity.
        let i = &s.identity;
        let mut hits = vec![
            (labels([("cache", "exe")]), i.exe_hits),
            (labels([("cache", "cgroup")]), i.cgroup_hits),
        ];
        let mut misses = vec![
            (labels([("cache", "exe")]), i.exe_misses),
            (labels([("cache", "cgroup")]), i.cgroup_misses),
        ];
        if let Some(k) = &s.kube {
            hits.push((labels([("cache", "pod")]), k.cache_hits));
            misses.push((labels([("cache", "pod")]), k.cache_misses));
        }
        o.counters(
            "identity_cache_hits",
            "Identity lookups answered from a cache (exe: process, cgroup: path, pod).",
            None,
            hits,
        )?;
        o.counters(
            "identity_cache_misses",
            "Identity lookups that read /proc or cgroupfs, or found no pod.",
            None,
            misses,
        )?;
        o.counter(
            "identity_cgroup_unresolved",
            "Cgroup ids no path was found for (the cgroup was gone).",
            i.cgroup_unresolved,
        )?;
        if let Some(k) = &s.kube {
            o.counter("kube_lists", "Pod lists from the Kubernetes API.", k.lists)?;
            o.counter(
                "kube_relists",
                "Pod lists after the first (expired watch, API back after an error).",
                k.relists,
            )?;
            o.counter(
                "kube_watch_events",
                "Pod watch events received.",
                k.watch_events,
            )?;
            o.counter(
                "kube_watch_restarts",
                "Pod watches started again.",
                k.watch_restarts,
            )?;
            o.counter(
                "kube_api_errors",
                "Failed Kubernetes API requests.",
                k.api_errors,
            )?;
            o.gauge("kube_pods", "Pods of this node cached now.", k.pods as u64)?;
            o.gauge(
                "kube_synced",
                "1 once a pod list has succeeded.",
                k.synced as u64,
            )?;
        }

        // Outputs.
        if let Some(c) = &s.clickhouse {
            o.counters(
                "clickhouse_rows",
                "Rows ClickHouse acknowledged, per table.",
                None,
                c.rows_by_table
                    .iter()
                    .map(|(t, n)| (labels([("table", t)]), *n)),
            )?;
            o.counter(
                "clickhouse_batches",
                "Batches ClickHouse acknowledged.",
                c.batches_written,
            )?;
            o.counter(
                "clickhouse_batches_from_spool",
                "Acknowledged batches that had waited in the spool.",
                c.batches_from_spool,
            )?;
            o.counter(
                "clickhouse_errors",
                "Failed INSERTs and schema migrations.",
                c.errors,
            )?;
            o.counter(
                "clickhouse_dropped_rows",
                "Rows dropped because the writer's queue was full.",
                c.dropped,
            )?;
            o.counter(
                "clickhouse_spooled_batches",
                "Batches written to the on-disk spool.",
                c.spooled_batches,
            )?;
            o.counter(
                "clickhouse_shed_batches",
                "Spooled batches shed by the spool's bound or lost to a write error.",
                c.shed_batches,
            )?;
            o.counter(
                "clickhouse_shed_rows",
                "Rows of the shed batches.",
                c.shed_rows,
            )?;
            o.counter(
                "clickhouse_set_aside_batches",
                "Spooled batches set aside as rejected or unreadable.",
                c.set_aside_batches,
            )?;
            o.gauge(
                "clickhouse_spool_batches",
                "Batches waiting in the spool now.",
                c.spool_batches,
            )?;
            o.gauge(
                "clickhouse_spool_rows",
                "Rows waiting in the spool now.",
                c.spool_rows,
            )?;
            o.gauge_unit(
                "clickhouse_spool",
                "Size of the spool now.",
                Some(&Unit::Bytes),
                c.spool_bytes,
            )?;
        }
        if let Some(w) = &s.webhook {
            o.counter("webhook_sent", "Alerts delivered (2xx).", w.sent)?;
            o.counter(
                "webhook_retries",
                "Delivery attempts after the first.",
                w.retried,
            )?;
            o.counter(
                "webhook_failed",
                "Alerts given up on (attempts or age ran out, or left at shutdown).",
                w.failed,
            )?;
            o.counter(
                "webhook_rejected",
                "Alerts refused with a status that is not retried.",
                w.rejected,
            )?;
            o.counter(
                "webhook_dropped",
                "Alerts not queued: the queue was full.",
                w.dropped,
            )?;
            o.gauge(
                "webhook_queued",
                "Alerts waiting in the queue now.",
                w.queued,
            )?;
        }
        if let Some(f) = &s.alerts_file {
            o.counter(
                "alerts_file_writes",
                "Alerts written to the alerts file.",
                f.written,
            )?;
            o.counter(
                "alerts_file_rotations",
                "Rotations of the alerts file.",
                f.rotations,
            )?;
            o.counter(
                "alerts_file_errors",
                "Alerts lost to an I/O error on the alerts file.",
                f.errors,
            )?;
            o.gauge_unit(
                "alerts_file_size",
                "Size of the current alerts file.",
                Some(&Unit::Bytes),
                f.bytes,
            )?;
        }
        o.counter(
            "alert_render_errors",
            "Alerts that could not be rendered in the chosen format.",
            s.alert_render_errors,
        )
    }
}

impl Collector for Snapshot {
    fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
        self.encode_all(&mut Out(encoder))
    }
}

/// Reads the ring buffer's consumer and producer positions from a read-only mapping of its
/// first two pages (the kernel allows read-only mappings of every page; aya's `RingBuf`
/// does not expose them).
pub struct RingUsage {
    pages: memmap2::Mmap,
    page: usize,
    size: u64,
    peak: u64,
}

impl RingUsage {
    pub fn new(fd: BorrowedFd) -> std::io::Result<Self> {
        let page = page_size();
        // SAFETY: a read-only shared mapping of the map's metadata pages; the kernel updates
        // them concurrently, so they are only read through atomics.
        let pages = unsafe {
            memmap2::MmapOptions::new()
                .len(2 * page)
                .map(fd.as_raw_fd())?
        };
        let size = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("max_entries:"))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0);
        Ok(RingUsage {
            pages,
            page,
            size,
            peak: 0,
        })
    }

    fn position(&self, page: usize) -> u64 {
        // SAFETY: page-aligned, inside the mapping; the kernel writes it atomically.
        let p = unsafe { &*(self.pages.as_ptr().add(page * self.page) as *const AtomicU64) };
        p.load(Ordering::Acquire)
    }

    /// (consumer, producer) positions.
    pub fn positions(&self) -> (u64, u64) {
        (self.position(0), self.position(1))
    }

    /// Notes how much is waiting (call before each drain).
    pub fn observe(&mut self) {
        let (c, p) = self.positions();
        self.peak = self.peak.max(p.saturating_sub(c));
    }

    /// The positions and the peak since the previous call.
    pub fn snapshot(&mut self) -> RingSnapshot {
        let (consumed, produced) = self.positions();
        let peak = std::mem::take(&mut self.peak).max(produced.saturating_sub(consumed));
        RingSnapshot {
            size: self.size,
            produced,
            consumed,
            peak_pending: peak,
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};

    use super::*;
    use crate::alert::Severity;

    fn sample() -> Snapshot {
        let mut s = Snapshot::new();
        s.ready = true;
        let mut cpu0 = [0u64; monitor_common::STAT_COUNT as usize];
        let mut cpu1 = cpu0;
        cpu0[STAT_HITS as usize] = 4;
        cpu0[STAT_EVENTS as usize] = 3;
        cpu1[STAT_EVENTS as usize] = 5;
        cpu1[STAT_LOST as usize] = 1;
        s.probes = vec![
            ProgCpuStats {
                program: "ssl_write",
                cpus: vec![cpu0, cpu1],
            },
            ProgCpuStats {
                program: "sys_read",
                cpus: vec![[0; 6], [0; 6]],
            },
        ];
        s.bpf_stats_enabled = true;
        s.program_runs = vec![ProgramRuns {
            program: "odd\"name\n".into(),
            runs: 7,
            run_time: std::time::Duration::from_millis(1500),
        }];
        s.ring = Some(RingSnapshot {
            size: 1 << 24,
            produced: 300,
            consumed: 200,
            peak_pending: 150,
        });
        s.attach
            .by_stack
            .insert("openssl".into(), BTreeMap::from([("attached", 2)]));
        s.attach.attached_now = 2;
        s.attach.sites.insert(
            (
                "openssl",
                "SSL_read",
                crate::probe::site::Kind::Return,
                crate::probe::site::Placement::Emulated,
            ),
            2,
        );
        s.attach.inspect_failures = BTreeMap::from([("byte_budget", 1)]);
        s.pipeline.requests_by_protocol = BTreeMap::from([("http/1.1", 6), ("redis", 1)]);
        s.pipeline.parse_errors_by_protocol = BTreeMap::from([("http/2", 1)]);
        s.pipeline.credentials_by_kind = BTreeMap::from([("bearer", 6), ("basic", 1)]);
        s.pipeline.conns = 3;
        s.detect.alerts_by_rule_severity = BTreeMap::from([(("token-replay", Severity::High), 2)]);
        s.detect.bindings = 5;
        s.identity.exe_hits = 10;
        s.kube = Some(KubeStats {
            cache_hits: 4,
            synced: true,
            ..Default::default()
        });
        s.clickhouse = Some(SinkStats {
            rows_by_table: BTreeMap::from([("flows", 9)]),
            spool_bytes: 4096,
            ..Default::default()
        });
        s.webhook = Some(WebhookStats {
            sent: 2,
            ..Default::default()
        });
        s.alerts_file = Some(FileStats::default());
        s
    }

    /// Checks the OpenMetrics text structurally: descriptors before samples, every sample in
    /// the family declared last, counters as `_total`, units as name suffixes, valid names and
    /// labels, no family or series twice, `# EOF` last. Returns (series → value).
    fn parse(text: &str) -> BTreeMap<String, f64> {
        let name_ok = |n: &str| {
            n.starts_with("monitor_")
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        };
        let mut families = HashSet::new();
        let mut current: Option<(String, String)> = None;
        let mut series = BTreeMap::new();
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            if line == "# EOF" {
                assert!(lines.peek().is_none(), "text after # EOF");
                return series;
            }
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP has text");
                assert!(name_ok(name), "{line}");
                assert!(!help.trim().is_empty(), "{line}");
                assert!(families.insert(name.to_string()), "{name} declared twice");
                let ty = lines.next().expect("TYPE after HELP");
                let (tname, kind) = ty
                    .strip_prefix("# TYPE ")
                    .and_then(|t| t.split_once(' '))
                    .unwrap_or_else(|| panic!("TYPE expected, got {ty}"));
                assert_eq!(tname, name);
                assert!(["counter", "gauge"].contains(&kind), "{ty}");
                assert!(
                    !name.ends_with("_total"),
                    "{name}: family names have no _total"
                );
                current = Some((name.to_string(), kind.to_string()));
                continue;
            }
            if let Some(rest) = line.strip_prefix("# UNIT ") {
                let (name, unit) = rest.split_once(' ').unwrap();
                assert_eq!(Some(name), current.as_ref().map(|c| c.0.as_str()));
                assert!(name.ends_with(&format!("_{unit}")), "{line}");
                continue;
            }
            assert!(!line.starts_with('#'), "unknown comment {line}");
            let (fam, kind) = current.as_ref().expect("sample before any family");
            let (head, value) = line.rsplit_once(' ').expect("sample has a value");
            let v: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
            assert!(v >= 0.0 && v.is_finite(), "{line}");
            let name = head.split('{').next().unwrap();
            let want = if kind == "counter" {
                format!("{fam}_total")
            } else {
                fam.clone()
            };
            assert_eq!(name, want, "{line} is not in family {fam}");
            if let Some(l) = head.strip_prefix(name).filter(|l| !l.is_empty()) {
                check_labels(l);
            }
            assert!(series.insert(head.to_string(), v).is_none(), "{head} twice");
        }
        panic!("no # EOF");
    }

    /// `{k="v",...}` with escaped values.
    fn check_labels(l: &str) {
        let inner = l
            .strip_prefix('{')
            .and_then(|l| l.strip_suffix('}'))
            .expect("braces");
        assert!(!inner.is_empty(), "empty label set");
        let mut chars = inner.chars().peekable();
        loop {
            let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
            assert!(
                !key.is_empty()
                    && !key.starts_with(|c: char| c.is_ascii_digit())
                    && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "label name {key:?} in {l}"
            );
            assert_eq!(chars.next(), Some('='));
            assert_eq!(chars.next(), Some('"'), "{l}");
            loop {
                match chars.next().expect("unterminated label value") {
                    '\\' => assert!(matches!(chars.next(), Some('\\' | '"' | 'n')), "{l}"),
                    '"' => break,
                    '\n' => panic!("raw newline in {l}"),
                    _ => {}
                }
            }
            match chars.next() {
                None => break,
                Some(',') => continue,
                Some(c) => panic!("{c:?} after a label value in {l}"),
            }
        }
    }

    #[test]
    fn renders_valid_openmetrics() {
        let text = render(sample());
        let series = parse(&text);
        let get = |k: &str| *series.get(k).unwrap_or_else(|| panic!("no {k} in\n{text}"));
        assert_eq!(get("monitor_ready"), 1.0);
        assert_eq!(get("monitor_probe_hits_total{program=\"ssl_write\"}"), 4.0);
        assert_eq!(
            get("monitor_events_total{program=\"ssl_write\",cpu=\"0\"}")
                + get("monitor_events_total{program=\"ssl_write\",cpu=\"1\"}"),
            8.0
        );
        // A CPU that counted nothing is left out, CPU 0 never.
        assert!(series.contains_key("monitor_events_lost_total{program=\"sys_read\",cpu=\"0\"}"));
        assert!(!series.contains_key("monitor_events_lost_total{program=\"sys_read\",cpu=\"1\"}"));
        assert_eq!(
            get("monitor_events_lost_total{program=\"ssl_write\",cpu=\"1\"}"),
            1.0
        );
        assert_eq!(
            get("monitor_program_run_seconds_total{program=\"odd\\\"name\\n\"}"),
            1.5
        );
        assert_eq!(get("monitor_ringbuf_pending_bytes"), 100.0);
        assert_eq!(get("monitor_ringbuf_pending_peak_bytes"), 150.0);
        assert_eq!(get("monitor_ringbuf_size_bytes"), (1 << 24) as f64);
        assert_eq!(
            get("monitor_tls_attach_total{stack=\"openssl\",result=\"attached\"}"),
            2.0
        );
        assert_eq!(
            get(
                "monitor_tls_probe_sites{stack=\"openssl\",function=\"SSL_read\",kind=\"return\",placement=\"emulated\"}"
            ),
            2.0
        );
        assert_eq!(
            get("monitor_tls_inspect_failures_total{reason=\"byte_budget\"}"),
            1.0
        );
        assert_eq!(get("monitor_requests_total{protocol=\"http/1.1\"}"), 6.0);
        assert_eq!(get("monitor_parse_errors_total{protocol=\"http/2\"}"), 1.0);
        assert_eq!(get("monitor_credentials_total{kind=\"bearer\"}"), 6.0);
        assert_eq!(
            get("monitor_alerts_total{rule=\"token-replay\",severity=\"high\"}"),
            2.0
        );
        assert_eq!(get("monitor_identity_cache_hits_total{cache=\"pod\"}"), 4.0);
        assert_eq!(get("monitor_kube_synced"), 1.0);
        assert_eq!(get("monitor_clickhouse_rows_total{table=\"flows\"}"), 9.0);
        assert_eq!(get("monitor_clickhouse_spool_bytes"), 4096.0);
        assert_eq!(get("monitor_webhook_sent_total"), 2.0);
        assert!(series.contains_key("monitor_alerts_file_rotations_total"));
        let info = series
            .keys()
            .find(|k| k.starts_with("monitor_build_info{"))
            .expect("build info");
        assert!(info.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))));
        assert!(info.contains("kernel=\""));
    }

    #[test]
    fn optional_parts_absent_and_run_counts_only_with_bpf_stats() {
        let mut s = sample();
        s.bpf_stats_enabled = false;
        s.kube = None;
        s.clickhouse = None;
        s.webhook = None;
        s.alerts_file = None;
        s.ring = None;
        let text = render(s);
        let series = parse(&text);
        assert!(!series.keys().any(|k| k.starts_with("monitor_program_run")));
        assert!(text.contains("# TYPE monitor_program_runs counter"));
        assert_eq!(series["monitor_bpf_stats_enabled"], 0.0);
        for absent in [
            "kube_",
            "clickhouse_",
            "webhook_",
            "alerts_file_",
            "ringbuf_",
        ] {
            assert!(
                !text.contains(&format!("monitor_{absent}")),
                "{absent} in\n{text}"
            );
        }
        assert!(!series.contains_key("monitor_identity_cache_hits_total{cache=\"pod\"}"));
    }
}
