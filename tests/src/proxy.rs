//! A fault-injecting TCP proxy between terminals and the relay: pass traffic, cut every
//! connection (optionally after N more bytes in one direction), black-hole (partition), delay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Which way bytes flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Terminal to relay.
    Up,
    /// Relay to terminal.
    Down,
}

/// Control handle of a running proxy.
#[derive(Clone)]
pub struct Proxy {
    /// The address terminals connect to.
    pub addr: SocketAddr,
    blackhole: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
    /// Bumped to cut every open connection.
    generation: watch::Sender<u64>,
    /// Cut after this many more bytes (per direction); u64::MAX = never.
    cut_after: Arc<[AtomicU64; 2]>,
    cuts: Arc<AtomicU64>,
}

impl Proxy {
    /// Starts a proxy on 127.0.0.1:0 forwarding to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let (generation, _) = watch::channel(0u64);
        let p = Self {
            addr: listener.local_addr()?,
            blackhole: Arc::new(AtomicBool::new(false)),
            delay_ms: Arc::new(AtomicU64::new(0)),
            generation,
            cut_after: Arc::new([AtomicU64::new(u64::MAX), AtomicU64::new(u64::MAX)]),
            cuts: Arc::new(AtomicU64::new(0)),
        };
        let me = p.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let me = me.clone();
                tokio::spawn(async move {
                    if me.blackhole.load(Ordering::Relaxed) {
                        // Partitioned: hold the socket open, pass nothing.
                        let mut rx = me.generation.subscribe();
                        let _ = rx.changed().await;
                        drop(client);
                        return;
                    }
                    if let Ok(server) = TcpStream::connect(target).await {
                        me.pipe(client, server).await;
                    }
                });
            }
        });
        Ok(p)
    }

    async fn pipe(&self, client: TcpStream, server: TcpStream) {
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (cr, cw) = client.into_split();
        let (sr, sw) = server.into_split();
        let mut rx = self.generation.subscribe();
        let up = self.copy(cr, sw, Direction::Up);
        let down = self.copy(sr, cw, Direction::Down);
        tokio::select! {
            _ = up => {}
            _ = down => {}
            _ = rx.changed() => {}
        }
    }

    async fn copy(
        &self,
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        dir: Direction,
    ) {
        let idx = if dir == Direction::Up { 0 } else { 1 };
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if self.blackhole.load(Ordering::Relaxed) {
                continue;
            }
            let budget = self.cut_after[idx].load(Ordering::Relaxed);
            let (send, cut) = if budget == u64::MAX {
                (n, false)
            } else {
                ((budget as usize).min(n), budget as usize <= n)
            };
            if budget != u64::MAX {
                self.cut_after[idx].store(budget.saturating_sub(send as u64), Ordering::Relaxed);
            }
            let delay = self.delay_ms.load(Ordering::Relaxed);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            if to.write_all(&buf[..send]).await.is_err() {
                return;
            }
            if cut {
                self.cut_after[idx].store(u64::MAX, Ordering::Relaxed);
                self.cut_all();
                return;
            }
        }
    }

    /// Resets every open connection now (the peers see a dropped TCP connection).
    pub fn cut_all(&self) {
        self.cuts.fetch_add(1, Ordering::Relaxed);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Lets `bytes` more bytes through in `dir`, then cuts every connection: "the server got
    /// it, the answer was lost" with `Direction::Down` and a small budget.
    pub fn cut_after(&self, dir: Direction, bytes: u64) {
        let idx = if dir == Direction::Up { 0 } else { 1 };
        self.cut_after[idx].store(bytes, Ordering::Relaxed);
    }

    /// Partitions (true: nothing passes, new connections hang) or heals (false).
    pub fn set_blackhole(&self, on: bool) {
        self.blackhole.store(on, Ordering::Relaxed);
        if on {
            self.cut_all();
        }
    }

    /// Delays every chunk by `ms`.
    pub fn set_delay_ms(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::Relaxed);
    }

    /// How many cuts happened.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::Relaxed)
    }
}
