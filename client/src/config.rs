//! The client's configuration and its backoff schedule.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue, Request};

use crate::Error;

/// How each reconnection delay is randomised, so that the clients of a hub that restarts do
/// not all come back in the same millisecond.
///
/// The schedule itself does not change: attempt n's nominal delay is
/// `initial_backoff × multiplier^(n-1)`, capped at `max_backoff`; the jitter only picks where
/// the actual wait falls around it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Jitter {
    /// Exactly the nominal delay: every client retries in lockstep (go-ws's behaviour).
    None,
    /// Uniform in `[0, nominal]` ("full jitter"): the widest spread, hence the fewest
    /// collisions after a restart; the first retry may come at once. The default.
    Full,
    /// Uniform in `[nominal × (1 - f), nominal × (1 + f)]` for `f` in `0.0..=1.0` (e.g. `0.2`
    /// for ±20 %), still capped at `max_backoff`.
    Proportional(f64),
}

/// What a [`Client`](crate::Client) connects to and how it retries; built by
/// [`ClientConfig::builder`].
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub(crate) url: String,
    pub(crate) initial_backoff: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) multiplier: f64,
    pub(crate) max_retries: u32,
    pub(crate) jitter: Jitter,
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    pub(crate) connect_timeout: Duration,
    pub(crate) read_timeout: Option<Duration>,
    pub(crate) event_capacity: usize,
    /// Feature `tls`: how `wss://` connections are made.
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl ClientConfig {
    /// A builder for a client of the hub at `url` (`ws://HOST:PORT/PATH`, or with feature
    /// `tls` `wss://HOST:PORT/PATH`), every other setting at its documented default.
    pub fn builder(url: impl Into<String>) -> ClientConfigBuilder {
        ClientConfigBuilder {
            config: ClientConfig {
                url: url.into(),
                initial_backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(30),
                multiplier: 2.0,
                max_retries: 0,
                jitter: Jitter::Full,
                headers: Vec::new(),
                connect_timeout: Duration::from_secs(10),
                read_timeout: Some(Duration::from_secs(90)),
                event_capacity: 1024,
                #[cfg(feature = "tls")]
                tls: None,
            },
            header_errors: Vec::new(),
        }
    }

    /// The hub's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The nominal delay (before jitter) of the `n`th wait in a row, counted from 0: the
    /// first wait after a lost connection (or after a failed first attempt) is
    /// `initial_backoff`, each next one `multiplier` times longer, up to `max_backoff`.
    pub fn nominal_delay(&self, n: u32) -> Duration {
        let exponent = i32::try_from(n).unwrap_or(i32::MAX).min(1024);
        let secs = self.initial_backoff.as_secs_f64() * self.multiplier.powi(exponent);
        let cap = self.max_backoff.as_secs_f64();
        Duration::from_secs_f64(if secs.is_finite() { secs.min(cap) } else { cap })
    }

    /// The nominal delay with the configured [`Jitter`] applied, `unit` a number in `[0, 1)`.
    pub(crate) fn jittered(&self, nominal: Duration, unit: f64) -> Duration {
        let unit = unit.clamp(0.0, 1.0);
        let nominal_secs = nominal.as_secs_f64();
        let secs = match self.jitter {
            Jitter::None => nominal_secs,
            Jitter::Full => nominal_secs * unit,
            Jitter::Proportional(f) => nominal_secs * (1.0 - f + 2.0 * f * unit),
        };
        Duration::from_secs_f64(secs.clamp(0.0, self.max_backoff.as_secs_f64().max(nominal_secs)))
    }

    /// The `n`th wait in a row, jitter applied.
    pub(crate) fn delay(&self, n: u32) -> Duration {
        self.jittered(self.nominal_delay(n), random_unit())
    }

    /// The handshake request: the URL and the extra headers.
    pub(crate) fn request(&self) -> Result<Request<()>, Error> {
        let mut request = self
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| Error::Config(format!("invalid URL {:?}: {e}", self.url)))?;
        for (name, value) in &self.headers {
            request.headers_mut().append(name.clone(), value.clone());
        }
        Ok(request)
    }
}

/// Builds a [`ClientConfig`]; each setter documents its default.
#[derive(Debug)]
pub struct ClientConfigBuilder {
    config: ClientConfig,
    header_errors: Vec<String>,
}

impl ClientConfigBuilder {
    /// Feature `tls`: `wss://` connections trust the certificates in `roots` (a private CA, a
    /// self-signed server certificate, or a public root store such as the `webpki-roots`
    /// crate's), with rustls's `ring` provider and `http/1.1` in ALPN. No default: a `wss://`
    /// URL without this or [`tls_config`](Self::tls_config) is a configuration error.
    #[cfg(feature = "tls")]
    pub fn tls_roots(mut self, roots: rustls::RootCertStore) -> Self {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        match rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
        {
            Ok(builder) => {
                let mut config = builder.with_root_certificates(roots).with_no_client_auth();
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                self.config.tls = Some(std::sync::Arc::new(config));
            }
            Err(e) => self.header_errors.push(format!("TLS: {e}")),
        }
        self
    }

    /// Feature `tls`: `wss://` connections use this rustls configuration as it is (client
    /// certificates, another provider, a custom verifier). Offer `http/1.1` or nothing in ALPN.
    #[cfg(feature = "tls")]
    pub fn tls_config(mut self, config: std::sync::Arc<rustls::ClientConfig>) -> Self {
        self.config.tls = Some(config);
        self
    }

    /// The delay before the first reconnection attempt after a connection is lost. Default 1 s.
    pub fn initial_backoff(mut self, delay: Duration) -> Self {
        self.config.initial_backoff = delay;
        self
    }

    /// The cap on the delay between attempts. Default 30 s.
    pub fn max_backoff(mut self, delay: Duration) -> Self {
        self.config.max_backoff = delay;
        self
    }

    /// Each attempt's nominal delay is the previous one's times this (at least 1.0), up to the
    /// cap. Default 2.0.
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.config.multiplier = multiplier;
        self
    }

    /// Consecutive failed connection attempts after which the client gives up
    /// ([`Event::Closed`](crate::Event::Closed) with [`Error::GaveUp`]); 0 never gives up.
    /// The count starts again after every successful connection. Default 0.
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.config.max_retries = retries;
        self
    }

    /// How each delay is randomised. Default [`Jitter::Full`].
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.config.jitter = jitter;
        self
    }

    /// Adds an HTTP header to every handshake (e.g. `Authorization: Bearer KEY`). Invalid
    /// names or values are reported by [`build`](Self::build). Default: none.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(name), Ok(value)) => self.config.headers.push((name, value)),
            _ => self
                .header_errors
                .push(format!("invalid header {name:?}: {value:?}")),
        }
        self
    }

    /// How long one connection attempt (TCP connect and upgrade) may take before it counts as
    /// failed. Default 10 s (the hub's own handshake timeout).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// A connection on which nothing at all (not even the hub's keep-alive pings, every 30 s
    /// by default) arrives for this long is treated as lost, and the client reconnects.
    /// `None` waits forever. Default 90 s (three of the hub's default ping periods).
    pub fn read_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config.read_timeout = timeout;
        self
    }

    /// How many events may wait unread in [`Events`](crate::Events). When it is full the
    /// client stops reading its socket until the application catches up, so the hub sees a
    /// slow consumer (and, on channels with history, the client recovers after the cut).
    /// Default 1,024.
    pub fn event_capacity(mut self, capacity: usize) -> Self {
        self.config.event_capacity = capacity;
        self
    }

    /// The configuration.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the URL is not a `ws://` URL, or a `wss://` URL without feature
    /// `tls` or without [`tls_roots`](Self::tls_roots) / `tls_config`; a header is invalid, the multiplier is below 1.0 or not finite, the
    /// initial backoff is over the maximum, the proportional jitter is outside `0.0..=1.0`,
    /// or the event capacity or connect timeout is zero.
    pub fn build(self) -> Result<ClientConfig, Error> {
        let config = self.config;
        if let Some(error) = self.header_errors.into_iter().next() {
            return Err(Error::Config(error));
        }
        let request = config.request()?;
        match request.uri().scheme_str() {
            Some("ws") => {}
            #[cfg(feature = "tls")]
            Some("wss") if config.tls.is_some() => {}
            #[cfg(feature = "tls")]
            Some("wss") => {
                return Err(Error::Config(format!(
                    "a wss:// URL needs the certificates to trust: tls_roots or tls_config: {:?}",
                    config.url
                )))
            }
            #[cfg(not(feature = "tls"))]
            Some("wss") => {
                return Err(Error::Config(format!(
                    "wss:// needs the crate's `tls` feature (or terminate TLS in front of the hub): {:?}",
                    config.url
                )))
            }
            _ => {
                return Err(Error::Config(format!(
                    "not a ws:// or wss:// URL: {:?}",
                    config.url
                )))
            }
        }
        if !config.multiplier.is_finite() || config.multiplier < 1.0 {
            return Err(Error::Config(format!(
                "the backoff multiplier must be at least 1.0, not {}",
                config.multiplier
            )));
        }
        if config.initial_backoff > config.max_backoff {
            return Err(Error::Config(format!(
                "the initial backoff ({:?}) is over the maximum ({:?})",
                config.initial_backoff, config.max_backoff
            )));
        }
        if let Jitter::Proportional(f) = config.jitter {
            if !(0.0..=1.0).contains(&f) {
                return Err(Error::Config(format!(
                    "proportional jitter must be within 0.0..=1.0, not {f}"
                )));
            }
        }
        if config.event_capacity == 0 || config.connect_timeout.is_zero() {
            return Err(Error::Config(
                "the event capacity and the connect timeout must not be zero".into(),
            ));
        }
        Ok(config)
    }
}

/// A number in `[0, 1)`, different on every call: std's randomly keyed hasher over a counter
/// and the clock. Enough to spread retries; not for anything that needs unpredictability.
fn random_unit() -> f64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let bits = RandomState::new().hash_one((CALLS.fetch_add(1, Ordering::Relaxed), nanos));
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(jitter: Jitter) -> ClientConfig {
        ClientConfig::builder("ws://127.0.0.1:1/ws")
            .initial_backoff(Duration::from_millis(100))
            .max_backoff(Duration::from_secs(1))
            .jitter(jitter)
            .build()
            .expect("a valid config")
    }

    #[test]
    fn nominal_delays_grow_by_the_multiplier_up_to_the_cap() {
        let c = config(Jitter::None);
        let delays: Vec<_> = (0..6).map(|n| c.nominal_delay(n).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(c.nominal_delay(u32::MAX), Duration::from_secs(1));
        assert_eq!(c.delay(2), Duration::from_millis(400));
    }

    #[test]
    fn jitter_stays_within_its_bounds_and_spreads() {
        let full = config(Jitter::Full);
        let nominal = Duration::from_millis(400);
        assert_eq!(full.jittered(nominal, 0.0), Duration::ZERO);
        assert_eq!(full.jittered(nominal, 0.5), Duration::from_millis(200));
        let samples: Vec<_> = (0..200).map(|_| full.delay(2)).collect();
        assert!(samples.iter().all(|d| *d <= nominal), "{samples:?}");
        let distinct: std::collections::HashSet<_> = samples.iter().collect();
        assert!(
            distinct.len() > 150,
            "full jitter should spread: {distinct:?}"
        );

        let twenty = config(Jitter::Proportional(0.2));
        assert_eq!(twenty.jittered(nominal, 0.0), Duration::from_millis(320));
        assert_eq!(twenty.jittered(nominal, 1.0), Duration::from_millis(480));
        for _ in 0..200 {
            let d = twenty.delay(2);
            assert!(d >= Duration::from_millis(320) && d <= Duration::from_millis(480));
        }
    }

    #[test]
    fn defaults_are_go_ws_s_with_full_jitter() {
        let c = ClientConfig::builder("ws://127.0.0.1:8080/ws")
            .build()
            .unwrap();
        assert_eq!(c.initial_backoff, Duration::from_secs(1));
        assert_eq!(c.max_backoff, Duration::from_secs(30));
        assert_eq!(c.multiplier, 2.0);
        assert_eq!(c.max_retries, 0);
        assert_eq!(c.jitter, Jitter::Full);
    }

    #[test]
    fn bad_settings_are_refused() {
        let base = || ClientConfig::builder("ws://127.0.0.1:8080/ws");
        assert!(ClientConfig::builder("wss://example.invalid/ws")
            .build()
            .is_err());
        assert!(ClientConfig::builder("not a url").build().is_err());
        assert!(base().multiplier(0.5).build().is_err());
        assert!(base().multiplier(f64::NAN).build().is_err());
        assert!(base().jitter(Jitter::Proportional(1.5)).build().is_err());
        assert!(base()
            .initial_backoff(Duration::from_secs(60))
            .build()
            .is_err());
        assert!(base().header("bad name", "x").build().is_err());
        assert!(base().header("Authorization", "Bearer k").build().is_ok());
    }
}
