//! One connection's socket, plain TCP or TLS (`wss://` targets), with the readiness-style
//! calls the engine makes: `readable`, `try_read`, `write_all`.
//!
//! The engine reads and writes a connection from different tasks through an `Arc` (a
//! subscriber's reader answers pings while publishers write), and reads with non-blocking
//! calls into its thread's buffer; tokio-rustls's `TlsStream` wants `&mut` for both and is
//! poll-based. So a TLS connection is rustls's own state machine (`ClientConnection`) over
//! the `TcpStream`, behind a mutex held only for the non-blocking step (never across an
//! await): `try_read` decrypts what is buffered or reads more records from the socket,
//! `write_all` encrypts and then writes the records, waiting for the socket between steps.
//! The plain path stays the `TcpStream` itself.

use std::io::{self, Read, Write};
use std::sync::{Mutex, PoisonError};

use tokio::net::TcpStream;
use tokio_rustls::rustls::ClientConnection;

/// A connected socket: TCP, or TLS over TCP.
#[derive(Debug)]
pub(crate) struct Sock {
    tcp: TcpStream,
    /// With TLS: the session, after a completed handshake.
    tls: Option<Mutex<ClientConnection>>,
}

impl Sock {
    /// A plain TCP connection.
    pub(crate) fn plain(tcp: TcpStream) -> Sock {
        Sock { tcp, tls: None }
    }

    /// A TLS connection whose handshake is done: the socket and the session tokio-rustls
    /// handed back (`TlsStream::into_inner`).
    pub(crate) fn tls(tcp: TcpStream, mut session: ClientConnection) -> Sock {
        // Records are written by `write_all`, which waits for the socket itself: no bound on
        // what rustls buffers, so a write is never refused half-way.
        session.set_buffer_limit(None);
        Sock {
            tcp,
            tls: Some(Mutex::new(session)),
        }
    }

    /// The TCP socket under it, for what the engine does without TLS (its fast read).
    pub(crate) fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Whether this is a TLS connection.
    pub(crate) fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The plain `TcpStream`, for the scenarios that drive raw sockets (ramp, recover).
    ///
    /// # Panics
    ///
    /// On a TLS connection: those scenarios are refused TLS targets before anything connects
    /// (`Args::validate`), so this is a bug, not something a server can cause.
    pub(crate) fn into_plain(self) -> TcpStream {
        assert!(
            self.tls.is_none(),
            "a TLS connection in a plain-socket scenario (Args::validate refuses it)"
        );
        self.tcp
    }

    /// Waits until `try_read` may return something: decrypted bytes already held, or the
    /// socket readable.
    pub(crate) async fn readable(&self) -> io::Result<()> {
        if let Some(tls) = &self.tls {
            let mut session = tls.lock().unwrap_or_else(PoisonError::into_inner);
            let state = session
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if state.plaintext_bytes_to_read() > 0 || state.peer_has_closed() {
                return Ok(());
            }
        }
        self.tcp.readable().await
    }

    /// Reads what is available without waiting: `Ok(0)` at the end of the stream,
    /// `WouldBlock` when nothing is (which clears the socket's readiness, as a plain
    /// `try_read` does).
    pub(crate) fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = &self.tls else {
            return self.tcp.try_read(buf);
        };
        let mut session = tls.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            match session.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The server closed without close_notify: an end like any other here.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            // Nothing decrypted is held: read records from the socket (WouldBlock passes up).
            if session.read_tls(&mut TcpIo(&self.tcp))? == 0 {
                return Ok(0);
            }
            session
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
    }

    /// Writes all of `buf`, waiting for the socket as needed.
    pub(crate) async fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        let Some(tls) = &self.tls else {
            return crate::conn::write_all(&self.tcp, buf).await;
        };
        tls.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .writer()
            .write_all(buf)?;
        // Writes the records, this write's and any another task left (a pong): whoever
        // writes flushes everything, so nothing stays behind in the session.
        loop {
            {
                let mut session = tls.lock().unwrap_or_else(PoisonError::into_inner);
                loop {
                    if !session.wants_write() {
                        return Ok(());
                    }
                    match session.write_tls(&mut TcpIo(&self.tcp)) {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
            }
            self.tcp.writable().await?;
        }
    }
}

/// The socket as `Read` and `Write` for rustls: non-blocking, `WouldBlock` when it must wait.
struct TcpIo<'a>(&'a TcpStream);

impl Read for TcpIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for TcpIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
