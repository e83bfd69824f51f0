//! Which relay replicas this agent's listeners hold, and which replica names the relay
//! announced (see `relay::replicas`): rendezvous addresses may name those and nothing else,
//! and listeners keep re-dialing the shared name until they sit on `--relay-replicas`
//! distinct replicas, so losing one replica leaves the cluster reachable through another.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use crate::tunnel::dial::Replicas;

/// Replica names kept from one relay, at most.
const MAX_ANNOUNCED: usize = 64;

/// What a listener does with the replica it landed on.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    Keep,
    /// Another listener already holds this replica and others are available: dial again.
    Elsewhere,
}

#[derive(Default)]
pub struct ReplicaView {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Per listener (by index): the replica it holds and the names it was told.
    held: HashMap<usize, (String, Vec<String>)>,
}

/// `host[:port]` of a `wss://` address, the way a replica names itself (no port for 443).
fn authority(address: &str) -> Option<String> {
    let url = url::Url::parse(address).ok()?;
    let host = url.host_str()?.to_ascii_lowercase();
    Some(match url.port() {
        Some(p) if p != 443 => format!("{host}:{p}"),
        _ => host,
    })
}

impl ReplicaView {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Listener `index` connected to replica `me`, which announced `replicas`: keep it, or go
    /// elsewhere when another listener holds it and fewer than `want` distinct replicas are
    /// held while more exist.
    pub fn claim(&self, index: usize, replicas: &Replicas, want: usize) -> Claim {
        let Some(me) = &replicas.me else {
            return Claim::Keep;
        };
        let mut inner = self.lock();
        let others: HashSet<&String> = inner
            .held
            .iter()
            .filter(|(i, _)| **i != index)
            .map(|(_, (r, _))| r)
            .collect();
        let known: HashSet<&String> = replicas.all.iter().chain(others.iter().copied()).collect();
        if others.contains(me) && others.len() < want && known.len() > others.len() {
            return Claim::Elsewhere;
        }
        inner.held.insert(index, (me.clone(), replicas.all.clone()));
        Claim::Keep
    }

    /// Listener `index`'s replica sent a new list of replicas.
    pub fn update(&self, index: usize, all: Vec<String>) {
        let all: Vec<String> = all
            .into_iter()
            .map(|a| a.to_ascii_lowercase())
            .filter(|a| a.len() <= 255 && a.parse::<http::uri::Authority>().is_ok())
            .take(MAX_ANNOUNCED)
            .collect();
        if let Some((_, told)) = self.lock().held.get_mut(&index) {
            *told = all;
        }
    }

    /// Listener `index` left its replica.
    pub fn release(&self, index: usize) {
        self.lock().held.remove(&index);
    }

    /// Whether a rendezvous address names a replica announced to a listener held now.
    pub fn allows(&self, address: &str) -> bool {
        let Some(authority) = authority(address) else {
            return false;
        };
        self.lock()
            .held
            .values()
            .any(|(me, all)| *me == authority || all.contains(&authority))
    }

    /// Distinct replicas held now.
    pub fn distinct(&self) -> usize {
        let inner = self.lock();
        inner
            .held
            .values()
            .map(|(r, _)| r)
            .collect::<HashSet<_>>()
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announced(me: &str, all: &[&str]) -> Replicas {
        Replicas {
            me: Some(me.into()),
            all: all.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn listeners_spread_over_distinct_replicas_while_more_exist() {
        let view = ReplicaView::default();
        let all = ["r0:8443", "r1:8443", "r2:8443"];
        assert_eq!(view.claim(0, &announced("r0:8443", &all), 2), Claim::Keep);
        assert_eq!(
            view.claim(1, &announced("r0:8443", &all), 2),
            Claim::Elsewhere
        );
        assert_eq!(view.claim(1, &announced("r1:8443", &all), 2), Claim::Keep);
        assert_eq!(view.distinct(), 2);
        // Enough distinct replicas: a third listener may share.
        assert_eq!(view.claim(2, &announced("r0:8443", &all), 2), Claim::Keep);
        // Only one replica exists: sharing it is all there is.
        let lone = ReplicaView::default();
        assert_eq!(lone.claim(0, &announced("r0", &["r0"]), 2), Claim::Keep);
        assert_eq!(lone.claim(1, &announced("r0", &["r0"]), 2), Claim::Keep);
        // A single relay announces nothing: nothing to spread over.
        assert_eq!(lone.claim(2, &Replicas::default(), 2), Claim::Keep);
    }

    #[test]
    fn only_announced_replicas_may_be_rendezvous_hosts() {
        let view = ReplicaView::default();
        assert!(!view.allows("wss://r1:8443/$hc/c?sb-hc-action=accept"));
        view.claim(0, &announced("r0:8443", &["r0:8443", "r1:8443"]), 2);
        assert!(view.allows("wss://R1:8443/$hc/c?sb-hc-action=accept"));
        assert!(view.allows("wss://r0:8443/$hc/c"));
        assert!(
            !view.allows("wss://r1:9443/$hc/c"),
            "another port is another service"
        );
        assert!(!view.allows("wss://evil.example/$hc/c"));
        view.release(0);
        assert!(
            !view.allows("wss://r1:8443/$hc/c"),
            "forgotten with the listener"
        );
        view.claim(
            0,
            &announced("relay.example.com", &["relay.example.com"]),
            2,
        );
        assert!(view.allows("wss://relay.example.com:443/$hc/c"));
    }
}
