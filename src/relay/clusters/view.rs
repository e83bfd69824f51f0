//! A registration as callers see it: the stored resource with its connectivity status as of
//! now.

use std::time::Duration;

use super::store::Record;
use crate::arm::{ConnectedCluster, ConnectivityStatus};
use crate::tunnel::sas::unix_now;

/// A cluster whose agent has not reported for this long is Offline.
pub const OFFLINE_AFTER: Duration = Duration::from_secs(5 * 60);
/// ... and after this long its credential has lapsed: Expired, and no more user tokens.
pub const EXPIRED_AFTER: Duration = Duration::from_secs(90 * 24 * 3600);

pub fn status_of(record: &Record) -> ConnectivityStatus {
    match record.last_heartbeat {
        None => ConnectivityStatus::Connecting,
        Some(at) => {
            let silent = unix_now().saturating_sub(at);
            if silent > EXPIRED_AFTER.as_secs() {
                ConnectivityStatus::Expired
            } else if silent > OFFLINE_AFTER.as_secs() {
                ConnectivityStatus::Offline
            } else {
                ConnectivityStatus::Connected
            }
        }
    }
}

/// The resource as callers see it, with the status as of now.
pub fn present(record: &Record) -> ConnectedCluster {
    let mut resource = record.resource.clone();
    resource.properties.connectivity_status = status_of(record);
    resource.properties.last_connectivity_time = record.last_heartbeat.map(rfc3339);
    resource
}

pub fn rfc3339(unix: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}
