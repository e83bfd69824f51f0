//! What a management path names: ARM's
//! `/subscriptions/{s}[/resourceGroups/{rg}]/providers/Microsoft.Kubernetes/connectedClusters[/{name}[/...]]`.

use super::error::ApiError;
use crate::arm::ClusterId;

/// The clusters of a subscription, or of one resource group in it.
pub struct Scope {
    pub subscription: String,
    pub resource_group: Option<String>,
}

impl Scope {
    /// The lowercase prefix of the ids of the clusters in scope.
    pub fn prefix(&self) -> String {
        match &self.resource_group {
            Some(rg) => format!("/subscriptions/{}/resourcegroups/{rg}/", self.subscription),
            None => format!("/subscriptions/{}/", self.subscription),
        }
        .to_ascii_lowercase()
    }
}

pub enum Target {
    List(Scope),
    Cluster(ClusterId),
    /// `POST .../{name}/{action}`.
    Action(ClusterId, String),
    /// `.../{name}/providers/Microsoft.Authorization/roleAssignments/{assignment}`, lowercase.
    RoleAssignment(ClusterId, String),
    /// `.../{name}/providers/Microsoft.KubernetesConfiguration/extensions`.
    Extensions(ClusterId),
    /// `.../{name}/providers/Microsoft.KubernetesConfiguration/extensions/{extension}`.
    Extension(ClusterId, String),
}

/// `None` when the path is not under `/subscriptions/{s}`: not the management API's.
pub fn parse(path: &str) -> Option<Result<Target, ApiError>> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    if !parts.first().is_some_and(|p| eq(p, "subscriptions")) {
        return None;
    }
    let subscription = parts.get(1)?.to_string();
    Some(parse_under(&parts, subscription))
}

fn parse_under(parts: &[&str], subscription: String) -> Result<Target, ApiError> {
    if names_provider(parts, 2) && parts.len() == 5 {
        return Ok(Target::List(Scope {
            subscription,
            resource_group: None,
        }));
    }
    if !parts.get(2).is_some_and(|p| eq(p, "resourceGroups")) || !names_provider(parts, 4) {
        return Err(ApiError::UnknownPath);
    }
    let resource_group = parts[3].to_string();
    if parts.len() == 7 {
        return Ok(Target::List(Scope {
            subscription,
            resource_group: Some(resource_group),
        }));
    }
    let id =
        ClusterId::new(&subscription, &resource_group, parts[7]).map_err(ApiError::ClusterId)?;
    match &parts[8..] {
        [] => Ok(Target::Cluster(id)),
        [action] => Ok(Target::Action(id, action.to_string())),
        [p, ns, ra, assignment]
            if eq(p, "providers")
                && eq(ns, "Microsoft.Authorization")
                && eq(ra, "roleAssignments") =>
        {
            Ok(Target::RoleAssignment(id, assignment.to_ascii_lowercase()))
        }
        [p, ns, ext]
            if eq(p, "providers") && eq(ns, EXTENSION_PROVIDER) && eq(ext, "extensions") =>
        {
            Ok(Target::Extensions(id))
        }
        [p, ns, ext, name]
            if eq(p, "providers") && eq(ns, EXTENSION_PROVIDER) && eq(ext, "extensions") =>
        {
            crate::arm::check_extension_name(name).map_err(ApiError::ExtensionName)?;
            Ok(Target::Extension(id, name.to_string()))
        }
        _ => Err(ApiError::UnknownPath),
    }
}

const EXTENSION_PROVIDER: &str = "Microsoft.KubernetesConfiguration";

/// `providers/Microsoft.Kubernetes/connectedClusters` at `parts[i..]`.
fn names_provider(parts: &[&str], i: usize) -> bool {
    parts.get(i).is_some_and(|p| eq(p, "providers"))
        && parts
            .get(i + 1)
            .is_some_and(|p| eq(p, "Microsoft.Kubernetes"))
        && parts.get(i + 2).is_some_and(|p| eq(p, "connectedClusters"))
}

fn eq(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RG: &str =
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Kubernetes/connectedClusters";

    #[test]
    fn paths_name_lists_clusters_actions_and_role_assignments() {
        assert!(parse("/healthz").is_none());
        assert!(parse("/subscriptions").is_none());
        assert!(matches!(
            parse("/subscriptions/s/providers/Microsoft.Kubernetes/connectedClusters"),
            Some(Ok(Target::List(Scope {
                resource_group: None,
                ..
            })))
        ));
        assert!(matches!(
            parse(RG),
            Some(Ok(Target::List(Scope {
                resource_group: Some(_),
                ..
            })))
        ));
        assert!(matches!(
            parse(&format!("{RG}/c")),
            Some(Ok(Target::Cluster(_)))
        ));
        assert!(matches!(
            parse(&format!("{RG}/c/listClusterUserCredential")),
            Some(Ok(Target::Action(_, a))) if a == "listClusterUserCredential"
        ));
        assert!(matches!(
            parse(&format!("{RG}/c/providers/Microsoft.Authorization/roleAssignments/ABC")),
            Some(Ok(Target::RoleAssignment(_, a))) if a == "abc"
        ));
        assert!(matches!(
            parse("/subscriptions/s/x"),
            Some(Err(ApiError::UnknownPath))
        ));
        assert!(matches!(
            parse(&format!("{RG}/c/providers/Microsoft.KubernetesConfiguration/extensions/akv")),
            Some(Ok(Target::Extension(_, e))) if e == "akv"
        ));
        assert!(matches!(
            parse(&format!(
                "{RG}/c/providers/Microsoft.KubernetesConfiguration/extensions"
            )),
            Some(Ok(Target::Extensions(_)))
        ));
        assert!(matches!(
            parse(&format!(
                "{RG}/c/providers/Microsoft.KubernetesConfiguration/extensions/A_B"
            )),
            Some(Err(ApiError::ExtensionName(_)))
        ));
        assert!(matches!(
            parse(&format!("{RG}/c/a/b")),
            Some(Err(ApiError::UnknownPath))
        ));
        assert!(matches!(
            parse(&format!("{RG}/a%20b")),
            Some(Err(ApiError::ClusterId(_)))
        ));
    }
}
