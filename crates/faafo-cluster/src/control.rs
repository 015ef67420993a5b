//! The supervisor's control socket: a Unix socket in the cluster directory (so only those
//! who may write the data directory control the cluster). One JSON request per
//! connection, answered by JSON lines: progress as it happens, then one final reply.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use faafo_core::NodeRole;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::autoscale::Range;
use crate::members::Kind;
use crate::supervisor::Supervisor;

/// Longest request line accepted.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    Start {
        target: String,
    },
    Stop {
        target: String,
    },
    Restart {
        target: String,
        rolling: bool,
    },
    Scale {
        counts: Vec<(NodeRole, u32)>,
    },
    /// SIGKILL one member: the named one, or a random one when the topology is whole.
    Kill {
        target: Option<String>,
        /// Leave it stopped, as a host that died stays down until someone repairs it.
        #[serde(default)]
        stay_down: bool,
    },
    /// Workers follow the queue within `range`; `None` turns that off.
    Autoscale {
        range: Option<Range>,
        scale_down_after_ms: u64,
    },
    /// Check the members' configuration file again and have the members re-read it.
    Reload,
    Down,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Progress { message: String },
    Status { members: Vec<MemberStatus> },
    Killed { name: String, pid: u32 },
    Done { message: String },
    Failed { message: String },
}

/// One member, as `faafo cluster status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub name: String,
    pub role: Kind,
    pub pid: Option<u32>,
    pub state: String,
    pub uptime_s: Option<f64>,
    pub restarts: u32,
    pub url: Option<String>,
    pub health: String,
    pub last_exit: Option<String>,
}

/// Where replies go while a request is handled.
pub type Replies = mpsc::UnboundedSender<Reply>;

pub fn progress(replies: &Replies, message: impl Into<String>) {
    let _ = replies.send(Reply::Progress {
        message: message.into(),
    });
}

/// Answers control requests until the listener is dropped.
pub async fn serve(listener: UnixListener, supervisor: Arc<Supervisor>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "control socket accept failed");
                continue;
            }
        };
        tokio::spawn(answer(stream, Arc::clone(&supervisor)));
    }
}

async fn answer(stream: UnixStream, supervisor: Arc<Supervisor>) {
    let (reader, mut writer) = stream.into_split();
    let mut line = String::new();
    let read = BufReader::new(reader.take(MAX_REQUEST_BYTES))
        .read_line(&mut line)
        .await;
    let (replies, mut outgoing) = mpsc::unbounded_channel();
    match read.map_err(|e| e.to_string()).and_then(|_| {
        serde_json::from_str::<Request>(&line).map_err(|e| format!("bad request: {e}"))
    }) {
        Ok(request) => {
            tokio::spawn(async move { supervisor.handle(request, replies).await });
        }
        Err(message) => {
            let _ = replies.send(Reply::Failed { message });
        }
    }
    while let Some(reply) = outgoing.recv().await {
        let mut text = serde_json::to_string(&reply).expect("replies serialize");
        text.push('\n');
        if writer.write_all(text.as_bytes()).await.is_err() {
            // The caller went away; the request still runs to its end.
            break;
        }
    }
}

/// Sends `request` to the supervisor listening on `socket`, passing each progress
/// message to `on_progress`; returns the final reply, or the failure as an error.
pub async fn call(
    socket: &Path,
    request: &Request,
    mut on_progress: impl FnMut(&str),
) -> anyhow::Result<Reply> {
    let stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "no cluster is running here (cannot connect to {}); start one with `faafo cluster up`, \
             or pass the --data-dir it uses",
            socket.display()
        )
    })?;
    let (reader, mut writer) = stream.into_split();
    let mut text = serde_json::to_string(request).expect("requests serialize");
    text.push('\n');
    writer.write_all(text.as_bytes()).await?;
    let mut lines = BufReader::new(reader).lines();
    while let Some(line) = lines.next_line().await? {
        match serde_json::from_str::<Reply>(&line)
            .with_context(|| format!("unexpected answer from the supervisor: {line:?}"))?
        {
            Reply::Progress { message } => on_progress(&message),
            Reply::Failed { message } => bail!("{message}"),
            done => return Ok(done),
        }
    }
    bail!("the supervisor closed the connection without an answer (did it stop?)")
}
