//! A SAS authorization rule: what the configuration declares, what each registered cluster
//! adds, and what every token is checked against.

use sha2::{Digest, Sha256};

use crate::secret::Secret;

/// An authorization rule, as Azure Relay has them: a named key (and, for rotation without
/// downtime, a secondary key) with Listen and/or Send rights.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub key: Secret,
    /// Also accepted, so that clients can move to it before the primary key is renewed.
    pub secondary_key: Option<Secret>,
    pub listen: bool,
    pub send: bool,
    /// May administer the cluster registry (the management API).
    pub manage: bool,
    pub entity: Option<String>,
}

impl Rule {
    /// The keys a token may be signed with, primary first.
    pub fn keys(&self) -> impl Iterator<Item = &Secret> {
        std::iter::once(&self.key).chain(self.secondary_key.as_ref())
    }

    /// Whether `grant` still holds: its key is still one of this rule's.
    pub fn still_grants(&self, grant: &Grant) -> bool {
        self.name == grant.rule && self.keys().any(|k| KeyDigest::of(k) == grant.key)
    }
}

/// A digest of a key, kept with each connection instead of the key itself.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    pub fn of(key: &Secret) -> KeyDigest {
        KeyDigest(Sha256::digest(key.expose().as_bytes()).into())
    }

    /// Hex, as relay replicas pass a listener's grant to the replica its sender landed on.
    pub fn to_hex(self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(hex: &str) -> Option<KeyDigest> {
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(KeyDigest(out))
    }
}

impl std::fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyDigest(..)")
    }
}

/// What authorized a long-lived connection: the rule and which of its keys. Removing the rule
/// or renewing that key revokes the grant, and the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub rule: String,
    pub key: KeyDigest,
}

/// A listener's grant as its control channel renews it: the rendezvous it accepted check the
/// grant current at each change, and the last one once the channel has closed.
#[derive(Debug, Clone)]
pub struct ListenerGrant(std::sync::Arc<std::sync::Mutex<Grant>>);

impl ListenerGrant {
    pub fn new(grant: Grant) -> ListenerGrant {
        ListenerGrant(std::sync::Arc::new(std::sync::Mutex::new(grant)))
    }

    pub fn get(&self) -> Grant {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, grant: Grant) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = grant;
    }
}

/// The configuration's rules, replaceable while the relay runs (`relay` re-reads its file on
/// SIGHUP): a rule removed or re-keyed revokes what it authorized, as in the registry.
#[derive(Clone)]
pub struct RuleSet {
    rules: std::sync::Arc<std::sync::RwLock<std::sync::Arc<Vec<Rule>>>>,
    changes: tokio::sync::watch::Sender<u64>,
}

impl RuleSet {
    pub fn new(rules: Vec<Rule>) -> RuleSet {
        RuleSet {
            rules: std::sync::Arc::new(std::sync::RwLock::new(std::sync::Arc::new(rules))),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }

    pub fn find(&self, name: &str) -> Option<Rule> {
        let rules = self.rules.read().unwrap_or_else(|p| p.into_inner()).clone();
        rules.iter().find(|r| r.name == name).cloned()
    }

    /// The rules in force now.
    pub fn rules(&self) -> Vec<Rule> {
        self.rules
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .to_vec()
    }

    pub fn len(&self) -> usize {
        self.rules.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Swaps in `rules`; open connections then recheck what authorized them.
    pub fn replace(&self, rules: Vec<Rule>) {
        *self.rules.write().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(rules);
        self.changes.send_modify(|n| *n += 1);
    }

    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

impl From<Vec<Rule>> for RuleSet {
    fn from(rules: Vec<Rule>) -> RuleSet {
        RuleSet::new(rules)
    }
}

/// Finds a rule by name: the configured rules, then the registered clusters' own.
pub type FindRule<'a> = dyn Fn(&str) -> Option<Rule> + Sync + 'a;
