//! Serving threads: one per core, each running its own single-threaded runtime.
//!
//! The listener is accepted from on the caller's runtime; each connection is handed to
//! a serving thread in turn and lives there, with the requests it carries and the backend
//! connections they use ([`Upstream`], one per thread). A request then never wakes a task
//! on another core: on a multi-threaded runtime the client's connection, the request and
//! the backend connection's task were spread over the cores, and the wake-ups between them
//! cost the gateway as much CPU as the proxying (haproxy's threads work the same way).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use crate::proxy::{self, Gateway, Peer};
use crate::upstream::Upstream;

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a serving thread's idle timer fires (see [`keep_a_timer_pending`]).
const IDLE_TIMER_PERIOD: Duration = Duration::from_millis(250);

/// Serves `listener` (over TLS with `tls`) until `shutdown`, then lets the requests in
/// flight finish.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    gateway: Arc<Gateway>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let count = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut threads = Vec::with_capacity(count);
    for index in 0..count {
        let (hand_over, accepted) = mpsc::unbounded_channel();
        let (finished, done) = oneshot::channel::<()>();
        let upstream = Arc::new(Upstream::new(gateway.config.backend_tls.clone()));
        let serving = ServingThread {
            router: proxy::router(Arc::clone(&gateway), Arc::clone(&upstream)),
            gateway: Arc::clone(&gateway),
            upstream,
            tls: tls.clone(),
            shutdown: shutdown.clone(),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name(format!("gateway-{index}"))
            .spawn(move || {
                runtime.block_on(serving.run(accepted));
                drop(finished);
            })?;
        threads.push((hand_over, done));
    }
    let mut next = 0;
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: pause, as axum does.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Out of this runtime's reactor: the serving thread registers it with its own.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, %peer, "cannot hand a connection over");
                continue;
            }
        };
        // Round robin: connections are long-lived and carry similar requests.
        let (hand_over, _) = &threads[next % count];
        next += 1;
        if hand_over.send((stream, peer)).is_err() {
            return Err(std::io::Error::other("a serving thread stopped"));
        }
    }
    drop(listener);
    for (hand_over, done) in threads {
        drop(hand_over);
        let _ = done.await;
    }
    Ok(())
}

/// What one serving thread needs.
#[derive(Debug)]
struct ServingThread {
    router: Router,
    gateway: Arc<Gateway>,
    upstream: Arc<Upstream>,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
}

impl ServingThread {
    /// Serves the connections it is handed until shutdown, then waits for their requests
    /// in flight.
    async fn run(self, mut accepted: mpsc::UnboundedReceiver<(std::net::TcpStream, SocketAddr)>) {
        let graceful = GracefulShutdown::new();
        tokio::spawn(keep_a_timer_pending(self.shutdown.clone()));
        loop {
            let (stream, peer) = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                next = accepted.recv() => match next {
                    Some(connection) => connection,
                    None => break,
                },
            };
            let stream = match TcpStream::from_std(stream) {
                Ok(stream) => stream,
                Err(error) => {
                    tracing::warn!(%error, %peer, "cannot take a connection over");
                    continue;
                }
            };
            let service = PeerService {
                router: self.router.clone(),
                gateway: Arc::clone(&self.gateway),
                upstream: Arc::clone(&self.upstream),
                peer: Peer::new(peer),
            };
            let (tls, watcher) = (self.tls.clone(), graceful.watcher());
            // The TLS handshake, if any, in the connection's own task: off the accept path.
            tokio::spawn(async move {
                match tls {
                    None => serve_connection(stream, service, watcher).await,
                    Some(tls) => match tokio::time::timeout(
                        HANDSHAKE_TIMEOUT,
                        TlsAcceptor::from(tls).accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(stream)) => serve_connection(stream, service, watcher).await,
                        Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    },
                }
            });
        }
        graceful.shutdown().await;
    }
}

/// Keeps a timer that expires within [`IDLE_TIMER_PERIOD`] pending on this thread.
///
/// A thread's tokio driver plans its next wake-up when it parks, and a timer set to expire
/// before that wake-up makes it wake itself (a write to its eventfd, then one more
/// `epoll_wait`). With no other timer pending it plans none, so every proxied request's
/// timeout cost those two system calls, 2 of the 8 a request makes here. This timer keeps
/// the planned wake-up sooner than any request's timeout.
async fn keep_a_timer_pending(shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(IDLE_TIMER_PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }
    }
}

async fn serve_connection<Io>(io: Io, service: PeerService, watcher: Watcher)
where
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let connection =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), service);
    if let Err(error) = watcher.watch(connection).await {
        tracing::trace!(%error, "client connection ended");
    }
}

/// A client connection's requests: the gateway's own pages through the router, told which
/// client each request comes from; every other request straight to [`proxy::forward`],
/// without the router's path lookup, request extensions and boxed layers (5-10% of the
/// gateway's CPU per proxied request in `bench http`).
#[derive(Debug, Clone)]
struct PeerService {
    router: Router,
    gateway: Arc<Gateway>,
    upstream: Arc<Upstream>,
    peer: Peer,
}

impl hyper::service::Service<Request<Incoming>> for PeerService {
    type Response = Response;
    type Error = Infallible;
    type Future = Either<
        axum::routing::future::RouteFuture<Infallible>,
        Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>,
    >;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        if proxy::is_own_path(request.uri().path()) {
            request
                .extensions_mut()
                .insert(ConnectInfo(self.peer.clone()));
            return Either::Left(tower_service::Service::call(
                &mut self.router.clone(),
                request,
            ));
        }
        let forwarded = proxy::forward(
            Arc::clone(&self.gateway),
            Arc::clone(&self.upstream),
            self.peer.clone(),
            request,
        );
        Either::Right(Box::pin(async move { Ok(forwarded.await) }))
    }
}
