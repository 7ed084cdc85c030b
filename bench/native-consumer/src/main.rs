//! `native-consumer`: an independent sqAPI consumer, written directly on
//! lapin, redis and tokio-postgres, with no Sandpipe code. It is the bar
//! the engine's RabbitMQ path is measured against (engine/benches/sqapi.rs,
//! docs/benchmarks.md, "sqAPI workload").
//!
//! Per delivery: parse the sqAPI envelope
//! (`{"uuid_ref", "data_type", "data_location", "meta_location"}`), GET the
//! metadata (a JSON object string) from Redis at `meta_location` while
//! reading the data file at `data_location` under `--data-dir`, count the
//! file's bytes and lines, then run ONE statement that inserts the result
//! row and a status row (one commit), and ack once it has returned. Up to
//! `--prefetch` deliveries are processed at once, each in a task of its
//! own; PostgreSQL connections come from a pool (`--pool-size`, default the
//! prefetch up to 64), each with the statement prepared once; Redis is one
//! multiplexed connection. A delivery that cannot succeed (a bad envelope,
//! missing metadata or data) is rejected without requeueing; any other
//! failure nacks it back to the queue.
//!
//! It creates its tables (`results`, `status`) if they are missing, stops
//! once `--messages` deliveries are settled and prints one line:
//!
//! ```text
//! native-consumer messages=N acked=A rejected=R requeued=Q seconds=S msg_per_s=T p50_us=P p99_us=P peak_rss_kib=K
//! ```
//!
//! `seconds` runs from the consume request to the last ack; a message's
//! latency runs from the moment its delivery is taken off the consumer to
//! the moment its ack has been sent.
//!
//! ```text
//! native-consumer --queue Q --postgres postgres://postgres@127.0.0.1/db --data-dir DIR \
//!     --messages N [--prefetch 16] [--pool-size N] [--amqp URL] [--redis URL]
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures::StreamExt as _;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, Consumer};
use serde::Deserialize;
use tokio::sync::{Semaphore, mpsc};
use tokio_postgres::NoTls;

const USAGE: &str = "usage: native-consumer --queue Q --postgres URL --data-dir DIR --messages N \
     [--prefetch 16] [--pool-size N] [--amqp URL] [--redis URL]";

/// The tables, made at start-up when missing.
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS results (
        message_id TEXT PRIMARY KEY,
        bytes BIGINT NOT NULL,
        lines BIGINT NOT NULL,
        source TEXT);
    CREATE TABLE IF NOT EXISTS status (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        message_id TEXT NOT NULL,
        status TEXT NOT NULL,
        at TIMESTAMPTZ NOT NULL DEFAULT now());
    CREATE INDEX IF NOT EXISTS status_message ON status (message_id);";

/// The result row (once per message: a redelivery keeps the first) and a
/// status row, in one statement and so one transaction.
const RECORD: &str = "WITH result AS (
        INSERT INTO results (message_id, bytes, lines, source) VALUES ($1, $2, $3, $4)
        ON CONFLICT (message_id) DO NOTHING)
    INSERT INTO status (message_id, status) VALUES ($1, 'done')";

struct Args {
    amqp: String,
    queue: String,
    redis: String,
    postgres: String,
    data_dir: PathBuf,
    prefetch: u16,
    pool_size: usize,
    messages: usize,
}

impl Args {
    fn parse() -> anyhow::Result<Self> {
        let mut given = HashMap::new();
        let mut args = std::env::args().skip(1);
        while let Some(key) = args.next() {
            let name = key
                .strip_prefix("--")
                .with_context(|| format!("unexpected argument {key:?}\n{USAGE}"))?;
            let value = args
                .next()
                .with_context(|| format!("{key} needs a value\n{USAGE}"))?;
            given.insert(name.to_owned(), value);
        }
        let mut take = |name: &str| given.remove(name);
        let required = |value: Option<String>, name: &str| {
            value.with_context(|| format!("--{name} is required\n{USAGE}"))
        };
        let number = |value: Option<String>, name: &str| {
            value
                .map(|v| {
                    v.parse::<usize>()
                        .with_context(|| format!("--{name} {v:?}"))
                })
                .transpose()
        };
        let prefetch = number(take("prefetch"), "prefetch")?.unwrap_or(16);
        let prefetch = u16::try_from(prefetch.max(1)).context("--prefetch is at most 65535")?;
        let parsed = Self {
            amqp: take("amqp").unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            queue: required(take("queue"), "queue")?,
            redis: take("redis").unwrap_or_else(|| "redis://127.0.0.1:6379".into()),
            postgres: required(take("postgres"), "postgres")?,
            data_dir: required(take("data-dir"), "data-dir")?.into(),
            prefetch,
            pool_size: number(take("pool-size"), "pool-size")?
                .unwrap_or(usize::from(prefetch).min(64))
                .max(1),
            messages: number(take("messages"), "messages")?
                .with_context(|| format!("--messages is required\n{USAGE}"))?,
        };
        if let Some(unknown) = given.keys().next() {
            bail!("unknown option --{unknown}\n{USAGE}");
        }
        Ok(parsed)
    }
}

/// sqAPI's message envelope (other fields are ignored).
#[derive(Deserialize)]
struct Envelope {
    uuid_ref: String,
    data_type: String,
    data_location: String,
    meta_location: String,
}

struct Shared {
    redis: redis::aio::MultiplexedConnection,
    pool: Pool,
    data_dir: PathBuf,
}

/// Why a delivery failed.
enum Failure {
    /// It cannot succeed however often it is delivered: reject it.
    Bad(anyhow::Error),
    /// Something it depends on failed: deliver it again.
    Transient(anyhow::Error),
}

fn bad(e: impl Into<anyhow::Error>) -> Failure {
    Failure::Bad(e.into())
}

fn transient(e: impl Into<anyhow::Error>) -> Failure {
    Failure::Transient(e.into())
}

/// How one delivery ended.
enum Settled {
    Acked { received: Instant, acked: Instant },
    Rejected,
    Requeued,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;

    let pg: tokio_postgres::Config = args.postgres.parse().context("--postgres")?;
    let manager = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager).max_size(args.pool_size).build()?;
    pool.get()
        .await
        .context("cannot connect to PostgreSQL")?
        .batch_execute(SCHEMA)
        .await
        .context("cannot create the tables")?;
    let redis = redis::Client::open(args.redis.as_str())?
        .get_multiplexed_async_connection()
        .await
        .context("cannot connect to Redis")?;
    let amqp = Connection::connect(&args.amqp, ConnectionProperties::default())
        .await
        .context("cannot connect to RabbitMQ")?;
    let channel = amqp.create_channel().await?;
    channel
        .basic_qos(args.prefetch, BasicQosOptions::default())
        .await?;
    let shared = Arc::new(Shared {
        redis,
        pool,
        data_dir: args.data_dir,
    });

    let started = Instant::now();
    let cpu_before = cpu_ms();
    let consumer = channel
        .basic_consume(
            args.queue.as_str().into(),
            "native-consumer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("cannot consume from {}", args.queue))?;
    let (settled_tx, mut settled_rx) = mpsc::unbounded_channel();
    let slots = Arc::new(Semaphore::new(usize::from(args.prefetch)));
    let mut dispatcher = tokio::spawn(dispatch(consumer, slots, shared, settled_tx));

    let mut latencies = Vec::with_capacity(args.messages);
    let (mut rejected, mut requeued) = (0usize, 0usize);
    let mut last = started;
    while latencies.len() + rejected < args.messages {
        tokio::select! {
            settled = settled_rx.recv() => match settled {
                Some(Settled::Acked { received, acked }) => {
                    latencies.push(acked - received);
                    last = last.max(acked);
                }
                Some(Settled::Rejected) => rejected += 1,
                Some(Settled::Requeued) => requeued += 1,
                None => bail!("the consumer stopped"),
            },
            ended = &mut dispatcher => bail!("the consumer stopped: {}", match ended {
                Ok(Err(e)) => format!("{e:#}"),
                Err(e) => e.to_string(),
                Ok(Ok(never)) => match never {},
            }),
        }
    }
    dispatcher.abort();
    let cpu = cpu_ms() - cpu_before;
    let seconds = (last - started).as_secs_f64();
    // Deliveries prefetched beyond `--messages` go back to the queue.
    let _ = channel.close(200, "done".into()).await;
    let _ = amqp.close(200, "done".into()).await;

    latencies.sort();
    let at = |q: f64| {
        latencies
            .get(((latencies.len().saturating_sub(1)) as f64 * q) as usize)
            .map_or(0, |d: &Duration| d.as_micros())
    };
    println!(
        "native-consumer messages={} acked={} rejected={rejected} requeued={requeued} seconds={seconds:.6} msg_per_s={:.1} p50_us={} p99_us={} peak_rss_kib={} cpu_ms={cpu:.0}",
        args.messages,
        latencies.len(),
        latencies.len() as f64 / seconds,
        at(0.5),
        at(0.99),
        peak_rss_kib()
    );
    Ok(())
}

/// Take deliveries while fewer than `slots` are in flight, each processed
/// and settled in a task of its own. Ends only by failing.
async fn dispatch(
    mut consumer: Consumer,
    slots: Arc<Semaphore>,
    shared: Arc<Shared>,
    settled: mpsc::UnboundedSender<Settled>,
) -> anyhow::Result<Infallible> {
    loop {
        let slot = slots.clone().acquire_owned().await?;
        let delivery = consumer
            .next()
            .await
            .ok_or_else(|| anyhow!("the broker ended the consumer"))??;
        let received = Instant::now();
        let (shared, settled) = (shared.clone(), settled.clone());
        tokio::spawn(async move {
            let outcome = handle(&shared, delivery, received).await;
            drop(slot);
            let _ = settled.send(outcome);
        });
    }
}

/// Process one delivery and settle it.
async fn handle(shared: &Shared, delivery: Delivery, received: Instant) -> Settled {
    let nack = |requeue| BasicNackOptions {
        requeue,
        ..Default::default()
    };
    let settled = match process(shared, &delivery.data).await {
        Ok(()) => delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map(|_| Settled::Acked {
                received,
                acked: Instant::now(),
            }),
        Err(Failure::Bad(e)) => {
            eprintln!("rejected delivery {}: {e:#}", delivery.delivery_tag);
            let rejected = delivery.acker.nack(nack(false)).await;
            rejected.map(|_| Settled::Rejected)
        }
        Err(Failure::Transient(e)) => {
            eprintln!("requeued delivery {}: {e:#}", delivery.delivery_tag);
            let requeued = delivery.acker.nack(nack(true)).await;
            requeued.map(|_| Settled::Requeued)
        }
    };
    // When the ack or nack cannot be sent, the broker redelivers.
    settled.unwrap_or(Settled::Requeued)
}

/// One delivery: everything but the settlement.
async fn process(shared: &Shared, body: &[u8]) -> Result<(), Failure> {
    let envelope: Envelope = serde_json::from_slice(body).map_err(bad)?;
    if envelope.data_type != "text/plain" {
        return Err(bad(anyhow!(
            "unexpected data_type {:?}",
            envelope.data_type
        )));
    }
    let path = data_path(&shared.data_dir, &envelope.data_location).map_err(bad)?;
    let mut redis = shared.redis.clone();
    let mut get = redis::cmd("GET");
    get.arg(&envelope.meta_location);
    let (meta, data) = tokio::join!(
        get.query_async::<Option<String>>(&mut redis),
        tokio::fs::read(&path)
    );
    let meta = meta
        .map_err(transient)?
        .ok_or_else(|| bad(anyhow!("no metadata at {:?}", envelope.meta_location)))?;
    let data = data.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => bad(anyhow!("no data at {}", path.display())),
        _ => transient(e),
    })?;
    let meta: serde_json::Value = serde_json::from_str(&meta).map_err(bad)?;
    let source = meta.get("source").and_then(|s| s.as_str());
    let bytes = i64::try_from(data.len()).map_err(bad)?;
    let lines = i64::try_from(count_lines(&data)).map_err(bad)?;

    let client = shared.pool.get().await.map_err(transient)?;
    let record = client.prepare_cached(RECORD).await.map_err(transient)?;
    client
        .execute(&record, &[&envelope.uuid_ref, &bytes, &lines, &source])
        .await
        .map_err(transient)?;
    Ok(())
}

/// `location` under `root`, refusing anything that would leave it.
fn data_path(root: &Path, location: &str) -> anyhow::Result<PathBuf> {
    let relative = Path::new(location);
    if location.is_empty()
        || !relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
    {
        bail!("data_location {location:?} is not a path inside the data directory");
    }
    Ok(root.join(relative))
}

/// `\n` bytes, plus one for an unterminated last line (as fx-insert counts).
fn count_lines(data: &[u8]) -> usize {
    let newlines = data.iter().filter(|&&b| b == b'\n').count();
    newlines + usize::from(data.last().is_some_and(|&b| b != b'\n'))
}

/// The process's peak resident set size (VmHWM), in KiB.
/// This process's CPU time so far (user and system), in milliseconds.
fn cpu_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // After the `(comm)` field: state is field 3, utime 14 and stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Clock ticks of 10 ms (`getconf CLK_TCK` is 100 on Linux).
    (ticks(11) + ticks(12)) * 10.0
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_count_an_unterminated_last_line() {
        assert_eq!(count_lines(b""), 0);
        assert_eq!(count_lines(b"a"), 1);
        assert_eq!(count_lines(b"a\n"), 1);
        assert_eq!(count_lines(b"a\nb"), 2);
        assert_eq!(count_lines(b"\n\n"), 2);
    }

    #[test]
    fn data_locations_stay_inside_the_data_directory() {
        let root = Path::new("/data");
        assert_eq!(
            data_path(root, "a/b.txt").ok(),
            Some(PathBuf::from("/data/a/b.txt"))
        );
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "./a"] {
            assert!(data_path(root, bad).is_err(), "{bad}");
        }
    }
}
