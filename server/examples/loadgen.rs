//! A closed-loop HTTP/1.1 load generator for bench/load.py: `concurrency` keep-alive
//! connections each send one POST, wait for its answer, and send the next, for a fixed
//! time after a warm-up. Prints one JSON object: requests/s, latency percentiles (ms)
//! and the count of each status.
//!
//! `cargo run --release -p spillway --example loadgen -- URL BODY_FILE CONCURRENCY SECONDS [THREADS]`

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Target {
    addr: String,
    request: Vec<u8>,
}

fn target(url: &str, body: &[u8]) -> Result<Target, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs are supported")?;
    let (addr, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    Ok(Target {
        addr: addr.to_string(),
        request,
    })
}

/// Reads one response (status line, headers, Content-Length body) from `stream`,
/// keeping any bytes past it in `buffer`. Returns the status.
async fn read_response(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> std::io::Result<u16> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buffer[..end]).map_err(|_| bad("non-UTF-8 head"))?;
            let status: u16 = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("no status"))?;
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .ok_or_else(|| bad("no content-length"))?;
            let total = end + 4 + length;
            while buffer.len() < total {
                let mut chunk = [0u8; 16 * 1024];
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(bad("connection closed mid-body"));
                }
                buffer.extend_from_slice(&chunk[..n]);
            }
            buffer.drain(..total);
            return Ok(status);
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(bad("connection closed"));
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

struct Connection {
    latencies: Vec<Duration>,
    statuses: BTreeMap<u16, u64>,
    errors: u64,
}

async fn connection(target: &Target, warm_until: Instant, stop_at: Instant) -> Connection {
    let mut done = Connection {
        latencies: Vec::new(),
        statuses: BTreeMap::new(),
        errors: 0,
    };
    let mut stream = None;
    let mut buffer = Vec::new();
    while Instant::now() < stop_at {
        if stream.is_none() {
            match TcpStream::connect(&target.addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    buffer.clear();
                    stream = Some(s);
                }
                Err(_) => {
                    done.errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let Some(s) = stream.as_mut() else { continue };
        let started = Instant::now();
        let answered = match s.write_all(&target.request).await {
            Ok(()) => read_response(s, &mut buffer).await,
            Err(e) => Err(e),
        };
        match answered {
            Ok(status) if started >= warm_until => {
                done.latencies.push(started.elapsed());
                *done.statuses.entry(status).or_default() += 1;
            }
            Ok(_) => {}
            Err(_) => {
                done.errors += 1;
                stream = None;
            }
        }
    }
    done
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: loadgen URL BODY_FILE CONCURRENCY SECONDS [THREADS]";
    let [url, body, concurrency, seconds, ..] = args.as_slice() else {
        return Err(usage.into());
    };
    let threads: usize = args.get(4).map(|t| t.parse()).transpose()?.unwrap_or(1);
    let target = std::sync::Arc::new(target(url, &std::fs::read(body)?)?);
    let concurrency: usize = concurrency.parse()?;
    let seconds: f64 = seconds.parse()?;
    let warmup = Duration::from_secs_f64((seconds * 0.2).min(2.0));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    let results = runtime.block_on(async {
        let start = Instant::now();
        let warm_until = start + warmup;
        let stop_at = warm_until + Duration::from_secs_f64(seconds);
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let target = target.clone();
                tokio::spawn(async move { connection(&target, warm_until, stop_at).await })
            })
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            all.push(task.await?);
        }
        Ok::<_, tokio::task::JoinError>(all)
    })?;
    let mut latencies: Vec<Duration> = results.iter().flat_map(|c| c.latencies.clone()).collect();
    latencies.sort();
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    for c in &results {
        for (s, n) in &c.statuses {
            *statuses.entry(*s).or_default() += n;
        }
    }
    let errors: u64 = results.iter().map(|c| c.errors).sum();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    let statuses: BTreeMap<String, u64> = statuses
        .into_iter()
        .map(|(s, n)| (s.to_string(), n))
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "concurrency": concurrency,
            "seconds": seconds,
            "requests": latencies.len(),
            "requests_per_s": latencies.len() as f64 / seconds,
            "p50_ms": pct(0.50),
            "p90_ms": pct(0.90),
            "p99_ms": pct(0.99),
            "statuses": statuses,
            "errors": errors,
        })
    );
    Ok(())
}
