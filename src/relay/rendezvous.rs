//! Who is listening on which hybrid connection, and which senders wait for a listener to
//! accept. The only shared state of the relay; every critical section is a few map operations.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hyper::upgrade::OnUpgrade;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use super::gauge::{Gauges, Place};
use super::rule::ListenerGrant;
use crate::tunnel::protocol::ControlMessage;

/// How a listener answered one sender.
pub enum AcceptOutcome {
    /// The listener's upgrade, its connection slot (which the splice keeps), and the
    /// WebSocket subprotocol it chose, which the sender's 101 must carry.
    Accepted(
        OnUpgrade,
        Arc<OwnedSemaphorePermit>,
        Option<http::HeaderValue>,
    ),
    Rejected {
        status: u16,
        description: String,
    },
}

struct ListenerEntry {
    id: u64,
    tx: mpsc::Sender<Box<ControlMessage>>,
    /// Where this listener reaches the relay (`host[:port]`, from configuration): the host
    /// its rendezvous addresses name, which is the one host it already trusts.
    authority: String,
    /// The address its control channel comes from, where its rendezvous will come from too.
    peer: IpAddr,
    /// What authorizes this listener now: the rendezvous it accepts end when that is revoked.
    grant: ListenerGrant,
    /// The relay replicas it was told of: the only ones whose rendezvous addresses it accepts.
    told: Told,
}

/// The replicas a listener was told of (in its handshake, then in updates when it hears them).
#[derive(Clone, Default)]
pub struct Told {
    pub replicas: Arc<Vec<String>>,
    /// It asked for `replicas` messages when the list changes.
    pub updates: bool,
}

/// A hybrid connection already has as many listeners as allowed.
#[derive(Debug)]
pub struct ListenersFull {
    pub max: usize,
}

struct Pending {
    entity: String,
    reply: oneshot::Sender<AcceptOutcome>,
}

#[derive(Default)]
struct Inner {
    listeners: HashMap<String, Vec<ListenerEntry>>,
    cursor: HashMap<String, usize>,
    pending: HashMap<String, Pending>,
}

#[derive(Clone, Default)]
pub struct Rendezvous {
    inner: Arc<Mutex<Inner>>,
    next_id: Arc<AtomicU64>,
    /// Rendezvous open through each listener (by id), each under the per-listener cap.
    load: Gauges<u64>,
}

/// A listener took an offer: what authorizes it, and its place under its cap, which the
/// rendezvous holds until it ends.
pub struct Offered {
    pub grant: ListenerGrant,
    pub place: Place<u64>,
    /// Where the listener's control channel comes from.
    pub peer: IpAddr,
}

/// Why no listener took an offer.
#[derive(Debug, PartialEq, Eq)]
pub enum NotOffered {
    /// None is connected (the documented 404).
    NoListener,
    /// Each is at its cap of open rendezvous or has a full accept queue.
    Busy,
}

/// Removes its listener from the rendezvous table when the control channel ends.
pub struct ListenerGuard {
    rendezvous: Rendezvous,
    entity: String,
    id: u64,
}

impl Drop for ListenerGuard {
    fn drop(&mut self) {
        let mut inner = self.rendezvous.lock();
        if let Some(list) = inner.listeners.get_mut(&self.entity) {
            list.retain(|l| l.id != self.id);
            if list.is_empty() {
                inner.listeners.remove(&self.entity);
                inner.cursor.remove(&self.entity);
            }
        }
    }
}

fn key(entity: &str) -> String {
    entity.to_ascii_lowercase()
}

impl Rendezvous {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere must not take the whole relay down with a poisoned lock.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a listener unless `entity` already has `max` of them.
    pub fn add_listener(
        &self,
        entity: &str,
        tx: mpsc::Sender<Box<ControlMessage>>,
        (authority, peer): (String, IpAddr),
        grant: ListenerGrant,
        told: Told,
        max: usize,
    ) -> Result<ListenerGuard, ListenersFull> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        let list = inner.listeners.entry(key(entity)).or_default();
        if list.len() >= max {
            return Err(ListenersFull { max });
        }
        list.push(ListenerEntry {
            id,
            tx,
            authority,
            peer,
            grant,
            told,
        });
        Ok(ListenerGuard {
            rendezvous: self.clone(),
            entity: key(entity),
            id,
        })
    }

    pub fn listener_count(&self, entity: &str) -> usize {
        self.lock().listeners.get(&key(entity)).map_or(0, Vec::len)
    }

    /// Hands the message `msg` makes for a listener (given that listener's relay authority) to
    /// the next listener of `entity` in turn, skipping any with `max` rendezvous open or whose
    /// control channel is full or gone.
    pub fn offer(
        &self,
        entity: &str,
        max: usize,
        msg: impl FnMut(&str) -> ControlMessage,
    ) -> Result<Offered, NotOffered> {
        self.offer_if(entity, max, |_| true, msg)
    }

    /// [`Rendezvous::offer`] to the listeners whose announced replicas satisfy `eligible`;
    /// `NoListener` when none does.
    pub fn offer_if(
        &self,
        entity: &str,
        max: usize,
        eligible: impl Fn(&[String]) -> bool,
        mut msg: impl FnMut(&str) -> ControlMessage,
    ) -> Result<Offered, NotOffered> {
        let mut inner = self.lock();
        let k = key(entity);
        let list = inner.listeners.get(&k).ok_or(NotOffered::NoListener)?;
        let n = list.len();
        let start = inner.cursor.get(&k).copied().unwrap_or(0);
        let mut taken = None;
        let mut any = false;
        for i in 0..n {
            let idx = (start + i) % n;
            let listener = &inner.listeners[&k][idx];
            if !eligible(&listener.told.replicas) {
                continue;
            }
            any = true;
            let Some(place) = self.load.take(listener.id, max) else {
                continue;
            };
            if listener
                .tx
                .try_send(Box::new(msg(&listener.authority)))
                .is_ok()
            {
                taken = Some((idx, place));
                break;
            }
        }
        let (idx, place) = taken.ok_or(if any {
            NotOffered::Busy
        } else {
            NotOffered::NoListener
        })?;
        let grant = inner.listeners[&k][idx].grant.clone();
        let peer = inner.listeners[&k][idx].peer;
        inner.cursor.insert(k, idx + 1);
        Ok(Offered { grant, place, peer })
    }

    /// Tells every listener that asked for it the new list of replicas; from then on its
    /// offers may name any of them.
    pub fn announce_replicas(&self, all: Arc<Vec<String>>) {
        let mut inner = self.lock();
        for listener in inner.listeners.values_mut().flatten() {
            if !listener.told.updates || listener.told.replicas == all {
                continue;
            }
            let msg = ControlMessage::Replicas(crate::tunnel::protocol::ReplicaList {
                all: all.to_vec(),
            });
            // A listener too far behind to take it stays on its old list.
            if listener.tx.try_send(Box::new(msg)).is_ok() {
                listener.told.replicas = all.clone();
            }
        }
    }

    /// A sender waiting for a listener under `id`: its entry lasts as long as the returned
    /// wait, however that ends (an answer, a timeout, or the sender's request dropped because
    /// its client went away), so the map holds no more than the senders waiting now.
    pub fn add_pending(&self, id: &str, entity: &str) -> PendingWait<'_> {
        let (reply, rx) = oneshot::channel();
        self.lock().pending.insert(
            id.to_string(),
            Pending {
                entity: key(entity),
                reply,
            },
        );
        PendingWait {
            reg: self,
            id: id.to_string(),
            reply: Some(rx),
        }
    }

    /// Takes the waiting sender for a rendezvous id (each address is usable once) if it belongs
    /// to `entity`.
    pub fn take_pending(&self, id: &str, entity: &str) -> Option<oneshot::Sender<AcceptOutcome>> {
        let mut inner = self.lock();
        // The accept path may carry the sender's path suffix after the connection's name.
        let path = key(entity);
        match inner.pending.get(id) {
            Some(p)
                if path == p.entity
                    || path
                        .strip_prefix(p.entity.as_str())
                        .is_some_and(|rest| rest.starts_with('/')) =>
            {
                inner.pending.remove(id).map(|p| p.reply)
            }
            _ => None,
        }
    }

    pub fn pending_count(&self) -> usize {
        self.lock().pending.len()
    }
}

/// A sender's entry among the pending rendezvous, removed when this is dropped.
pub struct PendingWait<'a> {
    reg: &'a Rendezvous,
    id: String,
    reply: Option<oneshot::Receiver<AcceptOutcome>>,
}

impl PendingWait<'_> {
    /// The listener's answer (taken once).
    pub fn reply(&mut self) -> oneshot::Receiver<AcceptOutcome> {
        self.reply.take().unwrap_or_else(|| oneshot::channel().1)
    }
}

impl Drop for PendingWait<'_> {
    fn drop(&mut self) {
        // Gone already when the listener took it; ids are random and used once.
        self.reg.lock().pending.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::protocol::RenewToken;

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    /// A listener of `entity` reaching the relay at `authority`, from 127.0.0.1.
    fn listen(
        reg: &Rendezvous,
        entity: &str,
        tx: mpsc::Sender<Box<ControlMessage>>,
        authority: &str,
        max: usize,
    ) -> ListenerGuard {
        reg.add_listener(
            entity,
            tx,
            (authority.into(), LOCAL),
            grant(),
            Default::default(),
            max,
        )
        .unwrap()
    }

    fn grant() -> ListenerGrant {
        ListenerGrant::new(super::super::rule::Grant {
            rule: "r".into(),
            key: super::super::rule::KeyDigest::of(&crate::secret::Secret::new("k")),
        })
    }

    fn msg(_authority: &str) -> ControlMessage {
        ControlMessage::RenewToken(RenewToken { token: "t".into() })
    }

    #[tokio::test]
    async fn spreads_senders_across_listeners_and_forgets_closed_ones() {
        let reg = Rendezvous::default();
        let (tx1, mut rx1) = mpsc::channel(4);
        let (tx2, mut rx2) = mpsc::channel(4);
        let g1 = listen(&reg, "C", tx1, "a", 25);
        let _g2 = listen(&reg, "c", tx2, "b", 25);
        assert_eq!(reg.listener_count("c"), 2);
        assert!(reg.offer("c", 25, msg).is_ok());
        assert!(reg.offer("c", 25, msg).is_ok());
        assert!(rx1.try_recv().is_ok() && rx2.try_recv().is_ok());
        drop(g1);
        assert_eq!(reg.listener_count("c"), 1);
        assert!(reg.offer("c", 25, msg).is_ok());
        assert!(rx2.try_recv().is_ok());
        assert!(reg.offer("other", 25, msg).err() == Some(NotOffered::NoListener));
    }

    #[tokio::test]
    async fn each_listener_gets_addresses_naming_its_own_host_and_the_cap_holds() {
        let reg = Rendezvous::default();
        let (tx1, mut rx1) = mpsc::channel(4);
        let (tx2, _rx2) = mpsc::channel(4);
        let (tx3, _rx3) = mpsc::channel(4);
        let _g1 = listen(&reg, "c", tx1, "relay-a:8443", 2);
        let _g2 = listen(&reg, "c", tx2, "relay-b:8443", 2);
        assert!(reg
            .add_listener(
                "c",
                tx3,
                ("x".into(), LOCAL),
                grant(),
                Default::default(),
                2
            )
            .is_err());
        let offered = reg.offer("c", 25, |authority| {
            ControlMessage::RenewToken(RenewToken {
                token: authority.to_string(),
            })
        });
        assert!(offered.is_ok());
        match rx1.try_recv().map(|m| *m) {
            Ok(ControlMessage::RenewToken(t)) => assert_eq!(t.token, "relay-a:8443"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_listener_at_its_cap_is_skipped_and_all_at_cap_is_busy() {
        let reg = Rendezvous::default();
        let (tx1, mut rx1) = mpsc::channel(8);
        let (tx2, mut rx2) = mpsc::channel(8);
        let _g1 = listen(&reg, "c", tx1, "a", 25);
        let _g2 = listen(&reg, "c", tx2, "b", 25);
        let first = reg.offer("c", 1, msg).unwrap();
        let second = reg.offer("c", 1, msg).unwrap();
        assert!(rx1.try_recv().is_ok() && rx2.try_recv().is_ok());
        assert_eq!(reg.offer("c", 1, msg).err(), Some(NotOffered::Busy));
        drop(first);
        assert!(reg.offer("c", 1, msg).is_ok());
        drop(second);
    }

    #[test]
    fn a_sender_that_stops_waiting_leaves_nothing_behind() {
        let reg = Rendezvous::default();
        let wait = reg.add_pending("id1", "c");
        assert_eq!(reg.pending_count(), 1);
        // Its request dropped (client gone) before any listener answered.
        drop(wait);
        assert_eq!(reg.pending_count(), 0);
        assert!(reg.take_pending("id1", "c").is_none());
    }

    #[test]
    fn a_rendezvous_id_is_usable_once_and_only_for_its_entity() {
        let reg = Rendezvous::default();
        let _rx = reg.add_pending("id1", "c");
        assert!(reg.take_pending("id1", "other").is_none());
        assert!(reg.take_pending("id1", "c").is_some());
        assert!(reg.take_pending("id1", "c").is_none());
        assert_eq!(reg.pending_count(), 0);
    }
}
