//! A SAS authorization rule: what the configuration declares, what each registered cluster
//! adds, and what every token is checked against.

use crate::secret::Secret;

/// An authorization rule, as Azure Relay has them: a named key with Listen and/or Send rights.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub key: Secret,
    pub listen: bool,
    pub send: bool,
    /// May administer the cluster registry (the management API).
    pub manage: bool,
    pub entity: Option<String>,
}

/// Finds a rule by name: the configured rules, then the registered clusters' own.
pub type FindRule<'a> = dyn Fn(&str) -> Option<Rule> + Sync + 'a;
