//! Metrics, in the Prometheus text format. Every metric the engine exports
//! is named here, so the list is in one place.
//!
//! The recorder is process-wide (installed once); `/metrics` renders it.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Deliveries taken from the listener.
pub const RECEIVED: &str = "sandpipe_messages_received_total";
/// Plugin results, labelled `plugin` and `status` (done, skipped, failed, dead).
pub const PLUGIN_RESULTS: &str = "sandpipe_plugin_results_total";
/// Settled deliveries, labelled `settlement` (done, retry, requeue, dead).
pub const SETTLED: &str = "sandpipe_messages_settled_total";
/// Invocation wall-clock time in seconds, labelled `plugin`.
pub const INVOCATION_SECONDS: &str = "sandpipe_invocation_seconds";
/// Fuel consumed, labelled `plugin` (only when fuel is metered).
pub const FUEL: &str = "sandpipe_fuel_consumed_total";
/// Host calls denied by policy, labelled `plugin`.
pub const DENIED: &str = "sandpipe_denied_calls_total";
/// Host calls refused by a quota, labelled `plugin` and `limit` (the key
/// under `limits`); deliveries refused by a pipeline limit, labelled `limit`
/// (`max_message_bytes`, `max_metadata_bytes`).
pub const LIMIT_EXCEEDED: &str = "sandpipe_limit_exceeded_total";
/// Messages being processed now.
pub const IN_FLIGHT: &str = "sandpipe_messages_in_flight";
/// Reconnections to the broker or another backend, labelled `backend`.
pub const RECONNECTS: &str = "sandpipe_reconnects_total";

/// Calls of a service's exports, labelled `service`, `call` (connect,
/// publish, query, request, close) and `result` (ok, error, failed,
/// busy).
pub const SERVICE_CALLS: &str = "sandpipe_service_calls_total";
/// Seconds one service call took, from taking an instance to its last
/// reply, labelled `service` and `call`.
pub const SERVICE_CALL_SECONDS: &str = "sandpipe_service_call_seconds";
/// Partial replies sent by services' queries, labelled `service`.
pub const SERVICE_PARTIALS: &str = "sandpipe_service_partial_replies_total";
/// Requests to a service's listener answered by the engine without the
/// guest, labelled `service` and `status` (404, 405, 408, 413, ...).
pub const SERVICE_REFUSED: &str = "sandpipe_service_requests_refused_total";

/// Status-log transactions committed (group commit: each may hold the
/// writes of several messages).
pub const STATUS_COMMITS: &str = "sandpipe_status_commits_total";
/// Status-log writes (`StatusLog::record` calls) committed; divided by
/// [`STATUS_COMMITS`], the mean group size.
pub const STATUS_WRITES: &str = "sandpipe_status_writes_total";

/// Status-log idempotency look-ups run (PostgreSQL batches the look-ups of
/// the messages that ask at once into one query).
pub const STATUS_LOOKUPS: &str = "sandpipe_status_lookups_total";
/// Status rows read back whose MAC does not verify (written by something
/// other than the engine, e.g. a plugin's role), and ignored.
pub const STATUS_FORGED: &str = "sandpipe_status_forged_rows_total";

/// Invocations waiting for a connection of their plugin's PostgreSQL pool
/// now, labelled `plugin`.
pub const DB_POOL_WAITING: &str = "sandpipe_db_pool_waiting";
/// Seconds an invocation waited for a connection of its plugin's
/// PostgreSQL pool, labelled `plugin`.
pub const DB_POOL_WAIT_SECONDS: &str = "sandpipe_db_pool_wait_seconds";
/// Connections PostgreSQL refused ("too many clients") to a plugin's pool,
/// labelled `plugin`; the pool then shrinks and invocations wait.
pub const DB_REFUSED: &str = "sandpipe_db_connections_refused_total";

/// Outbound HTTP requests sent, per plugin, destination host and status
/// class (`2xx`, `4xx`, ..., or `error` when no response came).
pub const HTTP_REQUESTS: &str = "sandpipe_http_requests_total";
/// Seconds from sending an outbound request to its response head, per
/// plugin and destination host.
pub const HTTP_SECONDS: &str = "sandpipe_http_request_seconds";
/// Request body bytes sent, per plugin and destination host.
pub const HTTP_SENT_BYTES: &str = "sandpipe_http_sent_bytes_total";
/// Response body bytes received (read by the guest), per plugin and
/// destination host.
pub const HTTP_RECEIVED_BYTES: &str = "sandpipe_http_received_bytes_total";

/// Seconds per step of a message's way, labelled `step`: `resolve` (data
/// object and metadata), `lookup` (plugins already finished), `plugins`
/// (every routed plugin, its effects' commit included), `commit` (one
/// plugin's effects), `status` (the final rows, durable). With
/// `sandpipe_invocation_seconds` (the sandboxed call) it breaks a
/// message's time down.
pub const STEP_SECONDS: &str = "sandpipe_message_step_seconds";

/// Documents of sync jobs, labelled `source` and `op` (indexed, updated,
/// deleted, skipped, dropped, error).
pub const SYNC_DOCUMENTS: &str = "sandpipe_sync_documents_total";
/// Sync jobs ended, labelled `source`, `kind` (full, incremental) and
/// `state` (completed, canceled, error).
pub const SYNC_JOBS: &str = "sandpipe_sync_jobs_total";
/// Seconds a sync job ran, labelled `source` and `kind`.
pub const SYNC_SECONDS: &str = "sandpipe_sync_job_seconds";

/// The process's Prometheus recorder (installed on first use).
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0, 30.0,
            ])
            .map(PrometheusBuilder::build_recorder)
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        // Another recorder may already be installed (embedding, tests):
        // then ours still renders what it is given directly.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Describe the metrics once so `/metrics` has HELP lines.
pub fn describe() {
    let _ = handle();
    metrics::describe_counter!(RECEIVED, "Deliveries taken from the listener.");
    metrics::describe_counter!(PLUGIN_RESULTS, "Plugin results per plugin and status.");
    metrics::describe_counter!(SETTLED, "Settled deliveries per settlement.");
    metrics::describe_histogram!(
        INVOCATION_SECONDS,
        metrics::Unit::Seconds,
        "Plugin invocation wall-clock time."
    );
    metrics::describe_counter!(FUEL, "Fuel consumed per plugin (when metered).");
    metrics::describe_counter!(
        SERVICE_CALLS,
        "Calls of services' exports per service, call and result."
    );
    metrics::describe_histogram!(
        SERVICE_CALL_SECONDS,
        metrics::Unit::Seconds,
        "Service call time, from taking an instance to the last reply."
    );
    metrics::describe_counter!(SERVICE_PARTIALS, "Partial replies sent per service.");
    metrics::describe_counter!(
        SERVICE_REFUSED,
        "Requests to a service's listener answered without the guest, per status."
    );
    metrics::describe_counter!(DENIED, "Host calls denied by policy, per plugin.");
    metrics::describe_counter!(
        LIMIT_EXCEEDED,
        "Host calls refused by a quota per plugin and limit; deliveries refused by a pipeline limit."
    );
    metrics::describe_gauge!(IN_FLIGHT, "Messages being processed now.");
    metrics::describe_counter!(RECONNECTS, "Reconnections per backend.");
    metrics::describe_histogram!(
        STEP_SECONDS,
        metrics::Unit::Seconds,
        "Time per step of a message's way (resolve, lookup, plugins, commit, status)."
    );
    metrics::describe_counter!(
        HTTP_REQUESTS,
        "Outbound HTTP requests per plugin, destination host and status class."
    );
    metrics::describe_histogram!(
        HTTP_SECONDS,
        metrics::Unit::Seconds,
        "Time from an outbound HTTP request to its response head."
    );
    metrics::describe_counter!(HTTP_SENT_BYTES, "Outbound HTTP request body bytes.");
    metrics::describe_counter!(
        HTTP_RECEIVED_BYTES,
        "Outbound HTTP response body bytes read."
    );
    metrics::describe_counter!(STATUS_COMMITS, "Status-log group commits.");
    metrics::describe_counter!(STATUS_WRITES, "Status-log writes committed.");
    metrics::describe_counter!(STATUS_LOOKUPS, "Status-log idempotency look-up queries.");
    metrics::describe_counter!(
        STATUS_FORGED,
        "Status-log rows read back without the engine's MAC, ignored."
    );
    metrics::describe_gauge!(
        DB_POOL_WAITING,
        "Invocations waiting for a connection of their plugin's PostgreSQL pool."
    );
    metrics::describe_histogram!(
        DB_POOL_WAIT_SECONDS,
        metrics::Unit::Seconds,
        "Time an invocation waited for a connection of its plugin's PostgreSQL pool."
    );
    metrics::describe_counter!(
        SYNC_DOCUMENTS,
        "Sync jobs' documents per source and operation."
    );
    metrics::describe_counter!(SYNC_JOBS, "Sync jobs ended per source, kind and state.");
    metrics::describe_histogram!(
        SYNC_SECONDS,
        metrics::Unit::Seconds,
        "Time a sync job ran, per source and kind."
    );
    metrics::describe_counter!(
        DB_REFUSED,
        "Connections PostgreSQL refused to a plugin's pool (too many clients)."
    );
}
