//! Keep-alive HTTP/1.1 connections to the backends, on hyper's client connection directly.
//!
//! A proxied request is already an HTTP request: it goes out as it came in (its method,
//! path, headers and body moved, not rebuilt through a URL), and the answer's body is
//! handed to the client as hyper gives it. Each serving thread keeps its own connections,
//! so a connection's task, the request's task and the client's connection run on one
//! thread and wake each other without crossing cores.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, header};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::either::Either;

use crate::backend::Backend;

/// The side of a backend connection that sends requests.
type Sender = SendRequest<Full<Bytes>>;

/// Idle connections kept per backend and serving thread; more are closed when done.
const MAX_IDLE: usize = 64;

/// Why a request got no answer from a backend.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// No connection could be made: the request never reached the backend.
    #[error("cannot connect: {0}")]
    Connect(io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

impl UpstreamError {
    /// True when the request never reached the backend (any method may go elsewhere).
    pub(crate) fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_))
    }
}

/// Where a backend listens, parsed once from its URL.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// `host:port`, to connect to and to send as `Host`.
    authority: String,
    host: HeaderValue,
    /// The name its certificate must have, for `https://`.
    tls_name: Option<ServerName<'static>>,
}

impl Target {
    /// `http://host:port` or `https://host:port`; None for anything else.
    pub(crate) fn parse(url: &str) -> Option<Target> {
        let parsed = url::Url::parse(url).ok()?;
        if !parsed.path().trim_matches('/').is_empty() {
            return None;
        }
        // The bare host: an IPv6 address without its brackets.
        let name = match parsed.host()? {
            url::Host::Domain(domain) => domain.to_owned(),
            url::Host::Ipv4(address) => address.to_string(),
            url::Host::Ipv6(address) => address.to_string(),
        };
        let tls_name = match parsed.scheme() {
            "http" => None,
            "https" => Some(ServerName::try_from(name).ok()?),
            _ => return None,
        };
        let authority = format!("{}:{}", parsed.host_str()?, parsed.port_or_known_default()?);
        Some(Target {
            host: HeaderValue::from_str(&authority).ok()?,
            authority,
            tls_name,
        })
    }

    pub(crate) fn is_https(&self) -> bool {
        self.tls_name.is_some()
    }
}

/// One serving thread's connections, per backend.
#[derive(Debug)]
pub(crate) struct Upstream {
    idle: Mutex<Vec<(Arc<Backend>, Vec<Sender>)>>,
    /// For `https://` backends.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Upstream {
    pub(crate) fn new(tls: Option<Arc<rustls::ClientConfig>>) -> Upstream {
        Upstream {
            idle: Mutex::default(),
            tls,
        }
    }

    /// Sends `request` (origin-form URI, headers already those to forward) to `backend`.
    pub(crate) async fn send(
        &self,
        backend: &Arc<Backend>,
        mut request: Request<Full<Bytes>>,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<Response<Body>, UpstreamError> {
        request
            .headers_mut()
            .insert(header::HOST, backend.target.host.clone());
        let exchange = async {
            loop {
                let (mut sender, fresh) = match self.take_idle(backend) {
                    Some(sender) => (sender, false),
                    None => {
                        // Boxed: a TLS handshake's state is large, and would otherwise be
                        // part of (and moved with) every request's future.
                        let mut sender =
                            Box::pin(self.connect(&backend.target, connect_timeout)).await?;
                        sender.ready().await?;
                        (sender, true)
                    }
                };
                match sender.try_send_request(request).await {
                    Ok(response) => {
                        self.put_back(backend, sender);
                        return Ok(response);
                    }
                    // A kept connection the backend closed before the request went out: the
                    // request comes back unsent, and goes out again on another connection.
                    Err(mut failed) => match failed.take_message() {
                        Some(unsent) if !fresh => request = unsent,
                        _ => return Err(UpstreamError::Http(failed.into_error())),
                    },
                }
            }
        };
        let response: Response<Incoming> = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| UpstreamError::Timeout(timeout))??;
        Ok(response.map(Body::new))
    }

    /// A kept connection to `backend` that can take a request now.
    fn take_idle(&self, backend: &Arc<Backend>) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let (_, senders) = idle.iter_mut().find(|(b, _)| Arc::ptr_eq(b, backend))?;
        // Closed ones are dropped; busy ones (an answer still streaming) stay for later.
        senders.retain(|sender| !sender.is_closed());
        let ready = senders.iter().rposition(|sender| sender.is_ready())?;
        Some(senders.swap_remove(ready))
    }

    async fn connect(&self, target: &Target, timeout: Duration) -> Result<Sender, UpstreamError> {
        let connecting = async {
            let stream = TcpStream::connect(&target.authority).await?;
            stream.set_nodelay(true)?;
            match (&target.tls_name, &self.tls) {
                (None, _) => Ok(Either::Left(stream)),
                (Some(name), Some(tls)) => TlsConnector::from(Arc::clone(tls))
                    .connect(name.clone(), stream)
                    .await
                    .map(Either::Right),
                // `Gateway::add_backend` refuses such backends; an Upstream made apart
                // from a gateway may still be asked.
                (Some(_), None) => Err(io::Error::other(
                    "https backends need the gateway's TLS client settings",
                )),
            }
        };
        match tokio::time::timeout(timeout, connecting).await {
            Err(_) => Err(UpstreamError::Connect(io::ErrorKind::TimedOut.into())),
            Ok(Err(error)) => Err(UpstreamError::Connect(error)),
            Ok(Ok(io)) => start(io).await,
        }
    }

    fn put_back(&self, backend: &Arc<Backend>, sender: Sender) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // Backends removed from the gateway take their connections with them.
        idle.retain(|(b, _)| !b.removed.is_cancelled());
        match idle.iter_mut().find(|(b, _)| Arc::ptr_eq(b, backend)) {
            Some((_, senders)) if senders.len() < MAX_IDLE => senders.push(sender),
            Some(_) => {}
            None if !backend.removed.is_cancelled() => {
                idle.push((Arc::clone(backend), vec![sender]));
            }
            None => {}
        }
    }
}

/// Starts driving a new connection on this thread; gives the side that sends requests.
async fn start<Io>(io: Io) -> Result<Sender, UpstreamError>
where
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| UpstreamError::Connect(io::Error::other(e)))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "backend connection ended");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn backend_urls_are_read_once() {
        let plain = Target::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(plain.authority, "127.0.0.1:8080");
        assert_eq!(plain.host, "127.0.0.1:8080");
        assert!(plain.tls_name.is_none());
        let secure = Target::parse("https://api.example:8443/").unwrap();
        assert_eq!(secure.authority, "api.example:8443");
        assert_eq!(
            secure.tls_name,
            Some(ServerName::try_from("api.example").unwrap())
        );
        // The default port; an IPv6 address keeps its brackets in Host, not in its name.
        let six = Target::parse("https://[::1]").unwrap();
        assert_eq!(six.authority, "[::1]:443");
        assert_eq!(six.tls_name, Some(ServerName::try_from("::1").unwrap()));
        for wrong in ["ftp://host:21", "http://host:80/api", "host:80", "http://"] {
            assert!(Target::parse(wrong).is_none(), "{wrong}");
        }
    }

    fn backend_at(url: &str) -> Arc<Backend> {
        Arc::new(Backend::new(url.to_owned(), Target::parse(url).unwrap(), 1))
    }

    async fn get(
        upstream: &Upstream,
        backend: &Arc<Backend>,
        path: &str,
    ) -> Result<Response<Body>, UpstreamError> {
        let request = Request::get(path).body(Full::default()).unwrap();
        let patience = Duration::from_secs(5);
        upstream.send(backend, request, patience, patience).await
    }

    /// Sends three GETs through one [`Upstream`] to a backend that keeps its connections
    /// open (`hang_up` false) or hangs up after each answer without saying so in it;
    /// gives the connections the backend accepted.
    async fn three_requests(hang_up: bool) -> usize {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut request = vec![0; 4096];
                    while let Ok(read @ 1..) = socket.read(&mut request).await {
                        assert!(request[..read].starts_with(b"GET /readyz HTTP/1.1\r\n"));
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        socket.write_all(answer).await.unwrap();
                        if hang_up {
                            return;
                        }
                    }
                });
            }
        });
        let backend = backend_at(&url);
        let upstream = Upstream::new(None);
        for _ in 0..3 {
            let answer = get(&upstream, &backend, "/readyz").await.unwrap();
            assert_eq!(answer.status(), 200);
            let body = http_body_util::BodyExt::collect(answer.into_body())
                .await
                .unwrap()
                .to_bytes();
            assert_eq!(&body[..], b"ok");
        }
        accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[tokio::test]
    async fn connections_are_kept_and_reused() {
        assert_eq!(three_requests(false).await, 1);
    }

    #[tokio::test]
    async fn a_connection_the_backend_closed_is_not_reused() {
        assert_eq!(three_requests(true).await, 3);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let failure = get(&Upstream::new(None), &backend_at(&url), "/")
            .await
            .unwrap_err();
        assert!(failure.is_connect(), "{failure}");
    }
}
