//! One gRPC call as one write: the HTTP/2 client side of both hops (edge -> tunnel, tunnel end -> code server),
//! on the `h2` crate directly.
//!
//! Why not hyper's client: it flushes a request's HEADERS and its DATA in two writes, so every call woke the
//! peer twice; measured with strace, that alone cost the Python code server about 0.15 ms of CPU per call (a
//! quarter more than a direct call) and capped relayed throughput. Here the whole request (headers and its one
//! message, buffered: a gRPC request is one message) is queued before the connection task writes, so it leaves
//! in one segment. The answer streams back untouched, trailers included (`RecvBody`).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::RecvStream;
use http::{Request, Response};
use hyper::body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const KEEPALIVE_EVERY: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// A TCP connection to `address` with TCP_NODELAY (each call is one small write that must leave at once),
/// given up after CONNECT_TIMEOUT.
pub async fn dial(address: &str) -> Result<TcpStream, String> {
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(err)) => Err(format!("cannot connect to {address}: {err}")),
        Err(_) => Err(format!("no answer from {address} within {CONNECT_TIMEOUT:?}")),
    }
}

/// Start an HTTP/2 client connection over `io`; the connection runs in its own task (with keepalive pings when
/// `keepalive`) and the returned handle ends when it does.
pub async fn connect<T>(io: T, keepalive: bool) -> Result<(SendRequest<Bytes>, tokio::task::JoinHandle<Result<(), String>>), String>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, mut connection) = h2::client::Builder::new()
        .initial_window_size(4 << 20)
        .initial_connection_window_size(8 << 20)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|err| format!("HTTP/2 handshake failed: {err}"))?;
    let mut pings = connection.ping_pong();
    let running = tokio::spawn(async move {
        let alive = async {
            let Some(pings) = pings.as_mut().filter(|_| keepalive) else {
                return std::future::pending::<String>().await;
            };
            loop {
                tokio::time::sleep(KEEPALIVE_EVERY).await;
                match tokio::time::timeout(KEEPALIVE_TIMEOUT, pings.ping(h2::Ping::opaque())).await {
                    Ok(Ok(_)) => continue,
                    Ok(Err(err)) => return format!("keepalive ping failed: {err}"),
                    Err(_) => return format!("no answer to a keepalive ping within {KEEPALIVE_TIMEOUT:?}"),
                }
            }
        };
        tokio::select! {
            ended = connection => ended.map_err(|err| err.to_string()),
            reason = alive => Err(reason),
        }
    });
    Ok((sender, running))
}

/// Send `head` with `message` as its whole body, both queued before the connection writes; wait for the answer.
pub async fn call(sender: SendRequest<Bytes>, head: Request<()>, message: Bytes) -> Result<Response<RecvBody>, h2::Error> {
    send(sender.ready().await?, head, message).await
}

async fn send(mut ready: SendRequest<Bytes>, head: Request<()>, message: Bytes) -> Result<Response<RecvBody>, h2::Error> {
    let (answer, mut stream) = ready.send_request(head, message.is_empty())?;
    if !message.is_empty() {
        stream.reserve_capacity(message.len());
        stream.send_data(message, true)?;
    }
    Ok(answer.await?.map(RecvBody::new))
}

/// Connections to plain-HTTP/2 servers on the local network (code servers, the Python relay), one per address,
/// opened on first use and again when one has ended.
#[derive(Default)]
pub struct Pool {
    connections: Mutex<HashMap<String, SendRequest<Bytes>>>,
}

impl Pool {
    /// `call` on `address`'s connection. One that ended before this request was sent (a code server replaced
    /// at the same address) is replaced and the request sent on the new one; once sent, an error is the answer.
    pub async fn call(&self, address: &str, head: Request<()>, message: Bytes) -> Result<Response<RecvBody>, String> {
        let ready = match self.sender(address).await?.ready().await {
            Ok(ready) => ready,
            Err(_) => {
                self.forget(address);
                self.sender(address).await?.ready().await.map_err(|err| err.to_string())?
            }
        };
        send(ready, head, message).await.map_err(|err| {
            if err.is_io() || err.is_go_away() {
                self.forget(address);
            }
            err.to_string()
        })
    }

    /// A sender for `address`: the open connection's, or a new connection's.
    async fn sender(&self, address: &str) -> Result<SendRequest<Bytes>, String> {
        if let Some(sender) = self.connections.lock().unwrap().get(address).cloned() {
            return Ok(sender);
        }
        let (sender, running) = connect(dial(address).await?, false).await?;
        self.connections.lock().unwrap().insert(address.to_owned(), sender.clone());
        drop(running); // the task goes on; a dead connection shows as an error on the next call
        Ok(sender)
    }

    /// Drop `address`'s connection (it failed): the next call opens a new one.
    fn forget(&self, address: &str) {
        self.connections.lock().unwrap().remove(address);
    }
}

/// An h2 response body as an `http_body::Body`: its DATA frames (flow-control capacity given back as they are
/// read), then its trailers, where gRPC puts the call's status.
pub struct RecvBody {
    stream: RecvStream,
    data_done: bool,
}

impl RecvBody {
    fn new(stream: RecvStream) -> Self {
        RecvBody { stream, data_done: false }
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match ready!(this.stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.stream.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(err)) => return Poll::Ready(Some(Err(err))),
                None => this.data_done = true,
            }
        }
        match ready!(this.stream.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(err) => Poll::Ready(Some(Err(err))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }
}
