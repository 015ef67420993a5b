//! A TCP proxy in front of a server, whose connections a test can cut and restore.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Forwards connections from its own port to `target`. `cut` drops every connection and
/// refuses new ones until `restore`.
#[derive(Debug)]
pub struct TcpProxy {
    address: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
    stop: CancellationToken,
}

#[derive(Debug)]
struct ProxyState {
    cut: bool,
    /// Cancelled to drop the connections of the current generation.
    connections: CancellationToken,
}

impl TcpProxy {
    pub async fn start(target: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let address = listener.local_addr().expect("proxy address");
        let state = Arc::new(Mutex::new(ProxyState {
            cut: false,
            connections: CancellationToken::new(),
        }));
        let stop = CancellationToken::new();
        let accepting = Arc::clone(&state);
        let stopped = stop.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stopped.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((client, _)) = accepted else { continue };
                let (cut, generation) = {
                    let state = accepting.lock().expect("proxy state");
                    (state.cut, state.connections.clone())
                };
                if cut {
                    drop(client);
                    continue;
                }
                tokio::spawn(forward(client, target, generation));
            }
        });
        TcpProxy {
            address,
            state,
            stop,
        }
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Drops every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        let mut state = self.state.lock().expect("proxy state");
        state.cut = true;
        state.connections.cancel();
        state.connections = CancellationToken::new();
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.state.lock().expect("proxy state").cut = false;
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut();
    }
}

async fn forward(mut client: TcpStream, target: SocketAddr, generation: CancellationToken) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    tokio::select! {
        _ = generation.cancelled() => {}
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
    }
}
