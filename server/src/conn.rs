//! The connections of the gRPC port: accepted within a cap, handshaken within a deadline, then
//! handed to tonic as its incoming stream (with TLS or without).
//!
//! - At most `max_client_connections` are open at once (each holds a permit until it closes);
//!   past that a new connection is closed at once, and clients retry with backoff.
//! - A connection must complete its TLS handshake (with TLS) and send the HTTP/2 connection
//!   preface (the magic and its SETTINGS frame) within `handshake_timeout`, or it is closed:
//!   a half-open socket holds no file and no permit for long. The bytes read are replayed to
//!   the HTTP/2 server.
//! - An accept that fails for want of resources (EMFILE, ENFILE, ENOBUFS, ENOMEM) makes the
//!   loop back off, not spin, and is logged once per [`LOG_EVERY`].

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_rustls::{TlsAcceptor, rustls::pki_types::CertificateDer, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// Warnings about refused connections and failing accepts come at most this often.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// The longest an accept that failed for want of resources waits before the next try.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Files the process keeps for itself beyond the pool (listener, PostgreSQL sessions of the
/// listener and the reaper, certificate reloads, logs).
const RESERVED_FILES: u64 = 64;

/// The client's first bytes on an HTTP/2 connection (RFC 9113, 3.4), before its SETTINGS frame.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The largest SETTINGS frame accepted in a preface (the default largest frame).
const MAX_SETTINGS: usize = 16_384;

/// How connections are admitted.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// The longest from accept to the end of the HTTP/2 preface.
    pub handshake_timeout: Duration,
}

/// What the services can learn of a connection, in each request's extensions.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub local_addr: Option<SocketAddr>,
    pub remote_addr: Option<SocketAddr>,
    /// The client's certificate chain, under mutual TLS.
    pub peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection: its socket (or TLS stream), the preface bytes still to replay, and
/// its permit, given back when it closes.
pub struct Conn {
    io: Io,
    replay: Vec<u8>,
    replayed: usize,
    info: ConnInfo,
    _permit: OwnedSemaphorePermit,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("info", &self.info).finish_non_exhaustive()
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.replayed < this.replay.len() {
            let rest = &this.replay[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            if this.replayed == this.replay.len() {
                this.replay = Vec::new();
                this.replayed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Reads the HTTP/2 connection preface: the magic, then one frame, which must be SETTINGS.
/// Answers the bytes read, to be replayed.
async fn read_preface(io: &mut (impl AsyncRead + Unpin)) -> io::Result<Vec<u8>> {
    let mut bytes = vec![0; PREFACE.len() + 9];
    io.read_exact(&mut bytes).await?;
    if &bytes[..PREFACE.len()] != PREFACE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not an HTTP/2 connection preface",
        ));
    }
    let header = &bytes[PREFACE.len()..];
    let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    if header[3] != 0x4 || len > MAX_SETTINGS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the HTTP/2 preface does not go on with a SETTINGS frame",
        ));
    }
    let start = bytes.len();
    bytes.resize(start + len, 0);
    io.read_exact(&mut bytes[start..]).await?;
    Ok(bytes)
}

/// Logs a warning at most once per [`LOG_EVERY`], with how many were left out meanwhile.
#[derive(Debug, Default)]
struct Throttled {
    last: Option<Instant>,
    left_out: u64,
}

impl Throttled {
    /// Whether to log now; if so, how many occurrences were not logged since the last time.
    fn due(&mut self) -> Option<u64> {
        match self.last {
            Some(t) if t.elapsed() < LOG_EVERY => {
                self.left_out += 1;
                None
            }
            _ => {
                self.last = Some(Instant::now());
                Some(std::mem::take(&mut self.left_out))
            }
        }
    }
}

/// Whether an accept failed for want of resources (rather than because of one connection).
fn out_of_resources(e: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    )
}

/// The most connections the process' open-file limit allows next to `pool_size` database
/// connections, after raising the soft limit towards the hard one if `wanted` needs it.
/// `None` if the limit cannot be read.
pub fn file_limit_allows(wanted: usize, pool_size: usize) -> Option<usize> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let reserve = RESERVED_FILES + pool_size as u64;
    let need = (wanted as u64).saturating_add(reserve);
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    let soft = if soft < need && soft < hard {
        let raised = need.min(hard);
        match setrlimit(Resource::RLIMIT_NOFILE, raised, hard) {
            Ok(()) => raised,
            Err(_) => soft,
        }
    } else {
        soft
    };
    Some(usize::try_from(soft.saturating_sub(reserve)).unwrap_or(usize::MAX))
}

/// The connections accepted on `listener` (through `tls` if given) within `limits`, until
/// `stop` is cancelled, as a stream for tonic.
pub fn incoming(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    stop: CancellationToken,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    tokio::spawn(async move {
        let (mut refused, mut failed) = (Throttled::default(), Throttled::default());
        let mut backoff = Duration::ZERO;
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                _ = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => {
                    backoff = Duration::ZERO;
                    a
                }
                Err(e) if out_of_resources(&e) => {
                    backoff = (backoff * 2).clamp(Duration::from_millis(10), MAX_BACKOFF);
                    if let Some(left_out) = failed.due() {
                        tracing::warn!(
                            error = %e,
                            left_out,
                            "cannot accept connections: the process is out of files or memory; \
                             raise its open-file limit (LimitNOFILE) or lower max_client_connections"
                        );
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => continue,
                    }
                }
                // One connection's trouble (reset before accept and the like): the next.
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    continue;
                }
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                if let Some(left_out) = refused.due() {
                    tracing::warn!(
                        max_client_connections = limits.max_connections,
                        left_out,
                        "too many client connections: closing new ones until some close"
                    );
                }
                drop(tcp);
                continue;
            };
            // Without TCP_NODELAY, small answers wait for the peer's delayed ACK.
            let _ = tcp.set_nodelay(true);
            let (tls, tx) = (tls.clone(), tx.clone());
            tokio::spawn(async move {
                let info = ConnInfo {
                    local_addr: tcp.local_addr().ok(),
                    remote_addr: Some(peer),
                    peer_certs: None,
                };
                match tokio::time::timeout(limits.handshake_timeout, handshake(tcp, tls, info)).await {
                    Ok(Ok((io, replay, info))) => {
                        let conn = Conn {
                            io,
                            replay,
                            replayed: 0,
                            info,
                            _permit: permit,
                        };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "handshake failed"),
                    Err(_) => tracing::debug!(%peer, "handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// TLS (if any), then the HTTP/2 preface.
async fn handshake(
    tcp: TcpStream,
    tls: Option<TlsAcceptor>,
    mut info: ConnInfo,
) -> io::Result<(Io, Vec<u8>, ConnInfo)> {
    match tls {
        None => {
            let mut tcp = tcp;
            let replay = read_preface(&mut tcp).await?;
            Ok((Io::Plain(tcp), replay, info))
        }
        Some(acceptor) => {
            let mut tls = acceptor.accept(tcp).await?;
            info.peer_certs = tls.get_ref().1.peer_certificates().map(|c| Arc::new(c.to_vec()));
            let replay = read_preface(&mut tls).await?;
            Ok((Io::Tls(Box::new(tls)), replay, info))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_preface_is_read_and_anything_else_refused() {
        let mut good = PREFACE.to_vec();
        good.extend_from_slice(&[0, 0, 6, 0x4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100]);
        good.extend_from_slice(b"rest");
        let mut r = &good[..];
        let read = read_preface(&mut r).await.unwrap();
        assert_eq!(read, good[..good.len() - 4]);
        assert_eq!(r, b"rest");

        let http1 = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n0123456789".to_vec();
        assert!(read_preface(&mut &http1[..]).await.is_err());
        let mut not_settings = PREFACE.to_vec();
        not_settings.extend_from_slice(&[0, 0, 0, 0x1, 0, 0, 0, 0, 1]);
        assert!(read_preface(&mut &not_settings[..]).await.is_err());
        assert!(read_preface(&mut &PREFACE[..12]).await.is_err());
    }

    #[test]
    fn throttled_logs_once_per_period() {
        let mut t = Throttled::default();
        assert_eq!(t.due(), Some(0));
        assert_eq!(t.due(), None);
        assert_eq!(t.due(), None);
        t.last = Some(Instant::now() - LOG_EVERY);
        assert_eq!(t.due(), Some(2));
    }
}
