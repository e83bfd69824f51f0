//! The server half of SPDY/3.1 as client-go's spdystream speaks it: enough to accept the
//! streams kubectl opens for exec, attach and port-forward, reply to them, carry their bytes and
//! half-close them. Flow control is ignored (spdystream does not enforce it either).

use std::collections::HashMap;
use std::io;
use std::sync::LazyLock;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

pub const VERSION: u16 = 3;
pub const FLAG_FIN: u8 = 0x01;

pub const SYN_STREAM: u16 = 1;
pub const SYN_REPLY: u16 = 2;
pub const RST_STREAM: u16 = 3;
pub const PING: u16 = 6;
pub const GOAWAY: u16 = 7;
pub const HEADERS: u16 = 8;

/// Larger DATA payloads are split; spdystream accepts up to 16 MiB but small frames keep
/// interleaving fair between streams.
const MAX_DATA: usize = 32 * 1024;
/// A frame longer than this is treated as a protocol error rather than buffered.
const MAX_FRAME: usize = 1 << 24;

/// Words of the SPDY/3 header dictionary, each stored with a 32-bit length prefix.
const DICTIONARY_WORDS: &[&str] = &[
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
];

/// The rest of the dictionary: raw text with no length prefixes.
const DICTIONARY_TAIL: &str = concat!(
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
    "203 Non-Authoritative Information",
    "204 No Content",
    "301 Moved Permanently",
    "400 Bad Request",
    "401 Unauthorized",
    "403 Forbidden",
    "404 Not Found",
    "500 Internal Server Error",
    "501 Not Implemented",
    "503 Service Unavailable",
    "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec ",
    "00:00:00 ",
    "Mon, Tue, Wed, Thu, Fri, Sat, Sun, ",
    "GMT",
    "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,",
    "text/plain,text/javascript,",
    "public",
    "private",
    "max-age=",
    "gzip,deflate,sdch",
    "charset=utf-8",
    "charset=iso-8859-1,",
    "utf-,*,enq=0.",
);

/// The SPDY/3 zlib dictionary (1423 bytes). Both directions seed their header compression
/// with it; a peer using any other dictionary fails at the first header block.
pub static DICTIONARY: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let mut dict = Vec::with_capacity(1423);
    for word in DICTIONARY_WORDS {
        dict.extend_from_slice(&(word.len() as u32).to_be_bytes());
        dict.extend_from_slice(word.as_bytes());
    }
    dict.extend_from_slice(DICTIONARY_TAIL.as_bytes());
    dict
});

pub type Headers = Vec<(String, String)>;

/// Serializes a name/value block: a count, then length-prefixed names and values.
pub fn encode_header_block(headers: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(headers.len() as u32).to_be_bytes());
    for (name, value) in headers {
        out.extend_from_slice(&(name.len() as u32).to_be_bytes());
        out.extend_from_slice(name.to_ascii_lowercase().as_bytes());
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        out.extend_from_slice(value.as_bytes());
    }
    out
}

pub fn decode_header_block(raw: &[u8]) -> io::Result<Headers> {
    fn take<'a>(raw: &mut &'a [u8], n: usize) -> io::Result<&'a [u8]> {
        if raw.len() < n {
            return Err(protocol_error("truncated header block"));
        }
        let (head, rest) = raw.split_at(n);
        *raw = rest;
        Ok(head)
    }
    fn take_u32(raw: &mut &[u8]) -> io::Result<usize> {
        let b = take(raw, 4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
    let mut raw = raw;
    let count = take_u32(&mut raw)?;
    // Each pair needs at least eight bytes, which bounds the count before allocating.
    if count > raw.len() / 8 {
        return Err(protocol_error("header count exceeds block"));
    }
    let mut headers = Vec::with_capacity(count);
    for _ in 0..count {
        let name_len = take_u32(&mut raw)?;
        let name = String::from_utf8_lossy(take(&mut raw, name_len)?).into_owned();
        let value_len = take_u32(&mut raw)?;
        let value = String::from_utf8_lossy(take(&mut raw, value_len)?).into_owned();
        headers.push((name, value));
    }
    Ok(headers)
}

fn protocol_error(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("spdy: {what}"))
}

/// One direction's header compression: a single zlib stream for the whole connection,
/// sync-flushed after every block so each frame is decodable on arrival.
pub struct HeaderCompressor(Compress);

impl HeaderCompressor {
    pub fn new() -> Self {
        let mut zlib = Compress::new(Compression::default(), true);
        zlib.set_dictionary(&DICTIONARY)
            .expect("a fresh zlib stream accepts a dictionary");
        HeaderCompressor(zlib)
    }

    pub fn compress(&mut self, headers: &[(String, String)]) -> Vec<u8> {
        let raw = encode_header_block(headers);
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut consumed = 0;
        // Each round either consumes input or fills the output, so this ends; the bound only
        // guards against a zlib bug turning into a hang.
        for _ in 0..10_000 {
            let before = self.0.total_in();
            self.0
                .compress_vec(&raw[consumed..], &mut out, FlushCompress::Sync)
                .expect("deflate of an in-memory buffer cannot fail");
            consumed += (self.0.total_in() - before) as usize;
            if consumed == raw.len() && out.len() < out.capacity() {
                break;
            }
            out.reserve(256);
        }
        out
    }
}

impl Default for HeaderCompressor {
    fn default() -> Self {
        Self::new()
    }
}

pub struct HeaderDecompressor(Decompress);

impl HeaderDecompressor {
    pub fn new() -> Self {
        HeaderDecompressor(Decompress::new(true))
    }

    pub fn decompress(&mut self, block: &[u8]) -> io::Result<Headers> {
        let mut out = Vec::with_capacity(block.len() * 4 + 256);
        let mut consumed = 0;
        for _ in 0..10_000 {
            let before = self.0.total_in();
            let result = self
                .0
                .decompress_vec(&block[consumed..], &mut out, FlushDecompress::Sync);
            consumed += (self.0.total_in() - before) as usize;
            match result {
                Ok(_) if consumed == block.len() && out.len() < out.capacity() => {
                    return decode_header_block(&out);
                }
                Ok(_) => out.reserve(1024),
                // The zlib header names the dictionary; zlib asks for it once per connection.
                Err(e) if e.needs_dictionary().is_some() => {
                    self.0
                        .set_dictionary(&DICTIONARY)
                        .map_err(|e| protocol_error(&format!("header dictionary rejected: {e}")))?;
                }
                Err(e) => return Err(protocol_error(&format!("header block: {e}"))),
            }
        }
        Err(protocol_error("header block does not end"))
    }
}

impl Default for HeaderDecompressor {
    fn default() -> Self {
        Self::new()
    }
}

/// A frame as read off the wire; control payloads stay raw (header blocks compressed).
#[derive(Debug)]
pub enum Frame {
    Control {
        kind: u16,
        flags: u8,
        payload: Bytes,
    },
    Data {
        stream_id: u32,
        flags: u8,
        payload: Bytes,
    },
}

/// The next frame, or `None` at a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Frame>> {
    let mut head = [0u8; 8];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let flags = head[4];
    let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
    if len > MAX_FRAME {
        return Err(protocol_error("frame too large"));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    let payload = Bytes::from(payload);
    let word = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    if word & 0x8000_0000 != 0 {
        let version = ((word >> 16) & 0x7fff) as u16;
        if version != VERSION {
            return Err(protocol_error(&format!("unsupported version {version}")));
        }
        Ok(Some(Frame::Control {
            kind: (word & 0xffff) as u16,
            flags,
            payload,
        }))
    } else {
        Ok(Some(Frame::Data {
            stream_id: word & 0x7fff_ffff,
            flags,
            payload,
        }))
    }
}

pub fn control_frame(kind: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(8 + payload.len());
    frame.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    frame.extend_from_slice(&kind.to_be_bytes());
    frame.push(flags);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    frame.extend_from_slice(payload);
    frame
}

pub fn data_frame(out: &mut BytesMut, stream_id: u32, fin: bool, payload: &[u8]) {
    out.put_u32(stream_id & 0x7fff_ffff);
    out.put_u8(if fin { FLAG_FIN } else { 0 });
    out.put_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.put_slice(payload);
}

fn read_u32(payload: &[u8], at: usize) -> Option<u32> {
    let b = payload.get(at..at + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

enum Outgoing {
    Reply(u32),
    Data {
        stream_id: u32,
        data: Bytes,
        fin: bool,
    },
    Ping(u32),
    Close,
}

/// A stream the client opened. Its bytes arrive on `incoming`, which ends at the client's FIN
/// or RST_STREAM, or when the connection goes away.
pub struct Stream {
    pub headers: Headers,
    pub incoming: mpsc::UnboundedReceiver<Bytes>,
    pub writer: StreamWriter,
}

impl Stream {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The sending half of a stream; clones share the connection's single ordered writer, so
/// bytes written before `finish` always precede the FIN.
#[derive(Clone)]
pub struct StreamWriter {
    id: u32,
    out: mpsc::UnboundedSender<Outgoing>,
}

impl StreamWriter {
    /// Queues bytes; false once the connection is gone.
    pub fn write(&self, data: Bytes) -> bool {
        self.out
            .send(Outgoing::Data {
                stream_id: self.id,
                data,
                fin: false,
            })
            .is_ok()
    }

    /// Half-closes the stream from our side.
    pub fn finish(&self) {
        let _ = self.out.send(Outgoing::Data {
            stream_id: self.id,
            data: Bytes::new(),
            fin: true,
        });
    }
}

/// A server SPDY session over any byte stream (an upgraded HTTP/1.1 connection, or a WebSocket
/// seen as bytes). Every stream the client opens is answered with SYN_REPLY before `accept`
/// returns it, which is what unblocks client-go's `CreateStream`.
pub struct Connection {
    incoming: mpsc::UnboundedReceiver<Stream>,
    out: mpsc::UnboundedSender<Outgoing>,
    // Dropping the connection aborts its reader and writer, so nothing outlives its owner.
    tasks: JoinSet<()>,
}

impl Connection {
    pub fn new<IO>(io: IO) -> Connection
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (reader, writer) = tokio::io::split(io);
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (incoming_tx, incoming) = mpsc::unbounded_channel();
        let mut tasks = JoinSet::new();
        tasks.spawn(read_loop(reader, incoming_tx, out_tx.clone()));
        tasks.spawn(write_loop(writer, out_rx));
        Connection {
            incoming,
            out: out_tx,
            tasks,
        }
    }

    /// The next stream the client opened, or `None` once the client closed the connection.
    pub async fn accept(&mut self) -> Option<Stream> {
        self.incoming.recv().await
    }

    /// Sends GOAWAY after everything already queued, closes our side, and waits briefly for
    /// the client to close its side so our last frames are not lost to a TCP reset.
    pub async fn close(mut self) {
        let _ = self.out.send(Outgoing::Close);
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: R,
    incoming: mpsc::UnboundedSender<Stream>,
    out: mpsc::UnboundedSender<Outgoing>,
) {
    let mut decompressor = HeaderDecompressor::new();
    let mut open: HashMap<u32, mpsc::UnboundedSender<Bytes>> = HashMap::new();
    // Any read error or protocol error ends the session; dropping `open` ends every stream.
    while let Ok(Some(frame)) = read_frame(&mut reader).await {
        match frame {
            Frame::Data {
                stream_id,
                flags,
                payload,
            } => {
                if let Some(tx) = open.get(&stream_id) {
                    if !payload.is_empty() {
                        let _ = tx.send(payload);
                    }
                }
                if flags & FLAG_FIN != 0 {
                    open.remove(&stream_id);
                }
            }
            Frame::Control {
                kind: SYN_STREAM,
                flags,
                payload,
            } => {
                let Some(id) = read_u32(&payload, 0).map(|w| w & 0x7fff_ffff) else {
                    break;
                };
                let Ok(headers) = decompressor.decompress(payload.get(10..).unwrap_or_default())
                else {
                    break;
                };
                let (tx, rx) = mpsc::unbounded_channel();
                if flags & FLAG_FIN == 0 {
                    open.insert(id, tx);
                }
                let _ = out.send(Outgoing::Reply(id));
                let stream = Stream {
                    headers,
                    incoming: rx,
                    writer: StreamWriter {
                        id,
                        out: out.clone(),
                    },
                };
                let _ = incoming.send(stream);
            }
            // These carry header blocks too; decoding them keeps the shared zlib context in
            // step even though their contents do not matter here.
            Frame::Control {
                kind: SYN_REPLY | HEADERS,
                payload,
                ..
            } => {
                if decompressor
                    .decompress(payload.get(4..).unwrap_or_default())
                    .is_err()
                {
                    break;
                }
            }
            Frame::Control {
                kind: RST_STREAM,
                payload,
                ..
            } => {
                if let Some(id) = read_u32(&payload, 0) {
                    open.remove(&(id & 0x7fff_ffff));
                }
            }
            Frame::Control {
                kind: PING,
                payload,
                ..
            } => {
                if let Some(id) = read_u32(&payload, 0) {
                    let _ = out.send(Outgoing::Ping(id));
                }
            }
            // SETTINGS, WINDOW_UPDATE, GOAWAY and anything unknown need no action: the client
            // still closes its connection after GOAWAY, which ends this loop.
            Frame::Control { .. } => {}
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut queue: mpsc::UnboundedReceiver<Outgoing>,
) {
    let mut compressor = HeaderCompressor::new();
    while let Some(item) = queue.recv().await {
        let mut buf = BytesMut::new();
        let closing = matches!(item, Outgoing::Close);
        match item {
            Outgoing::Reply(id) => {
                let mut payload = id.to_be_bytes().to_vec();
                payload.extend_from_slice(&compressor.compress(&[]));
                buf.put_slice(&control_frame(SYN_REPLY, 0, &payload));
            }
            Outgoing::Data {
                stream_id,
                data,
                fin,
            } => {
                let mut chunks = data.chunks(MAX_DATA).peekable();
                if chunks.peek().is_none() {
                    data_frame(&mut buf, stream_id, fin, &[]);
                }
                while let Some(chunk) = chunks.next() {
                    data_frame(&mut buf, stream_id, fin && chunks.peek().is_none(), chunk);
                }
            }
            Outgoing::Ping(id) => buf.put_slice(&control_frame(PING, 0, &id.to_be_bytes())),
            Outgoing::Close => {
                // Last-good-stream-id 0 and status OK: we never opened streams ourselves.
                buf.put_slice(&control_frame(GOAWAY, 0, &[0u8; 8]));
            }
        }
        if writer.write_all(&buf).await.is_err() {
            return;
        }
        if (queue.is_empty() || closing) && writer.flush().await.is_err() {
            return;
        }
        if closing {
            let _ = writer.shutdown().await;
            return;
        }
    }
}
