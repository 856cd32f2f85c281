//! The tunnel's transport: TCP carrying Noise `NNpsk0` (ChaCha20-Poly1305, BLAKE2s), the pattern's pre-shared
//! key being the fast-path key both ends derived from their work channel's handshake (protocol/channel.py).
//!
//! Why Noise and not TLS: the key that authenticates the tunnel already exists at both ends, established by the
//! channel's Ed25519-signed X25519 exchange, so a PSK pattern authenticates both sides with nothing new to pin
//! and no certificate to trust; a TLS-terminating proxy on the way cannot read, forge, replay, drop or reorder a
//! byte. Each message is an AEAD under a per-direction counter nonce: the first bad one is an error and the
//! connection ends.
//!
//! Wire: the agent opens with `MAGIC`, a one-byte length and the channel id (in clear: it names the key, it is
//! not secret), then the two handshake messages and the transport messages, each as a big-endian u16 length
//! followed by that many bytes. The channel id is also the handshake's prologue, so a swapped id fails.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

pub const PATTERN: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
pub const MAGIC: &[u8] = b"AIRLOCK-FASTPATH/1\n";
pub const KEY_BYTES: usize = 32;
const MAX_MESSAGE: usize = 65_535;
const TAG: usize = 16;
const MAX_PLAIN: usize = MAX_MESSAGE - TAG;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Ciphertext this side holds before it makes the writer wait for the socket.
const WRITE_HIGH_WATER: usize = 256 * 1024;

fn prologue(channel: &str) -> Vec<u8> {
    [MAGIC, channel.as_bytes()].concat()
}

/// The handshake state of one side, bound to the channel (prologue) and its key (the pattern's PSK).
fn handshake_state(channel: &str, key: &[u8; KEY_BYTES], initiator: bool) -> io::Result<snow::HandshakeState> {
    let prologue = prologue(channel);
    let builder = snow::Builder::new(PATTERN.parse().expect("valid pattern")).prologue(&prologue).psk(0, key);
    let state = if initiator { builder.build_initiator() } else { builder.build_responder() };
    state.map_err(|e| noise_error("noise setup", e))
}

/// Run one side's handshake (`exchange`) under the handshake timeout and turn it into the encrypted stream.
async fn finish<T, F>(exchange: F) -> io::Result<NoiseStream<T>>
where
    F: std::future::Future<Output = io::Result<(T, snow::HandshakeState)>>,
{
    let (io, state) = tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "tunnel handshake timed out"))??;
    let transport = state.into_transport_mode().map_err(|e| noise_error("handshake", e))?;
    Ok(NoiseStream::new(io, transport))
}

fn noise_error(what: &str, err: snow::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {err}"))
}

async fn write_message<T: AsyncWrite + Unpin>(io: &mut T, message: &[u8]) -> io::Result<()> {
    let len = u16::try_from(message.len()).map_err(|_| io::Error::other("noise message over 65535 bytes"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(message).await?;
    io.flush().await
}

async fn read_message<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<Vec<u8>> {
    let len = io.read_u16().await? as usize;
    let mut message = vec![0u8; len];
    io.read_exact(&mut message).await?;
    Ok(message)
}

/// The agent's side: name the channel, run the handshake, return the encrypted stream.
pub async fn initiate<T: AsyncRead + AsyncWrite + Unpin>(
    mut io: T,
    channel: &str,
    key: &[u8; KEY_BYTES],
) -> io::Result<NoiseStream<T>> {
    let id = channel.as_bytes();
    let id_len = u8::try_from(id.len()).map_err(|_| io::Error::other("channel id over 255 bytes"))?;
    let mut state = handshake_state(channel, key, true)?;
    finish(async move {
        let mut buf = vec![0u8; MAX_MESSAGE];
        io.write_all(&[MAGIC, &[id_len], id].concat()).await?;
        let n = state.write_message(&[], &mut buf).map_err(|e| noise_error("handshake", e))?;
        write_message(&mut io, &buf[..n]).await?;
        let reply = read_message(&mut io).await?;
        state
            .read_message(&reply, &mut buf)
            .map_err(|e| noise_error("the edge's handshake reply does not authenticate (wrong key?)", e))?;
        Ok((io, state))
    })
    .await
}

/// The first thing the edge reads from a new connection: which channel's key the agent claims to hold.
pub async fn read_channel_id<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<String> {
    let run = async {
        let mut magic = [0u8; MAGIC.len()];
        io.read_exact(&mut magic).await?;
        if magic != MAGIC {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "not an airlock fast-path tunnel"));
        }
        let len = io.read_u8().await? as usize;
        let mut id = vec![0u8; len];
        io.read_exact(&mut id).await?;
        String::from_utf8(id).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "channel id is not UTF-8"))
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, run)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "tunnel preamble timed out"))?
}

/// The edge's side, after `read_channel_id` found the key: finish the handshake.
pub async fn respond<T: AsyncRead + AsyncWrite + Unpin>(
    mut io: T,
    channel: &str,
    key: &[u8; KEY_BYTES],
) -> io::Result<NoiseStream<T>> {
    let mut state = handshake_state(channel, key, false)?;
    finish(async move {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let hello = read_message(&mut io).await?;
        state
            .read_message(&hello, &mut buf)
            .map_err(|e| noise_error("the agent's handshake does not authenticate (wrong key?)", e))?;
        let n = state.write_message(&[], &mut buf).map_err(|e| noise_error("handshake", e))?;
        write_message(&mut io, &buf[..n]).await?;
        Ok((io, state))
    })
    .await
}

/// A byte stream over Noise transport messages: what hyper's HTTP/2 runs on inside the tunnel.
pub struct NoiseStream<T> {
    io: T,
    transport: snow::TransportState,
    /// Ciphertext read from `io` and not yet decrypted (length prefixes included).
    cipher_in: BytesMut,
    /// Decrypted bytes not yet handed to the reader.
    plain_in: BytesMut,
    /// Sealed messages (length prefixes included) not yet written to `io`.
    cipher_out: BytesMut,
    scratch: Vec<u8>,
}

impl<T> NoiseStream<T> {
    fn new(io: T, transport: snow::TransportState) -> Self {
        NoiseStream {
            io,
            transport,
            cipher_in: BytesMut::with_capacity(2 * MAX_MESSAGE),
            plain_in: BytesMut::new(),
            cipher_out: BytesMut::new(),
            scratch: vec![0u8; MAX_MESSAGE],
        }
    }

    /// Decrypt one whole message from `cipher_in` into `plain_in`; false if a whole one is not there yet.
    fn open_one(&mut self) -> io::Result<bool> {
        if self.cipher_in.len() < 2 {
            return Ok(false);
        }
        let len = u16::from_be_bytes([self.cipher_in[0], self.cipher_in[1]]) as usize;
        if self.cipher_in.len() < 2 + len {
            return Ok(false);
        }
        let n = self
            .transport
            .read_message(&self.cipher_in[2..2 + len], &mut self.scratch)
            .map_err(|e| noise_error("tunnel message failed authentication (altered, replayed or reordered)", e))?;
        self.plain_in.extend_from_slice(&self.scratch[..n]);
        self.cipher_in.advance(2 + len);
        Ok(true)
    }
}

impl<T: AsyncWrite + Unpin> NoiseStream<T> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.cipher_out.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.cipher_out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.cipher_out.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for NoiseStream<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.plain_in.is_empty() {
                let n = this.plain_in.len().min(buf.remaining());
                buf.put_slice(&this.plain_in[..n]);
                this.plain_in.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.open_one()? {
                continue;
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                if this.cipher_in.is_empty() {
                    return Poll::Ready(Ok(())); // clean end of stream
                }
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tunnel ended mid-message")));
            }
            this.cipher_in.extend_from_slice(read.filled());
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for NoiseStream<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.cipher_out.len() >= WRITE_HIGH_WATER {
            ready!(this.poll_drain(cx))?;
        }
        let n = buf.len().min(MAX_PLAIN);
        let sealed = this
            .transport
            .write_message(&buf[..n], &mut this.scratch)
            .map_err(|e| noise_error("tunnel seal", e))?;
        this.cipher_out.extend_from_slice(&(sealed as u16).to_be_bytes());
        this.cipher_out.extend_from_slice(&this.scratch[..sealed]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    const KEY: [u8; KEY_BYTES] = [7u8; KEY_BYTES];

    async fn pair(agent_key: [u8; KEY_BYTES]) -> io::Result<(NoiseStream<tokio::io::DuplexStream>, NoiseStream<tokio::io::DuplexStream>)> {
        let (a, mut b) = duplex(1 << 20);
        let agent = tokio::spawn(async move { initiate(a, "chan-1", &agent_key).await });
        let id = read_channel_id(&mut b).await?;
        assert_eq!(id, "chan-1");
        let edge = respond(b, &id, &KEY).await;
        let agent = agent.await.unwrap();
        let edge = edge?; // the edge judges first; the agent then only sees the connection end
        Ok((agent?, edge))
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_in_order_large_and_small() {
        let (mut agent, mut edge) = pair(KEY).await.unwrap();
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            agent.write_all(&sent).await.unwrap();
            agent.write_all(b"end").await.unwrap();
            agent.flush().await.unwrap();
            agent
        });
        let mut got = vec![0u8; big.len() + 3];
        edge.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..big.len()], &big[..]);
        assert_eq!(&got[big.len()..], b"end");
        let mut agent = writer.await.unwrap();
        edge.write_all(b"pong").await.unwrap();
        edge.flush().await.unwrap();
        let mut pong = [0u8; 4];
        agent.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"pong");
    }

    #[tokio::test]
    async fn a_wrong_key_fails_the_handshake() {
        let err = pair([8u8; KEY_BYTES]).await.err().expect("must fail");
        assert!(err.to_string().contains("does not authenticate"), "{err}");
    }

    #[tokio::test]
    async fn an_altered_byte_fails_the_message_and_nothing_of_it_is_read() {
        // A proxy in the middle flips one ciphertext bit: the reader gets an error, not altered plaintext.
        let (a, b) = duplex(1 << 16);
        let (mut b_read, mut b_write) = tokio::io::split(b);
        let (c, d) = duplex(1 << 16);
        let (mut c_read, mut c_write) = tokio::io::split(c);
        // agent <-> [a|b] relay [c|d] <-> edge; the relay corrupts the 60th byte from agent to edge.
        let upstream = tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            let mut total = 0usize;
            loop {
                let n = b_read.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                for (i, byte) in buf[..n].iter_mut().enumerate() {
                    if total + i == MAGIC.len() + 1 + 6 + 2 + 48 + 2 + 60 {
                        *byte ^= 1;
                    }
                }
                total += n;
                c_write.write_all(&buf[..n]).await.unwrap();
            }
        });
        let downstream = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut c_read, &mut b_write).await;
        });
        let agent = tokio::spawn(async move {
            let mut s = initiate(a, "chan-1", &KEY).await.unwrap();
            s.write_all(&[1u8; 200]).await.unwrap();
            s.flush().await.unwrap();
            s
        });
        let mut d = d;
        let id = read_channel_id(&mut d).await.unwrap();
        let mut edge = respond(d, &id, &KEY).await.unwrap();
        let mut got = [0u8; 200];
        let err = edge.read_exact(&mut got).await.err().expect("must fail");
        assert!(err.to_string().contains("failed authentication"), "{err}");
        drop(agent);
        upstream.abort();
        downstream.abort();
    }

    #[tokio::test]
    async fn a_foreign_protocol_is_refused_at_the_preamble() {
        let (mut a, mut b) = duplex(1024);
        a.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let err = read_channel_id(&mut b).await.err().expect("must fail");
        assert!(err.to_string().contains("not an airlock fast-path tunnel"), "{err}");
    }
}
