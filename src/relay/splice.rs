//! Joining a sender's and a listener's WebSocket, frame by frame, without ever holding a
//! whole message: each frame's header is read and checked ([`crate::tunnel::frame`]), and its payload
//! streams through one fixed buffer per direction (`Limits::splice_buffer`), unmasked in
//! place, to the other side. A 14 MiB message therefore costs the relay its two buffers, not
//! 14 MiB; and nothing is read from one side before the other side took what came before, so
//! back-pressure crosses the relay unchanged.
//!
//! Frames keep their boundaries, their opcodes and FIN: fragmented messages stay fragmented.
//! Pings and pongs are forwarded too, so a keep-alive ping from one end is answered by the
//! other end (not by the relay) and proves the whole path alive. A close is forwarded and ends
//! its direction; the other side then has [`CLOSE_GRACE`] to answer with its own close. A frame
//! that breaks RFC 6455 closes its sender with 1002 and the other side with 1001; relay
//! shutdown closes both with 1001, revocation with 1008.

use std::io;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_util::sync::CancellationToken;

use crate::tunnel::frame::{
    apply_mask, close_code, parse_header, write_close, write_server_header, FrameError, Opcode,
    Sequence, MAX_CONTROL_PAYLOAD, MAX_HEADER, MAX_SERVER_HEADER,
};

/// After one side closes, how long the other may take to finish its own close.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How long the relay's own close frame (and the shutdown after it) may take to go out to a
/// side that no longer reads.
const CLOSE_WRITE: Duration = Duration::from_secs(1);

/// The smallest splice buffer: a whole control frame and its header must fit.
pub const MIN_BUFFER: usize = 4 * 1024;

/// Payload bytes of data frames forwarded each way.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub sender_to_listener: u64,
    pub listener_to_sender: u64,
}

/// How one direction ended.
#[derive(Debug)]
enum End {
    /// Its side sent a close frame, which went on to the other side.
    Closed,
    /// Its side's connection ended or failed without a close; the other side got 1001.
    Gone,
    /// Writing to the other side failed.
    WriteFailed,
    /// Its side broke the protocol.
    Protocol(FrameError),
}

/// Why the relay ended a splice before both sides did.
#[derive(Debug, Clone, Copy)]
enum Stopped {
    Shutdown,
    Revoked,
}

/// Splices `sender` and `listener` (raw upgraded connections whose handshakes the relay
/// answered as the server) until both have closed, either fails, `closing` (relay shutdown:
/// 1001 to both) or `revoked` (1008 "revoked" to both) is cancelled. `buffer` is the size of
/// each direction's buffer, at least [`MIN_BUFFER`]. Payload bytes are also added to
/// `counters` (sender to listener, listener to sender) as they pass, so a long-lived
/// rendezvous shows its traffic while it lasts.
pub async fn splice<S, L>(
    sender: S,
    listener: L,
    buffer: usize,
    (closing, revoked): (CancellationToken, CancellationToken),
    counters: (Counter, Counter),
) -> Counts
where
    S: AsyncRead + AsyncWrite + Send,
    L: AsyncRead + AsyncWrite + Send,
{
    let started = Instant::now();
    let (s_rx, s_tx) = tokio::io::split(sender);
    let (l_rx, l_tx) = tokio::io::split(listener);
    let mut up = Direction::new(s_rx, l_tx, buffer, counters.0);
    let mut down = Direction::new(l_rx, s_tx, buffer, counters.1);

    let stop = async {
        tokio::select! {
            _ = closing.cancelled() => Stopped::Shutdown,
            _ = revoked.cancelled() => Stopped::Revoked,
        }
    };
    tokio::pin!(stop);
    // Which side broke the protocol, if one did (true: the sender).
    let mut offender = None;
    let stopped = 'run: {
        let up_run = up.run();
        let down_run = down.run();
        tokio::pin!(up_run, down_run);
        let (first, sender_first) = tokio::select! {
            end = &mut up_run => (end, true),
            end = &mut down_run => (end, false),
            why = &mut stop => break 'run Some(why),
        };
        if let End::Protocol(e) = first {
            let from = if sender_first { "sender" } else { "listener" };
            tracing::info!(error = %e, from, "rendezvous protocol error");
            offender = Some(sender_first);
            break 'run None;
        }
        let other = async {
            if sender_first {
                down_run.await
            } else {
                up_run.await
            }
        };
        tokio::select! {
            end = tokio::time::timeout(CLOSE_GRACE, other) => {
                if let Ok(End::Protocol(e)) = end {
                    tracing::info!(error = %e, "rendezvous protocol error while closing");
                    offender = Some(!sender_first);
                }
                None
            }
            why = &mut stop => Some(why),
        }
    };
    finish(up, down, stopped, offender, started).await
}

/// Sends the relay's own close frames where a side has not had one yet (and its connection
/// is between frames), shuts both connections down and reports the counts.
async fn finish<S, L>(
    mut up: Direction<ReadHalf<S>, WriteHalf<L>>,
    mut down: Direction<ReadHalf<L>, WriteHalf<S>>,
    stopped: Option<Stopped>,
    offender: Option<bool>,
    started: Instant,
) -> Counts
where
    S: AsyncRead + AsyncWrite + Send,
    L: AsyncRead + AsyncWrite + Send,
{
    // `up` writes to the listener, `down` to the sender.
    let (to_listener, to_sender) = match (stopped, offender) {
        (Some(Stopped::Revoked), _) => (
            (close_code::POLICY, "revoked"),
            (close_code::POLICY, "revoked"),
        ),
        (Some(Stopped::Shutdown), _) => (
            (close_code::GOING_AWAY, "relay shutting down"),
            (close_code::GOING_AWAY, "relay shutting down"),
        ),
        (None, Some(true)) => (
            (close_code::GOING_AWAY, "peer protocol error"),
            (close_code::PROTOCOL_ERROR, "protocol error"),
        ),
        (None, Some(false)) => (
            (close_code::PROTOCOL_ERROR, "protocol error"),
            (close_code::GOING_AWAY, "peer protocol error"),
        ),
        (None, None) => (
            (close_code::GOING_AWAY, "peer went away"),
            (close_code::GOING_AWAY, "peer went away"),
        ),
    };
    tokio::join!(
        up.close_and_shut(to_listener.0, to_listener.1),
        down.close_and_shut(to_sender.0, to_sender.1),
    );
    let counts = Counts {
        sender_to_listener: up.bytes,
        listener_to_sender: down.bytes,
    };
    tracing::debug!(
        bytes.up = counts.sender_to_listener,
        bytes.down = counts.listener_to_sender,
        elapsed_ms = started.elapsed().as_millis() as u64,
        stopped = ?stopped,
        "rendezvous closed"
    );
    counts
}

/// One way through the relay: frames read from one side, written to the other.
struct Direction<R, W> {
    rx: R,
    tx: W,
    /// The first [`MAX_HEADER`] bytes stay free so a frame's outgoing header always fits right
    /// before its payload; bytes read sit in `start..end`.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    sequence: Sequence,
    /// The other side is in the middle of a frame: nothing else may be written to it.
    mid_frame: bool,
    /// Bytes were written since the last flush.
    dirty: bool,
    /// A close frame went to the other side.
    close_sent: bool,
    bytes: u64,
    counter: Counter,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Direction<R, W> {
    fn new(rx: R, tx: W, buffer: usize, counter: Counter) -> Self {
        let len = MAX_HEADER + buffer.max(MIN_BUFFER);
        Direction {
            rx,
            tx,
            buf: vec![0; len].into_boxed_slice(),
            start: MAX_HEADER,
            end: MAX_HEADER,
            sequence: Sequence::default(),
            mid_frame: false,
            dirty: false,
            close_sent: false,
            bytes: 0,
            counter,
        }
    }

    /// Forwards frames until its side closes, fails, breaks the protocol or the other side
    /// stops taking them.
    async fn run(&mut self) -> End {
        match self.forward().await {
            Ok(end) => end,
            Err(Failed::Read) => {
                if !self.mid_frame {
                    let _ = self
                        .send_close(close_code::GOING_AWAY, "peer went away")
                        .await;
                }
                End::Gone
            }
            Err(Failed::Write) => End::WriteFailed,
        }
    }

    async fn forward(&mut self) -> Result<End, Failed> {
        loop {
            let (header, header_len) = loop {
                match parse_header(&self.buf[self.start..self.end]) {
                    Ok(Some(parsed)) => break parsed,
                    Ok(None) => self.fill().await?,
                    Err(e) => return Ok(End::Protocol(e)),
                }
            };
            if let Err(e) = self.sequence.check(&header) {
                return Ok(End::Protocol(e));
            }
            let key = header.mask.unwrap_or_default();
            if header.opcode.is_control() {
                // At most 125 bytes: read it whole, then forward it in one write.
                let len = header.len as usize;
                while self.end - self.start < header_len + len {
                    self.fill().await?;
                }
                self.start += header_len;
                let payload = self.start..self.start + len;
                apply_mask(&mut self.buf[payload.clone()], key, 0);
                self.write_chunk(true, header.fin, header.opcode, header.len, payload.end)
                    .await?;
                self.start = payload.end;
                self.mid_frame = false;
                if header.opcode == Opcode::Close {
                    self.flush().await?;
                    self.close_sent = true;
                    return Ok(End::Closed);
                }
                continue;
            }
            self.start += header_len;
            let mut remaining = header.len;
            let mut offset = 0u64;
            loop {
                let mut available = (self.end - self.start) as u64;
                if available == 0 && remaining > 0 {
                    self.fill().await?;
                    continue;
                }
                if available < remaining {
                    self.top_up();
                    available = (self.end - self.start) as u64;
                }
                let chunk = available.min(remaining) as usize;
                let end = self.start + chunk;
                apply_mask(&mut self.buf[self.start..end], key, offset);
                self.write_chunk(offset == 0, header.fin, header.opcode, header.len, end)
                    .await?;
                self.start = end;
                offset += chunk as u64;
                remaining -= chunk as u64;
                self.bytes += chunk as u64;
                self.counter.inc_by(chunk as u64);
                if remaining == 0 {
                    self.mid_frame = false;
                    break;
                }
            }
        }
    }

    /// Writes `buf[start..end]` (payload already unmasked), preceded by the frame's header
    /// when `first` (written into the buffer right before the payload: one write for both).
    async fn write_chunk(
        &mut self,
        first: bool,
        fin: bool,
        opcode: Opcode,
        len: u64,
        end: usize,
    ) -> Result<(), Failed> {
        let from = if first {
            self.start - write_server_header(&mut self.buf[..self.start], fin, opcode, len)
        } else {
            self.start
        };
        self.mid_frame = true;
        if from == end {
            return Ok(());
        }
        self.dirty = true;
        self.tx
            .write_all(&self.buf[from..end])
            .await
            .map_err(|_| Failed::Write)
    }

    /// Reads more from this direction's side, first flushing what was written to the other
    /// side (so nothing sits in a TLS buffer while the relay waits).
    async fn fill(&mut self) -> Result<(), Failed> {
        self.flush().await?;
        if self.start == self.end {
            self.start = MAX_HEADER;
            self.end = MAX_HEADER;
        } else if self.end == self.buf.len()
            || self.buf.len() - self.start < MAX_HEADER + MAX_CONTROL_PAYLOAD
        {
            // Too little room left for the rest of a header or control frame: move the
            // unprocessed bytes (always fewer than that) to the front.
            self.buf.copy_within(self.start..self.end, MAX_HEADER);
            self.end -= self.start - MAX_HEADER;
            self.start = MAX_HEADER;
        }
        match self.rx.read(&mut self.buf[self.end..]).await {
            Ok(0) | Err(_) => Err(Failed::Read),
            Ok(n) => {
                self.end += n;
                Ok(())
            }
        }
    }

    /// Adds to the buffer whatever more of this side's bytes are already there, without
    /// waiting: a large frame then goes out in fewer, larger writes (one TLS record holds
    /// 16 KiB; without this every record read would be a write of its own).
    fn top_up(&mut self) {
        while self.end < self.buf.len() {
            match self.rx.read(&mut self.buf[self.end..]).now_or_never() {
                Some(Ok(n)) if n > 0 => self.end += n,
                // Nothing yet, or an end or error the next `fill` meets again.
                _ => return,
            }
        }
    }

    async fn flush(&mut self) -> Result<(), Failed> {
        if self.dirty {
            self.tx.flush().await.map_err(|_| Failed::Write)?;
            self.dirty = false;
        }
        Ok(())
    }

    /// The relay's own close frame to the other side, unless one went already or the other
    /// side is in the middle of a frame (then it can only be cut off).
    async fn send_close(&mut self, code: u16, reason: &str) -> io::Result<()> {
        if self.close_sent || self.mid_frame {
            return Ok(());
        }
        let mut frame = [0u8; 2 + MAX_CONTROL_PAYLOAD];
        let n = write_close(&mut frame, code, reason);
        self.close_sent = true;
        self.tx.write_all(&frame[..n]).await?;
        self.tx.flush().await
    }

    async fn close_and_shut(&mut self, code: u16, reason: &str) {
        let _ = tokio::time::timeout(CLOSE_WRITE, async {
            let _ = self.send_close(code, reason).await;
            let _ = self.tx.shutdown().await;
        })
        .await;
    }
}

/// Which side of a direction failed.
#[derive(Debug)]
enum Failed {
    Read,
    Write,
}

const _: () = assert!(MAX_SERVER_HEADER <= MAX_HEADER);
const _: () = assert!(MIN_BUFFER >= MAX_HEADER + MAX_CONTROL_PAYLOAD);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::frame::parse_header;
    use tokio::io::{duplex, DuplexStream};

    const KEY: [u8; 4] = [0xA1, 0x02, 0xC3, 0x44];
    const WITHIN: Duration = Duration::from_secs(10);

    /// A frame as a client sends it (masked).
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        let len = payload.len() as u64;
        match len {
            0..=125 => out.push(0x80 | len as u8),
            126..=0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                out.push(0x80 | 127);
                out.extend_from_slice(&len.to_be_bytes());
            }
        }
        out.extend_from_slice(&KEY);
        let start = out.len();
        out.extend_from_slice(payload);
        apply_mask(&mut out[start..], KEY, 0);
        out
    }

    /// The next frame the relay wrote: FIN, opcode bits and payload; `None` at end of stream.
    async fn server_frame(io: &mut DuplexStream) -> Option<(bool, u8, Vec<u8>)> {
        let mut head = Vec::new();
        let (header, _) = loop {
            if let Some(parsed) = parse_header(&head).expect("the relay writes valid frames") {
                break parsed;
            }
            let mut b = [0u8; 1];
            match io.read(&mut b).await {
                Ok(1) => head.push(b[0]),
                _ => return None,
            }
        };
        assert_eq!(header.mask, None, "the relay as a server never masks");
        let mut payload = vec![0; header.len as usize];
        io.read_exact(&mut payload).await.ok()?;
        Some((header.fin, header.opcode.bits(), payload))
    }

    fn close_code_of(payload: &[u8]) -> u16 {
        u16::from_be_bytes([payload[0], payload[1]])
    }

    struct Pair {
        sender: DuplexStream,
        listener: DuplexStream,
        closing: CancellationToken,
        revoked: CancellationToken,
        task: tokio::task::JoinHandle<Counts>,
    }

    /// A splice between two in-memory connections; `pipe` bytes fit in each pipe at once, so
    /// a small value cuts every frame into many reads.
    fn start(buffer: usize, pipe: usize) -> Pair {
        let (sender, s_relay) = duplex(pipe);
        let (listener, l_relay) = duplex(pipe);
        let closing = CancellationToken::new();
        let revoked = CancellationToken::new();
        let task = tokio::spawn(splice(
            s_relay,
            l_relay,
            buffer,
            (closing.clone(), revoked.clone()),
            Default::default(),
        ));
        Pair {
            sender,
            listener,
            closing,
            revoked,
            task,
        }
    }

    #[tokio::test]
    async fn fragments_controls_and_large_frames_pass_unmasked_with_their_boundaries() {
        let mut pair = start(MIN_BUFFER, 97);
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let frames = [
            (false, 0x1, b"frag".to_vec()),
            (true, 0x9, b"keepalive".to_vec()),
            (false, 0x0, b"mented ".to_vec()),
            (true, 0x0, b"text".to_vec()),
            (true, 0x2, big.clone()),
            (true, 0x2, Vec::new()),
            (true, 0x2, vec![7; 126]),
            (true, 0xA, Vec::new()),
        ];
        let wire: Vec<u8> = frames
            .iter()
            .flat_map(|(fin, op, p)| client_frame(*fin, *op, p))
            .collect();
        let mut sender = pair.sender;
        let writer = tokio::spawn(async move {
            sender.write_all(&wire).await.unwrap();
            sender
        });
        for want in &frames {
            let got = tokio::time::timeout(WITHIN, server_frame(&mut pair.listener))
                .await
                .expect("in time")
                .expect("a frame");
            assert_eq!((got.0, got.1), (want.0, want.1));
            assert!(got.2 == want.2, "payload of a {:#x} frame", want.1);
        }
        let mut sender = writer.await.unwrap();
        // The other way too, and then a close from the listener, answered by the sender.
        pair.listener
            .write_all(&client_frame(true, 0x2, b"answer"))
            .await
            .unwrap();
        assert_eq!(
            server_frame(&mut sender).await.unwrap(),
            (true, 0x2, b"answer".to_vec())
        );
        let mut close = 1000u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"done");
        pair.listener
            .write_all(&client_frame(true, 0x8, &close))
            .await
            .unwrap();
        assert_eq!(
            server_frame(&mut sender).await.unwrap(),
            (true, 0x8, close.clone())
        );
        sender
            .write_all(&client_frame(true, 0x8, &close))
            .await
            .unwrap();
        assert_eq!(
            server_frame(&mut pair.listener).await.unwrap(),
            (true, 0x8, close)
        );
        let counts = tokio::time::timeout(WITHIN, pair.task)
            .await
            .expect("the splice ends once both closed")
            .unwrap();
        let data = 4 + 7 + 4 + big.len() as u64 + 126;
        assert_eq!(counts.sender_to_listener, data);
        assert_eq!(counts.listener_to_sender, 6);
        assert!(
            server_frame(&mut sender).await.is_none(),
            "then the relay hangs up"
        );
    }

    async fn protocol_error(bytes: Vec<u8>) {
        let mut pair = start(MIN_BUFFER, 64 * 1024);
        // A good frame first: the error is found mid-stream, not only at the start.
        pair.sender
            .write_all(&client_frame(true, 0x2, b"ok"))
            .await
            .unwrap();
        pair.sender.write_all(&bytes).await.unwrap();
        assert_eq!(
            server_frame(&mut pair.listener).await.unwrap(),
            (true, 0x2, b"ok".to_vec())
        );
        let (_, op, payload) = server_frame(&mut pair.sender).await.expect("a close");
        assert_eq!((op, close_code_of(&payload)), (0x8, 1002), "{bytes:02x?}");
        // Valid frames before the bad one (a fragment of the interrupted message) go on.
        let (op, payload) = loop {
            let (_, op, payload) = server_frame(&mut pair.listener).await.expect("a close");
            if op == 0x8 {
                break (op, payload);
            }
        };
        assert_eq!((op, close_code_of(&payload)), (0x8, 1001));
        tokio::time::timeout(WITHIN, pair.task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn protocol_errors_close_the_offender_with_1002_and_its_peer_with_1001() {
        let mut unmasked = vec![0x82, 0x02];
        unmasked.extend_from_slice(b"hi");
        protocol_error(unmasked).await;
        let mut rsv1 = client_frame(true, 0x2, b"deflated?");
        rsv1[0] |= 0x40;
        protocol_error(rsv1).await;
        protocol_error(client_frame(true, 0x3, b"")).await;
        protocol_error(client_frame(false, 0x9, b"")).await;
        protocol_error(client_frame(true, 0xA, &[0; 126])).await;
        protocol_error(client_frame(true, 0x0, b"orphan")).await;
        let mut interrupted = client_frame(false, 0x2, b"part");
        interrupted.extend(client_frame(true, 0x2, b"new"));
        protocol_error(interrupted).await;
        let mut huge = vec![0x82, 0xFF];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        huge.extend_from_slice(&KEY);
        protocol_error(huge).await;
    }

    #[tokio::test]
    async fn revocation_and_shutdown_close_both_sides_between_frames() {
        for (revoke, code) in [(true, 1008u16), (false, 1001)] {
            let mut pair = start(MIN_BUFFER, 1024);
            pair.sender
                .write_all(&client_frame(true, 0x2, b"before"))
                .await
                .unwrap();
            server_frame(&mut pair.listener).await.unwrap();
            if revoke {
                pair.revoked.cancel();
            } else {
                pair.closing.cancel();
            }
            for side in [&mut pair.sender, &mut pair.listener] {
                let (_, op, payload) = tokio::time::timeout(WITHIN, server_frame(side))
                    .await
                    .unwrap()
                    .expect("a close");
                assert_eq!((op, close_code_of(&payload)), (0x8, code));
                if revoke {
                    assert_eq!(&payload[2..], b"revoked");
                }
            }
            tokio::time::timeout(WITHIN, pair.task)
                .await
                .unwrap()
                .unwrap();
        }
    }

    #[tokio::test]
    async fn a_side_that_hangs_up_gets_its_peer_a_1001() {
        let mut pair = start(MIN_BUFFER, 1024);
        drop(pair.sender);
        let (_, op, payload) = server_frame(&mut pair.listener).await.expect("a close");
        assert_eq!((op, close_code_of(&payload)), (0x8, 1001));
        // The listener's answer has nowhere to go; the splice ends without waiting out the
        // grace period.
        pair.listener
            .write_all(&client_frame(true, 0x8, &payload))
            .await
            .unwrap();
        tokio::time::timeout(WITHIN, pair.task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_slow_reader_holds_back_the_writer_instead_of_filling_memory() {
        // 1 MiB through 4 KiB pipes and a 4 KiB buffer: the sender can only get ahead of the
        // listener by what the pipes and the buffer hold.
        let mut pair = start(MIN_BUFFER, 4096);
        let frame = client_frame(true, 0x2, &vec![1; 1 << 20]);
        let sent = frame.len();
        let mut sender = pair.sender;
        let writer = tokio::spawn(async move {
            let mut written = 0;
            for piece in frame.chunks(1024) {
                sender.write_all(piece).await.unwrap();
                written += piece.len();
            }
            (sender, written)
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !writer.is_finished(),
            "nothing reads the listener: the sender must wait"
        );
        let got = server_frame(&mut pair.listener).await.unwrap();
        assert_eq!(got.2.len(), 1 << 20);
        let (_sender, written) = writer.await.unwrap();
        assert_eq!(written, sent);
        pair.closing.cancel();
    }
}
