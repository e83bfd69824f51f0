//! `.../connectedClusters/{name}/providers/Microsoft.KubernetesConfiguration/extensions[/{ext}]`:
//! the cluster's extension, kept in its registration. Owners write it (the installer reports
//! the state it found in the cluster, as Arc's extension agent does); anyone with a role on
//! the cluster reads it. One instance per cluster, as Arc allows for the Key Vault provider.

use http::StatusCode;
use serde_json::json;

use super::error::ApiError;
use super::handlers::{owner, readable, Call, Reply};
use super::reply;
use super::store::Change;
use super::view::rfc3339;
use crate::arm::{
    extension_path, ClusterId, Extension, ExtensionProperties, ExtensionRequest, SystemData,
    EXTENSION_RESOURCE_TYPE, KEY_VAULT_EXTENSION_TYPE,
};
use crate::extension::settings::Settings;
use crate::tunnel::sas::unix_now;

/// Where the Key Vault provider is installed unless the request names a namespace (Arc's).
pub const DEFAULT_RELEASE_NAMESPACE: &str = "kube-system";

/// `GET .../extensions`: the cluster's extensions (none or one).
pub fn list(call: &Call, id: &ClusterId) -> Reply {
    let record = readable(call, id)?;
    let value: Vec<&Extension> = record.extension.iter().collect();
    Ok(reply::json(StatusCode::OK, &json!({ "value": value })))
}

/// `GET .../extensions/{ext}`.
pub fn show(call: &Call, id: &ClusterId, name: &str) -> Reply {
    let record = readable(call, id)?;
    match record.extension {
        Some(e) if e.name.eq_ignore_ascii_case(name) => Ok(reply::json(StatusCode::OK, &e)),
        _ => Err(not_found(id, name)),
    }
}

/// `PUT .../extensions/{ext}` (owners): creates (201) or updates (200) the extension.
pub fn put(call: &Call, id: &ClusterId, name: &str) -> Reply {
    let request: ExtensionRequest =
        serde_json::from_slice(&call.body).map_err(ApiError::ExtensionBody)?;
    let mut properties = request.properties;
    if !properties
        .extension_type
        .eq_ignore_ascii_case(KEY_VAULT_EXTENSION_TYPE)
    {
        return Err(ApiError::ExtensionType(crate::secret::clip(
            &properties.extension_type,
            100,
        )));
    }
    properties.extension_type = KEY_VAULT_EXTENSION_TYPE.to_string();
    // Protected settings are write-only in ARM; nothing here needs them, so none are kept.
    properties.configuration_protected_settings.clear();
    if properties.scope.cluster.release_namespace.trim().is_empty() {
        properties.scope.cluster.release_namespace = DEFAULT_RELEASE_NAMESPACE.to_string();
    }
    if properties.provisioning_state.trim().is_empty() {
        properties.provisioning_state = "Creating".to_string();
    }
    if properties.release_train.is_empty() {
        properties.release_train = "Stable".to_string();
    }
    // Stored settings are read back by every later show, update and install: refuse what the
    // installer could not apply rather than keep it.
    Settings::parse(&properties.configuration_settings).map_err(ApiError::ExtensionSettings)?;
    let caller = &call.caller;
    let now = rfc3339(unix_now());
    let (extension, created) = call.store.update(&id.key(), |current| {
        let mut record = current.ok_or_else(|| ApiError::not_found(id))?;
        owner(caller, &record, id)?;
        let (extension, created) = match record.extension.clone() {
            Some(existing) if !existing.name.eq_ignore_ascii_case(name) => {
                return Err(ApiError::ExtensionExists {
                    existing: existing.name,
                })
            }
            Some(mut existing) => {
                same_namespace(&existing, &properties)?;
                existing.properties = properties.clone();
                existing.system_data.last_modified_at = now.clone();
                existing.system_data.last_modified_by = caller.display_name().to_string();
                existing.system_data.last_modified_by_type = caller.kind().to_string();
                (existing, false)
            }
            None => (
                Extension {
                    id: extension_path(id, name),
                    name: name.to_string(),
                    kind: EXTENSION_RESOURCE_TYPE.to_string(),
                    properties: properties.clone(),
                    system_data: SystemData {
                        created_at: now.clone(),
                        created_by: caller.display_name().to_string(),
                        created_by_type: caller.kind().to_string(),
                        last_modified_at: now.clone(),
                        last_modified_by: caller.display_name().to_string(),
                        last_modified_by_type: caller.kind().to_string(),
                    },
                },
                true,
            ),
        };
        record.extension = Some(extension.clone());
        Ok::<_, ApiError>((Change::Put(Box::new(record)), (extension, created)))
    })?;
    tracing::info!(cluster = %id.path(), extension = name, by = caller.display_name(), created, state = %extension.properties.provisioning_state, "extension written");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(reply::json(status, &extension))
}

/// `DELETE .../extensions/{ext}` (owners): 200 when it existed, 204 when it did not.
pub fn delete(call: &Call, id: &ClusterId, name: &str) -> Reply {
    let removed = call.store.update(&id.key(), |current| {
        let mut record = current.ok_or_else(|| ApiError::not_found(id))?;
        owner(&call.caller, &record, id)?;
        let matches = record
            .extension
            .as_ref()
            .is_some_and(|e| e.name.eq_ignore_ascii_case(name));
        if !matches {
            return Ok::<_, ApiError>((Change::Keep, false));
        }
        record.extension = None;
        Ok((Change::Put(Box::new(record)), true))
    })?;
    if removed {
        tracing::info!(cluster = %id.path(), extension = name, by = call.caller.display_name(), "extension deleted");
    }
    Ok(reply::changed(removed))
}

/// The release namespace is where the extension's objects live: a PUT that moved it would
/// leave them installed there, unrecorded.
fn same_namespace(existing: &Extension, requested: &ExtensionProperties) -> Result<(), ApiError> {
    let existing_ns = &existing.properties.scope.cluster.release_namespace;
    let requested_ns = &requested.scope.cluster.release_namespace;
    if existing_ns != requested_ns {
        return Err(ApiError::ReleaseNamespaceImmutable {
            name: existing.name.clone(),
            existing: existing_ns.clone(),
            requested: crate::secret::clip(requested_ns, 100),
        });
    }
    Ok(())
}

fn not_found(id: &ClusterId, name: &str) -> ApiError {
    ApiError::ExtensionNotFound {
        name: name.to_string(),
        cluster: id.name.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extension(namespace: &str) -> Extension {
        serde_json::from_value(json!({
            "id": "x", "name": "akvsecretsprovider", "type": EXTENSION_RESOURCE_TYPE,
            "properties": {
                "extensionType": KEY_VAULT_EXTENSION_TYPE,
                "scope": {"cluster": {"releaseNamespace": namespace}},
            },
            "systemData": {
                "createdAt": "t", "createdBy": "u", "createdByType": "User",
                "lastModifiedAt": "t", "lastModifiedBy": "u", "lastModifiedByType": "User",
            },
        }))
        .unwrap()
    }

    #[test]
    fn the_release_namespace_cannot_change() {
        let existing = extension("kube-system");
        assert!(same_namespace(&existing, &extension("kube-system").properties).is_ok());
        let err = same_namespace(&existing, &extension("other").properties).unwrap_err();
        assert!(matches!(err, ApiError::ReleaseNamespaceImmutable { .. }));
        assert!(err.to_string().contains("kube-system"), "{err}");
    }
}
