//! The control plane's end: it serves each location's relay port (what Dagster's webserver and daemon dial)
//! and the tunnel port (what agents dial, egress from their side).
//!
//! A call whose method is in the fast set, for a location one of whose agents holds a tunnel, goes down that
//! tunnel as an HTTP/2 stream and its answer comes back untouched. Every other call, and a fast one when no
//! tunnel serves the location or the tunnel fails before answering, goes to the Python relay for the location
//! (controlplane/relay/server.py), which refuses, scrubs, caches and queues as before. So the method table and
//! every security verdict stay in one place, in Python; this process only chooses the cheaper road for calls
//! Python has already declared plain (relayed, nothing to scrub, nothing to cache).

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response};
use http_body_util::BodyExt;
use bytes::Bytes;
use hyper::body::Incoming;
use h2::client::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;

use crate::control::{self, emit, parse_key, Command, Event};
use crate::grpc::{self, format_timeout, parse_timeout, plan_wait, status_response, Body, Code, Waits};
use crate::h2call;
use crate::noise::{self, KEY_BYTES};

/// Tunnel connections that may be in their handshake at once (each gives up after noise::HANDSHAKE_TIMEOUT).
const MAX_HANDSHAKES: usize = 64;

/// The header that tells the agent which location a tunnelled call is for.
pub const LOCATION_HEADER: &str = "airlock-location";

struct Route {
    location: String,
    deployment: String,
    queue: String,
    fallback: String,
}

struct Listener {
    route: Arc<Route>,
    task: AbortHandle,
}

struct Tunnel {
    id: u64,
    sender: SendRequest<Bytes>,
    task: AbortHandle,
}

struct Ticket {
    key: [u8; KEY_BYTES],
    deployment: String,
    queues: Vec<String>,
    tunnel: Option<Tunnel>,
}

pub struct Edge {
    methods: RwLock<HashSet<String>>,
    waits: RwLock<Waits>,
    listeners: Mutex<HashMap<String, Listener>>,
    tickets: Mutex<HashMap<String, Ticket>>,
    next_tunnel: AtomicU64,
    turn: AtomicUsize,
    fallback: h2call::Pool,
    roads: Roads,
    stats_every: RwLock<Duration>,
}

/// How many calls took which road since the last report.
#[derive(Default)]
struct Roads {
    tunnel: AtomicU64,
    python: AtomicU64,
    handed_back: AtomicU64,
}

impl Edge {
    pub fn new() -> Arc<Edge> {
        Arc::new(Edge {
            methods: RwLock::new(HashSet::new()),
            waits: RwLock::new(Waits::default()),
            listeners: Mutex::new(HashMap::new()),
            tickets: Mutex::new(HashMap::new()),
            next_tunnel: AtomicU64::new(1),
            turn: AtomicUsize::new(0),
            fallback: h2call::Pool::default(),
            roads: Roads::default(),
            stats_every: RwLock::new(Duration::from_secs(60)),
        })
    }

    /// Apply one command from the owner (controlplane/relay/fastpath.py).
    pub async fn command(self: &Arc<Self>, command: Command) {
        match command {
            Command::Methods { methods, default_wait, max_wait, no_deadline_above, stats_seconds } => {
                if let Some(seconds) = stats_seconds.filter(|v| v.is_finite() && *v >= 0.0) {
                    *self.stats_every.write().unwrap() = Duration::from_secs_f64(seconds);
                }
                *self.methods.write().unwrap() = methods.into_iter().collect();
                let mut waits = self.waits.write().unwrap();
                let seconds = |value: Option<f64>, current: Duration| {
                    value.filter(|v| v.is_finite() && *v >= 0.0).map(Duration::from_secs_f64).unwrap_or(current)
                };
                waits.default_wait = seconds(default_wait, waits.default_wait);
                waits.max_wait = seconds(max_wait, waits.max_wait);
                waits.no_deadline_above = seconds(no_deadline_above, waits.no_deadline_above);
            }
            Command::Listen { location, address, fallback, deployment, queue } => {
                self.listen(Route { location, deployment, queue, fallback }, address).await;
            }
            Command::Unlisten { address } => {
                if let Some(listener) = self.listeners.lock().unwrap().remove(&address) {
                    listener.task.abort();
                }
            }
            Command::Ticket { channel, key, deployment, queues } => match parse_key(&key) {
                Ok(key) => {
                    let ticket = Ticket { key, deployment, queues, tunnel: None };
                    if let Some(old) = self.tickets.lock().unwrap().insert(channel, ticket) {
                        close(old.tunnel);
                    }
                }
                Err(err) => emit(&Event::Error { error: format!("ticket for channel {channel}: {err}") }),
            },
            Command::Revoke { channel } => {
                if let Some(ticket) = self.tickets.lock().unwrap().remove(&channel) {
                    close(ticket.tunnel);
                }
            }
            other => emit(&Event::Error { error: format!("not an edge command: {other:?}") }),
        }
    }

    /// Serve `address` for the route; the same call again changes nothing, a changed route replaces it.
    async fn listen(self: &Arc<Self>, route: Route, address: String) {
        let unchanged = self.listeners.lock().unwrap().get(&address).is_some_and(|l| {
            l.route.location == route.location
                && l.route.fallback == route.fallback
                && l.route.deployment == route.deployment
                && l.route.queue == route.queue
        });
        if unchanged {
            let port = address.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0);
            return emit(&Event::Listening { address: &address, port });
        }
        let old = self.listeners.lock().unwrap().remove(&address);
        if let Some(old) = old {
            old.task.abort();
            tokio::task::yield_now().await; // let the aborted accept loop drop its socket before rebinding
        }
        let listener = match TcpListener::bind(&address).await {
            Ok(listener) => listener,
            Err(err) => {
                emit(&Event::ListenFailed { address: &address, error: format!("cannot bind {address}: {err}") });
                return;
            }
        };
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let route = Arc::new(route);
        let task = tokio::spawn(self.clone().serve_location(listener, route.clone())).abort_handle();
        self.listeners.lock().unwrap().insert(address.clone(), Listener { route, task });
        emit(&Event::Listening { address: &address, port });
    }

    async fn serve_location(self: Arc<Self>, listener: TcpListener, route: Arc<Route>) {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            let edge = self.clone();
            let route = route.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let edge = edge.clone();
                    let route = route.clone();
                    async move { Ok::<_, Infallible>(edge.relay(&route, request).await) }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    /// One call from the webserver or daemon: down a tunnel if it may and can, to the Python relay otherwise.
    async fn relay(&self, route: &Route, request: Request<Incoming>) -> Response<Body> {
        let (mut parts, body) = request.into_parts();
        let path = parts.uri.path().to_owned();
        let message = match grpc::read_message(body, "airlock relay", &path).await {
            Ok(message) => message,
            Err(refusal) => return refusal,
        };
        let fast = self.methods.read().unwrap().contains(&path);
        let sender = if fast { self.pick_tunnel(route) } else { None };
        let Some(sender) = sender else {
            self.roads.python.fetch_add(1, Ordering::Relaxed);
            return self.to_fallback(route, &parts, message).await;
        };
        self.roads.tunnel.fetch_add(1, Ordering::Relaxed);
        let waits = *self.waits.read().unwrap();
        let (wait, caller_bound) = plan_wait(parse_timeout(&parts.headers), &waits);
        let started = Instant::now();
        if wait.is_zero() {
            return status_response(Code::DeadlineExceeded, &format!("airlock relay: {path} arrived past its deadline"));
        }
        let mut head = Request::post(format!("http://agent{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header(LOCATION_HEADER, HeaderValue::from_str(&route.location).expect("location names are ASCII"))
            .header("grpc-timeout", format_timeout(wait))
            .body(())
            .expect("a valid request");
        for name in ["grpc-encoding", "grpc-accept-encoding"] {
            if let Some(value) = parts.headers.get(name) {
                head.headers_mut().insert(name, value.clone());
            }
        }
        let answer = tokio::time::timeout(wait, h2call::call(sender, head, message.clone())).await;
        match answer {
            Ok(Ok(response)) => response.map(|body| body.map_err(Into::into).boxed()),
            Ok(Err(err)) => {
                // The message is still here: relayed methods are reads or reloads, so the Python road may run it.
                self.roads.handed_back.fetch_add(1, Ordering::Relaxed);
                let left = wait.saturating_sub(started.elapsed());
                control::log(format_args!(
                    "fastpath location={} method={path}: the tunnel failed before the agent answered ({err}); \
                     the Python relay takes the call ({:.1} s left)", route.location, left.as_secs_f64()));
                if caller_bound {
                    parts.headers.insert("grpc-timeout", format_timeout(left));
                }
                self.to_fallback(route, &parts, message).await
            }
            Err(_) if caller_bound => status_response(Code::DeadlineExceeded, &format!(
                "airlock relay: {path} got no answer from the agent for location {:?} within the call's deadline \
                 ({:.1}s)", route.location, wait.as_secs_f64())),
            Err(_) => status_response(Code::Unavailable, &format!(
                "airlock relay: no answer from the agent for location {:?} within {:.1}s ({path}); is the \
                 appliance connected?", route.location, wait.as_secs_f64())),
        }
    }

    /// A tunnel of an agent that serves the location's queue, taking turns among several.
    fn pick_tunnel(&self, route: &Route) -> Option<SendRequest<Bytes>> {
        let tickets = self.tickets.lock().unwrap();
        let live: Vec<&Tunnel> = tickets
            .values()
            .filter(|t| t.deployment == route.deployment && t.queues.contains(&route.queue))
            .filter_map(|t| t.tunnel.as_ref())
            .collect();
        if live.is_empty() {
            return None;
        }
        let turn = self.turn.fetch_add(1, Ordering::Relaxed) % live.len();
        Some(live[turn].sender.clone())
    }

    /// The call as it came (its headers, its message) to the Python relay for the location.
    async fn to_fallback(&self, route: &Route, parts: &http::request::Parts, message: Bytes) -> Response<Body> {
        let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let mut head = match Request::post(format!("http://{}{path}", route.fallback)).body(()) {
            Ok(head) => head,
            Err(err) => return status_response(Code::Internal, &format!("airlock relay: bad fallback address: {err}")),
        };
        *head.headers_mut() = parts.headers.clone();
        match self.fallback.call(&route.fallback, head, message).await {
            Ok(response) => response.map(|body| body.map_err(Into::into).boxed()),
            Err(err) => status_response(Code::Unavailable, &format!(
                "airlock relay: the control plane's relay for location {:?} is not answering: {err}", route.location)),
        }
    }

    /// Accept agents' tunnels until the process ends. The port is open to anyone who can reach the gateway, so
    /// connections still in their handshake are capped: a flood of idle ones cannot starve real agents for long.
    pub async fn accept_tunnels(self: Arc<Self>, listener: TcpListener) {
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        loop {
            let Ok((stream, peer)) = listener.accept().await else { continue };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                decision(peer, "-", &format!("{MAX_HANDSHAKES} tunnel handshakes already in progress"));
                continue; // dropping the stream closes it
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(self.clone().open_tunnel(stream, peer, permit));
        }
    }

    async fn open_tunnel(self: Arc<Self>, mut stream: TcpStream, peer: SocketAddr, permit: OwnedSemaphorePermit) {
        let channel = match noise::read_channel_id(&mut stream).await {
            Ok(channel) => channel,
            Err(err) => return decision(peer, "-", &err.to_string()),
        };
        let key = self.tickets.lock().unwrap().get(&channel).map(|t| t.key);
        let Some(key) = key else {
            return decision(peer, &channel, "no open work channel has that id (closed, or never opened here)");
        };
        let stream = match noise::respond(stream, &channel, &key).await {
            Ok(stream) => stream,
            Err(err) => return decision(peer, &channel, &err.to_string()),
        };
        let (sender, running) = match h2call::connect(stream, true).await {
            Ok(pair) => pair,
            Err(err) => return decision(peer, &channel, &err),
        };
        drop(permit);
        let id = self.next_tunnel.fetch_add(1, Ordering::Relaxed);
        let tunnel = Tunnel { id, sender, task: running.abort_handle() };
        {
            let mut tickets = self.tickets.lock().unwrap();
            let Some(ticket) = tickets.get_mut(&channel) else {
                running.abort(); // revoked during the handshake
                return;
            };
            close(ticket.tunnel.replace(tunnel));
        }
        control::log(format_args!("FASTPATH-DECISION peer={peer} channel={channel} decision=accept"));
        emit(&Event::TunnelUp { channel: &channel });
        let reason = match running.await {
            Ok(Ok(())) => "closed".to_owned(),
            Ok(Err(err)) => err,
            Err(_) => "closed by the control plane (channel revoked or replaced)".to_owned(),
        };
        if let Some(ticket) = self.tickets.lock().unwrap().get_mut(&channel) {
            if ticket.tunnel.as_ref().is_some_and(|t| t.id == id) {
                ticket.tunnel = None;
            }
        }
        emit(&Event::TunnelDown { channel: &channel, reason });
    }
}

/// Report the roads' counts now and then, when there is something to report.
async fn report_roads(edge: Arc<Edge>) {
    let mut last = Instant::now();
    loop {
        let every = *edge.stats_every.read().unwrap();
        // At most a second asleep, so a new period (the owner's `methods` command) applies at once.
        tokio::time::sleep(if every.is_zero() { Duration::from_secs(1) } else { every.min(Duration::from_secs(1)) })
            .await;
        if every.is_zero() || last.elapsed() < every {
            continue;
        }
        let tunnel = edge.roads.tunnel.swap(0, Ordering::Relaxed);
        let python = edge.roads.python.swap(0, Ordering::Relaxed);
        let handed_back = edge.roads.handed_back.swap(0, Ordering::Relaxed);
        if tunnel + python + handed_back > 0 {
            emit(&Event::Stats { seconds: last.elapsed().as_secs_f64(), tunnel, python, handed_back });
        }
        last = Instant::now();
    }
}

fn close(tunnel: Option<Tunnel>) {
    if let Some(tunnel) = tunnel {
        tunnel.task.abort();
    }
}

/// One structured line per refused tunnel (STYLE rule 6): who, which channel, why.
fn decision(peer: SocketAddr, channel: &str, reason: &str) {
    control::log(format_args!("FASTPATH-DECISION peer={peer} channel={channel} decision=refuse reason={reason:?}"));
}

/// `airlock-fastpath edge --tunnel-listen ADDR`: serve until the owner closes stdin.
pub async fn run(tunnel_address: &str) -> Result<(), String> {
    let edge = Edge::new();
    let listener = TcpListener::bind(tunnel_address)
        .await
        .map_err(|err| format!("cannot bind the tunnel port {tunnel_address}: {err}"))?;
    let port = listener.local_addr().map(|a| a.port()).ok();
    tokio::spawn(edge.clone().accept_tunnels(listener));
    tokio::spawn(report_roads(edge.clone()));
    emit(&Event::Ready { tunnel_port: port });
    let mut commands = control::spawn_reader();
    while let Some(command) = commands.recv().await {
        edge.command(command).await;
    }
    Ok(())
}
