//! Cross-node credential bindings: which workload, on which node, presented a fingerprint
//! first, as recorded in ClickHouse's `credential_bindings` by every node.
//!
//! The detector reads a local copy synchronously ([`SharedBindings::get`]); it is loaded whole
//! at start ([`SharedBindings::load_initial`], so a replay run sees the same bindings every
//! time) and then refreshed in the background with the rows inserted since the last refresh
//! ([`SharedBindings::spawn_refresh`]). A node publishes its own first sightings through the
//! writer ([`SharedBindings::publish`]), so they survive outages like any other row. The
//! binding of a fingerprint is its earliest sighting on any node: (first_seen, workload, node)
//! least, which makes merging idempotent and order-free.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use clickhouse::{Client, Row};
use serde::Deserialize;
use tokio::task::JoinHandle;

use super::{ClickHouseSink, rows::BindingRow};

/// Where a credential was first seen, on whichever node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteBinding {
    pub workload: String,
    pub node: String,
    pub first_seen_ns: u64,
}

impl RemoteBinding {
    fn key(&self) -> (u64, &str, &str) {
        (self.first_seen_ns, &self.workload, &self.node)
    }
}

/// Rows inserted up to this long before the watermark are read again at a refresh: inserts
/// take their `inserted_at` when they start but become visible when they end.
const OVERLAP_US: i64 = 30_000_000;

#[derive(Row, Deserialize)]
struct Loaded {
    fingerprint: String,
    bound_workload: String,
    bound_node: String,
    first_seen_ns: i64,
    last_inserted_us: i64,
}

struct Inner {
    map: RwLock<HashMap<String, RemoteBinding>>,
    client: Client,
    database: String,
    /// Per query: a server that takes the connection and never answers fails the load.
    timeout: Duration,
    sink: ClickHouseSink,
    /// µs of the newest `inserted_at` seen.
    watermark: Mutex<Option<i64>>,
    refreshes: AtomicU64,
    refresh_errors: AtomicU64,
}

/// Handle to the shared bindings; clones share one map.
#[derive(Clone)]
pub struct SharedBindings {
    inner: Arc<Inner>,
}

impl SharedBindings {
    /// Bindings kept in the sink's ClickHouse database (empty until loaded).
    pub fn new(sink: &ClickHouseSink) -> SharedBindings {
        SharedBindings {
            inner: Arc::new(Inner {
                map: RwLock::new(HashMap::new()),
                client: sink.client().clone(),
                database: sink.database().to_string(),
                timeout: sink.request_timeout(),
                sink: sink.clone(),
                watermark: Mutex::new(None),
                refreshes: AtomicU64::new(0),
                refresh_errors: AtomicU64::new(0),
            }),
        }
    }

    /// The earliest known sighting of a fingerprint, on any node.
    pub fn get(&self, fp: &str) -> Option<RemoteBinding> {
        self.inner.map.read().expect("bindings").get(fp).cloned()
    }

    /// Fingerprints known.
    pub fn len(&self) -> usize {
        self.inner.map.read().expect("bindings").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (refreshes done, refreshes failed).
    pub fn refresh_stats(&self) -> (u64, u64) {
        (
            self.inner.refreshes.load(Relaxed),
            self.inner.refresh_errors.load(Relaxed),
        )
    }

    /// Keeps the earlier of the known and the given binding.
    fn merge(&self, fp: String, b: RemoteBinding) {
        let mut m = self.inner.map.write().expect("bindings");
        match m.get_mut(&fp) {
            Some(old) if old.key() <= b.key() => {}
            Some(old) => *old = b,
            None => {
                m.insert(fp, b);
            }
        }
    }

    /// Records that `workload` on `node` presented `fp` first at `first_seen_ns` (as far as
    /// this node knows): into the local copy now, into ClickHouse through the writer.
    pub fn publish(&self, fp: &str, workload: &str, node: &str, first_seen_ns: u64) {
        self.merge(
            fp.to_string(),
            RemoteBinding {
                workload: workload.to_string(),
                node: node.to_string(),
                first_seen_ns,
            },
        );
        self.inner.sink.binding(BindingRow {
            fingerprint: fp.to_string(),
            workload: workload.to_string(),
            node: node.to_string(),
            first_seen: first_seen_ns.min(i64::MAX as u64) as i64,
        });
    }

    /// Loads every binding (call before processing traffic). Returns how many fingerprints
    /// are known.
    pub async fn load_initial(&self) -> Result<usize> {
        self.fetch(None).await?;
        Ok(self.len())
    }

    /// Reads the rows inserted since the last load or refresh. Returns the rows read.
    pub async fn refresh(&self) -> Result<usize> {
        let since = self
            .inner
            .watermark
            .lock()
            .expect("watermark")
            .map(|w| w - OVERLAP_US);
        self.fetch(since).await
    }

    async fn fetch(&self, since_us: Option<i64>) -> Result<usize> {
        let sql = format!(
            "SELECT fingerprint,
                    argMin(workload, (first_seen, workload, node)) AS bound_workload,
                    argMin(node, (first_seen, workload, node)) AS bound_node,
                    toUnixTimestamp64Nano(min(first_seen)) AS first_seen_ns,
                    toUnixTimestamp64Micro(max(inserted_at)) AS last_inserted_us
             FROM {}.credential_bindings
             WHERE inserted_at >= fromUnixTimestamp64Micro({{since:Int64}}, 'UTC')
             GROUP BY fingerprint",
            self.inner.database
        );
        let query = self
            .inner
            .client
            .query_raw(&sql)
            .param("since", since_us.unwrap_or(0).max(0))
            .fetch_all();
        let rows: Vec<Loaded> = tokio::time::timeout(self.inner.timeout, query)
            .await
            .map_err(|_| anyhow!("no answer within {:?}", self.inner.timeout))
            .and_then(|r| r.map_err(anyhow::Error::from))
            .context("reading credential_bindings")?;
        let n = rows.len();
        let mut newest = None;
        for r in rows {
            newest = newest.max(Some(r.last_inserted_us));
            self.merge(
                r.fingerprint,
                RemoteBinding {
                    workload: r.bound_workload,
                    node: r.bound_node,
                    first_seen_ns: r.first_seen_ns.max(0) as u64,
                },
            );
        }
        let mut w = self.inner.watermark.lock().expect("watermark");
        *w = (*w).max(newest);
        self.inner.refreshes.fetch_add(1, Relaxed);
        Ok(n)
    }

    /// Refreshes every `every` until the handle is aborted; failures are logged and counted.
    pub fn spawn_refresh(&self, every: Duration) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            let mut failing = false;
            loop {
                tick.tick().await;
                match me.refresh().await {
                    Ok(_) => {
                        if failing {
                            tracing::info!("credential bindings refresh works again");
                        }
                        failing = false;
                    }
                    Err(e) => {
                        me.inner.refresh_errors.fetch_add(1, Relaxed);
                        if !failing {
                            tracing::warn!("credential bindings refresh failed: {e:#}");
                        }
                        failing = true;
                    }
                }
            }
        })
    }
}

/// The detector reads bindings made on other nodes through this, and publishes its own.
impl crate::detect::SharedBindings for SharedBindings {
    fn get(&self, fingerprint: &str) -> Option<crate::detect::RemoteBinding> {
        SharedBindings::get(self, fingerprint).map(|b| crate::detect::RemoteBinding {
            workload: b.workload,
            node: b.node,
            first_seen_ns: b.first_seen_ns,
        })
    }

    fn publish(&self, fingerprint: &str, workload: &str, node: &str, first_seen_ns: u64) {
        SharedBindings::publish(self, fingerprint, workload, node, first_seen_ns)
    }
}
