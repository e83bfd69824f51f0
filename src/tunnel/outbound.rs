//! Dialing out through a corporate proxy: `HTTPS_PROXY` (or `https_proxy`) and `NO_PROXY` as
//! curl, kubectl and Arc's `--proxy-https` read them, an HTTP CONNECT tunnel with basic
//! authentication from the proxy URL's user and password. Only `https://` destinations are
//! proxied: plain-HTTP ones are local by nature (the instance metadata endpoint, a loopback
//! stand-in) and go direct, as Azure's own clients do for IMDS.

use std::sync::OnceLock;
use std::time::Duration;

use hyper_util::client::proxy::matcher::Matcher;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest CONNECT answer (status line and headers) we read.
const MAX_ANSWER: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot reach the outbound proxy {proxy} (from HTTPS_PROXY)")]
    Connect {
        proxy: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the outbound proxy {proxy} did not answer CONNECT within {}s", .within.as_secs())]
    Timeout { proxy: String, within: Duration },
    #[error("the outbound proxy {proxy} asks for credentials (407): put them in HTTPS_PROXY as http://USER:PASSWORD@host:port")]
    AuthenticationRequired { proxy: String },
    #[error("the outbound proxy {proxy} refused CONNECT to {target}: {status_line}")]
    Refused {
        proxy: String,
        target: String,
        status_line: String,
    },
    #[error("the outbound proxy {proxy} answered CONNECT with something that is not HTTP")]
    Garbled { proxy: String },
    #[error("the outbound proxy in HTTPS_PROXY ({0}) has no host")]
    NoHost(String),
    #[error("the outbound proxy {proxy} is a {scheme}:// proxy; only http:// proxies (HTTP CONNECT) are supported: set HTTPS_PROXY=http://host:port")]
    Scheme { proxy: String, scheme: String },
}

/// The proxy settings of this process, read once from its environment.
fn matcher() -> &'static Matcher {
    static MATCHER: OnceLock<Matcher> = OnceLock::new();
    MATCHER.get_or_init(Matcher::from_env)
}

/// A TCP connection to `host:port`, through the outbound proxy when the environment names one
/// for it, within `timeout` for each step.
pub async fn connect(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, ConnectError> {
    connect_with(matcher(), host, port, timeout).await
}

/// Why a connection could not be made: directly, or through the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Direct(#[from] std::io::Error),
    #[error("connecting to {0} timed out")]
    Timeout(String),
    #[error(transparent)]
    Proxy(#[from] ProxyError),
}

/// [`connect`] with explicit proxy settings.
pub async fn connect_with(
    matcher: &Matcher,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let authority = authority(host, port);
    let target: http::Uri = match format!("https://{authority}/").parse() {
        Ok(uri) => uri,
        Err(_) => return direct(host, port, timeout).await,
    };
    let Some(via) = matcher.intercept(&target) else {
        return direct(host, port, timeout).await;
    };
    let proxy = via.uri().clone();
    let shown = format!(
        "{}:{}",
        proxy.host().unwrap_or_default(),
        proxy.port_u16().unwrap_or(80)
    );
    match proxy.scheme_str() {
        Some("http") | None => {}
        Some(other) => {
            return Err(ProxyError::Scheme {
                proxy: shown,
                scheme: other.to_string(),
            }
            .into())
        }
    }
    let proxy_host = proxy
        .host()
        .ok_or_else(|| ProxyError::NoHost(shown.clone()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let mut tcp = match tokio::time::timeout(
        timeout,
        TcpStream::connect((proxy_host.as_str(), proxy.port_u16().unwrap_or(80))),
    )
    .await
    {
        Err(_) => return Err(ConnectError::Timeout(shown)),
        Ok(Err(source)) => {
            return Err(ProxyError::Connect {
                proxy: shown,
                source,
            }
            .into())
        }
        Ok(Ok(tcp)) => tcp,
    };
    let _ = tcp.set_nodelay(true);
    let auth = via
        .basic_auth()
        .and_then(|v| v.to_str().ok())
        .map(|v| format!("Proxy-Authorization: {v}\r\n"))
        .unwrap_or_default();
    let request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{auth}\r\n");
    let handshake = async {
        tcp.write_all(request.as_bytes()).await?;
        read_answer(&mut tcp).await
    };
    let answer = match tokio::time::timeout(timeout, handshake).await {
        Err(_) => {
            return Err(ProxyError::Timeout {
                proxy: shown,
                within: timeout,
            }
            .into())
        }
        Ok(Err(source)) => {
            return Err(ProxyError::Connect {
                proxy: shown,
                source,
            }
            .into())
        }
        Ok(Ok(answer)) => answer,
    };
    check_answer(&answer, &shown, &authority)?;
    Ok(tcp)
}

/// A connector for hyper's client: `https://` destinations through the outbound proxy when
/// the environment names one for them, everything else direct.
#[derive(Clone)]
pub struct Connector {
    pub timeout: Duration,
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<TcpStream>;
    type Error = ConnectError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, ConnectError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), ConnectError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let timeout = self.timeout;
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| ProxyError::NoHost(uri.to_string()))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let https = uri.scheme_str() == Some("https");
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            let tcp = match https {
                true => connect(&host, port, timeout).await?,
                false => direct(&host, port, timeout).await?,
            };
            let _ = tcp.set_nodelay(true);
            Ok(hyper_util::rt::TokioIo::new(tcp))
        })
    }
}

async fn direct(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, ConnectError> {
    match tokio::time::timeout(timeout, TcpStream::connect((host, port))).await {
        Err(_) => Err(ConnectError::Timeout(authority(host, port))),
        Ok(result) => Ok(result?),
    }
}

fn authority(host: &str, port: u16) -> String {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The proxy's answer up to the blank line, byte by byte so that nothing of the tunnel that
/// follows is consumed; bounded.
async fn read_answer(tcp: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut answer = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        if answer.len() >= MAX_ANSWER || tcp.read(&mut byte).await? == 0 {
            break;
        }
        answer.push(byte[0]);
    }
    Ok(answer)
}

/// 2xx opens the tunnel; anything else is refused with the proxy's own status line.
fn check_answer(answer: &[u8], proxy: &str, target: &str) -> Result<(), ProxyError> {
    let text = String::from_utf8_lossy(answer);
    let status_line = text.lines().next().unwrap_or_default().trim().to_string();
    let mut parts = status_line.split_whitespace();
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(ProxyError::Garbled {
            proxy: proxy.into(),
        });
    };
    let Ok(code) = code.parse::<u16>() else {
        return Err(ProxyError::Garbled {
            proxy: proxy.into(),
        });
    };
    if !version.starts_with("HTTP/1.") || !answer.ends_with(b"\r\n\r\n") {
        return Err(ProxyError::Garbled {
            proxy: proxy.into(),
        });
    }
    match code {
        200..=299 => Ok(()),
        407 => Err(ProxyError::AuthenticationRequired {
            proxy: proxy.into(),
        }),
        _ => Err(ProxyError::Refused {
            proxy: proxy.into(),
            target: target.into(),
            status_line: crate::secret::clip(&status_line, 200),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A one-shot CONNECT proxy: records the request head, answers `answer`, then echoes.
    async fn proxy(answer: &'static str) -> (u16, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let head = read_answer(&mut s).await.unwrap();
            s.write_all(answer.as_bytes()).await.unwrap();
            let mut buf = [0u8; 5];
            if s.read_exact(&mut buf).await.is_ok() {
                s.write_all(&buf).await.unwrap();
            }
            String::from_utf8(head).unwrap()
        });
        (port, task)
    }

    fn via(port: u16, no_proxy: &str) -> Matcher {
        Matcher::builder()
            .https(format!("http://alice:s3cret@127.0.0.1:{port}"))
            .no(no_proxy)
            .build()
    }

    #[tokio::test]
    async fn tunnels_through_connect_with_basic_auth() {
        let (port, head) = proxy("HTTP/1.1 200 Connection established\r\n\r\n").await;
        let mut tcp = connect_with(&via(port, ""), "relay.example", 443, Duration::from_secs(5))
            .await
            .unwrap();
        tcp.write_all(b"hello").await.unwrap();
        let mut echo = [0u8; 5];
        tcp.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"hello");
        let head = head.await.unwrap();
        assert!(
            head.starts_with("CONNECT relay.example:443 HTTP/1.1\r\n"),
            "{head}"
        );
        // alice:s3cret
        assert!(
            head.contains("Proxy-Authorization: Basic YWxpY2U6czNjcmV0\r\n"),
            "{head}"
        );
    }

    #[tokio::test]
    async fn refusals_name_the_reason_and_no_proxy_goes_direct() {
        let (port, _) = proxy("HTTP/1.1 407 Proxy Authentication Required\r\n\r\n").await;
        let err = connect_with(&via(port, ""), "relay.example", 443, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            ConnectError::Proxy(ProxyError::AuthenticationRequired { .. })
        ));
        let (port, _) = proxy("HTTP/1.1 403 Forbidden\r\n\r\n").await;
        let err = connect_with(&via(port, ""), "relay.example", 443, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("403 Forbidden"), "{err}");
        // NO_PROXY: straight to the destination, the proxy never asked.
        let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target_port = target.local_addr().unwrap().port();
        let bypassed = via(1, "127.0.0.1");
        let direct = connect_with(&bypassed, "127.0.0.1", target_port, Duration::from_secs(5));
        assert!(direct.await.is_ok());
    }

    #[test]
    fn garbage_answers_are_refused() {
        assert!(check_answer(b"SSH-2.0-OpenSSH\r\n\r\n", "p", "t").is_err());
        assert!(check_answer(b"HTTP/1.1 200 OK\r\n", "p", "t").is_err());
        assert!(check_answer(b"HTTP/1.0 200 OK\r\n\r\n", "p", "t").is_ok());
    }
}
