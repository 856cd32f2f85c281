//! How the Python process that owns this one drives it: JSON commands, one per line, on stdin; JSON events, one
//! per line, on stdout; log lines on stderr. Python stays the source of truth (which locations, which methods,
//! which keys); this process only moves bytes. When stdin closes, its owner is gone and it exits.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use crate::noise::KEY_BYTES;

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Edge: the relayed methods that may take the tunnel (the rest go to the Python relay), and its waits.
    /// Agent: the methods it will forward to a code server (everything else is refused).
    Methods {
        methods: Vec<String>,
        #[serde(default)]
        default_wait: Option<f64>,
        #[serde(default)]
        max_wait: Option<f64>,
        #[serde(default)]
        no_deadline_above: Option<f64>,
        /// Edge: how often to report how many calls took which road (only when some did); 0 = never.
        #[serde(default)]
        stats_seconds: Option<f64>,
    },
    /// Edge: serve a location's relay port (`address`, which also names the listener); `fallback` is the
    /// Python relay for that location.
    Listen { location: String, address: String, fallback: String, deployment: String, queue: String },
    /// Edge: stop serving the listener at `address`.
    Unlisten { address: String },
    /// Edge: a work channel opened; an agent may open a tunnel with its key and serve these queues.
    Ticket { channel: String, key: String, deployment: String, queues: Vec<String> },
    /// Edge: that channel closed; its tunnel closes too.
    Revoke { channel: String },
    /// Agent: open (and keep open) the tunnel for this channel at the edge's address.
    Connect { channel: String, key: String, address: String },
    /// Agent: close the tunnel.
    Disconnect {},
    /// Agent: which code server serves which location on this appliance (the whole map each time).
    Servers { servers: HashMap<String, String> },
}

#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event<'a> {
    Ready { tunnel_port: Option<u16> },
    Listening { address: &'a str, port: u16 },
    ListenFailed { address: &'a str, error: String },
    TunnelUp { channel: &'a str },
    TunnelDown { channel: &'a str, reason: String },
    /// Calls since the last report: down a tunnel, to the Python relay, and to it after a tunnel failed.
    Stats { seconds: f64, tunnel: u64, python: u64, handed_back: u64 },
    Error { error: String },
}

pub fn emit(event: &Event<'_>) {
    // One line per event and flushed at once: the owner reads them as they come.
    use std::io::Write;
    let line = serde_json::to_string(event).expect("events serialize");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

pub fn log(line: std::fmt::Arguments<'_>) {
    eprintln!("{line}");
}

/// A 32-byte key from its 64 hex digits.
pub fn parse_key(hex: &str) -> Result<[u8; KEY_BYTES], String> {
    if hex.len() != KEY_BYTES * 2 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("a key is {} hex digits", KEY_BYTES * 2));
    }
    let mut key = [0u8; KEY_BYTES];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("checked hex");
    }
    Ok(key)
}

/// Read commands from stdin until it closes; a line that does not parse is reported and skipped.
pub fn spawn_reader() -> mpsc::UnboundedReceiver<Command> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Command>(&line) {
                Ok(command) => {
                    if tx.send(command).is_err() {
                        break;
                    }
                }
                Err(err) => emit(&Event::Error { error: format!("bad command: {err}") }),
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_and_unknown_fields_are_refused() {
        let c: Command = serde_json::from_str(r#"{"op":"revoke","channel":"c1"}"#).unwrap();
        assert!(matches!(c, Command::Revoke { channel } if channel == "c1"));
        assert!(serde_json::from_str::<Command>(r#"{"op":"revoke","channel":"c1","x":1}"#).is_err());
        assert!(serde_json::from_str::<Command>(r#"{"op":"launch"}"#).is_err());
    }

    #[test]
    fn keys_are_exactly_64_hex_digits() {
        assert_eq!(parse_key(&"ab".repeat(32)).unwrap(), [0xab; 32]);
        assert!(parse_key(&"ab".repeat(31)).is_err());
        assert!(parse_key(&"zz".repeat(32)).is_err());
    }
}
