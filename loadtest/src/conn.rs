//! Opening one WebSocket connection: TCP connect, the TLS handshake for `wss://`, the HTTP
//! upgrade, nothing else.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsConnector;

use crate::sock::Sock;
use crate::ws;

/// Where the load goes: a resolved `ws://HOST:PORT/PATH` or `wss://HOST:PORT/PATH`.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The server's address.
    pub(crate) addr: SocketAddr,
    /// The `Host` header value.
    pub(crate) host: String,
    /// The request path, `/ws` by default.
    pub(crate) path: String,
    /// `wss://`: the connector and the name the certificate must have.
    pub(crate) tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
}

impl Target {
    /// Parses and resolves `ws://HOST:PORT/PATH` or `wss://HOST:PORT/PATH`; a `wss://` URL
    /// needs `tls` (from `--ca` or `--insecure`).
    pub(crate) fn parse(url: &str, tls: Option<&Arc<ClientConfig>>) -> Result<Target, String> {
        let (authority, path) = Target::split(url)?;
        let secure = url.starts_with("wss://");
        let with_port = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_string()
        } else if secure {
            format!("{authority}:443")
        } else {
            format!("{authority}:80")
        };
        let tls = match (secure, tls) {
            (false, _) => None,
            (true, None) => {
                return Err(format!(
                "{url}: a wss:// target needs --ca FILE (the certificate to trust) or --insecure"
            ))
            }
            (true, Some(config)) => {
                let host = with_port.rsplit_once(':').map_or(authority, |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let name = ServerName::try_from(host.to_string())
                    .map_err(|e| format!("{url}: {host} is not a TLS server name: {e}"))?;
                Some((config.clone(), name))
            }
        };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| format!("{url}: cannot resolve {authority}: {e}"))?
            .find(SocketAddr::is_ipv4)
            .ok_or_else(|| format!("{url}: {authority} has no IPv4 address"))?;
        Ok(Target {
            addr,
            host: authority.to_string(),
            path: path.to_string(),
            tls,
        })
    }

    /// Checks the URL's form without resolving it, and splits it into `host[:port]` and path
    /// (a malformed URL is a usage error; a name that does not resolve is found when the run
    /// starts).
    pub(crate) fn split(url: &str) -> Result<(&str, &str), String> {
        let rest = url
            .strip_prefix("ws://")
            .or_else(|| url.strip_prefix("wss://"))
            .ok_or_else(|| format!("{url}: the target must start with ws:// or wss://"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/ws"),
        };
        if authority.is_empty() {
            return Err(format!("{url}: no host"));
        }
        Ok((authority, path))
    }

    /// The target of a server listening on `addr`, at `/ws`; over TLS with `tls` (whose
    /// certificate is for the address).
    #[cfg(feature = "embedded")]
    pub(crate) fn local(addr: SocketAddr, tls: Option<&Arc<ClientConfig>>) -> Target {
        Target {
            addr,
            host: addr.to_string(),
            path: "/ws".into(),
            tls: tls.map(|config| (config.clone(), ServerName::IpAddress(addr.ip().into()))),
        }
    }

    /// The URL, for the report.
    pub(crate) fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        format!("{scheme}://{}{}", self.host, self.path)
    }
}

/// How a connection attempt failed, as the report counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnectError {
    /// The TCP connect was refused.
    Refused,
    /// The TCP connect or the upgrade did not finish in time.
    Timeout,
    /// Out of local ports or file descriptors.
    Resources,
    /// Another socket error.
    Io,
    /// The server answered the upgrade with something other than 101.
    Rejected,
    /// The server closed the connection during the upgrade.
    Closed,
    /// The TLS handshake failed (an untrusted certificate, a server that does not speak TLS).
    Tls,
}

impl ConnectError {
    /// The kind as the report names it.
    pub(crate) fn kind(self) -> &'static str {
        match self {
            ConnectError::Refused => "connect refused",
            ConnectError::Timeout => "connect timeout",
            ConnectError::Resources => "out of ports or file descriptors",
            ConnectError::Io => "connect error",
            ConnectError::Rejected => "upgrade rejected",
            ConnectError::Closed => "closed during upgrade",
            ConnectError::Tls => "TLS handshake failed",
        }
    }

    fn from_io(e: &std::io::Error) -> ConnectError {
        match e.kind() {
            std::io::ErrorKind::ConnectionRefused => ConnectError::Refused,
            std::io::ErrorKind::TimedOut => ConnectError::Timeout,
            std::io::ErrorKind::AddrNotAvailable | std::io::ErrorKind::AddrInUse => {
                ConnectError::Resources
            }
            _ if e.raw_os_error() == Some(libc::EMFILE)
                || e.raw_os_error() == Some(libc::ENFILE) =>
            {
                ConnectError::Resources
            }
            _ => ConnectError::Io,
        }
    }
}

/// Per-connection socket options.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ConnectOpts {
    /// SO_RCVBUF before connecting (0 = the system's default): small for clients that never read.
    pub(crate) recv_buffer: u32,
    /// Which loopback source address to use (127.0.0.(1 + n)), so that more connections than
    /// one address has local ports can be opened against a loopback server.
    pub(crate) source: Option<u8>,
}

/// An open, upgraded connection.
#[derive(Debug)]
pub(crate) struct Connected {
    /// The socket (TLS over it for `wss://`), TCP_NODELAY set.
    pub(crate) stream: Sock,
    /// Bytes the server sent after the 101 response (already frames).
    pub(crate) leftover: Vec<u8>,
}

/// Connects and upgrades, all within `timeout`.
pub(crate) async fn connect(
    target: &Target,
    opts: ConnectOpts,
    timeout: Duration,
) -> Result<Connected, ConnectError> {
    match tokio::time::timeout(timeout, connect_inner(target, opts)).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout),
    }
}

async fn connect_inner(target: &Target, opts: ConnectOpts) -> Result<Connected, ConnectError> {
    let io = |e: std::io::Error| ConnectError::from_io(&e);
    let sock = TcpSocket::new_v4().map_err(io)?;
    if opts.recv_buffer > 0 {
        sock.set_recv_buffer_size(opts.recv_buffer).map_err(io)?;
    }
    if let Some(n) = opts.source {
        sock.bind(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + n)),
            0,
        ))
        .map_err(io)?;
    }
    let stream = sock.connect(target.addr).await.map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    let stream = match &target.tls {
        None => Sock::plain(stream),
        Some((config, name)) => {
            let tls = TlsConnector::from(config.clone())
                .connect(name.clone(), stream)
                .await
                .map_err(|_| ConnectError::Tls)?;
            let (stream, session) = tls.into_inner();
            Sock::tls(stream, session)
        }
    };
    let req = ws::upgrade_request(&target.host, &target.path);
    stream.write_all(req.as_bytes()).await.map_err(io)?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        stream.readable().await.map_err(io)?;
        match stream.try_read(&mut chunk) {
            Ok(0) => return Err(ConnectError::Closed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(io(e)),
        }
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).map_err(|_| ConnectError::Rejected)?;
            let status_ok = head
                .lines()
                .next()
                .is_some_and(|l| l.split_whitespace().nth(1) == Some("101"));
            let accept_ok = head.lines().any(|l| {
                l.split_once(':').is_some_and(|(k, v)| {
                    k.trim().eq_ignore_ascii_case("sec-websocket-accept")
                        && v.trim() == ws::EXPECTED_ACCEPT
                })
            });
            if !status_ok || !accept_ok {
                return Err(ConnectError::Rejected);
            }
            let leftover = buf[end + 4..].to_vec();
            return Ok(Connected { stream, leftover });
        }
        if buf.len() > 16 * 1024 {
            return Err(ConnectError::Rejected);
        }
    }
}

/// Writes all of `buf`, waiting for the socket as needed.
pub(crate) async fn write_all(stream: &TcpStream, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        match stream.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => stream.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        let t = Target::parse("ws://127.0.0.1:9001/ws", None).unwrap();
        assert_eq!(t.addr.port(), 9001);
        assert_eq!(t.path, "/ws");
        assert_eq!(
            Target::parse("ws://127.0.0.1:9001", None).unwrap().path,
            "/ws"
        );
        assert_eq!(
            Target::parse("ws://localhost:9/x/y", None).unwrap().path,
            "/x/y"
        );
        assert!(Target::parse("http://127.0.0.1:1/", None).is_err());
        assert!(Target::parse("ws:///ws", None).is_err());
    }

    #[test]
    fn wss_targets_need_a_tls_configuration() {
        let err = Target::parse("wss://127.0.0.1:1/", None).unwrap_err();
        assert!(err.contains("--ca") && err.contains("--insecure"), "{err}");
        let config = crate::tls::insecure().unwrap();
        let t = Target::parse("wss://localhost/x", Some(&config)).unwrap();
        assert_eq!(t.addr.port(), 443);
        assert_eq!(t.path, "/x");
        assert!(t.tls.is_some());
        assert_eq!(t.url(), "wss://localhost/x");
        // A plain target stays plain whatever the TLS options.
        assert!(Target::parse("ws://127.0.0.1:9/", Some(&config))
            .unwrap()
            .tls
            .is_none());
    }
}
