//! A fault-injecting HTTP/1.1 proxy between the daemon and the real S3 server.
//!
//! It handles each request of a keep-alive connection in turn (Content-Length bodies: the daemon
//! sends no aws-chunked bodies by default) and asks the test's [`Plan`] what to do with it:
//! forward it (after some latency), answer it with an S3 error itself, reset the connection in the
//! middle of the request body, or hold it without an answer (a stall: the client's timeouts must
//! fire). The test changes the plan while the daemon runs.
//!
//! Error answers are what S3 sends (status, `<Error><Code>…` XML body; no body for HEAD, as S3
//! does), so the SDK classifies them exactly as it would classify real ones. The proxy reads a
//! request's whole body before answering it itself, so the client never sees its upload cut short
//! by an answer it did not wait for, and the connection stays usable for the next request.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

use crate::proxy::Request;

/// An S3 error answer, with the status and code real S3 uses for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(dead_code)]
pub enum S3Fault {
    InternalError,
    ServiceUnavailable,
    SlowDown,
    AccessDenied,
    InvalidAccessKeyId,
    NoSuchBucket,
}

impl S3Fault {
    fn status(self) -> (u16, &'static str) {
        match self {
            S3Fault::InternalError => (500, "Internal Server Error"),
            S3Fault::ServiceUnavailable | S3Fault::SlowDown => (503, "Service Unavailable"),
            S3Fault::AccessDenied | S3Fault::InvalidAccessKeyId => (403, "Forbidden"),
            S3Fault::NoSuchBucket => (404, "Not Found"),
        }
    }

    fn code(self) -> &'static str {
        match self {
            S3Fault::InternalError => "InternalError",
            S3Fault::ServiceUnavailable => "ServiceUnavailable",
            S3Fault::SlowDown => "SlowDown",
            S3Fault::AccessDenied => "AccessDenied",
            S3Fault::InvalidAccessKeyId => "InvalidAccessKeyId",
            S3Fault::NoSuchBucket => "NoSuchBucket",
        }
    }

    fn message(self) -> &'static str {
        match self {
            S3Fault::InternalError => "We encountered an internal error. Please try again.",
            S3Fault::ServiceUnavailable => "Service is unable to handle request.",
            S3Fault::SlowDown => "Please reduce your request rate.",
            S3Fault::AccessDenied => "Access Denied",
            S3Fault::InvalidAccessKeyId => {
                "The AWS Access Key Id you provided does not exist in our records."
            }
            S3Fault::NoSuchBucket => "The specified bucket does not exist",
        }
    }
}

/// What HEAD requests on objects get instead of the real server's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(dead_code)]
pub enum HeadAnswer {
    /// The error's status, without a body (S3 sends none for HEAD, so the SDK sees no code).
    Error(S3Fault),
    /// The server's real answer (status, ETag, digest metadata), but a Content-Length one byte
    /// larger: the same object, seemingly of another size.
    WrongSize,
}

/// The faults in force; see the setters of [`FaultProxy`].
struct Plan {
    latency: Duration,
    fail: Option<(f64, S3Fault)>,
    storm: usize,
    reset_every: Option<usize>,
    puts: usize,
    /// `Some(None)`: stalled until lifted; `Some(Some(t))`: until `t`.
    stall: Option<Option<Instant>>,
    deny: Option<S3Fault>,
    /// PUT requests (objects and parts) only.
    deny_puts: Option<S3Fault>,
    /// PUT requests carrying SSE-C headers only (AWS S3 buckets that block SSE-C).
    deny_sse_c_puts: Option<S3Fault>,
    head: Option<HeadAnswer>,
    /// Seeded: the same sequence of requests meets the same failures in every run.
    rng: rand::rngs::StdRng,
}

impl Plan {
    fn stalled(&self) -> bool {
        match self.stall {
            None => false,
            Some(None) => true,
            Some(Some(until)) => Instant::now() < until,
        }
    }

    fn decide(&mut self, req: &Request, body_len: u64) -> Action {
        if let Some(f) = self.deny {
            return Action::Answer(f);
        }
        if req.method == "PUT"
            && let Some(f) = self.deny_puts
        {
            return Action::Answer(f);
        }
        if req.method == "PUT"
            && req
                .header("x-amz-server-side-encryption-customer-algorithm")
                .is_some()
            && let Some(f) = self.deny_sse_c_puts
        {
            return Action::Answer(f);
        }
        if req.method == "HEAD"
            && req.is_object()
            && let Some(h) = self.head
        {
            return Action::Head(h);
        }
        if self.storm > 0 {
            self.storm -= 1;
            return Action::Answer(S3Fault::SlowDown);
        }
        if let Some((ratio, f)) = self.fail
            && self.rng.random_bool(ratio)
        {
            return Action::Answer(f);
        }
        if req.method == "PUT"
            && body_len > 1
            && let Some(n) = self.reset_every
        {
            self.puts += 1;
            if self.puts.is_multiple_of(n) {
                return Action::Reset;
            }
        }
        if self.stalled() {
            return Action::Stall;
        }
        Action::Forward(self.latency)
    }
}

enum Action {
    Forward(Duration),
    Answer(S3Fault),
    Head(HeadAnswer),
    Reset,
    Stall,
}

/// What the proxy did, for the tests to check that their fault really happened.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub requests: u64,
    /// Answered by the proxy itself (errors, and the HEAD answers).
    pub answered: u64,
    pub slowdowns: u64,
    /// Connections reset in the middle of a request body.
    pub resets: u64,
    /// Requests held by a stall.
    pub stalled: u64,
    /// Held requests whose client gave up (its timeout fired) before the stall ended.
    pub abandoned: u64,
}

struct Shared {
    upstream: SocketAddr,
    /// Requests received and not answered yet (the answer's first byte ends one), and the most
    /// at once since [`FaultProxy::take_peak`]: the client's concurrency, seen from the wire.
    in_flight: AtomicI64,
    peak: AtomicI64,
    plan: Mutex<Plan>,
    stats: Mutex<Stats>,
    log: Mutex<Vec<Request>>,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[allow(dead_code)]
impl FaultProxy {
    /// Starts forwarding to `upstream` with no fault; `seed` fixes the random failures.
    pub async fn start(upstream: SocketAddr, seed: u64) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream,
            in_flight: AtomicI64::new(0),
            peak: AtomicI64::new(0),
            plan: Mutex::new(Plan {
                latency: Duration::ZERO,
                fail: None,
                storm: 0,
                reset_every: None,
                puts: 0,
                stall: None,
                deny: None,
                deny_puts: None,
                deny_sse_c_puts: None,
                head: None,
                rng: rand::rngs::StdRng::seed_from_u64(seed),
            }),
            stats: Mutex::new(Stats::default()),
            log: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { break };
                        let s = s.clone();
                        conns.spawn(async move {
                            if let Ok(server) = TcpStream::connect(upstream).await {
                                let _ = connection(client, server, s).await;
                            }
                        });
                    }
                }
            }
        });
        FaultProxy { addr, shared, task }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn plan(&self) -> std::sync::MutexGuard<'_, Plan> {
        self.shared.plan.lock().unwrap()
    }

    pub fn stats(&self) -> Stats {
        self.shared.stats.lock().unwrap().clone()
    }

    pub fn requests(&self) -> Vec<Request> {
        self.shared.log.lock().unwrap().clone()
    }

    /// The most requests in flight at once since the last call (then reset to those in flight now).
    pub fn take_peak(&self) -> i64 {
        let now = self.shared.in_flight.load(Ordering::SeqCst);
        self.shared.peak.swap(now, Ordering::SeqCst)
    }

    /// Removes every fault.
    pub fn heal(&self) {
        let mut p = self.plan();
        p.latency = Duration::ZERO;
        p.fail = None;
        p.storm = 0;
        p.reset_every = None;
        p.stall = None;
        p.deny = None;
        p.deny_puts = None;
        p.deny_sse_c_puts = None;
        p.head = None;
    }

    /// Every forwarded request waits `d` first.
    pub fn latency(&self, d: Duration) {
        self.plan().latency = d;
    }

    /// This share of requests (0.0–1.0) is answered with `fault`.
    pub fn fail_ratio(&self, ratio: f64, fault: S3Fault) {
        self.plan().fail = Some((ratio, fault));
    }

    /// The next `n` requests are answered 503 SlowDown.
    pub fn slowdown_storm(&self, n: usize) {
        self.plan().storm += n;
    }

    /// Requests still to be answered by the current storms.
    pub fn storm_left(&self) -> usize {
        self.plan().storm
    }

    /// Every `n`th PUT with a body has its connection reset halfway through the body.
    pub fn reset_mid_body(&self, every_nth: Option<usize>) {
        self.plan().reset_every = every_nth;
    }

    /// Requests get no answer for `d` (`None`: until [`FaultProxy::heal`]); they are forwarded once
    /// the stall ends, if their client still waits.
    pub fn stall(&self, d: Option<Duration>) {
        self.plan().stall = Some(d.map(|d| Instant::now() + d));
    }

    /// Every request is answered with `fault` (e.g. revoked credentials: 403).
    pub fn deny(&self, fault: Option<S3Fault>) {
        self.plan().deny = fault;
    }

    /// Answers every PUT with `fault` (the bucket and HEADs still answer).
    pub fn deny_puts(&self, fault: Option<S3Fault>) {
        self.plan().deny_puts = fault;
    }

    /// Answers PUTs that carry SSE-C headers with `fault`, as an AWS bucket blocking SSE-C does.
    #[allow(dead_code)]
    pub fn deny_sse_c_puts(&self, fault: Option<S3Fault>) {
        self.plan().deny_sse_c_puts = fault;
    }

    /// HEAD requests on objects get `answer` instead of the server's.
    pub fn head_answer(&self, answer: Option<HeadAnswer>) {
        self.plan().head = answer;
    }
}

type Writer = Arc<tokio::sync::Mutex<OwnedWriteHalf>>;

/// One client connection and its own connection to the server.
async fn connection(client: TcpStream, server: TcpStream, s: Arc<Shared>) -> std::io::Result<()> {
    let (client_r, client_w) = client.into_split();
    let (mut server_r, mut server_w) = server.into_split();
    let client_w: Writer = Arc::new(tokio::sync::Mutex::new(client_w));
    let pending = Pending(Arc::new(AtomicBool::new(false)), s.clone());
    // Server → client, as bytes. The client waits for each response before sending its next
    // request, so the proxy's own answers never interleave with a forwarded one.
    let back = {
        let w = client_w.clone();
        let pending = pending.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = server_r.read(&mut buf).await {
                if n > 0 {
                    pending.answered();
                }
                if n == 0 || w.lock().await.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = w.lock().await.shutdown().await;
        })
    };
    let result = requests(client_r, &client_w, &mut server_w, &s, &pending).await;
    back.abort();
    pending.answered();
    result
}

/// Whether this connection's current request awaits its answer (see `Shared::in_flight`).
#[derive(Clone)]
struct Pending(Arc<AtomicBool>, Arc<Shared>);

impl Pending {
    fn asked(&self) {
        if !self.0.swap(true, Ordering::SeqCst) {
            let n = self.1.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.1.peak.fetch_max(n, Ordering::SeqCst);
        }
    }

    fn answered(&self) {
        if self.0.swap(false, Ordering::SeqCst) {
            self.1.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

async fn requests(
    client_r: OwnedReadHalf,
    client_w: &Writer,
    server_w: &mut OwnedWriteHalf,
    s: &Shared,
    pending: &Pending,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(client_r);
    let mut n = 0u64;
    loop {
        let Some((head, req)) = read_head(&mut reader).await? else {
            return Ok(());
        };
        pending.asked();
        n += 1;
        let len: u64 = req
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(
            req.header("transfer-encoding").is_none(),
            "the fault proxy handles Content-Length bodies only: {req:?}"
        );
        let action = s.plan.lock().unwrap().decide(&req, len);
        s.stats.lock().unwrap().requests += 1;
        let expect_continue = req
            .header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        s.log.lock().unwrap().push(req.clone());
        match action {
            Action::Forward(delay) => {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                forward(&mut reader, server_w, &head, len).await?;
            }
            Action::Answer(fault) => {
                // A client that waits for 100 Continue sends no body; otherwise take it all first.
                if !expect_continue {
                    drain(&mut reader, len).await?;
                }
                {
                    let mut st = s.stats.lock().unwrap();
                    st.answered += 1;
                    st.slowdowns += (fault == S3Fault::SlowDown) as u64;
                }
                let response = error_response(fault, &req, n);
                pending.answered();
                client_w.lock().await.write_all(&response).await?;
            }
            Action::Head(answer) => {
                s.stats.lock().unwrap().answered += 1;
                let response = match answer {
                    HeadAnswer::Error(fault) => error_response(fault, &req, n),
                    HeadAnswer::WrongSize => resized_head(s.upstream, &head).await?,
                };
                pending.answered();
                client_w.lock().await.write_all(&response).await?;
            }
            Action::Reset => {
                // The server gets the head and half the body, then both sides get a TCP reset
                // (zero linger): an upload cut in the middle, for the server and for the client.
                server_w.write_all(&head).await?;
                let half = len / 2;
                tokio::io::copy(&mut (&mut reader).take(half), server_w).await?;
                server_w.flush().await?;
                s.stats.lock().unwrap().resets += 1;
                let _ = AsRef::<TcpStream>::as_ref(&*server_w).set_zero_linger();
                let _ = AsRef::<TcpStream>::as_ref(&*client_w.lock().await).set_zero_linger();
                return Ok(());
            }
            Action::Stall => {
                s.stats.lock().unwrap().stalled += 1;
                // Read the body now, so that a closed connection means the client gave up.
                let mut body = Vec::with_capacity(len as usize);
                if !expect_continue {
                    (&mut reader).take(len).read_to_end(&mut body).await?;
                }
                loop {
                    if !s.plan.lock().unwrap().stalled() {
                        break;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                        more = reader.fill_buf() => {
                            if more.map_or(true, |b| b.is_empty()) {
                                s.stats.lock().unwrap().abandoned += 1;
                                return Ok(());
                            }
                            break; // Unexpected (pipelined) bytes: stop holding this request.
                        }
                    }
                }
                server_w.write_all(&head).await?;
                server_w.write_all(&body).await?;
                if expect_continue {
                    forward_body(&mut reader, server_w, len).await?;
                }
            }
        }
    }
}

/// Reads one request head; `None` at a clean end of the connection.
async fn read_head(
    reader: &mut BufReader<OwnedReadHalf>,
) -> std::io::Result<Option<(Vec<u8>, Request)>> {
    let mut head = Vec::new();
    loop {
        let before = head.len();
        if reader.read_until(b'\n', &mut head).await? == 0 {
            return Ok(None);
        }
        if &head[before..] == b"\r\n" {
            break;
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_owned();
    let path = first.next().unwrap_or("").to_owned();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Some((
        head,
        Request {
            method,
            path,
            headers,
        },
    )))
}

async fn forward(
    reader: &mut BufReader<OwnedReadHalf>,
    server_w: &mut OwnedWriteHalf,
    head: &[u8],
    len: u64,
) -> std::io::Result<()> {
    server_w.write_all(head).await?;
    forward_body(reader, server_w, len).await
}

async fn forward_body(
    reader: &mut BufReader<OwnedReadHalf>,
    server_w: &mut OwnedWriteHalf,
    len: u64,
) -> std::io::Result<()> {
    let copied = tokio::io::copy(&mut reader.take(len), server_w).await?;
    if copied < len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

async fn drain(reader: &mut BufReader<OwnedReadHalf>, len: u64) -> std::io::Result<()> {
    let drained = tokio::io::copy(&mut reader.take(len), &mut tokio::io::sink()).await?;
    if drained < len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Sends the HEAD request `head` to the server on a connection of its own and returns its answer
/// with a Content-Length one larger (a HEAD answer has no body, so nothing else changes).
async fn resized_head(upstream: SocketAddr, head: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut server = BufReader::new(TcpStream::connect(upstream).await?);
    server.get_mut().write_all(head).await?;
    let mut out = Vec::new();
    loop {
        let mut line = String::new();
        if server.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let resized = line.split_once(':').and_then(|(k, v)| {
            let len: u64 = v.trim().parse().ok()?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| format!("{k}: {}\r\n", len + 1))
        });
        out.extend_from_slice(resized.unwrap_or_else(|| line.clone()).as_bytes());
        if line == "\r\n" {
            return Ok(out);
        }
    }
}

/// The status, headers and XML body S3 sends for `fault` (no body for HEAD).
fn error_response(fault: S3Fault, req: &Request, n: u64) -> Vec<u8> {
    let (status, reason) = fault.status();
    let resource = req.path.split('?').next().unwrap_or("");
    let body = if req.method == "HEAD" {
        String::new()
    } else {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{}</Code><Message>{}</Message><Resource>{resource}</Resource><RequestId>fault-{n}</RequestId></Error>",
            fault.code(),
            fault.message()
        )
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nx-amz-request-id: fault-{n}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}
