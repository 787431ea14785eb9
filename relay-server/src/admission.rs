//! Fair admission: who gets a socket and a device connection slot, and for how long before it
//! has proven itself.
//!
//! * Every accepted TCP connection takes a socket slot ([`Limits::sockets`], derived from the
//!   process's open-file limit with a reserve for the database and other files). When all are
//!   taken the relay stops accepting until one frees; accept errors (EMFILE, ...) are logged,
//!   counted and retried after a short pause.
//! * A socket must finish its handshake — HTTP request headers, or WebSocket upgrade plus the
//!   device's `hello` — within [`Limits::handshake_timeout`] of being accepted, else its reads
//!   fail and it is closed. An HTTP connection that goes idle after a response gets the same
//!   time for its next request.
//! * Device connections take a slot of the relay ([`Limits::devices`], kept below the socket
//!   slots so `/healthz` and the back-office API still answer when every device slot is taken),
//!   of their store and of their device. A revoked device's connections are closed at once and
//!   it gets no new slot.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use crdt_model::{DeviceId, StoreId};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::metrics::Metrics;

/// File descriptors kept for everything that is not a client socket (database, log, epoll, ...).
pub const FD_RESERVE: usize = 64;
/// Socket slots kept for HTTP (health checks, back office) beyond the device connections.
pub const HTTP_RESERVE: usize = 32;

/// The admission limits in force (after clamping to the open-file limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Open client sockets of any kind.
    pub sockets: usize,
    /// Device connections of the whole relay.
    pub devices: usize,
    /// Device connections of one store.
    pub per_store: usize,
    /// Device connections of one device.
    pub per_device: usize,
    /// From accept to the end of the handshake.
    pub handshake_timeout: Duration,
}

impl Limits {
    /// Limits from the configured values, clamped so sockets stay below `fd_limit` minus
    /// [`FD_RESERVE`] and device connections below the sockets minus [`HTTP_RESERVE`].
    /// Returns the limits and whether the device limit had to be lowered.
    pub fn clamp(
        max_connections: usize,
        per_store: usize,
        per_device: usize,
        handshake_timeout: Duration,
        fd_limit: Option<usize>,
    ) -> (Self, bool) {
        let wanted_sockets = max_connections.saturating_add(HTTP_RESERVE);
        let sockets = match fd_limit {
            Some(fds) => wanted_sockets.min(fds.saturating_sub(FD_RESERVE).max(HTTP_RESERVE + 2)),
            None => wanted_sockets,
        };
        let devices = max_connections
            .min(sockets.saturating_sub(HTTP_RESERVE))
            .max(1);
        (
            Self {
                sockets,
                devices,
                per_store: per_store.max(1),
                per_device: per_device.max(1),
                handshake_timeout,
            },
            devices < max_connections,
        )
    }
}

/// The soft open-file limit of this process (`ulimit -n`), where it can be read.
pub fn fd_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    if soft == "unlimited" {
        return None;
    }
    soft.parse().ok()
}

/// Why a device connection was refused; each has a stable error code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The device already has its share of connections.
    Device,
    /// The device's store already has its share.
    Store,
    /// Every device slot of the relay is taken.
    Relay,
    /// The device was revoked.
    Revoked,
}

impl Refusal {
    /// The error code sent to the device.
    pub fn code(self) -> &'static str {
        match self {
            Self::Device => "too_many_device_connections",
            Self::Store => "too_many_store_connections",
            Self::Relay => "too_many_connections",
            Self::Revoked => crdt_model::wire::codes::REVOKED,
        }
    }

    /// A human-readable reason.
    pub fn message(self, limits: &Limits) -> String {
        match self {
            Self::Device => format!(
                "this device already has {} connections open",
                limits.per_device
            ),
            Self::Store => format!(
                "this store already has {} connections open",
                limits.per_store
            ),
            Self::Relay => "the relay's connection limit is reached".into(),
            Self::Revoked => "this device's token was revoked".into(),
        }
    }
}

/// One admitted connection's stop signal: raised when its device is revoked.
#[derive(Debug, Default)]
pub(crate) struct Ticket {
    revoked: AtomicBool,
    /// Woken when the device is revoked.
    pub(crate) notify: Notify,
}

impl Ticket {
    /// Whether the connection's device was revoked.
    pub(crate) fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }
}

#[derive(Default)]
struct Slots {
    devices: HashMap<DeviceId, HashMap<u64, Arc<Ticket>>>,
    stores: HashMap<StoreId, usize>,
    revoked: HashSet<DeviceId>,
}

/// The device connection slots and the registry of live connections per device.
pub(crate) struct Admission {
    limits: Limits,
    total: Arc<Semaphore>,
    slots: Mutex<Slots>,
    next: AtomicU64,
}

/// A taken device slot; dropping it frees the slot.
pub(crate) struct Slot {
    admission: Arc<Admission>,
    id: u64,
    device: DeviceId,
    store: StoreId,
    /// Raised when the device is revoked.
    pub(crate) ticket: Arc<Ticket>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut s) = self.admission.slots.lock() {
            if let Some(conns) = s.devices.get_mut(&self.device) {
                conns.remove(&self.id);
                if conns.is_empty() {
                    s.devices.remove(&self.device);
                }
            }
            if let Some(n) = s.stores.get_mut(&self.store) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    s.stores.remove(&self.store);
                }
            }
        }
    }
}

impl Admission {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            total: Arc::new(Semaphore::new(limits.devices)),
            limits,
            slots: Mutex::new(Slots::default()),
            next: AtomicU64::new(1),
        }
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Takes a slot for a connection of `device` (of `store`), or says why not.
    pub(crate) fn admit(
        self: &Arc<Self>,
        device: DeviceId,
        store: &StoreId,
    ) -> Result<Slot, Refusal> {
        let mut s = self.slots.lock().map_err(|_| Refusal::Relay)?;
        if s.revoked.contains(&device) {
            return Err(Refusal::Revoked);
        }
        if s.devices.get(&device).map_or(0, HashMap::len) >= self.limits.per_device {
            return Err(Refusal::Device);
        }
        if s.stores.get(store).copied().unwrap_or(0) >= self.limits.per_store {
            return Err(Refusal::Store);
        }
        let permit = Arc::clone(&self.total)
            .try_acquire_owned()
            .map_err(|_| Refusal::Relay)?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let ticket = Arc::new(Ticket::default());
        s.devices
            .entry(device)
            .or_default()
            .insert(id, Arc::clone(&ticket));
        *s.stores.entry(store.clone()).or_default() += 1;
        Ok(Slot {
            admission: Arc::clone(self),
            id,
            device,
            store: store.clone(),
            ticket,
            _permit: permit,
        })
    }

    /// Closes every connection of `device` and refuses it from now on. Returns how many
    /// connections were told to close.
    pub(crate) fn revoke(&self, device: DeviceId) -> usize {
        let Ok(mut s) = self.slots.lock() else {
            return 0;
        };
        s.revoked.insert(device);
        let Some(conns) = s.devices.get(&device) else {
            return 0;
        };
        for t in conns.values() {
            t.revoked.store(true, Ordering::Release);
            t.notify.notify_one();
        }
        conns.len()
    }

    /// Waits until every device connection has ended, at most until `deadline`.
    pub(crate) async fn drained(&self, deadline: Instant) {
        let all = u32::try_from(self.limits.devices).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout_at(deadline, self.total.acquire_many(all)).await;
    }
}

/// The handshake clock of one accepted socket, shared between its I/O and its handlers.
#[derive(Debug)]
pub struct Handshake {
    base: Instant,
    /// Milliseconds after `base` when reads start failing; `u64::MAX` while disarmed.
    deadline_ms: AtomicU64,
}

impl Handshake {
    fn new(timeout: Duration) -> Self {
        Self {
            base: Instant::now(),
            deadline_ms: AtomicU64::new(millis(timeout)),
        }
    }

    /// A clock without deadline.
    pub fn disarmed() -> Self {
        Self {
            base: Instant::now(),
            deadline_ms: AtomicU64::new(u64::MAX),
        }
    }

    /// The connection finished its handshake: no deadline any more.
    pub fn disarm(&self) {
        self.deadline_ms.store(u64::MAX, Ordering::Release);
    }

    /// The connection must show activity within `timeout` from now.
    pub fn arm(&self, timeout: Duration) {
        let at = millis(self.base.elapsed()).saturating_add(millis(timeout));
        self.deadline_ms.store(at, Ordering::Release);
    }

    /// When the handshake must be over, if it is not yet.
    pub fn deadline(&self) -> Option<Instant> {
        match self.deadline_ms.load(Ordering::Acquire) {
            u64::MAX => None,
            ms => Some(self.base + Duration::from_millis(ms)),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX - 1)
}

/// What the handlers know of a connection: the peer and its handshake clock.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The remote address.
    pub addr: SocketAddr,
    /// The handshake clock.
    pub handshake: Arc<Handshake>,
}

/// A socket that fails its reads once its handshake deadline passes, and frees its socket slot
/// when dropped.
pub struct Guarded<Io> {
    io: Io,
    handshake: Arc<Handshake>,
    sleep: Pin<Box<Sleep>>,
    _slot: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl<Io> Drop for Guarded<Io> {
    fn drop(&mut self) {
        self.metrics.sockets.dec();
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for Guarded<Io> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(deadline) = this.handshake.deadline() {
            if this.sleep.deadline() != deadline {
                this.sleep.as_mut().reset(deadline);
            }
            if this.sleep.as_mut().poll(cx).is_ready() {
                this.metrics.handshake_timeouts.inc();
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "handshake timed out",
                )));
            }
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Guarded<Io> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Accepts TCP connections within the socket limit; see the [module docs](self).
pub struct Acceptor {
    tcp: TcpListener,
    sockets: Arc<Semaphore>,
    handshake_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Acceptor {
    /// Accepts on `tcp` with at most `limits.sockets` open at once.
    pub fn new(tcp: TcpListener, limits: &Limits, metrics: Arc<Metrics>) -> Self {
        Self {
            tcp,
            sockets: Arc::new(Semaphore::new(limits.sockets)),
            handshake_timeout: limits.handshake_timeout,
            metrics,
        }
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The next connection. Waits while every socket slot is taken; logs, counts and retries
    /// after accept errors (a full file table included) instead of failing.
    pub async fn accept(&self) -> (Guarded<TcpStream>, PeerInfo) {
        loop {
            let permit = match Arc::clone(&self.sockets).try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    let n = self.metrics.sockets_full.inc();
                    if n.is_power_of_two() || n == 0 {
                        tracing::warn!(
                            times = n + 1,
                            "every socket slot is taken; waiting before accepting more"
                        );
                    }
                    match Arc::clone(&self.sockets).acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => std::future::pending().await,
                    }
                }
            };
            match self.tcp.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    self.metrics.sockets.inc();
                    let handshake = Arc::new(Handshake::new(self.handshake_timeout));
                    let sleep = Box::pin(tokio::time::sleep(self.handshake_timeout));
                    let io = Guarded {
                        io: stream,
                        handshake: Arc::clone(&handshake),
                        sleep,
                        _slot: permit,
                        metrics: Arc::clone(&self.metrics),
                    };
                    return (io, PeerInfo { addr, handshake });
                }
                Err(e) => {
                    drop(permit);
                    self.metrics.accept_errors.inc();
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                    ) {
                        continue;
                    }
                    tracing::error!(error = %e, "accept failed; retrying shortly");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

impl axum::serve::Listener for Acceptor {
    type Io = Guarded<TcpStream>;
    type Addr = PeerInfo;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        Acceptor::accept(self).await
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(PeerInfo {
            addr: self.tcp.local_addr()?,
            handshake: Arc::new(Handshake::disarmed()),
        })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Acceptor>>
    for PeerInfo
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, Acceptor>) -> Self {
        stream.remote_addr().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_keep_a_reserve_below_the_file_limit() {
        let t = Duration::from_secs(5);
        let (l, lowered) = Limits::clamp(20_000, 64, 4, t, Some(1024));
        assert_eq!(l.sockets, 1024 - FD_RESERVE);
        assert_eq!(l.devices, 1024 - FD_RESERVE - HTTP_RESERVE);
        assert!(lowered);
        let (l, lowered) = Limits::clamp(100, 64, 4, t, Some(1024));
        assert_eq!((l.sockets, l.devices), (100 + HTTP_RESERVE, 100));
        assert!(!lowered);
        let (l, _) = Limits::clamp(100, 64, 4, t, Some(10));
        assert!(l.devices >= 1 && l.devices < l.sockets);
    }

    #[test]
    fn a_device_gets_its_share_and_revocation_closes_and_refuses() {
        let (limits, _) = Limits::clamp(10, 3, 2, Duration::from_secs(5), None);
        let a = Arc::new(Admission::new(limits));
        let id = |n: u8| -> DeviceId {
            format!("00000000-0000-0000-0000-0000000000{n:02x}")
                .parse()
                .unwrap_or_else(|_| unreachable!())
        };
        let (d1, d2, d3) = (id(1), id(2), id(3));
        let s1 = StoreId::new("s1").unwrap_or_else(|_| unreachable!());
        let s2 = StoreId::new("s2").unwrap_or_else(|_| unreachable!());
        let x1 = a.admit(d1, &s1);
        let x2 = a.admit(d1, &s1);
        assert!(x1.is_ok() && x2.is_ok());
        assert_eq!(a.admit(d1, &s1).err(), Some(Refusal::Device));
        let y1 = a.admit(d2, &s1);
        assert!(y1.is_ok());
        assert_eq!(a.admit(d2, &s1).err(), Some(Refusal::Store));
        assert!(a.admit(d3, &s2).is_ok());
        drop(x2);
        let x3 = a.admit(d1, &s1);
        assert!(x3.is_ok());
        assert_eq!(a.revoke(d1), 2);
        assert!(x1.as_ref().is_ok_and(|s| s.ticket.is_revoked()));
        assert!(y1.as_ref().is_ok_and(|s| !s.ticket.is_revoked()));
        drop((x1, x3));
        assert_eq!(a.admit(d1, &s1).err(), Some(Refusal::Revoked));
    }
}
