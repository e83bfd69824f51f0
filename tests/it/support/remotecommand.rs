//! `exec` and `attach` as the kubelet serves them, over both transports kubectl 1.32 uses:
//! WebSocket channels (`v5.channel.k8s.io` / `v4.channel.k8s.io`) and SPDY/3.1 streams
//! (`v4.channel.k8s.io`). A tiny command interpreter stands in for the container.

use std::time::Duration;

use bytes::Bytes;
use clusterconnect::tunnel::upgrade::ServerStream;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use super::spdy;

pub const WS_V5: &str = "v5.channel.k8s.io";
pub const WS_V4: &str = "v4.channel.k8s.io";
/// In preference order, as the apiserver negotiates.
pub const WEBSOCKET_PROTOCOLS: [&str; 2] = [WS_V5, WS_V4];
/// The kubelet offers v1-v4 over SPDY; v4 is the only one whose status format kubectl 1.32
/// expects, so it is the only one served.
pub const SPDY_PROTOCOLS: [&str; 1] = ["v4.channel.k8s.io"];

const CHANNEL_STDIN: u8 = 0;
const CHANNEL_STDOUT: u8 = 1;
const CHANNEL_STDERR: u8 = 2;
const CHANNEL_ERROR: u8 = 3;
/// v5 only: `[255, channel]` half-closes a channel (kubectl sends it when stdin ends).
const CHANNEL_CLOSE: u8 = 255;

/// How long the session waits for the streams it was promised, and for the client to close
/// after we did.
const STREAM_WAIT: Duration = Duration::from_secs(30);
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// How long the command takes to start after the WebSocket is accepted, as a container
/// runtime's exec does (tens of milliseconds at least). Output sent at once would meet a
/// client-go race in kubectl 1.32: it reads frames before it has created the streams they
/// belong to and drops them ("Unknown stream id 1, discarding message"), then exits 0 with no
/// output (kubernetes/kubernetes#131189, fixed by #131203 in later releases).
const EXEC_START: Duration = Duration::from_millis(100);

/// What the client asked for, from the query of `.../exec` or `.../attach`.
#[derive(Clone, Debug)]
pub struct Session {
    pub command: Vec<String>,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

impl Session {
    /// `attach` joins the container's main process, which here behaves like `cat`.
    pub fn attach(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> Session {
        Session {
            command: vec!["cat".into()],
            stdin,
            stdout,
            stderr,
            tty,
        }
    }
}

enum Output {
    Stdout(Bytes),
    Stderr(Bytes),
}

/// Runs the stand-in container's command; returns its exit code. Output goes through `out`
/// so the transport can order it before the final status.
async fn run(
    command: Vec<String>,
    mut stdin: mpsc::UnboundedReceiver<Bytes>,
    out: mpsc::UnboundedSender<Output>,
) -> i32 {
    let Some((program, args)) = command.split_first() else {
        let _ = out.send(Output::Stderr("no command given\n".into()));
        return 127;
    };
    match program.as_str() {
        "echo" => {
            let _ = out.send(Output::Stdout(format!("{}\n", args.join(" ")).into()));
            0
        }
        "cat" if args.is_empty() => {
            while let Some(chunk) = stdin.recv().await {
                if out.send(Output::Stdout(chunk)).is_err() {
                    break;
                }
            }
            0
        }
        "sh" if args.len() == 2 && args[0] == "-c" => {
            let script: Vec<String> = args[1].split_whitespace().map(String::from).collect();
            match script.as_slice() {
                [exit, code] if exit == "exit" => code.parse().unwrap_or(2),
                // One level of `sh -c "echo ..."`: enough for tests, no shell grammar.
                _ => Box::pin(run(script, stdin, out)).await,
            }
        }
        other => {
            let _ = out.send(Output::Stderr(
                format!("sh: {other}: command not found\n").into(),
            ));
            127
        }
    }
}

/// The status the kubelet writes on the error channel, byte for byte in shape: client-go turns
/// `NonZeroExitCode` with an `ExitCode` cause into kubectl's own exit code.
pub fn status_json(command: &[String], code: i32) -> Vec<u8> {
    let status = if code == 0 {
        json!({"metadata": {}, "status": "Success"})
    } else {
        json!({
            "metadata": {},
            "status": "Failure",
            "message": format!(
                "command terminated with non-zero exit code: error executing command [{}], exit code {code}",
                command.join(" ")
            ),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        })
    };
    serde_json::to_vec(&status).expect("a JSON value serializes")
}

/// Serves one session on an upgraded WebSocket speaking `protocol` (v4 or v5 channels).
pub async fn serve_websocket(ws: ServerStream, protocol: &str, session: Session) {
    let (mut sink, source) = ws.split();
    let (stdin_tx, stdin_rx) = mpsc::unbounded_channel();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel();
    let mut reader = JoinSet::new();
    reader.spawn(read_websocket(
        source,
        session.stdin.then_some(stdin_tx),
        protocol == WS_V5,
    ));

    let forward = async {
        let mut connected = true;
        // Drain even after a failed send so the command never blocks on a dead client.
        while let Some(item) = out_rx.recv().await {
            let (channel, data, wanted) = match item {
                Output::Stdout(data) => (CHANNEL_STDOUT, data, session.stdout),
                Output::Stderr(data) => (CHANNEL_STDERR, data, session.stderr),
            };
            if connected && wanted {
                connected = send_channel(&mut sink, channel, &data).await.is_ok();
            }
        }
        connected
    };
    tokio::time::sleep(EXEC_START).await;
    let (code, connected) = tokio::join!(run(session.command.clone(), stdin_rx, out_tx), forward);
    if !connected {
        return;
    }
    let status = status_json(&session.command, code);
    let _ = send_channel(&mut sink, CHANNEL_ERROR, &status).await;
    let close = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    let _ = sink.send(Message::Close(Some(close))).await;
    // The reader ends when the client answers our close frame.
    let _ = tokio::time::timeout(CLOSE_WAIT, reader.join_next()).await;
}

/// Feeds channel 0 to the command until stdin ends (v5 close signal, close frame or lost
/// connection), and keeps reading after that so pings are answered and the client's close
/// frame is seen.
async fn read_websocket<S>(mut source: S, mut stdin: Option<mpsc::UnboundedSender<Bytes>>, v5: bool)
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    while let Some(Ok(message)) = source.next().await {
        let data = match message {
            Message::Binary(data) => data,
            Message::Close(_) => break,
            _ => continue,
        };
        match data.first() {
            Some(&CHANNEL_STDIN) => {
                if let Some(tx) = &stdin {
                    let _ = tx.send(data.slice(1..));
                }
            }
            Some(&CHANNEL_CLOSE) if v5 && data.get(1) == Some(&CHANNEL_STDIN) => stdin = None,
            // Resize events (channel 4) mean nothing without a terminal.
            _ => {}
        }
    }
}

async fn send_channel<S>(sink: &mut S, channel: u8, data: &[u8]) -> Result<(), S::Error>
where
    S: futures_util::Sink<Message> + Unpin,
{
    let mut framed = Vec::with_capacity(data.len() + 1);
    framed.push(channel);
    framed.extend_from_slice(data);
    sink.send(Message::Binary(framed.into())).await
}

/// The streams of one SPDY session, filled in as the client opens them.
#[derive(Default)]
struct SpdyStreams {
    error: Option<spdy::Stream>,
    stdin: Option<spdy::Stream>,
    stdout: Option<spdy::Stream>,
    stderr: Option<spdy::Stream>,
}

impl SpdyStreams {
    /// Whether every stream the query promised has arrived (with a tty, stderr is merged
    /// into stdout and never opened).
    fn complete(&self, session: &Session) -> bool {
        self.error.is_some()
            && (self.stdin.is_some() || !session.stdin)
            && (self.stdout.is_some() || !session.stdout)
            && (self.stderr.is_some() || !session.stderr || session.tty)
    }

    /// Accepts streams until complete; false if the client went away first.
    async fn collect(&mut self, conn: &mut spdy::Connection, session: &Session) -> bool {
        while !self.complete(session) {
            let Some(stream) = conn.accept().await else {
                return false;
            };
            let slot = match stream.header("streamtype") {
                Some("error") => &mut self.error,
                Some("stdin") => &mut self.stdin,
                Some("stdout") => &mut self.stdout,
                Some("stderr") => &mut self.stderr,
                // `resize` and anything unknown: already replied to, and ignored.
                _ => continue,
            };
            *slot = Some(stream);
        }
        true
    }
}

/// Serves one session over SPDY/3.1 (`v4.channel.k8s.io`): the client opens an `error` stream
/// and one stream per requested std stream, and waits for our reply to each.
pub async fn serve_spdy<IO>(io: IO, session: Session)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let mut conn = spdy::Connection::new(io);
    let mut streams = SpdyStreams::default();
    let collected = tokio::time::timeout(STREAM_WAIT, streams.collect(&mut conn, &session)).await;
    let (Ok(true), Some(error)) = (collected, streams.error.take()) else {
        conn.close().await;
        return;
    };
    let stdin = match streams.stdin.take() {
        Some(stream) => stream.incoming,
        None => mpsc::unbounded_channel().1,
    };
    let (out_tx, mut out_rx) = mpsc::unbounded_channel();
    let forward = async {
        while let Some(item) = out_rx.recv().await {
            let (stream, data) = match item {
                Output::Stdout(data) => (&streams.stdout, data),
                Output::Stderr(data) => (&streams.stderr, data),
            };
            if let Some(stream) = stream {
                stream.writer.write(data);
            }
        }
    };
    let (code, ()) = tokio::join!(run(session.command.clone(), stdin, out_tx), forward);
    // The status, then FIN on every stream: client-go reads the error stream to its end.
    error
        .writer
        .write(status_json(&session.command, code).into());
    error.writer.finish();
    for stream in [&streams.stdout, &streams.stderr].into_iter().flatten() {
        stream.writer.finish();
    }
    conn.close().await;
}
