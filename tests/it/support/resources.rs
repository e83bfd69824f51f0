//! The resource types the stand-in serves, as one table: discovery, OpenAPI, routing, the
//! store and RBAC all read it, so serving another type is one more line here.

/// One REST resource: where it lives and how clients name it.
#[derive(Debug, PartialEq, Eq)]
pub struct Resource {
    /// API group; empty for the core group (`/api/v1`).
    pub group: &'static str,
    pub version: &'static str,
    /// The plural, as in paths and RBAC rules.
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
}

const fn core(
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
) -> Resource {
    grouped("", plural, kind, namespaced, short_names)
}

const fn grouped(
    group: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
) -> Resource {
    Resource {
        group,
        version: "v1",
        plural,
        // Every kind served here has a singular that is its lowercased kind.
        singular: "",
        kind,
        namespaced,
        short_names,
        categories: &[],
    }
}

const RBAC: &str = "rbac.authorization.k8s.io";

pub static NAMESPACES: Resource = core("namespaces", "Namespace", false, &["ns"]);
pub static PODS: Resource = Resource {
    categories: &["all"],
    ..core("pods", "Pod", true, &["po"])
};
pub static SECRETS: Resource = core("secrets", "Secret", true, &[]);
pub static SERVICE_ACCOUNTS: Resource = core("serviceaccounts", "ServiceAccount", true, &["sa"]);
pub static NODES: Resource = core("nodes", "Node", false, &["no"]);
pub static DEPLOYMENTS: Resource = Resource {
    categories: &["all"],
    ..grouped("apps", "deployments", "Deployment", true, &["deploy"])
};
pub static CLUSTER_ROLES: Resource = grouped(RBAC, "clusterroles", "ClusterRole", false, &[]);
pub static CLUSTER_ROLE_BINDINGS: Resource = grouped(
    RBAC,
    "clusterrolebindings",
    "ClusterRoleBinding",
    false,
    &[],
);
pub static ROLES: Resource = grouped(RBAC, "roles", "Role", true, &[]);
pub static ROLE_BINDINGS: Resource = grouped(RBAC, "rolebindings", "RoleBinding", true, &[]);
pub static SERVICES: Resource = Resource {
    categories: &["all"],
    ..core("services", "Service", true, &["svc"])
};
pub static CONFIG_MAPS: Resource = core("configmaps", "ConfigMap", true, &["cm"]);
pub static EVENTS: Resource = core("events", "Event", true, &["ev"]);
pub static DAEMON_SETS: Resource = Resource {
    categories: &["all"],
    ..grouped("apps", "daemonsets", "DaemonSet", true, &["ds"])
};
pub static LEASES: Resource = grouped("coordination.k8s.io", "leases", "Lease", true, &[]);
pub static CRDS: Resource = grouped(
    "apiextensions.k8s.io",
    "customresourcedefinitions",
    "CustomResourceDefinition",
    false,
    &["crd", "crds"],
);
/// Custom resources are served as if their CRDs were installed: the stand-in does not grow
/// its table at run time. The Secrets Store CSI driver's class and the Key Vault extension's
/// status objects.
pub static SECRET_PROVIDER_CLASSES: Resource = grouped(
    "secrets-store.csi.x-k8s.io",
    "secretproviderclasses",
    "SecretProviderClass",
    true,
    &[],
);
pub static SECRET_SYNC_STATUSES: Resource = grouped(
    "clusterconnect.io",
    "secretsyncstatuses",
    "SecretSyncStatus",
    true,
    &["syncstatus"],
);

/// Everything served, in discovery order.
pub static ALL: [&Resource; 18] = [
    &NAMESPACES,
    &PODS,
    &SERVICES,
    &SECRETS,
    &CONFIG_MAPS,
    &SERVICE_ACCOUNTS,
    &NODES,
    &DEPLOYMENTS,
    &CLUSTER_ROLES,
    &CLUSTER_ROLE_BINDINGS,
    &ROLES,
    &ROLE_BINDINGS,
    &EVENTS,
    &DAEMON_SETS,
    &LEASES,
    &CRDS,
    &SECRET_PROVIDER_CLASSES,
    &SECRET_SYNC_STATUSES,
];

/// The API groups besides core, in discovery order.
pub const GROUPS: [&str; 6] = [
    "apps",
    RBAC,
    "coordination.k8s.io",
    "apiextensions.k8s.io",
    "secrets-store.csi.x-k8s.io",
    "clusterconnect.io",
];

impl Resource {
    /// `v1` or `apps/v1`: an object's `apiVersion`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods` or `deployments.apps`: how the apiserver names the resource in messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// `Pod` or `Deployment.apps`: how `Invalid` messages name the kind.
    pub fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.to_string()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }

    pub fn singular(&self) -> String {
        if self.singular.is_empty() {
            self.kind.to_ascii_lowercase()
        } else {
            self.singular.to_string()
        }
    }

    /// `/api/v1` or `/apis/apps/v1`.
    pub fn prefix(&self) -> String {
        if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        }
    }
}

/// The resource served under `group`/`version` as `plural`.
pub fn lookup(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    ALL.iter()
        .copied()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The resources of one group version.
pub fn in_group<'a>(
    group: &'a str,
    version: &'a str,
) -> impl Iterator<Item = &'static Resource> + 'a {
    ALL.iter()
        .copied()
        .filter(move |r| r.group == group && r.version == version)
}

/// Splits an object path (`/api/v1/namespaces/x/pods/y`, `/apis/apps/v1/deployments`) into its
/// resource, namespace and name; `None` for anything else.
pub fn parse_path(path: &str) -> Option<(&'static Resource, String, Option<String>)> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        ["namespaces", ns, plural, name] => (*ns, *plural, Some(*name)),
        ["namespaces", ns, plural] if lookup(group, version, plural).is_some() => {
            (*ns, *plural, None)
        }
        [plural, name] => ("", *plural, Some(*name)),
        [plural] => ("", *plural, None),
        _ => return None,
    };
    let resource = lookup(group, version, plural)?;
    Some((resource, namespace.to_string(), name.map(String::from)))
}
