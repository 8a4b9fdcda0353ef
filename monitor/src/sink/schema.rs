//! The ClickHouse schema the monitor owns, and the migrations that create and upgrade it.
//!
//! Every statement is idempotent (`IF NOT EXISTS`), so nodes starting at once against one
//! server may race through the same migration; the version is `max(version)` of
//! `schema_version`. Statements name `{db}` (the database, validated to `[A-Za-z0-9_]`) and
//! `{ttl}` (a `TTL` clause, or nothing when the TTL is 0).
//!
//! Tables:
//! - `flows`: one row per request record; `ORDER BY (source_workload, time)` answers "what
//!   did this workload call", a bloom filter on the fingerprints helps "where was it used".
//! - `credential_observations`: one row per credential in a request; `ORDER BY
//!   (fingerprint, time)` answers "where was this fingerprint used".
//! - `alerts`: the `monitor.alert/v1` fields flattened; a repeat of an alert (same id, a
//!   higher `count`) replaces it.
//! - `credential_bindings`: which workload on which node saw a fingerprint first; the binding
//!   of a fingerprint is the row with the least `first_seen` (no TTL: long-lived credentials
//!   are the ones worth remembering).
//!
//! Tables are plain `MergeTree`s with `non_replicated_deduplication_window`, so a batch sent
//! again with its `insert_deduplication_token` is dropped by the server. On a cluster, create
//! `Replicated*` tables of the same shape beforehand: `IF NOT EXISTS` leaves them alone.

use anyhow::{Context, Result, bail};
use clickhouse::Client;

/// Blocks per table whose deduplication tokens the server remembers: far more batches than
/// the spool can hold for one table.
pub const DEDUP_WINDOW: u32 = 10_000;

pub const SCHEMA_VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS {db}.schema_version (
    version UInt32,
    description String,
    monitor_version String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
) ENGINE = MergeTree ORDER BY version";

pub const FLOWS_V1: &str = "CREATE TABLE IF NOT EXISTS {db}.flows (
    time DateTime64(6, 'UTC'),
    node LowCardinality(String),
    source_workload LowCardinality(String),
    source_pid UInt32,
    source_comm LowCardinality(String),
    source_exe LowCardinality(String),
    source_cgroup LowCardinality(String),
    source_ip IPv6,
    source_port UInt16,
    destination_ip IPv6,
    destination_port UInt16,
    destination_host LowCardinality(String),
    tls Bool,
    library LowCardinality(String),
    protocol LowCardinality(String),
    method LowCardinality(String),
    path String,
    status Nullable(UInt16),
    credential_fingerprints Array(String),
    credential_kinds Array(LowCardinality(String)),
    INDEX credential_fingerprints_idx credential_fingerprints TYPE bloom_filter(0.01) GRANULARITY 4
) ENGINE = MergeTree
PARTITION BY toDate(time)
ORDER BY (source_workload, time)
{ttl}
SETTINGS non_replicated_deduplication_window = {dedup}";

pub const CREDENTIAL_OBSERVATIONS_V1: &str =
    "CREATE TABLE IF NOT EXISTS {db}.credential_observations (
    time DateTime64(6, 'UTC'),
    node LowCardinality(String),
    fingerprint String,
    kind LowCardinality(String),
    header LowCardinality(String),
    name LowCardinality(String),
    user String,
    claims Map(String, String),
    source_workload LowCardinality(String),
    source_pid UInt32,
    source_comm LowCardinality(String),
    source_ip IPv6,
    destination_ip IPv6,
    destination_port UInt16,
    destination_host LowCardinality(String),
    tls Bool,
    protocol LowCardinality(String),
    method LowCardinality(String),
    path String
) ENGINE = MergeTree
PARTITION BY toDate(time)
ORDER BY (fingerprint, time)
{ttl}
SETTINGS non_replicated_deduplication_window = {dedup}";

pub const ALERTS_V1: &str = "CREATE TABLE IF NOT EXISTS {db}.alerts (
    time DateTime64(6, 'UTC'),
    id String,
    schema LowCardinality(String),
    rule LowCardinality(String),
    severity LowCardinality(String),
    summary String,
    credential_fingerprint String,
    credential_kind LowCardinality(String),
    credential_claims String,
    source_workload LowCardinality(String),
    source_pid UInt32,
    source_comm LowCardinality(String),
    source_exe LowCardinality(String),
    source_cgroup LowCardinality(String),
    source_container_id String,
    source_pod String,
    source_node LowCardinality(String),
    source_ip IPv6,
    source_port UInt16,
    destination_workload LowCardinality(String),
    destination_ip IPv6,
    destination_port UInt16,
    destination_host LowCardinality(String),
    destination_method LowCardinality(String),
    destination_path String,
    expected String,
    first_seen Nullable(DateTime64(6, 'UTC')),
    first_seen_by LowCardinality(String),
    owner String,
    owner_team LowCardinality(String) DEFAULT JSONExtractString(owner, 'team'),
    references Array(LowCardinality(String)),
    count UInt64
) ENGINE = ReplacingMergeTree(count)
PARTITION BY toDate(time)
ORDER BY (rule, source_workload, id)
{ttl}
SETTINGS non_replicated_deduplication_window = {dedup}";

pub const CREDENTIAL_BINDINGS_V1: &str = "CREATE TABLE IF NOT EXISTS {db}.credential_bindings (
    fingerprint String,
    workload LowCardinality(String),
    node LowCardinality(String),
    first_seen DateTime64(9, 'UTC'),
    inserted_at DateTime64(6, 'UTC') DEFAULT now64(6)
) ENGINE = ReplacingMergeTree
ORDER BY (fingerprint, node, workload)
SETTINGS non_replicated_deduplication_window = {dedup}";

/// v2: which side of the connection observed the request, and the database of a
/// PostgreSQL login.
pub const FLOWS_V2: &str = "ALTER TABLE {db}.flows
    ADD COLUMN IF NOT EXISTS side LowCardinality(String) AFTER source_cgroup,
    ADD COLUMN IF NOT EXISTS database_name LowCardinality(String) AFTER path";

/// v3: who the source is beyond the process: container, pod (namespace, name, uid, service
/// account, owning workload as `Kind/name`, labels), systemd unit, uid.
pub const FLOWS_V3: &str = "ALTER TABLE {db}.flows
    ADD COLUMN IF NOT EXISTS source_container_id String AFTER side,
    ADD COLUMN IF NOT EXISTS source_runtime LowCardinality(String) AFTER source_container_id,
    ADD COLUMN IF NOT EXISTS source_namespace LowCardinality(String) AFTER source_runtime,
    ADD COLUMN IF NOT EXISTS source_pod String AFTER source_namespace,
    ADD COLUMN IF NOT EXISTS source_pod_uid String AFTER source_pod,
    ADD COLUMN IF NOT EXISTS source_service_account LowCardinality(String) AFTER source_pod_uid,
    ADD COLUMN IF NOT EXISTS source_owner LowCardinality(String) AFTER source_service_account,
    ADD COLUMN IF NOT EXISTS source_labels Map(String, String) AFTER source_owner,
    ADD COLUMN IF NOT EXISTS source_unit LowCardinality(String) AFTER source_labels,
    ADD COLUMN IF NOT EXISTS source_uid Nullable(UInt32) AFTER source_unit";

pub const CREDENTIAL_OBSERVATIONS_V3: &str = "ALTER TABLE {db}.credential_observations
    ADD COLUMN IF NOT EXISTS source_namespace LowCardinality(String) AFTER source_comm,
    ADD COLUMN IF NOT EXISTS source_pod String AFTER source_namespace,
    ADD COLUMN IF NOT EXISTS source_service_account LowCardinality(String) AFTER source_pod,
    ADD COLUMN IF NOT EXISTS source_owner LowCardinality(String) AFTER source_service_account";

pub const ALERTS_V3: &str = "ALTER TABLE {db}.alerts
    ADD COLUMN IF NOT EXISTS source_runtime LowCardinality(String) AFTER source_pod,
    ADD COLUMN IF NOT EXISTS source_pod_uid String AFTER source_runtime,
    ADD COLUMN IF NOT EXISTS source_namespace LowCardinality(String) AFTER source_pod_uid,
    ADD COLUMN IF NOT EXISTS source_service_account LowCardinality(String) AFTER source_namespace,
    ADD COLUMN IF NOT EXISTS source_owner LowCardinality(String) AFTER source_service_account,
    ADD COLUMN IF NOT EXISTS source_labels Map(String, String) AFTER source_owner,
    ADD COLUMN IF NOT EXISTS source_unit LowCardinality(String) AFTER source_labels,
    ADD COLUMN IF NOT EXISTS source_uid Nullable(UInt32) AFTER source_unit";

/// One step of the schema.
pub struct Migration {
    pub version: u32,
    pub description: &'static str,
    pub statements: &'static [&'static str],
}

/// Every version, in order; the last is what this monitor writes.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "flows, credential_observations, alerts, credential_bindings",
        statements: &[
            FLOWS_V1,
            CREDENTIAL_OBSERVATIONS_V1,
            ALERTS_V1,
            CREDENTIAL_BINDINGS_V1,
        ],
    },
    Migration {
        version: 2,
        description: "flows.side, flows.database_name",
        statements: &[FLOWS_V2],
    },
    Migration {
        version: 3,
        description: "source container, pod, service account, owner, labels, unit, uid",
        statements: &[FLOWS_V3, CREDENTIAL_OBSERVATIONS_V3, ALERTS_V3],
    },
];

pub const LATEST: u32 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// Tables that get the TTL (by their `time` column).
pub const TTL_TABLES: &[&str] = &["flows", "credential_observations", "alerts"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaConfig {
    pub database: String,
    /// Days rows are kept (0: forever).
    pub ttl_days: u32,
}

impl Default for SchemaConfig {
    fn default() -> Self {
        SchemaConfig {
            database: "monitor".into(),
            ttl_days: 30,
        }
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`: a database name needing no quoting.
pub fn check_identifier(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.as_bytes()[0].is_ascii_digit()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !ok {
        bail!("database name {name:?}: use letters, digits and '_' (not first)");
    }
    Ok(())
}

impl SchemaConfig {
    fn ttl_clause(&self) -> String {
        if self.ttl_days == 0 {
            String::new()
        } else {
            format!("TTL toDateTime(time) + INTERVAL {} DAY", self.ttl_days)
        }
    }

    /// A statement with its placeholders filled in.
    pub fn render(&self, sql: &str) -> String {
        sql.replace("{db}", &self.database)
            .replace("{ttl}", &self.ttl_clause())
            .replace("{dedup}", &DEDUP_WINDOW.to_string())
    }
}

/// What [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    pub from: u32,
    pub to: u32,
    pub applied: Vec<u32>,
}

/// The schema version of the database (0: none yet).
pub async fn current_version(client: &Client, cfg: &SchemaConfig) -> Result<u32> {
    check_identifier(&cfg.database)?;
    let exists: u8 = client
        .query_raw("SELECT count() > 0 FROM system.tables WHERE database = {db:String} AND name = 'schema_version'")
        .param("db", &cfg.database)
        .fetch_one()
        .await
        .context("reading system.tables")?;
    if exists == 0 {
        return Ok(0);
    }
    let v: u32 = client
        .query_raw(&cfg.render("SELECT max(version) FROM {db}.schema_version"))
        .fetch_one()
        .await
        .context("reading schema_version")?;
    Ok(v)
}

/// Creates or upgrades the schema to the latest version.
pub async fn migrate(client: &Client, cfg: &SchemaConfig) -> Result<MigrationReport> {
    migrate_to(client, cfg, LATEST).await
}

/// Creates or upgrades the schema to `target` (tests stop at older versions), then sets
/// the TTL of the tables that have one to `cfg.ttl_days`.
pub async fn migrate_to(
    client: &Client,
    cfg: &SchemaConfig,
    target: u32,
) -> Result<MigrationReport> {
    check_identifier(&cfg.database)?;
    let exec = |sql: String| async move {
        client
            .query_raw(&sql)
            .execute()
            .await
            .with_context(|| format!("ClickHouse rejected: {}", first_line(&sql)))
    };
    exec(cfg.render("CREATE DATABASE IF NOT EXISTS {db}")).await?;
    exec(cfg.render(SCHEMA_VERSION_TABLE)).await?;
    let from = current_version(client, cfg).await?;
    if from > LATEST {
        tracing::warn!(
            database = %cfg.database,
            "ClickHouse schema v{from} is newer than this monitor's v{LATEST}: writing v{LATEST} columns"
        );
    }
    let mut applied = Vec::new();
    for m in MIGRATIONS
        .iter()
        .filter(|m| m.version > from && m.version <= target)
    {
        for s in m.statements {
            exec(cfg.render(s)).await?;
        }
        client
            .query_raw(&cfg.render(
                "INSERT INTO {db}.schema_version (version, description, monitor_version) \
                 VALUES ({v:UInt32}, {d:String}, {mv:String})",
            ))
            .param("v", m.version)
            .param("d", m.description)
            .param("mv", env!("CARGO_PKG_VERSION"))
            .execute()
            .await
            .context("recording the schema version")?;
        tracing::info!(database = %cfg.database, "ClickHouse schema migrated to v{}: {}", m.version, m.description);
        applied.push(m.version);
    }
    if target >= 1 {
        set_ttl(client, cfg).await?;
    }
    let to = current_version(client, cfg).await?;
    Ok(MigrationReport { from, to, applied })
}

/// Brings the TTL of existing tables to `cfg.ttl_days` (a changed `--clickhouse-ttl-days`),
/// without rewriting parts now: expired rows go at the next merges.
async fn set_ttl(client: &Client, cfg: &SchemaConfig) -> Result<()> {
    for table in TTL_TABLES {
        let engine: String = client
            .query_raw("SELECT engine_full FROM system.tables WHERE database = {db:String} AND name = {t:String}")
            .param("db", &cfg.database)
            .param("t", *table)
            .fetch_one()
            .await
            .with_context(|| format!("reading the TTL of {table}"))?;
        let has = engine.contains(" TTL ");
        let want = format!("toIntervalDay({})", cfg.ttl_days);
        let sql = match (cfg.ttl_days, has) {
            (0, false) => continue,
            (0, true) => format!("ALTER TABLE {}.{table} REMOVE TTL", cfg.database),
            (_, true) if engine.contains(&want) => continue,
            _ => format!(
                "ALTER TABLE {}.{table} MODIFY {}",
                cfg.database,
                cfg.ttl_clause()
            ),
        };
        client
            .query_raw(&sql)
            .with_setting("materialize_ttl_after_modify", "0")
            .execute()
            .await
            .with_context(|| format!("ClickHouse rejected: {sql}"))?;
        tracing::info!(table, ttl_days = cfg.ttl_days, "ClickHouse TTL changed");
    }
    Ok(())
}

fn first_line(sql: &str) -> &str {
    sql.lines().next().unwrap_or(sql)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_ascend_and_render() {
        assert!(MIGRATIONS.windows(2).all(|w| w[0].version < w[1].version));
        assert_eq!(MIGRATIONS[0].version, 1);
        let cfg = SchemaConfig {
            database: "mon_1".into(),
            ttl_days: 7,
        };
        let s = cfg.render(FLOWS_V1);
        assert!(s.contains("mon_1.flows"));
        assert!(s.contains("TTL toDateTime(time) + INTERVAL 7 DAY"));
        assert!(s.contains("non_replicated_deduplication_window = 10000"));
        assert!(!s.contains('{'));
        let forever = SchemaConfig { ttl_days: 0, ..cfg };
        assert!(!forever.render(FLOWS_V1).contains("TTL"));
    }

    #[test]
    fn identifiers() {
        assert!(check_identifier("monitor").is_ok());
        assert!(check_identifier("m_2").is_ok());
        for bad in ["", "2m", "a-b", "a.b", "a`b", "a b"] {
            assert!(check_identifier(bad).is_err(), "{bad}");
        }
    }
}
