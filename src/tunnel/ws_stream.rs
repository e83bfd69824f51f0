//! A WebSocket seen as a byte stream, from the client's side (the agent and the proxy both dial
//! the relay): the payloads of the relay's data frames in, our writes out as masked binary
//! frames. This is the seam that lets HTTP/1.1, HTTP/2 and upgraded protocols run over a
//! rendezvous unchanged.
//!
//! Framed here rather than by tungstenite because a byte stream needs no messages: a payload
//! is read from TLS straight into the caller's buffer, and a write is masked straight into the
//! buffer that goes to TLS. Through tungstenite each byte was copied twice more on the way
//! (into a message, then out of it). Fragments are simply more bytes; pings are answered; a
//! close is answered and reads as the end of the stream.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::frame::{
    apply_mask, header_len, parse_header, push_client_header, FrameError, Opcode, Sequence,
    MAX_CONTROL_PAYLOAD, MAX_HEADER,
};

/// Largest message we send. Writes are split at this size so a peer with modest frame limits
/// (a real Azure Relay, a corporate proxy) accepts every frame, and each frame stays cheap.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Frames waiting to be written, at most (a little more: the frame being added): past this a
/// write first waits for the relay to take what is queued. Answers to pings beyond it are
/// skipped (RFC 6455 5.5.3 lets a pong answer only the latest ping), so a peer that pings
/// without reading cannot grow it.
const MAX_QUEUED: usize = 2 * MAX_MESSAGE;

/// Close code sent on shutdown: a normal closure (RFC 6455 7.4.1).
const NORMAL_CLOSURE: u16 = 1000;

pub struct WsStream<S> {
    io: S,
    /// What the relay sent behind its handshake answer; read before `io`.
    read_ahead: Vec<u8>,
    read_ahead_at: usize,
    read: Read,
    sequence: Sequence,
    /// Frames to write (headers and masked payloads), `written` bytes of them done.
    queued: Vec<u8>,
    written: usize,
    /// A close frame is queued (ours, or the answer to the relay's): nothing follows it.
    closing: bool,
}

/// Where the reader is in the relay's frames.
enum Read {
    /// `have` bytes of a frame header in `buf`.
    Header { buf: [u8; MAX_HEADER], have: usize },
    /// `left` bytes of a data frame's payload still to hand out.
    Data { left: u64 },
    /// A control frame's payload: `have` of `len` bytes in `buf`.
    Control {
        opcode: Opcode,
        buf: [u8; MAX_CONTROL_PAYLOAD],
        len: usize,
        have: usize,
    },
    /// The relay closed the WebSocket.
    Done,
}

impl Read {
    fn header() -> Read {
        Read::Header {
            buf: [0; MAX_HEADER],
            have: 0,
        }
    }
}

impl<S> WsStream<S> {
    /// A stream over `io` once the upgrade is done, `read_ahead` being the bytes the relay sent
    /// right behind its answer.
    pub fn new(io: S, read_ahead: Vec<u8>) -> Self {
        WsStream {
            io,
            read_ahead,
            read_ahead_at: 0,
            read: Read::header(),
            sequence: Sequence::default(),
            queued: Vec::new(),
            written: 0,
            closing: false,
        }
    }

    /// Queues a final frame of `len` bytes, `parts` in order, masked with a fresh key.
    fn queue<'a>(&mut self, opcode: Opcode, len: usize, parts: impl Iterator<Item = &'a [u8]>) {
        let key: [u8; 4] = rand::random();
        push_client_header(&mut self.queued, opcode, len as u64, key);
        let start = self.queued.len();
        for part in parts {
            self.queued.extend_from_slice(part);
        }
        apply_mask(&mut self.queued[start..], key, 0);
    }

    fn pending(&self) -> usize {
        self.queued.len() - self.written
    }
}

fn protocol_error(e: FrameError) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the relay broke the WebSocket protocol: {e}"),
    )
}

fn cut_off() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the relay's connection ended without a WebSocket close",
    )
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    /// Reads from what came with the handshake, then from `io`.
    fn poll_read_raw(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let ahead = &self.read_ahead[self.read_ahead_at..];
        if !ahead.is_empty() {
            let n = ahead.len().min(buf.remaining());
            buf.put_slice(&ahead[..n]);
            self.read_ahead_at += n;
            if self.read_ahead_at == self.read_ahead.len() {
                self.read_ahead = Vec::new();
                self.read_ahead_at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }

    /// Fills `into[*have..]` from the stream; an error if it ends first.
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        into: &mut [u8],
        have: &mut usize,
    ) -> Poll<io::Result<()>> {
        while *have < into.len() {
            let mut buf = ReadBuf::new(&mut into[*have..]);
            ready!(self.poll_read_raw(cx, &mut buf))?;
            if buf.filled().is_empty() {
                return Poll::Ready(Err(cut_off()));
            }
            *have += buf.filled().len();
        }
        Poll::Ready(Ok(()))
    }

    /// Writes queued frames to `io` until none is left.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.queued.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.queued[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.queued.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Answers a control frame from the relay.
    fn control(&mut self, cx: &mut Context<'_>, opcode: Opcode, payload: &[u8]) {
        match opcode {
            Opcode::Ping if !self.closing && self.pending() < MAX_QUEUED => {
                self.queue(Opcode::Pong, payload.len(), std::iter::once(payload));
            }
            Opcode::Close => {
                if !self.closing {
                    // The usual answer echoes the relay's code (RFC 6455 5.5.1).
                    let code = payload.get(..2).unwrap_or_default();
                    self.queue(Opcode::Close, code.len(), std::iter::once(code));
                    self.closing = true;
                }
                self.read = Read::Done;
            }
            _ => return,
        }
        // Sent now if the connection takes it; otherwise with the next write or read.
        if let Poll::Ready(Err(e)) = self.poll_drain(cx) {
            tracing::debug!(error = %e, "could not answer the relay's control frame");
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match this.read {
                Read::Done => return Poll::Ready(Ok(())),
                Read::Data { left: 0 } => this.read = Read::header(),
                Read::Data { left } => {
                    let want = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(buf.remaining());
                    if want == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    // Straight from TLS into the caller's buffer.
                    let mut part = ReadBuf::new(buf.initialize_unfilled_to(want));
                    ready!(this.poll_read_raw(cx, &mut part))?;
                    let n = part.filled().len();
                    if n == 0 {
                        return Poll::Ready(Err(cut_off()));
                    }
                    buf.advance(n);
                    this.read = Read::Data {
                        left: left - n as u64,
                    };
                    return Poll::Ready(Ok(()));
                }
                Read::Header {
                    buf: mut header,
                    mut have,
                } => {
                    // The first two bytes say how long the rest of the header is.
                    let first = this.poll_fill(cx, &mut header[..2], &mut have);
                    this.read = Read::Header { buf: header, have };
                    ready!(first)?;
                    let need = header_len([header[0], header[1]]);
                    let rest = this.poll_fill(cx, &mut header[..need], &mut have);
                    this.read = Read::Header { buf: header, have };
                    ready!(rest)?;
                    let (parsed, _) = parse_header(&header[..need])
                        .map_err(protocol_error)?
                        .ok_or_else(|| protocol_error(FrameError::LengthTopBit))?;
                    this.sequence
                        .check_from_server(&parsed)
                        .map_err(protocol_error)?;
                    this.read = if parsed.opcode.is_control() {
                        Read::Control {
                            opcode: parsed.opcode,
                            buf: [0; MAX_CONTROL_PAYLOAD],
                            // parse_header refuses control frames over 125 bytes.
                            len: parsed.len as usize,
                            have: 0,
                        }
                    } else {
                        Read::Data { left: parsed.len }
                    };
                }
                Read::Control {
                    opcode,
                    buf: mut payload,
                    len,
                    mut have,
                } => {
                    let filled = this.poll_fill(cx, &mut payload[..len], &mut have);
                    this.read = Read::Control {
                        opcode,
                        buf: payload,
                        len,
                        have,
                    };
                    ready!(filled)?;
                    this.read = Read::header();
                    this.control(cx, opcode, &payload[..len]);
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    /// One binary frame of as much of `bufs` as fits in [`MAX_MESSAGE`]: HTTP/2's frame header
    /// and its payload travel as one WebSocket frame.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.closing {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let n = bufs.iter().map(|b| b.len()).sum::<usize>().min(MAX_MESSAGE);
        if n == 0 {
            return Poll::Ready(Ok(0));
        }
        if this.pending() >= MAX_QUEUED - MAX_MESSAGE {
            ready!(this.poll_drain(cx))?;
        }
        let mut left = n;
        let parts = bufs.iter().map(|b| {
            let take = b.len().min(left);
            left -= take;
            &b[..take]
        });
        this.queue(Opcode::Binary, n, parts);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Sends a close frame (once) and everything before it. The connection itself closes when
    /// the stream is dropped, as the relay forwards the close.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.closing {
            let code = NORMAL_CLOSURE.to_be_bytes();
            self.queue(Opcode::Close, code.len(), std::iter::once(&code[..]));
            self.closing = true;
        }
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::WebSocketStream;

    /// Our client stream and a tungstenite server on the other end of an in-memory pipe.
    async fn pair() -> (WsStream<DuplexStream>, WebSocketStream<DuplexStream>) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let server = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        (WsStream::new(a, Vec::new()), server)
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_large_writes_are_split() {
        let (mut client, mut server) = pair().await;
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let expected = big.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&big).await.unwrap();
            client.flush().await.unwrap();
            let mut reply = vec![0u8; 70_000];
            client.read_exact(&mut reply).await.unwrap();
            client.shutdown().await.unwrap();
            reply
        });
        let mut got = Vec::new();
        while got.len() < expected.len() {
            match server.next().await.unwrap().unwrap() {
                Message::Binary(data) => {
                    assert!(data.len() <= MAX_MESSAGE, "a {}-byte message", data.len());
                    got.extend_from_slice(&data);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, expected);
        // The reply comes as a text frame, then in fragments: all of it is stream bytes.
        let reply: Vec<u8> = (0..70_000u32).map(|i| (i % 13) as u8).collect();
        server.send(Message::text("ab")).await.unwrap();
        server
            .send(Message::Frame(
                tokio_tungstenite::tungstenite::protocol::frame::Frame::message(
                    reply[2..30_000].to_vec(),
                    tokio_tungstenite::tungstenite::protocol::frame::coding::OpCode::Data(
                        tokio_tungstenite::tungstenite::protocol::frame::coding::Data::Binary,
                    ),
                    false,
                ),
            ))
            .await
            .unwrap();
        server
            .send(Message::Frame(
                tokio_tungstenite::tungstenite::protocol::frame::Frame::message(
                    reply[30_000..].to_vec(),
                    tokio_tungstenite::tungstenite::protocol::frame::coding::OpCode::Data(
                        tokio_tungstenite::tungstenite::protocol::frame::coding::Data::Continue,
                    ),
                    true,
                ),
            ))
            .await
            .unwrap();
        let mut expected_reply = reply.clone();
        expected_reply[..2].copy_from_slice(b"ab");
        assert_eq!(writer.await.unwrap(), expected_reply);
        // The client's shutdown is a normal close.
        match server.next().await.unwrap().unwrap() {
            Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Normal),
            other => panic!("expected a close, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn vectored_writes_make_one_frame_and_pings_are_answered() {
        let (mut client, mut server) = pair().await;
        let (head, body) = ([9u8; 9], [7u8; 1000]);
        let n = client
            .write_vectored(&[IoSlice::new(&head), IoSlice::new(&body)])
            .await
            .unwrap();
        assert_eq!(n, 1009);
        client.flush().await.unwrap();
        match server.next().await.unwrap().unwrap() {
            Message::Binary(data) => assert_eq!(&data[..], [&head[..], &body[..]].concat()),
            other => panic!("unexpected {other:?}"),
        }
        // A ping between two data frames: answered while the client reads, and the bytes
        // around it arrive in order.
        server.send(Message::binary(&b"one"[..])).await.unwrap();
        server
            .send(Message::Ping("are you there".into()))
            .await
            .unwrap();
        server.send(Message::binary(&b"two"[..])).await.unwrap();
        let mut got = [0u8; 6];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"onetwo");
        match server.next().await.unwrap().unwrap() {
            Message::Pong(p) => assert_eq!(&p[..], b"are you there"),
            other => panic!("expected the pong, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_relays_close_is_answered_and_reads_as_the_end() {
        let (mut client, mut server) = pair().await;
        server.send(Message::binary(&b"last"[..])).await.unwrap();
        server
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Away,
                reason: "bye".into(),
            })))
            .await
            .unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"last");
        // Our answer echoes the code; writing after it is refused.
        match server.next().await.unwrap().unwrap() {
            Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Away),
            other => panic!("expected the close answer, got {other:?}"),
        }
        let refused = client.write_all(b"more").await.unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::BrokenPipe);
    }

    #[tokio::test]
    async fn read_ahead_comes_first_and_a_cut_or_masked_stream_is_an_error() {
        // A frame split between the handshake's leftovers and the connection.
        let (a, mut b) = tokio::io::duplex(1024);
        let mut client = WsStream::new(a, vec![0x82, 0x05, b'h', b'e']);
        b.write_all(b"llo").await.unwrap();
        let mut got = [0u8; 5];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        // Cut in the middle of a frame.
        b.write_all(&[0x82, 0x05, b'x']).await.unwrap();
        drop(b);
        let mut one = [0u8; 1];
        client.read_exact(&mut one).await.unwrap();
        let err = client.read_exact(&mut one).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);

        // Cut between frames, without a close: not a clean end either.
        let (a, b) = tokio::io::duplex(1024);
        let mut client = WsStream::new(a, Vec::new());
        drop(b);
        let err = client.read(&mut one).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);

        // A server must not mask (RFC 6455 5.1).
        let (a, mut b) = tokio::io::duplex(1024);
        let mut client = WsStream::new(a, Vec::new());
        b.write_all(&[0x82, 0x81, 1, 2, 3, 4, b'x' ^ 1])
            .await
            .unwrap();
        let err = client.read(&mut one).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(
            err.to_string().contains("masked frame from a server"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn pings_without_reading_do_not_grow_the_queue() {
        // The relay pings while never reading what we send: the pipe fills, answers stop
        // being queued past the bound, and reading goes on.
        let (a, mut b) = tokio::io::duplex(64);
        let mut client = WsStream::new(a, Vec::new());
        let ping = [0x89u8, 125]
            .into_iter()
            .chain([0u8; 125])
            .collect::<Vec<u8>>();
        let pings = 5_000;
        let feeder = tokio::spawn(async move {
            for _ in 0..pings {
                b.write_all(&ping).await.unwrap();
            }
            b.write_all(&[0x82, 0x01, b'!']).await.unwrap();
            b
        });
        let mut got = [0u8; 1];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"!");
        assert!(
            client.pending() <= MAX_QUEUED + MAX_HEADER + MAX_CONTROL_PAYLOAD,
            "{} bytes queued",
            client.pending()
        );
        drop(feeder.await.unwrap());
    }
}
