//! `POST .../{name}/agentStatus`: the agent's heartbeat, authenticated by its signature over
//! timestamp, path and body with the key registered for the cluster. The signature is checked
//! before the write transaction begins, so an unauthenticated report never writes and never
//! holds up the registry's writers while a signature is verified.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};

use super::error::{ApiError, ReportRefusal};
use super::reply::{self, Body};
use super::store::{Change, Record, Store};
use crate::arm::{
    agent_key, signed_message, AgentStatus, ClusterId, HEADER_SIGNATURE, HEADER_TIMESTAMP,
};
use crate::tunnel::sas::unix_now;

/// How far an agent's report timestamp may be from the relay's clock.
const REPORT_SKEW: Duration = Duration::from_secs(5 * 60);

/// A report as it arrived: what the signature covers, and the headers that carry it.
pub struct SignedReport<'a> {
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    pub body: &'a Bytes,
}

/// Verifies and records an agent's status report. Every refusal is the same 401, so the
/// endpoint does not tell an unauthenticated caller which clusters exist. Blocks (a read, then
/// a write transaction): called on a blocking worker.
pub fn agent_status(
    store: &Store,
    id: &ClusterId,
    report: &SignedReport<'_>,
) -> Result<Response<Body>, ApiError> {
    let (timestamp, signature) = signature_headers(report.headers)?;
    let now = unix_now();
    if timestamp.abs_diff(now) > REPORT_SKEW.as_secs() {
        return Err(ReportRefusal::Skewed.into());
    }
    let status: AgentStatus = serde_json::from_slice(report.body).map_err(ApiError::StatusBody)?;
    let message = signed_message(timestamp, report.path, report.body);
    let key = id.key();
    let Some(registered) = store.get(&key)? else {
        // As long as a failed check of a registered cluster's report, so its time does not
        // tell a stranger which clusters exist.
        verify_as_if_registered(&message, &signature);
        return Err(ReportRefusal::NotVerified.into());
    };
    verify(&registered, &message, &signature)?;
    let verified_with = registered.resource.properties.agent_public_key_certificate;
    store.update::<(), ApiError>(&key, |current| {
        let mut record = current.ok_or(ReportRefusal::NotVerified)?;
        // Re-registered with another key since the check: this report proves nothing now.
        if record.resource.properties.agent_public_key_certificate != verified_with {
            return Err(ReportRefusal::NotVerified.into());
        }
        if timestamp <= record.last_report_timestamp {
            return Err(ReportRefusal::Replay.into());
        }
        record_report(&mut record, status.clone(), now, timestamp);
        Ok((Change::Put(Box::new(record)), ()))
    })?;
    Ok(reply::empty(StatusCode::NO_CONTENT))
}

/// The report's timestamp and decoded signature.
fn signature_headers(headers: &HeaderMap) -> Result<(u64, Vec<u8>), ReportRefusal> {
    use base64::Engine;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let timestamp = header(HEADER_TIMESTAMP)
        .and_then(|t| t.parse().ok())
        .ok_or(ReportRefusal::NoTimestamp)?;
    let signature = header(HEADER_SIGNATURE)
        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        .ok_or(ReportRefusal::NoSignature)?;
    Ok((timestamp, signature))
}

fn verify(record: &Record, message: &[u8], signature: &[u8]) -> Result<(), ReportRefusal> {
    let key = agent_key(&record.resource.properties.agent_public_key_certificate)
        .map_err(|_| ReportRefusal::NotVerified)?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, key)
        .verify(message, signature)
        .map_err(|_| ReportRefusal::NotVerified)
}

/// A signature check against a key nobody holds, for a report naming no registered cluster.
fn verify_as_if_registered(message: &[u8], signature: &[u8]) {
    use ring::signature::KeyPair;
    static NOBODYS: std::sync::OnceLock<Option<Vec<u8>>> = std::sync::OnceLock::new();
    let key = NOBODYS.get_or_init(|| {
        let rng = ring::rand::SystemRandom::new();
        let alg = &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING;
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).ok()?;
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).ok()?;
        Some(pair.public_key().as_ref().to_vec())
    });
    if let Some(key) = key {
        let _ =
            ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, key)
                .verify(message, signature);
    }
}

fn record_report(record: &mut Record, status: AgentStatus, now: u64, timestamp: u64) {
    let p = &mut record.resource.properties;
    p.agent_version = Some(status.agent_version);
    p.kubernetes_version = status.kubernetes_version;
    p.total_node_count = status.total_node_count;
    p.total_core_count = status.total_core_count;
    record.last_heartbeat = Some(now);
    record.last_report_timestamp = timestamp;
}
