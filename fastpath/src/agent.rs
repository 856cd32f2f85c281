//! The appliance's end: it dials the edge (egress only, like every other connection the appliance makes),
//! proves it holds its work channel's fast-path key, and then serves HTTP/2 inside the tunnel, the edge being
//! the client. Each tunnelled call names its location; the agent forwards it to that location's code server on
//! this appliance and streams the answer back.
//!
//! Defence in depth, as in appliance/agent/grpc_replay.py: only methods its owner listed are forwarded (never
//! StartRun, ShutdownServer or CancelExecution), and only to the code servers its owner listed, by location:
//! the control plane cannot name an address.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::watch;

use crate::control::{self, emit, parse_key, Command, Event};
use crate::edge::LOCATION_HEADER;
use crate::grpc::{self, status_response, Body, Code};
use crate::h2call;
use crate::noise::{self, KEY_BYTES};

const MAX_BACKOFF: Duration = Duration::from_secs(5);
const FORWARDED_HEADERS: [&str; 5] = ["content-type", "te", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding"];

#[derive(Clone, PartialEq, Eq)]
struct Target {
    channel: String,
    key: [u8; KEY_BYTES],
    address: String,
}

pub struct Agent {
    methods: RwLock<HashSet<String>>,
    servers: RwLock<HashMap<String, String>>,
    code_servers: h2call::Pool,
}

impl Agent {
    pub fn new() -> Arc<Agent> {
        Arc::new(Agent { methods: RwLock::default(), servers: RwLock::default(), code_servers: h2call::Pool::default() })
    }

    /// One tunnelled call: check it, forward it to the location's code server, stream the answer back.
    async fn forward(&self, request: Request<Incoming>) -> Response<Body> {
        let path = request.uri().path().to_owned();
        let location = request.headers().get(LOCATION_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        if !self.methods.read().unwrap().contains(&path) {
            control::log(format_args!(
                "FASTPATH-DECISION location={location} method={path} decision=refuse reason=\"not a fast-path method\""));
            return status_response(Code::PermissionDenied,
                &format!("airlock agent refuses {path}: not a method the fast path relays"));
        }
        let server = self.servers.read().unwrap().get(&location).cloned();
        let Some(server) = server else {
            return status_response(Code::Unavailable, &format!(
                "location {location:?} has no code server on this appliance (not desired here, or still starting)"));
        };
        let (parts, body) = request.into_parts();
        let message = match grpc::read_message(body, "airlock agent", &path).await {
            Ok(message) => message,
            Err(refusal) => return refusal,
        };
        let mut head = match Request::post(format!("http://{server}{path}")).body(()) {
            Ok(head) => head,
            Err(err) => return status_response(Code::Internal, &format!("airlock agent: bad address {server}: {err}")),
        };
        for name in FORWARDED_HEADERS {
            if let Some(value) = parts.headers.get(name) {
                head.headers_mut().insert(name, value.clone());
            }
        }
        match self.code_servers.call(&server, head, message).await {
            Ok(response) => response.map(|body| body.map_err(Into::into).boxed()),
            Err(err) => status_response(Code::Unavailable, &format!(
                "airlock agent: the code server for location {location:?} at {server} is not answering: {err}")),
        }
    }

    /// Keep the tunnel of the current target open, redialling with backoff, until the owner says otherwise.
    async fn hold_tunnel(self: Arc<Self>, mut targets: watch::Receiver<Option<Target>>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let target = targets.borrow_and_update().clone();
            let Some(target) = target else {
                if targets.changed().await.is_err() {
                    return;
                }
                continue;
            };
            let opened = Instant::now();
            let reason = tokio::select! {
                reason = self.serve_tunnel(&target) => reason,
                changed = targets.changed() => {
                    if changed.is_err() { return; }
                    "the owner closed or replaced it".to_owned()
                }
            };
            emit(&Event::TunnelDown { channel: &target.channel, reason });
            if opened.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
            }
            let pause = backoff + jitter(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                changed = targets.changed() => if changed.is_err() { return; },
            }
        }
    }

    /// Dial, authenticate, serve; returns why the tunnel ended.
    async fn serve_tunnel(self: &Arc<Self>, target: &Target) -> String {
        let stream = match h2call::dial(&target.address).await {
            Ok(stream) => stream,
            Err(err) => return format!("cannot reach the edge: {err}"),
        };
        let stream = match noise::initiate(stream, &target.channel, &target.key).await {
            Ok(stream) => stream,
            Err(err) => return format!("tunnel handshake: {err}"),
        };
        emit(&Event::TunnelUp { channel: &target.channel });
        let agent = self.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let agent = agent.clone();
            async move { Ok::<_, Infallible>(agent.forward(request).await) }
        });
        let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(256)
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(8 << 20)
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .serve_connection(TokioIo::new(stream), service)
            .await;
        match served {
            Ok(()) => "the edge closed it".to_owned(),
            Err(err) => err.to_string(),
        }
    }
}

/// Up to half of `base`, different on every call: agents that lost the same edge do not redial in step.
fn jitter(base: Duration) -> Duration {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(Instant::now().elapsed().as_nanos());
    base.mul_f64((hasher.finish() % 1000) as f64 / 2000.0)
}

/// `airlock-fastpath agent`: serve until the owner closes stdin.
pub async fn run() -> Result<(), String> {
    let agent = Agent::new();
    let (targets, watched) = watch::channel(None);
    tokio::spawn(agent.clone().hold_tunnel(watched));
    emit(&Event::Ready { tunnel_port: None });
    let mut commands = control::spawn_reader();
    while let Some(command) = commands.recv().await {
        match command {
            Command::Methods { methods, .. } => *agent.methods.write().unwrap() = methods.into_iter().collect(),
            Command::Servers { servers } => *agent.servers.write().unwrap() = servers,
            Command::Connect { channel, key, address } => match parse_key(&key) {
                Ok(key) => {
                    targets.send_if_modified(|current| {
                        let target = Some(Target { channel: channel.clone(), key, address: address.clone() });
                        let changed = *current != target;
                        *current = target;
                        changed
                    });
                }
                Err(err) => emit(&Event::Error { error: format!("connect {channel}: {err}") }),
            },
            Command::Disconnect {} => {
                targets.send_replace(None);
            }
            other => emit(&Event::Error { error: format!("not an agent command: {other:?}") }),
        }
    }
    Ok(())
}
