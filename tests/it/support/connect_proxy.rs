//! A corporate outbound proxy on 127.0.0.1: HTTP CONNECT with basic authentication, as
//! Squid answers it. It records every CONNECT target and refuses wrong credentials with 407.

use std::sync::{Arc, Mutex};

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub struct ConnectProxy {
    pub port: u16,
    /// `host:port` of every CONNECT that was let through.
    pub tunnels: Arc<Mutex<Vec<String>>>,
    /// How many were refused for credentials.
    pub refused: Arc<Mutex<usize>>,
    stop: CancellationToken,
}

impl ConnectProxy {
    /// A proxy that lets through only `user:password`.
    pub async fn start(user: &str, password: &str) -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let tunnels = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(0));
        let stop = CancellationToken::new();
        let (t, r, s) = (tunnels.clone(), refused.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    _ = s.cancelled() => return,
                };
                let (t, r, expected) = (t.clone(), r.clone(), expected.clone());
                tokio::spawn(serve(client, expected, t, r));
            }
        });
        ConnectProxy {
            port,
            tunnels,
            refused,
            stop,
        }
    }

    /// `HTTPS_PROXY` for it with these credentials.
    pub fn url(&self, user: &str, password: &str) -> String {
        format!("http://{user}:{password}@127.0.0.1:{}", self.port)
    }

    pub fn tunnels_to(&self, target: &str) -> usize {
        let tunnels = self.tunnels.lock().unwrap();
        tunnels.iter().filter(|t| t.as_str() == target).count()
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve(
    mut client: TcpStream,
    expected: String,
    tunnels: Arc<Mutex<Vec<String>>>,
    refused: Arc<Mutex<usize>>,
) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 || client.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.lines();
    let request = lines.next().unwrap_or_default().to_string();
    let mut parts = request.split_whitespace();
    let (Some("CONNECT"), Some(target)) = (parts.next(), parts.next()) else {
        let _ = client
            .write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
            .await;
        return;
    };
    let authorized = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.eq_ignore_ascii_case("proxy-authorization") && v.trim() == expected
        })
    });
    if !authorized {
        *refused.lock().unwrap() += 1;
        let _ = client
            .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"corp\"\r\n\r\n")
            .await;
        return;
    }
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
        return;
    };
    tunnels.lock().unwrap().push(target.to_string());
    if client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}
