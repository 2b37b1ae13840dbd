//! A latency-injecting TCP proxy for WAN benchmarks (netem is not available on the bench machine).
//!
//! Every byte read from one side is written to the other `delay` later (one-way delay, per
//! direction, so a request/response pair costs 2 × delay = one RTT). A new connection also pays
//! the TCP handshake: the client's first bytes leave no earlier than one RTT after the accept,
//! as on a real link where the client cannot send before the SYN-ACK. An optional bandwidth cap
//! (`--rate`, bytes per second, shared by all connections per direction, like one WAN link)
//! serialises chunks before their propagation delay.
//!
//! Backpressure: each direction of a connection holds at most `--window` bytes in flight (its
//! bounded queue), so a fast sender is slowed as by a TCP window instead of buffering without end.
//!
//! usage: cargo run --release --example latency_proxy -- \
//!          --listen 127.0.0.1:9001 --upstream 127.0.0.1:9000 --delay 15ms [--rate 12.5MB]
//!
//! `scripts/bench/latency_check.sh` measures that the proxy adds what it claims.
//! Self-contained on purpose (only crates the package already depends on) so other benches can
//! copy it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc};
use tokio::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "TCP proxy adding a one-way delay per direction and an optional bandwidth cap")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Address to forward to.
    #[arg(long)]
    upstream: SocketAddr,
    /// One-way delay in each direction (RTT = 2 × delay), e.g. "15ms".
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0ms")]
    delay: Duration,
    /// One-way delay client → upstream (overrides --delay for that direction).
    #[arg(long, value_parser = humantime::parse_duration)]
    delay_up: Option<Duration>,
    /// One-way delay upstream → client (overrides --delay for that direction).
    #[arg(long, value_parser = humantime::parse_duration)]
    delay_down: Option<Duration>,
    /// Bandwidth cap per direction in bytes per second, shared by all connections
    /// (e.g. "12.5MB" = 100 Mbit/s). Unlimited when absent.
    #[arg(long, value_parser = parse_rate)]
    rate: Option<u64>,
    /// Bytes in flight per direction and connection before the sender is held back.
    #[arg(long, value_parser = parse_rate, default_value = "4MiB")]
    window: u64,
    /// Do not charge one RTT for the TCP handshake of each new connection.
    #[arg(long)]
    no_handshake: bool,
}

fn parse_rate(s: &str) -> Result<u64, String> {
    parse_size::parse_size(s).map_err(|e| format!("{s:?} is not a size such as 12.5MB: {e}"))
}

/// One direction's shared link: when it is next free to serialise a chunk (bandwidth cap).
struct Link {
    delay: Duration,
    rate: Option<u64>,
    free_at: Mutex<Instant>,
    bytes: AtomicU64,
}

impl Link {
    fn new(delay: Duration, rate: Option<u64>) -> Self {
        Self {
            delay,
            rate,
            free_at: Mutex::new(Instant::now()),
            bytes: AtomicU64::new(0),
        }
    }

    /// When a chunk of `len` bytes that arrived at `at` reaches the other side.
    async fn deliver_at(&self, at: Instant, len: usize) -> Instant {
        self.bytes.fetch_add(len as u64, Ordering::Relaxed);
        let Some(rate) = self.rate else {
            return at + self.delay;
        };
        let mut free_at = self.free_at.lock().await;
        let start = (*free_at).max(at);
        let end = start + Duration::from_secs_f64(len as f64 / rate as f64);
        *free_at = end;
        end + self.delay
    }
}

const CHUNK: usize = 64 * 1024;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let up = Arc::new(Link::new(args.delay_up.unwrap_or(args.delay), args.rate));
    let down = Arc::new(Link::new(args.delay_down.unwrap_or(args.delay), args.rate));
    let listener = TcpListener::bind(args.listen).await?;
    // The bench scripts read the bound address from this line (with --listen 127.0.0.1:0).
    println!("listening {}", listener.local_addr()?);
    eprintln!(
        "latency_proxy: {} -> {}, delay up {:?} down {:?}, rate {}",
        listener.local_addr()?,
        args.upstream,
        up.delay,
        down.delay,
        args.rate.map_or("unlimited".into(), |r| format!("{r} B/s"))
    );
    let slots = (args.window as usize / CHUNK).max(1);
    let handshake = !args.no_handshake;
    loop {
        let (client, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and the like: back off rather than spin.
                eprintln!("latency_proxy: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (up, down, upstream) = (up.clone(), down.clone(), args.upstream);
        tokio::spawn(async move {
            let accepted = Instant::now();
            let server = match TcpStream::connect(upstream).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("latency_proxy: connect {upstream}: {e}");
                    return;
                }
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            // The client may send only after the SYN-ACK came back: one RTT after its SYN.
            let not_before = if handshake {
                accepted + up.delay + down.delay
            } else {
                accepted
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            let a = tokio::spawn(pipe(cr, sw, up, not_before, slots));
            let b = tokio::spawn(pipe(sr, cw, down, accepted, slots));
            let _ = tokio::join!(a, b);
        });
    }
}

/// Forwards `from` to `to` through `link`; EOF is forwarded (half-close) after the data before it.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    link: Arc<Link>,
    not_before: Instant,
    slots: usize,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Option<Bytes>)>(slots);
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            };
            let at = Instant::now().max(not_before);
            let when = link.deliver_at(at, n).await;
            let chunk = (n > 0).then(|| Bytes::copy_from_slice(&buf[..n]));
            if tx.send((when, chunk)).await.is_err() || n == 0 {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((when, chunk)) = rx.recv().await {
            tokio::time::sleep_until(when).await;
            match chunk {
                Some(c) => {
                    if to.write_all(&c).await.is_err() {
                        return;
                    }
                }
                None => {
                    let _ = to.shutdown().await;
                    return;
                }
            }
        }
    };
    tokio::join!(reader, writer);
}
