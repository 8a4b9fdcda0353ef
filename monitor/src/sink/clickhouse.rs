//! The ClickHouse writer: request records, credential observations, alerts and bindings,
//! batched by size and time, sent by a background task, never blocking the caller.
//!
//! ```text
//! record()/alert()/publish ──try_send──▶ batcher ──sealed batch──▶ sender ──INSERT──▶ ClickHouse
//!   (full channel: counted drop)           │ (sender busy)           │ (refused, unreachable)
//!                                          └────────▶ spool ◀────────┘ … retried with backoff
//! ```
//! Each batch gets a random `insert_deduplication_token` when it is sealed and keeps it in
//! the spool, so a batch the server stored but could not acknowledge is dropped by the server
//! when it comes again: no loss (up to the spool's bound, whose sheds are counted) and no
//! duplicates.

use std::{
    collections::BTreeMap,
    fmt,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow};
use clickhouse::{Client, RowOwned, RowWrite};
use serde::Serialize;
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

use super::{
    rows::{self, AlertRow, BindingRow, FlowRow, ObservationRow},
    schema::{self, SchemaConfig},
    spool::{Batch, Rows, Spool, Table},
};
use crate::{alert::Alert, https::url_for_logs, pipeline::RequestRecord};

/// `monitor run` / `monitor replay` options for the ClickHouse history.
#[derive(clap::Args, Clone)]
pub struct ClickHouseArgs {
    /// ClickHouse HTTP(S) endpoint for flow and alert history and cross-node bindings, e.g.
    /// http://127.0.0.1:8123 (none: no history).
    #[arg(long = "clickhouse-url", env = "MONITOR_CLICKHOUSE_URL")]
    pub clickhouse_url: Option<String>,
    /// ClickHouse user.
    #[arg(long = "clickhouse-user", env = "MONITOR_CLICKHOUSE_USER")]
    pub clickhouse_user: Option<String>,
    /// ClickHouse password (prefer the environment variable: command lines are visible).
    #[arg(
        long = "clickhouse-password",
        env = "MONITOR_CLICKHOUSE_PASSWORD",
        hide_env_values = true
    )]
    pub clickhouse_password: Option<String>,
    /// Database the monitor creates and migrates.
    #[arg(long = "clickhouse-database", default_value = "monitor")]
    pub clickhouse_database: String,
    /// Days flows, observations and alerts are kept (0: forever).
    #[arg(long = "clickhouse-ttl-days", default_value_t = 30)]
    pub clickhouse_ttl_days: u32,
    /// Where batches wait while ClickHouse is unreachable.
    #[arg(long = "spool-dir", default_value = "/var/lib/monitor/spool")]
    pub spool_dir: PathBuf,
    /// Bound of the spool; past it the oldest batches are shed (and counted).
    #[arg(long = "spool-max-mb", default_value_t = 1024)]
    pub spool_max_mb: u64,
    /// Longest wait for one request to ClickHouse (an INSERT, the schema migration, the
    /// bindings query); a server that takes the connection and never answers costs this, then
    /// the rows go to the spool.
    #[arg(long = "clickhouse-timeout", default_value = "10s", value_parser = humantime::parse_duration)]
    pub clickhouse_timeout: Duration,
}

impl fmt::Debug for ClickHouseArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClickHouseArgs")
            .field(
                "clickhouse_url",
                &self.clickhouse_url.as_deref().map(url_for_logs),
            )
            .field("clickhouse_user", &self.clickhouse_user)
            .field(
                "clickhouse_password",
                &self.clickhouse_password.as_ref().map(|_| "<hidden>"),
            )
            .field("clickhouse_database", &self.clickhouse_database)
            .field("clickhouse_ttl_days", &self.clickhouse_ttl_days)
            .field("spool_dir", &self.spool_dir)
            .field("spool_max_mb", &self.spool_max_mb)
            .field("clickhouse_timeout", &self.clickhouse_timeout)
            .finish()
    }
}

impl ClickHouseArgs {
    /// The writer's configuration, if a URL was given.
    pub fn sink_config(&self) -> Option<SinkConfig> {
        let url = self.clickhouse_url.clone()?;
        Some(SinkConfig {
            url,
            user: self.clickhouse_user.clone(),
            password: self.clickhouse_password.clone(),
            schema: SchemaConfig {
                database: self.clickhouse_database.clone(),
                ttl_days: self.clickhouse_ttl_days,
            },
            spool_dir: self.spool_dir.clone(),
            spool_max_bytes: self.spool_max_mb.saturating_mul(1 << 20),
            request_timeout: self.clickhouse_timeout,
            ..SinkConfig::new("")
        })
    }
}

/// Everything the writer needs; [`SinkConfig::new`] has the defaults.
#[derive(Clone)]
pub struct SinkConfig {
    pub url: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub schema: SchemaConfig,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    /// A table's batch is sent when it has this many rows…
    pub batch_rows: usize,
    /// …or when it is this old.
    pub batch_interval: Duration,
    /// Rows (records, alerts, bindings) waiting for the batcher; past it they are dropped
    /// and counted.
    pub channel_capacity: usize,
    /// Backoff between attempts while ClickHouse is unreachable.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Per request to the server, from connecting to the last byte of the answer: an INSERT
    /// (with the table metadata the client asks for first), a schema migration, a bindings
    /// query.
    pub request_timeout: Duration,
    /// lz4 on the wire.
    pub compression: bool,
    /// Times the server may refuse a spooled batch (while taking others) before it is set
    /// aside as `*.rejected`.
    pub max_rejections: u32,
}

impl fmt::Debug for SinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SinkConfig")
            .field("url", &url_for_logs(&self.url))
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("schema", &self.schema)
            .field("spool_dir", &self.spool_dir)
            .field("spool_max_bytes", &self.spool_max_bytes)
            .field("batch_rows", &self.batch_rows)
            .field("batch_interval", &self.batch_interval)
            .finish_non_exhaustive()
    }
}

impl SinkConfig {
    pub fn new(url: &str) -> SinkConfig {
        SinkConfig {
            url: url.to_string(),
            user: None,
            password: None,
            schema: SchemaConfig::default(),
            spool_dir: PathBuf::from("/var/lib/monitor/spool"),
            spool_max_bytes: 1 << 30,
            batch_rows: 10_000,
            batch_interval: Duration::from_secs(1),
            channel_capacity: 100_000,
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            compression: true,
            max_rejections: 10,
        }
    }

    /// A client for the server (the database is not selected: statements name it).
    pub fn client(&self) -> Client {
        let mut c = Client::default().with_url(&self.url);
        if let Some(u) = &self.user {
            c = c.with_user(u);
        }
        if let Some(p) = &self.password {
            c = c.with_password(p);
        }
        if !self.compression {
            c = c.with_compression(clickhouse::Compression::None);
        }
        c
    }
}

/// Counters of the writer (a snapshot).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct SinkStats {
    /// Rows ClickHouse acknowledged (all tables).
    pub rows_written: u64,
    pub batches_written: u64,
    /// Of those, batches that had waited in the spool.
    pub batches_from_spool: u64,
    /// Failed INSERTs (and failed schema migrations).
    pub errors: u64,
    /// Rows dropped because the writer's channel was full (or the writer stopped).
    pub dropped: u64,
    /// Batches (and their rows) written to the spool (not those shed at once for being
    /// larger than the whole spool: they count as shed).
    pub spooled_batches: u64,
    pub spooled_rows: u64,
    /// Batches (and rows) shed by the spool's bound, or lost to a spool write error.
    pub shed_batches: u64,
    pub shed_rows: u64,
    /// Spooled batches set aside (`*.rejected`, `*.bad`).
    pub set_aside_batches: u64,
    /// Waiting in the spool now.
    pub spool_batches: u64,
    pub spool_rows: u64,
    pub spool_bytes: u64,
    /// Rows ClickHouse acknowledged, per table.
    pub rows_by_table: BTreeMap<&'static str, u64>,
}

#[derive(Default)]
struct Counters {
    rows_written: AtomicU64,
    batches_written: AtomicU64,
    batches_from_spool: AtomicU64,
    errors: AtomicU64,
    dropped: AtomicU64,
    spooled_batches: AtomicU64,
    spooled_rows: AtomicU64,
    shed_batches: AtomicU64,
    shed_rows: AtomicU64,
    set_aside_batches: AtomicU64,
    spool_batches: AtomicU64,
    spool_rows: AtomicU64,
    spool_bytes: AtomicU64,
    /// Per table, in the order of `Table::ALL`.
    rows_by_table: [AtomicU64; 4],
    /// Seconds (monotonic, since start) of the last drop warning.
    last_drop_warn: AtomicU64,
}

// Requests are nearly all of the traffic: boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Request(FlowRow, Vec<ObservationRow>),
    Alert(Box<AlertRow>),
    Binding(BindingRow),
    /// `durable`: the rows in hand go to the spool before anything is sent, so that they are
    /// on disk before the caller waits on the network (a shutdown that may be cut short).
    Flush {
        reply: oneshot::Sender<Result<(), String>>,
        durable: bool,
    },
    Stop,
}

/// How long a sealed batch waits for the busy sender before it goes to the spool.
const SPILL_AFTER: Duration = Duration::from_secs(2);

enum Sealed {
    Batch(Batch),
    Flush(oneshot::Sender<Result<(), String>>),
}

struct Inner {
    tx: mpsc::Sender<Msg>,
    counters: Arc<Counters>,
    spool: Arc<Mutex<Spool>>,
    client: Client,
    schema: SchemaConfig,
    request_timeout: Duration,
    /// The schema migration at start got its answers.
    answered_at_start: bool,
    started: Instant,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// Handle to the writer; clones share it.
#[derive(Clone)]
pub struct ClickHouseSink {
    inner: Arc<Inner>,
}

impl ClickHouseSink {
    /// Opens the spool (batches left by an earlier run are sent first), creates or migrates
    /// the schema if the server answers (else later, before the first INSERT) and starts the
    /// writer's tasks. Must be called inside a tokio runtime.
    pub async fn start(cfg: SinkConfig) -> Result<ClickHouseSink> {
        schema::check_identifier(&cfg.schema.database)?;
        let spool = Spool::open(&cfg.spool_dir, cfg.spool_max_bytes)?;
        let client = cfg.client();
        let counters = Arc::new(Counters::default());
        let migrated =
            tokio::time::timeout(cfg.request_timeout, schema::migrate(&client, &cfg.schema))
                .await
                .unwrap_or_else(|_| Err(anyhow!("no answer within {:?}", cfg.request_timeout)));
        let schema_ready = match migrated {
            Ok(r) => {
                tracing::info!(url = %url_for_logs(&cfg.url), database = %cfg.schema.database, from = r.from, to = r.to, "ClickHouse schema ready");
                true
            }
            Err(e) => {
                counters.errors.fetch_add(1, Relaxed);
                tracing::warn!(url = %url_for_logs(&cfg.url), "ClickHouse not ready, rows go to the spool until it is: {e:#}");
                false
            }
        };
        let spool = Arc::new(Mutex::new(spool));
        let (tx, rx) = mpsc::channel(cfg.channel_capacity.max(1));
        // A few sealed batches in hand; more wait in the spool.
        let (sealed_tx, sealed_rx) = mpsc::channel(4);
        let data_client = client.clone().with_database(&cfg.schema.database);
        let batcher = Batcher {
            rx,
            sealed: sealed_tx,
            spool: spool.clone(),
            counters: counters.clone(),
            batch_rows: cfg.batch_rows.max(1),
            flows: Vec::new(),
            observations: Vec::new(),
            alerts: Vec::new(),
            bindings: Vec::new(),
        };
        let sender = Sender {
            rx: sealed_rx,
            client: client.clone(),
            data: data_client,
            schema: cfg.schema.clone(),
            schema_ready,
            spool: spool.clone(),
            counters: counters.clone(),
            backoff: cfg.retry_min,
            retry_min: cfg.retry_min,
            retry_max: cfg.retry_max,
            retry_at: None,
            timeout: cfg.request_timeout,
            max_rejections: cfg.max_rejections,
            rejections: Default::default(),
            last_error: String::new(),
        };
        let sink = ClickHouseSink {
            inner: Arc::new(Inner {
                tx,
                counters,
                spool,
                client,
                schema: cfg.schema.clone(),
                request_timeout: cfg.request_timeout,
                answered_at_start: schema_ready,
                started: Instant::now(),
                tasks: Mutex::new(Vec::new()),
            }),
        };
        sink.update_depth();
        let batch_interval = cfg.batch_interval;
        let t1 = tokio::spawn(batcher.run(batch_interval));
        let t2 = tokio::spawn(sender.run());
        sink.inner.tasks.lock().expect("tasks").extend([t1, t2]);
        Ok(sink)
    }

    /// Like [`ClickHouseSink::start`], with the writer on a runtime of its own (one worker
    /// thread), so that neither the daemon's capture loop nor a replay ever waits on the
    /// server. Callable alike from synchronous code (`monitor replay`) and from inside
    /// another runtime (`monitor run`): both take this one path. Wait for `flush`,
    /// `shutdown` and the bindings' loads with [`SinkRuntime::wait`].
    pub fn start_dedicated(cfg: SinkConfig) -> Result<(ClickHouseSink, SinkRuntime)> {
        let rt = SinkRuntime::new()?;
        let sink = rt.wait(ClickHouseSink::start(cfg))?;
        Ok((sink, rt))
    }

    fn offer(&self, m: Msg, rows: u64) {
        if self.inner.tx.try_send(m).is_err() {
            let c = &self.inner.counters;
            let total = c.dropped.fetch_add(rows, Relaxed) + rows;
            let now = self.inner.started.elapsed().as_secs() + 1;
            let last = c.last_drop_warn.load(Relaxed);
            if now >= last + 10
                && c.last_drop_warn
                    .compare_exchange(last, now, Relaxed, Relaxed)
                    .is_ok()
            {
                tracing::warn!(
                    dropped = total,
                    "ClickHouse writer cannot keep up (or has stopped): rows dropped"
                );
            }
        }
    }

    /// Queues one request (a `flows` row and a `credential_observations` row per credential);
    /// never blocks.
    pub fn record(&self, r: &RequestRecord, node: &str, source_workload: &str) {
        let (flow, obs) = rows::request_rows(r, node, source_workload);
        let n = 1 + obs.len() as u64;
        self.offer(Msg::Request(flow, obs), n);
    }

    /// Queues an alert; never blocks.
    pub fn alert(&self, a: &Alert) {
        self.offer(Msg::Alert(Box::new(rows::alert_row(a))), 1);
    }

    /// Queues a `credential_bindings` row; never blocks.
    pub fn binding(&self, row: BindingRow) {
        self.offer(Msg::Binding(row), 1);
    }

    /// Sends everything queued so far, the spool included. `Err` if some of it is still
    /// waiting in the spool (ClickHouse unreachable or refusing): nothing is lost by that.
    pub async fn flush(&self) -> Result<()> {
        self.flush_with(false).await
    }

    async fn flush_with(&self, durable: bool) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Msg::Flush { reply, durable })
            .await
            .map_err(|_| anyhow!("ClickHouse writer has stopped"))?;
        let r = rx
            .await
            .map_err(|_| anyhow!("ClickHouse writer has stopped"))?;
        self.update_depth();
        r.map_err(|e| anyhow!(e))
    }

    /// Writes the rows in hand to the spool, sends the spool, then stops the writer. What
    /// could not be sent stays in the spool for the next start; none of it waits in memory
    /// on a slow server, so being killed mid-shutdown loses nothing.
    pub async fn shutdown(&self) -> Result<()> {
        let r = self.flush_with(true).await;
        let _ = self.inner.tx.send(Msg::Stop).await;
        let tasks: Vec<_> = std::mem::take(&mut *self.inner.tasks.lock().expect("tasks"));
        for t in tasks {
            let _ = t.await;
        }
        self.update_depth();
        if let Err(e) = &r {
            let s = self.stats();
            tracing::warn!(
                batches = s.spool_batches,
                rows = s.spool_rows,
                "ClickHouse writer stopped with rows in the spool: {e:#}"
            );
        }
        r
    }

    fn update_depth(&self) {
        let (b, r, by) = self.inner.spool.lock().expect("spool").depth();
        let c = &self.inner.counters;
        c.spool_batches.store(b, Relaxed);
        c.spool_rows.store(r, Relaxed);
        c.spool_bytes.store(by, Relaxed);
    }

    pub fn stats(&self) -> SinkStats {
        let c = &self.inner.counters;
        SinkStats {
            rows_written: c.rows_written.load(Relaxed),
            batches_written: c.batches_written.load(Relaxed),
            batches_from_spool: c.batches_from_spool.load(Relaxed),
            errors: c.errors.load(Relaxed),
            dropped: c.dropped.load(Relaxed),
            spooled_batches: c.spooled_batches.load(Relaxed),
            spooled_rows: c.spooled_rows.load(Relaxed),
            shed_batches: c.shed_batches.load(Relaxed),
            shed_rows: c.shed_rows.load(Relaxed),
            set_aside_batches: c.set_aside_batches.load(Relaxed),
            spool_batches: c.spool_batches.load(Relaxed),
            spool_rows: c.spool_rows.load(Relaxed),
            spool_bytes: c.spool_bytes.load(Relaxed),
            rows_by_table: Table::ALL
                .iter()
                .zip(&c.rows_by_table)
                .map(|(t, n)| (t.name(), n.load(Relaxed)))
                .collect(),
        }
    }

    /// A client for queries (no database selected: name it, see [`ClickHouseSink::database`]).
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    pub fn database(&self) -> &str {
        &self.inner.schema.database
    }

    /// The bound of one request to the server (queries made with [`ClickHouseSink::client`]
    /// should keep to it too).
    pub fn request_timeout(&self) -> Duration {
        self.inner.request_timeout
    }

    /// Whether the server answered (and the schema was ready) when the writer started; if
    /// not, a caller may skip further waits on it at start.
    pub fn answered_at_start(&self) -> bool {
        self.inner.answered_at_start
    }
}

/// The runtime of a writer started by [`ClickHouseSink::start_dedicated`]; dropping it stops
/// the writer (shut it down first to send what is queued).
pub struct SinkRuntime {
    rt: Option<tokio::runtime::Runtime>,
}

impl SinkRuntime {
    fn new() -> Result<SinkRuntime> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("clickhouse-sink")
            .enable_all()
            .build()?;
        Ok(SinkRuntime { rt: Some(rt) })
    }

    /// Runs a future (a flush, a shutdown, a bindings load) on the writer's runtime and
    /// waits for its output. Unlike `Runtime::block_on` this may be called inside another
    /// runtime (the daemon's): the caller's thread only waits on a channel while the
    /// writer's own worker runs the future, so nothing nests. Never call it from that
    /// worker (a future already on this runtime): await there instead.
    pub fn wait<F>(&self, f: F) -> F::Output
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle().spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv()
            .unwrap_or_else(|_| panic!("a task on the ClickHouse writer's runtime panicked"))
    }

    pub fn handle(&self) -> &tokio::runtime::Handle {
        self.rt.as_ref().expect("runtime").handle()
    }
}

impl Drop for SinkRuntime {
    fn drop(&mut self) {
        // Allowed inside another runtime too, unlike dropping it.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn spool_batch(spool: &Mutex<Spool>, counters: &Counters, b: &Batch) {
    let mut s = spool.lock().expect("spool");
    let n = b.rows.len() as u64;
    match s.push(b) {
        Ok(p) => {
            // A batch larger than the whole spool is shed, not spooled.
            if p.stored {
                counters.spooled_batches.fetch_add(1, Relaxed);
                counters.spooled_rows.fetch_add(n, Relaxed);
            }
            counters.shed_batches.fetch_add(p.shed.batches, Relaxed);
            counters.shed_rows.fetch_add(p.shed.rows, Relaxed);
        }
        Err(e) => {
            counters.shed_batches.fetch_add(1, Relaxed);
            counters.shed_rows.fetch_add(n, Relaxed);
            tracing::error!(rows = n, table = b.table().name(), "batch lost: {e:#}");
        }
    }
    let (bt, r, by) = s.depth();
    counters.spool_batches.store(bt, Relaxed);
    counters.spool_rows.store(r, Relaxed);
    counters.spool_bytes.store(by, Relaxed);
}

/// Collects rows into per-table batches.
struct Batcher {
    rx: mpsc::Receiver<Msg>,
    sealed: mpsc::Sender<Sealed>,
    spool: Arc<Mutex<Spool>>,
    counters: Arc<Counters>,
    batch_rows: usize,
    flows: Vec<FlowRow>,
    observations: Vec<ObservationRow>,
    alerts: Vec<AlertRow>,
    bindings: Vec<BindingRow>,
}

impl Batcher {
    async fn run(mut self, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                m = self.rx.recv() => match m {
                    Some(Msg::Stop) | None => break,
                    Some(m) => self.handle(m).await,
                },
                _ = tick.tick() => self.seal_all().await,
            }
        }
        // Rows queued after the last flush wait in the spool for the next start.
        self.rx.close();
        while let Ok(m) = self.rx.try_recv() {
            self.handle(m).await;
        }
        self.spool_all();
    }

    async fn handle(&mut self, m: Msg) {
        match m {
            Msg::Request(f, o) => {
                self.flows.push(f);
                self.observations.extend(o);
                if self.flows.len() >= self.batch_rows {
                    self.seal(Table::Flows).await;
                }
                if self.observations.len() >= self.batch_rows {
                    self.seal(Table::CredentialObservations).await;
                }
            }
            Msg::Alert(a) => {
                self.alerts.push(*a);
                if self.alerts.len() >= self.batch_rows {
                    self.seal(Table::Alerts).await;
                }
            }
            Msg::Binding(b) => {
                self.bindings.push(b);
                if self.bindings.len() >= self.batch_rows {
                    self.seal(Table::CredentialBindings).await;
                }
            }
            Msg::Flush { reply, durable } => {
                if durable {
                    self.spool_all();
                } else {
                    self.seal_all().await;
                }
                if let Err(e) = self.sealed.send(Sealed::Flush(reply)).await
                    && let Sealed::Flush(reply) = e.0
                {
                    let _ = reply.send(Err("ClickHouse sender has stopped".into()));
                }
            }
            Msg::Stop => {}
        }
    }

    async fn seal_all(&mut self) {
        for t in Table::ALL {
            self.seal(t).await;
        }
    }

    /// Every table's rows in hand, straight to the spool.
    fn spool_all(&mut self) {
        for t in Table::ALL {
            let rows = self.take(t);
            if !rows.is_empty() {
                spool_batch(&self.spool, &self.counters, &Batch::new(rows));
            }
        }
    }

    fn take(&mut self, t: Table) -> Rows {
        match t {
            Table::Flows => Rows::Flows(std::mem::take(&mut self.flows)),
            Table::CredentialObservations => {
                Rows::Observations(std::mem::take(&mut self.observations))
            }
            Table::Alerts => Rows::Alerts(std::mem::take(&mut self.alerts)),
            Table::CredentialBindings => Rows::Bindings(std::mem::take(&mut self.bindings)),
        }
    }

    async fn seal(&mut self, t: Table) {
        let rows = self.take(t);
        if rows.is_empty() {
            return;
        }
        let b = Batch::new(rows);
        // The sender is busy with an INSERT: wait a little (the channel in front holds the
        // rows coming meanwhile), then let the batch wait on disk instead.
        match tokio::time::timeout(SPILL_AFTER, self.sealed.reserve()).await {
            Ok(Ok(permit)) => permit.send(Sealed::Batch(b)),
            // Busy for long (a slow or hung server), or stopped.
            _ => spool_batch(&self.spool, &self.counters, &b),
        }
    }
}

/// Sends batches, spools what fails, and drains the spool when the server is back.
struct Sender {
    rx: mpsc::Receiver<Sealed>,
    /// No database selected: DDL.
    client: Client,
    /// The monitor's database selected: INSERTs.
    data: Client,
    schema: SchemaConfig,
    schema_ready: bool,
    spool: Arc<Mutex<Spool>>,
    counters: Arc<Counters>,
    backoff: Duration,
    retry_min: Duration,
    retry_max: Duration,
    /// Set while the server is failing: no attempt before then.
    retry_at: Option<tokio::time::Instant>,
    timeout: Duration,
    max_rejections: u32,
    /// Refusals per spooled batch (by sequence number).
    rejections: std::collections::HashMap<u64, u32>,
    last_error: String,
}

/// Whether an error is the server refusing this batch (as opposed to not being reachable).
fn is_rejection(e: &clickhouse::error::Error) -> bool {
    use clickhouse::error::Error as E;
    matches!(
        e,
        E::BadResponse(_) | E::SchemaMismatch(_) | E::Custom(_) | E::DataFormat(_)
    )
}

/// One INSERT, bounded as a whole: the client's own timeouts cover sending and the answer,
/// not the table metadata it fetches first.
async fn insert<T>(
    client: &Client,
    table: &str,
    token: &str,
    rows: &[T],
    timeout: Duration,
) -> clickhouse::error::Result<()>
where
    T: RowOwned + RowWrite,
{
    let run = async {
        let mut ins = client
            .insert::<T>(table)
            .await?
            .with_setting("insert_deduplicate", "1")
            .with_setting("insert_deduplication_token", token)
            .with_timeouts(Some(timeout), Some(timeout));
        for r in rows {
            ins.write(r).await?;
        }
        ins.end().await
    };
    tokio::time::timeout(timeout, run)
        .await
        .unwrap_or(Err(clickhouse::error::Error::TimedOut))
}

impl Sender {
    async fn run(mut self) {
        loop {
            let spool_waiting = !self.spool.lock().expect("spool").is_empty();
            let wake = self.retry_at.unwrap_or_else(tokio::time::Instant::now);
            tokio::select! {
                m = self.rx.recv() => match m {
                    Some(Sealed::Batch(b)) => {
                        if self.retry_at.is_some_and(|t| t > tokio::time::Instant::now()) {
                            spool_batch(&self.spool, &self.counters, &b);
                        } else if let Err(e) = self.send(&b).await {
                            spool_batch(&self.spool, &self.counters, &b);
                            self.failed(&e.error);
                        }
                    }
                    Some(Sealed::Flush(reply)) => {
                        // One pass regardless of the backoff: the caller is waiting.
                        self.retry_at = None;
                        let r = self.drain(usize::MAX).await;
                        let _ = reply.send(r);
                    }
                    None => return,
                },
                _ = tokio::time::sleep_until(wake), if spool_waiting => {
                    let _ = self.drain(16).await;
                }
            }
        }
    }

    fn failed(&mut self, e: &anyhow::Error) {
        self.counters.errors.fetch_add(1, Relaxed);
        let msg = format!("{e:#}");
        if self.retry_at.is_none() || msg != self.last_error {
            tracing::warn!(retry_in = ?self.backoff, "ClickHouse insert failed, batches go to the spool: {msg}");
        }
        self.last_error = msg;
        self.retry_at = Some(tokio::time::Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(self.retry_max);
    }

    fn succeeded(&mut self) {
        if self.retry_at.is_some() {
            tracing::info!("ClickHouse reachable again");
        }
        self.retry_at = None;
        self.backoff = self.retry_min;
    }

    async fn ensure_schema(&mut self) -> Result<()> {
        if !self.schema_ready {
            tokio::time::timeout(self.timeout, schema::migrate(&self.client, &self.schema))
                .await
                .unwrap_or_else(|_| Err(anyhow!("no answer within {:?}", self.timeout)))?;
            self.data.clear_cached_metadata().await;
            self.schema_ready = true;
            tracing::info!(database = %self.schema.database, "ClickHouse schema ready");
        }
        Ok(())
    }

    /// One INSERT of a batch.
    async fn send(&mut self, b: &Batch) -> Result<(), SendError> {
        self.ensure_schema().await.map_err(|error| SendError {
            rejected: false,
            error: error.context("ClickHouse schema not ready"),
        })?;
        let t = b.table().name();
        let (tok, to) = (&b.token, self.timeout);
        let r = match &b.rows {
            Rows::Flows(v) => insert(&self.data, t, tok, v, to).await,
            Rows::Observations(v) => insert(&self.data, t, tok, v, to).await,
            Rows::Alerts(v) => insert(&self.data, t, tok, v, to).await,
            Rows::Bindings(v) => insert(&self.data, t, tok, v, to).await,
        };
        match r {
            Ok(()) => {
                self.counters
                    .rows_written
                    .fetch_add(b.rows.len() as u64, Relaxed);
                if let Some(i) = Table::ALL.iter().position(|x| *x == b.table()) {
                    self.counters.rows_by_table[i].fetch_add(b.rows.len() as u64, Relaxed);
                }
                self.counters.batches_written.fetch_add(1, Relaxed);
                self.succeeded();
                Ok(())
            }
            Err(e) => {
                let rejected = is_rejection(&e);
                let what = if rejected {
                    "refused"
                } else {
                    "could not take"
                };
                let n = b.rows.len();
                Err(SendError {
                    rejected,
                    error: anyhow::Error::new(e)
                        .context(format!("ClickHouse {what} a batch of {n} rows for {t}")),
                })
            }
        }
    }

    /// Sends up to `max` spooled batches, oldest first; stops at the first failure.
    async fn drain(&mut self, max: usize) -> Result<(), String> {
        for _ in 0..max {
            let entry = {
                let mut s = self.spool.lock().expect("spool");
                let e = s.oldest().cloned();
                s.set_in_flight(e.as_ref().map(|e| e.seq));
                e
            };
            let Some(entry) = entry else {
                return Ok(());
            };
            let loaded = self.spool.lock().expect("spool").load(&entry);
            let b = match loaded {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(path = %entry.path.display(), "unreadable spool file set aside: {e:#}");
                    self.set_aside(entry.seq, "bad");
                    continue;
                }
            };
            match self.send(&b).await {
                Ok(()) => {
                    self.counters.batches_from_spool.fetch_add(1, Relaxed);
                    self.rejections.remove(&entry.seq);
                    let mut s = self.spool.lock().expect("spool");
                    if let Err(e) = s.remove(entry.seq) {
                        // Sent again at the next start: the token makes it harmless.
                        tracing::error!("{e:#}");
                    }
                    let (bt, r, by) = s.depth();
                    self.counters.spool_batches.store(bt, Relaxed);
                    self.counters.spool_rows.store(r, Relaxed);
                    self.counters.spool_bytes.store(by, Relaxed);
                }
                Err(e) => {
                    self.spool.lock().expect("spool").set_in_flight(None);
                    if e.rejected {
                        let n = self.rejections.entry(entry.seq).or_default();
                        *n += 1;
                        if *n >= self.max_rejections {
                            tracing::error!(path = %entry.path.display(), "ClickHouse refused this spooled batch {n} times: set aside: {:#}", e.error);
                            self.rejections.remove(&entry.seq);
                            self.set_aside(entry.seq, "rejected");
                            self.counters.errors.fetch_add(1, Relaxed);
                            continue;
                        }
                    }
                    self.failed(&e.error);
                    let (bt, r, _) = self.spool.lock().expect("spool").depth();
                    return Err(format!(
                        "{bt} batches ({r} rows) wait in the spool: {}",
                        self.last_error
                    ));
                }
            }
        }
        Ok(())
    }

    fn set_aside(&mut self, seq: u64, suffix: &str) {
        let mut s = self.spool.lock().expect("spool");
        match s.set_aside(seq, suffix) {
            Ok(_) => {
                self.counters.set_aside_batches.fetch_add(1, Relaxed);
            }
            Err(e) => tracing::error!("{e:#}"),
        }
        let (bt, r, by) = s.depth();
        self.counters.spool_batches.store(bt, Relaxed);
        self.counters.spool_rows.store(r, Relaxed);
        self.counters.spool_bytes.store(by, Relaxed);
    }
}

/// A failed INSERT: refused by the server, or the server not reached.
struct SendError {
    rejected: bool,
    error: anyhow::Error,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// A port nothing listens on: connections are refused at once.
    fn dead_url() -> String {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        format!("http://127.0.0.1:{port}")
    }

    /// A server that takes every connection and never answers (nor closes).
    fn hung_url() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for c in l.incoming() {
                held.push(c);
            }
        });
        url
    }

    fn config(url: &str, spool: &std::path::Path) -> SinkConfig {
        let mut c = SinkConfig::new(url);
        c.spool_dir = spool.to_path_buf();
        c.batch_interval = Duration::from_millis(50);
        c.retry_min = Duration::from_millis(50);
        c.retry_max = Duration::from_millis(100);
        c.request_timeout = Duration::from_millis(300);
        c
    }

    fn binding(fp: &str) -> BindingRow {
        BindingRow {
            fingerprint: fp.into(),
            workload: "w".into(),
            node: "n".into(),
            first_seen: 1,
        }
    }

    fn spool_files(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".jsonl")
            })
            .count()
    }

    /// `monitor run` starts its outputs inside its own (current-thread) runtime: starting the
    /// writer, loading bindings, shutting down and dropping the runtime must all work there
    /// (they panicked with "Cannot start a runtime from within a runtime").
    #[tokio::test(flavor = "current_thread")]
    async fn dedicated_writer_starts_and_stops_inside_another_runtime() {
        let spool = tempfile::tempdir().unwrap();
        let (sink, rt) = ClickHouseSink::start_dedicated(config(&dead_url(), spool.path()))
            .expect("started inside a runtime");
        let bindings = super::super::SharedBindings::new(&sink);
        let b = bindings.clone();
        assert!(rt.wait(async move { b.load_initial().await }).is_err());
        for i in 0..3 {
            sink.binding(binding(&format!("fp-{i}")));
        }
        let s2 = sink.clone();
        let r = rt.wait(async move { s2.shutdown().await });
        assert!(r.is_err(), "nothing reached a server");
        let s = sink.stats();
        assert_eq!((s.spool_rows, s.dropped, s.shed_rows), (3, 0, 0), "{s:?}");
        assert!(spool_files(spool.path()) > 0);
        drop(rt);
    }

    /// A server that accepts and never answers: the start, the bindings load and the
    /// shutdown each give up after the request timeout, and the rows wait in the spool.
    #[test]
    fn server_that_never_answers_costs_bounded_time_and_spools() {
        let spool = tempfile::tempdir().unwrap();
        let t = Instant::now();
        let (sink, rt) =
            ClickHouseSink::start_dedicated(config(&hung_url(), spool.path())).unwrap();
        let bindings = super::super::SharedBindings::new(&sink);
        let b = bindings.clone();
        let e = rt.wait(async move { b.load_initial().await }).unwrap_err();
        assert!(format!("{e:#}").contains("no answer within"), "{e:#}");
        sink.binding(binding("fp-hung"));
        let s2 = sink.clone();
        assert!(rt.wait(async move { s2.shutdown().await }).is_err());
        let took = t.elapsed();
        assert!(took < Duration::from_secs(5), "took {took:?}");
        let s = sink.stats();
        assert_eq!(
            (s.spool_rows, s.rows_written, s.dropped),
            (1, 0, 0),
            "{s:?}"
        );
        assert!(s.errors >= 2, "{s:?}");
        assert_eq!(spool_files(spool.path()), 1);
    }

    /// At shutdown the rows in hand reach the disk before the writer waits on the server: a
    /// shutdown cut short (SIGKILL after a grace period) loses none of them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_spools_rows_before_waiting_on_the_server() {
        let spool = tempfile::tempdir().unwrap();
        let mut cfg = config(&hung_url(), spool.path());
        cfg.request_timeout = Duration::from_secs(2);
        // Only the shutdown seals.
        cfg.batch_interval = Duration::from_secs(3600);
        let sink = ClickHouseSink::start(cfg).await.unwrap();
        sink.binding(binding("fp-1"));
        let s2 = sink.clone();
        let t = Instant::now();
        let stopping = tokio::spawn(async move { s2.shutdown().await });
        while spool_files(spool.path()) == 0 {
            assert!(t.elapsed() < Duration::from_secs(1), "not spooled at once");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            !stopping.is_finished(),
            "the shutdown still waits on the server"
        );
        assert!(stopping.await.unwrap().is_err());
        let s = sink.stats();
        assert_eq!((s.spool_rows, s.rows_written), (1, 0), "{s:?}");
    }

    /// A batch larger than the whole spool is shed: counted as shed, not as spooled.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batch_shed_by_the_bound_is_not_counted_spooled() {
        let spool = tempfile::tempdir().unwrap();
        let mut cfg = config(&dead_url(), spool.path());
        cfg.spool_max_bytes = 200;
        let sink = ClickHouseSink::start(cfg).await.unwrap();
        sink.binding(binding(&"x".repeat(500)));
        // Nothing waits in the spool afterwards: the flush has nothing left to report.
        let _ = sink.shutdown().await;
        let s = sink.stats();
        assert_eq!((s.spooled_batches, s.spooled_rows), (0, 0), "{s:?}");
        assert_eq!((s.shed_batches, s.shed_rows), (1, 1), "{s:?}");
        assert_eq!(spool_files(spool.path()), 0);
    }

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        ch: ClickHouseArgs,
    }

    #[test]
    fn args_and_hidden_password() {
        let cli = Cli::parse_from([
            "x",
            "--clickhouse-url",
            "http://127.0.0.1:8123",
            "--clickhouse-password",
            "s3cret",
            "--spool-max-mb",
            "2",
            "--clickhouse-timeout",
            "5s",
        ]);
        let with_userinfo = Cli::parse_from(["x", "--clickhouse-url", "http://u:s3cret@h:8123"]);
        assert!(!format!("{:?}", with_userinfo.ch).contains("s3cret"));
        let dbg = format!("{:?}", cli.ch);
        assert!(!dbg.contains("s3cret"), "{dbg}");
        let cfg = cli.ch.sink_config().unwrap();
        assert!(!format!("{cfg:?}").contains("s3cret"));
        assert_eq!(cfg.spool_max_bytes, 2 << 20);
        assert_eq!(cfg.request_timeout, Duration::from_secs(5));
        assert_eq!(cfg.schema.database, "monitor");
        assert_eq!(cfg.schema.ttl_days, 30);
        assert_eq!(cfg.spool_dir, PathBuf::from("/var/lib/monitor/spool"));
        let none = Cli::parse_from(["x"]);
        if std::env::var_os("MONITOR_CLICKHOUSE_URL").is_none() {
            assert!(none.ch.sink_config().is_none());
        }
    }
}
