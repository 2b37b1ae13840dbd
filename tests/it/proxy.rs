//! A recording (and delaying, and optionally corrupting) HTTP/1.1 proxy between the code under test and the real S3 server.
//! It forwards bytes unchanged unless told to damage PUT bodies; it parses each request head so tests can see exactly which
//! requests and headers reached the server (PUT counts, checksum headers, SSE-C, storage class).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// Whether this is a request for an object (not the bucket itself).
    pub fn is_object(&self) -> bool {
        let path = self.path.split('?').next().unwrap_or("");
        path.trim_matches('/').contains('/')
    }
}

#[derive(Default)]
struct Shared {
    log: Mutex<Vec<Request>>,
    put_delay: Mutex<Duration>,
    /// Object requests still forwarded before the proxy starts dropping connections.
    budget: Mutex<Option<usize>>,
    /// Flip one byte of every PUT body on its way (data damaged in transit).
    corrupt_puts: std::sync::atomic::AtomicBool,
    /// ListObjectsV2 requests seen, and how many pass before the next ones wait for
    /// [`Proxy::release_lists`] (`None`: all pass).
    lists: std::sync::atomic::AtomicUsize,
    lists_pass: Mutex<Option<usize>>,
    lists_released: tokio::sync::Notify,
}

pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        let _ = relay(client, server, s).await;
                    }
                });
            }
        });
        Proxy { addr, shared, task }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Request> {
        self.shared.log.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.shared.log.lock().unwrap().clear();
    }

    /// Requests with this method on objects (e.g. "PUT", "HEAD").
    pub fn object_requests(&self, method: &str) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == method && r.is_object())
            .collect()
    }

    /// After `n` more object requests, drops every request's connection (the server "dies");
    /// `None` heals it.
    pub fn fail_after(&self, n: Option<usize>) {
        *self.shared.budget.lock().unwrap() = n;
    }

    /// Alters one byte of every PUT body (object or part) before forwarding it.
    pub fn corrupt_puts(&self, on: bool) {
        self.shared
            .corrupt_puts
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Lets `n` more ListObjectsV2 requests through, then holds the next ones (before they reach
    /// the server) until [`Proxy::release_lists`]: the bucket can be changed while a listing is
    /// under way.
    pub fn hold_lists_after(&self, n: usize) {
        let seen = self.lists_seen();
        *self.shared.lists_pass.lock().unwrap() = Some(seen + n);
    }

    pub fn release_lists(&self) {
        *self.shared.lists_pass.lock().unwrap() = None;
        self.shared.lists_released.notify_waiters();
    }

    /// ListObjectsV2 requests received so far (held ones included).
    pub fn lists_seen(&self) -> usize {
        self.shared.lists.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Holds every PUT this long before forwarding it.
    pub fn set_put_delay(&self, d: Duration) {
        *self.shared.put_delay.lock().unwrap() = d;
    }
}

async fn relay(client: TcpStream, server: TcpStream, shared: Arc<Shared>) -> std::io::Result<()> {
    let (client_r, mut client_w) = client.into_split();
    let (mut server_r, mut server_w) = server.into_split();
    let back = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_r, &mut client_w).await;
        let _ = client_w.shutdown().await;
    });
    let mut reader = BufReader::new(client_r);
    loop {
        let mut head = Vec::new();
        loop {
            let before = head.len();
            if reader.read_until(b'\n', &mut head).await? == 0 {
                back.abort();
                return Ok(());
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
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let req = Request {
            method,
            path,
            headers,
        };
        if req.is_object() {
            let mut budget = shared.budget.lock().unwrap();
            match budget.as_mut() {
                Some(0) => {
                    back.abort();
                    return Ok(());
                }
                Some(n) => *n -= 1,
                None => {}
            }
        }
        let len: u64 = req
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let chunked = req
            .header("transfer-encoding")
            .is_some_and(|v| v.contains("chunked"));
        let delay = if req.method == "PUT" {
            *shared.put_delay.lock().unwrap()
        } else {
            Duration::ZERO
        };
        let corrupt = req.method == "PUT"
            && shared
                .corrupt_puts
                .load(std::sync::atomic::Ordering::SeqCst);
        let is_list = req.method == "GET" && req.path.contains("list-type=2");
        shared.log.lock().unwrap().push(req);
        if is_list {
            let n = shared
                .lists
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                + 1;
            loop {
                let released = shared.lists_released.notified();
                if shared
                    .lists_pass
                    .lock()
                    .unwrap()
                    .is_none_or(|pass| n <= pass)
                {
                    break;
                }
                released.await;
            }
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        server_w.write_all(&head).await?;
        if chunked {
            // Not parsed: forward the rest of the connection as it comes.
            tokio::io::copy(&mut reader, &mut server_w).await?;
            return Ok(());
        }
        let mut body = (&mut reader).take(len);
        if corrupt && len > 0 {
            let mut buf = Vec::with_capacity(len as usize);
            body.read_to_end(&mut buf).await?;
            buf[0] ^= 0xff;
            server_w.write_all(&buf).await?;
            continue;
        }
        tokio::io::copy(&mut body, &mut server_w).await?;
    }
}

/// A plain TCP relay that can be cut (every connection dropped, new ones refused) and restored:
/// a database or server that goes away mid-operation. It can also hold the server's answers
/// (requests still reach the server, replies wait): a network stall after the server acted.
pub struct TcpProxy {
    pub addr: SocketAddr,
    cut: Arc<std::sync::atomic::AtomicBool>,
    hold: tokio::sync::watch::Sender<bool>,
    trigger: Arc<Mutex<Option<Vec<u8>>>>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

/// Copies the client's bytes to the server. Once a chunk contains `trigger`, the replies are held
/// from the client's next Bind message on (a query sent with parameters is prepared first, in a round
/// trip of its own, then executed: holding the reply to the execution stalls the connection after
/// the server acted).
async fn requests(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    hold: tokio::sync::watch::Sender<bool>,
    trigger: Arc<Mutex<Option<Vec<u8>>>>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut armed = false;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        // The execution starts with a Bind message ('B'). Other messages may come between the
        // Parse and it (a Close of a statement dropped earlier on a pooled connection): holding
        // the replies on those stalled the prepare, so the server never ran the query.
        if armed && buf[0] == b'B' {
            hold.send_replace(true);
            armed = false;
        } else if !armed {
            let mut t = trigger.lock().unwrap();
            if t.as_ref()
                .is_some_and(|p| buf[..n].windows(p.len()).any(|w| w == p.as_slice()))
            {
                *t = None;
                armed = true;
            }
        }
        to.write_all(&buf[..n]).await?;
    }
}

/// Copies the server's bytes to the client, waiting while `hold` is set.
async fn replies(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut hold: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if hold.wait_for(|h| !*h).await.is_err() {
            return Ok(());
        }
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
    }
}

#[allow(dead_code)]
impl TcpProxy {
    pub async fn start(upstream: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (hold, _) = tokio::sync::watch::channel(false);
        let trigger: Arc<Mutex<Option<Vec<u8>>>> = Default::default();
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Default::default();
        let (c, k, h, t) = (cut.clone(), conns.clone(), hold.clone(), trigger.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if c.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: connection reset
                }
                let (held, h, t) = (h.subscribe(), h.clone(), t.clone());
                let task = tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        let _ = tokio::join!(requests(cr, sw, h, t), replies(sr, cw, held));
                    }
                });
                k.lock().unwrap().push(task.abort_handle());
            }
        });
        TcpProxy {
            addr,
            cut,
            hold,
            trigger,
            conns,
            task,
        }
    }

    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Holds the replies on every connection once a client sent a query containing `pattern` and
    /// then its next message (see [`requests`]); [`TcpProxy::hold_replies`]`(false)` lifts it.
    pub fn hold_replies_after(&self, pattern: &str) {
        *self.trigger.lock().unwrap() = Some(pattern.as_bytes().to_vec());
    }

    /// Holds (`true`) or releases (`false`) the server's replies on every connection.
    pub fn hold_replies(&self, on: bool) {
        self.hold.send_replace(on);
    }
}
