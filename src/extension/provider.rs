//! The Secrets Store CSI driver's provider, as the upstream Azure provider serves it: gRPC
//! (`v1alpha1.CSIDriverProvider`: `Version` and `Mount`) over HTTP/2 on a unix socket in the
//! node's provider directory, where the driver dials `<provider>.sock` for each pod volume.
//! `Mount` gets the class's parameters and the pod's attributes as JSON, and the
//! nodePublishSecretRef Secret's data (`clientid`, `clientsecret`); it answers with the
//! files (by objectAlias or objectName, in the requested mode) and their versions, which the
//! driver writes into the pod's volume. Nothing is written to disk here.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::proto::{
    self, File, MountRequest, MountResponse, ObjectVersion, VersionRequest, VersionResponse,
};
use super::vault::{ServicePrincipal, VaultAccess};
use crate::secret::Secret;
use crate::secrets::sync::{Syncer, Targets};
use crate::secrets::ProviderClass;
use crate::tunnel::http::error_chain;

/// A Mount request is a class's parameters: far below this.
const MAX_REQUEST: usize = 4 * 1024 * 1024;
/// Mounts fetching at once; more wait (kubelet retries slow mounts anyway).
const MAX_MOUNTS: usize = 16;
/// The driver's own default timeout for a provider call is 20 s.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(20);
/// The file mode when the request names none (the driver's default, 0644).
const DEFAULT_MODE: i32 = 0o644;
pub const RUNTIME_NAME: &str = "clusterconnect-akv-provider";

/// gRPC status codes used here.
const INVALID_ARGUMENT: u32 = 3;
const UNKNOWN: u32 = 2;
const UNIMPLEMENTED: u32 = 12;
const DEADLINE_EXCEEDED: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("attributes are not a JSON object of strings")]
    Attributes(#[source] serde_json::Error),
    #[error("secrets are not a JSON object of strings")]
    Secrets(#[source] serde_json::Error),
    #[error("permission {0:?} is not a file mode (a decimal number up to 511)")]
    Permission(String),
    #[error(
        "the nodePublishSecretRef Secret has clientid but no clientsecret (or the other way round)"
    )]
    HalfCredentials,
    #[error(transparent)]
    Class(#[from] crate::secrets::provider_class::ProviderClassError),
    #[error(transparent)]
    Vault(#[from] super::vault::VaultError),
    #[error(transparent)]
    Fetch(#[from] crate::secrets::sync::SyncError),
}

impl MountError {
    fn code(&self) -> u32 {
        match self {
            MountError::Fetch(_) | MountError::Vault(_) => UNKNOWN,
            _ => INVALID_ARGUMENT,
        }
    }
}

pub struct Provider {
    vault: VaultAccess,
    mounts: Semaphore,
}

type Body =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

impl Provider {
    pub fn new(vault: VaultAccess) -> Provider {
        Provider {
            vault,
            mounts: Semaphore::new(MAX_MOUNTS),
        }
    }

    pub fn version(&self, request: &VersionRequest) -> VersionResponse {
        tracing::debug!(driver = %request.version, "Version");
        VersionResponse {
            version: "v1alpha1".into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    /// Fetches every object of the class the attributes describe.
    pub async fn mount(&self, request: &MountRequest) -> Result<MountResponse, MountError> {
        let attributes: BTreeMap<String, String> =
            serde_json::from_str(&request.attributes).map_err(MountError::Attributes)?;
        let secrets: BTreeMap<String, String> = if request.secrets.trim().is_empty() {
            BTreeMap::new()
        } else {
            serde_json::from_str(&request.secrets).map_err(MountError::Secrets)?
        };
        let mode = match request.permission.trim() {
            "" => DEFAULT_MODE,
            p => p
                .parse::<i32>()
                .ok()
                .filter(|m| (0..=0o777).contains(m))
                .ok_or_else(|| MountError::Permission(crate::secret::clip(p, 20)))?,
        };
        let principal = match (secrets.get("clientid"), secrets.get("clientsecret")) {
            (Some(id), Some(secret)) => Some(ServicePrincipal {
                client_id: id.trim().to_string(),
                client_secret: Secret::new(secret.trim().to_string()),
            }),
            (None, None) => None,
            _ => return Err(MountError::HalfCredentials),
        };
        let namespace = attributes
            .get("csi.storage.k8s.io/pod.namespace")
            .cloned()
            .unwrap_or_default();
        let pod = attributes
            .get("csi.storage.k8s.io/pod.name")
            .cloned()
            .unwrap_or_default();
        let document = json!({
            "apiVersion": "secrets-store.csi.x-k8s.io/v1",
            "kind": "SecretProviderClass",
            "metadata": {"name": attributes.get("secretProviderClass").cloned().unwrap_or_else(|| "mount".into()), "namespace": namespace},
            "spec": {"provider": "azure", "parameters": attributes},
        });
        let class = ProviderClass::parse(&document.to_string())?;
        let client = self.vault.client(&class, principal.as_ref())?;
        let objects: Vec<(String, String)> = class
            .objects
            .iter()
            .map(|o| {
                (
                    o.file_name().to_string(),
                    format!("{}/{}", o.object.kind, o.object.name),
                )
            })
            .collect();
        let mut syncer = Syncer::new(
            client,
            class,
            Targets {
                mount_dir: None,
                secrets: None,
            },
        );
        syncer.pass().await?;
        let versions = syncer.versions();
        let files = syncer.files()?;
        tracing::info!(namespace = %namespace, pod = %pod, files = files.len(), "mounted");
        Ok(MountResponse {
            object_version: objects
                .iter()
                .map(|(file, id)| ObjectVersion {
                    id: id.clone(),
                    version: versions.get(file).cloned().unwrap_or_default(),
                })
                .collect(),
            error: None,
            files: files
                .into_iter()
                .map(|(path, contents)| File {
                    path,
                    mode,
                    contents,
                })
                .collect(),
        })
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let path = req.uri().path().to_string();
        let body = match Limited::new(req.into_body(), MAX_REQUEST).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => return Ok(status(INVALID_ARGUMENT, "request too large or cut off")),
        };
        let message = match proto::unframe(&body) {
            Ok(m) => m,
            Err(e) => return Ok(status(INVALID_ARGUMENT, &e.to_string())),
        };
        Ok(match path.as_str() {
            proto::VERSION_PATH => match VersionRequest::decode(message) {
                Ok(request) => ok(&self.version(&request).encode()),
                Err(e) => status(INVALID_ARGUMENT, &format!("VersionRequest: {e}")),
            },
            proto::MOUNT_PATH => {
                let request = match MountRequest::decode(message) {
                    Ok(r) => r,
                    Err(e) => return Ok(status(INVALID_ARGUMENT, &format!("MountRequest: {e}"))),
                };
                let Ok(_permit) = self.mounts.acquire().await else {
                    return Ok(status(UNKNOWN, "shutting down"));
                };
                match tokio::time::timeout(MOUNT_TIMEOUT, self.mount(&request)).await {
                    Ok(Ok(response)) => ok(&response.encode()),
                    Ok(Err(e)) => {
                        let message = error_chain(&e);
                        tracing::warn!(error = %message, "Mount failed");
                        status(e.code(), &message)
                    }
                    Err(_) => status(DEADLINE_EXCEEDED, "Key Vault did not answer in time"),
                }
            }
            other => status(
                UNIMPLEMENTED,
                &format!("unknown method {}", crate::secret::clip(other, 100)),
            ),
        })
    }
}

fn grpc_response(frames: Vec<Result<Frame<Bytes>, Infallible>>) -> Response<Body> {
    let mut response = Response::new(StreamBody::new(futures_util::stream::iter(frames)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

/// What grpc-message percent-encodes: controls, non-ASCII and '%' itself.
const GRPC_MESSAGE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');

fn trailers(code: u32, message: &str) -> HeaderMap {
    let mut map = HeaderMap::new();
    map.insert("grpc-status", HeaderValue::from(code));
    if !message.is_empty() {
        // grpc-message is percent-encoded; keep it to printable ASCII.
        let encoded: String =
            percent_encoding::utf8_percent_encode(message, GRPC_MESSAGE).to_string();
        if let Ok(v) = HeaderValue::from_str(&encoded) {
            map.insert("grpc-message", v);
        }
    }
    map
}

fn ok(message: &[u8]) -> Response<Body> {
    grpc_response(vec![
        Ok(Frame::data(Bytes::from(proto::frame(message)))),
        Ok(Frame::trailers(trailers(0, ""))),
    ])
}

fn status(code: u32, message: &str) -> Response<Body> {
    grpc_response(vec![Ok(Frame::trailers(trailers(code, message)))])
}

/// The file's identity (device, inode), to tell our socket from one bound after it.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Binds `socket` (replacing a stale one, refusing a live one) and serves until `shutdown`;
/// removes it on the way out if it is still the one it bound.
pub async fn serve(
    socket: &Path,
    provider: Provider,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if std::fs::symlink_metadata(socket).is_ok() {
        // Another provider (an old pod still terminating) serves it: taking the path away
        // would leave the driver talking to whichever bound last.
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "{} accepts connections: another provider is serving it; stop that one first",
                    socket.display()
                ),
            ));
        }
        std::fs::remove_file(socket)?;
    }
    let listener = UnixListener::bind(socket)?;
    let ours = file_id(socket);
    // Only the driver (root on the node) calls the provider.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    }
    tracing::info!(socket = %socket.display(), "CSI provider listening");
    let provider = Arc::new(provider);
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let provider = provider.clone();
        let stop = shutdown.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| provider.clone().handle(req));
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "provider connection ended");
                    }
                }
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                }
            }
        });
    }
    connections.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), connections.wait()).await;
    // A successor may have replaced the path with its own socket meanwhile: leave that one.
    if ours.is_some() && file_id(socket) == ours {
        let _ = std::fs::remove_file(socket);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> Provider {
        Provider::new(VaultAccess::for_tests())
    }

    #[tokio::test]
    async fn a_live_socket_is_refused_not_unlinked() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("azure.sock");
        let _other = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let before = file_id(&socket);
        let err = serve(&socket, provider(), CancellationToken::new())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
        assert_eq!(
            file_id(&socket),
            before,
            "the other provider's socket stays"
        );
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_successors_is_left_on_exit() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("azure.sock");
        // Stale: bound and closed, nobody accepts.
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        let shutdown = CancellationToken::new();
        let serving = tokio::spawn({
            let socket = socket.clone();
            let shutdown = shutdown.clone();
            async move { serve(&socket, provider(), shutdown).await }
        });
        // A stale socket refuses connections; ours accepts them once bound.
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            tokio::task::yield_now().await;
        }
        // A successor takes the path over before this one exits (our listener still holds
        // its inode, so the successor's is another).
        std::fs::remove_file(&socket).unwrap();
        let _successor = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let theirs = file_id(&socket);
        shutdown.cancel();
        serving.await.unwrap().unwrap();
        assert_eq!(file_id(&socket), theirs, "the successor's socket stays");
    }
}
