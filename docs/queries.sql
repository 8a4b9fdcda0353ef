-- Analyst queries over the monitor's ClickHouse history.
--
-- Run them in the monitor's database with query parameters, e.g.
--   clickhouse-client --database monitor --param_fingerprint=3f9c... --queries-file q.sql
--   curl 'http://127.0.0.1:8123/?database=monitor&param_fingerprint=3f9c...' --data-binary @q.sql
-- Times are UTC; parameters of type DateTime64 take '2026-11-23 00:00:00'.
-- Addresses are IPv6 with IPv4 mapped (::ffff:10.0.0.5); `::` means unknown.
-- Each query below (from its `-- name:` line to the next) is run by
-- monitor/tests/clickhouse.rs against a live server.

-- name: fingerprint_usage
-- Where was this credential used: by which workload, on which node, towards which
-- destination, how often and when.
SELECT
    source_workload,
    node,
    destination_host,
    replaceRegexpOne(toString(destination_ip), '^::ffff:', '') AS destination_ip,
    destination_port,
    count() AS requests,
    min(time) AS first_seen,
    max(time) AS last_seen
FROM credential_observations
WHERE fingerprint = {fingerprint:String}
GROUP BY source_workload, node, destination_host, destination_ip, destination_port
ORDER BY first_seen, source_workload;

-- name: destination_callers
-- Which workloads reached this destination (a host name or an IP address) since a time,
-- and with which credentials.
SELECT
    source_workload,
    count() AS requests,
    groupUniqArrayArray(credential_fingerprints) AS fingerprints,
    min(time) AS first_seen,
    max(time) AS last_seen
FROM flows
WHERE (destination_host = {destination:String}
       OR replaceRegexpOne(toString(destination_ip), '^::ffff:', '') = {destination:String})
  AND time >= {since:DateTime64(6)}
GROUP BY source_workload
ORDER BY requests DESC, source_workload;

-- name: workload_calls
-- What did this workload call since a time: destinations, methods, TLS or not.
SELECT
    destination_host,
    replaceRegexpOne(toString(destination_ip), '^::ffff:', '') AS destination_ip,
    destination_port,
    protocol,
    groupUniqArray(method) AS methods,
    countIf(NOT tls) AS cleartext_requests,
    count() AS requests
FROM flows
WHERE source_workload = {workload:String}
  AND time >= {since:DateTime64(6)}
GROUP BY destination_host, destination_ip, destination_port, protocol
ORDER BY requests DESC, destination_host;

-- name: shared_credentials
-- Credentials presented by more than one workload (NHI9: reuse of a machine identity).
SELECT
    fingerprint,
    any(kind) AS kind,
    uniqExact(source_workload) AS workloads,
    arraySort(groupUniqArray(source_workload)) AS used_by,
    uniqExact(node) AS nodes,
    min(time) AS first_seen,
    max(time) AS last_seen
FROM credential_observations
WHERE time >= {since:DateTime64(6)}
GROUP BY fingerprint
HAVING workloads > 1
ORDER BY workloads DESC, fingerprint;

-- name: cross_node_credentials
-- Credentials seen on more than one node: replay of a token away from its first node.
SELECT
    fingerprint,
    arraySort(groupUniqArray(node)) AS nodes,
    arraySort(groupUniqArray(source_workload)) AS workloads,
    count() AS requests
FROM credential_observations
WHERE time >= {since:DateTime64(6)}
GROUP BY fingerprint
HAVING uniqExact(node) > 1
ORDER BY fingerprint;

-- name: credential_binding
-- Which workload, on which node, presented this credential first (what `token-replay`
-- compares against).
SELECT
    fingerprint,
    argMin(workload, (first_seen, workload, node)) AS bound_workload,
    argMin(node, (first_seen, workload, node)) AS bound_node,
    min(first_seen) AS bound_at,
    uniqExact(workload) AS workloads_claiming
FROM credential_bindings
WHERE fingerprint = {fingerprint:String}
GROUP BY fingerprint;

-- name: cleartext_credentials
-- Credentials that crossed the wire without TLS, per workload and destination.
SELECT
    source_workload,
    destination_host,
    destination_port,
    kind,
    uniqExact(fingerprint) AS credentials,
    count() AS requests
FROM credential_observations
WHERE NOT tls AND time >= {since:DateTime64(6)}
GROUP BY source_workload, destination_host, destination_port, kind
ORDER BY requests DESC, source_workload;

-- name: alerts_by_owner
-- Alerts per owning team, rule and severity (a repeated alert counts once; `occurrences`
-- adds up its repeats).
SELECT
    owner_team,
    rule,
    severity,
    count() AS alerts,
    sum(count) AS occurrences,
    max(time) AS last_alert
FROM alerts FINAL
WHERE time >= {since:DateTime64(6)}
GROUP BY owner_team, rule, severity
ORDER BY owner_team, rule, severity;

-- name: alerts_for_fingerprint
-- Every alert about one credential, newest first.
SELECT
    time,
    id,
    rule,
    severity,
    source_workload,
    source_node,
    destination_host,
    expected,
    first_seen_by,
    count
FROM alerts FINAL
WHERE credential_fingerprint = {fingerprint:String}
ORDER BY time DESC, id;

-- name: busiest_credentials
-- The credentials seen most often since a time, with how many destinations they reach.
SELECT
    fingerprint,
    any(kind) AS kind,
    count() AS requests,
    uniqExact(destination_host, destination_ip, destination_port) AS destinations
FROM credential_observations
WHERE time >= {since:DateTime64(6)}
GROUP BY fingerprint
ORDER BY requests DESC, fingerprint
LIMIT 20;
