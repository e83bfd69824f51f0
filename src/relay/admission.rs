//! Who may hold a connection before proving who they are. Every TCP connection starts
//! unauthenticated: it counts against a global cap and a per-source-IP cap until its HTTP
//! exchange ends or it is upgraded into an authenticated listener or rendezvous, which then
//! takes one of `max_connections` slots instead. A stranger can therefore hold at most
//! `max_unauthenticated_per_ip` connections, each only until the handshake or request
//! deadline (or until a newcomer takes its place, see [`Admission`]), and never a slot that
//! agents and proxies need.
//!
//! Behind a load balancer speaking the PROXY protocol the client's address is known only
//! once its header is read, so admission has two steps: [`Admission::reserve`] at accept
//! takes a place under the global cap alone (never under the balancer's own address, which
//! every client shares and one stalled client would otherwise exhaust), and
//! [`Reserved::identify`] then charges the declared client's address. A connection whose
//! header never comes holds only its global place, and only until the handshake deadline.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

/// An idle unauthenticated connection this old is no one's handshake in progress (a TLS
/// handshake and an upgrade take a few round trips): any newcomer at the cap may take its
/// place, whatever the two addresses hold. So an agent opening several rendezvous at once is
/// not refused its second because strangers at thousands of addresses hold one place each.
pub const SETTLED: std::time::Duration = std::time::Duration::from_secs(2);

/// Counts unauthenticated connections, globally and per source address. The map holds an
/// entry only while that address has a connection open, so it is bounded by the global cap.
///
/// When the global cap is reached, a newcomer takes the place of an idle connection (one with
/// no request in progress: between keep-alive requests, in its handshake, or trickling headers)
/// of the address holding the most places, the oldest of those if several hold as many: as
/// nginx reuses idle keep-alive connections when it runs out. The victim's address must hold
/// at least two more places than the newcomer's, or the newcomer's none, unless the idle
/// connection is older than [`SETTLED`]: so a few dozen addresses each holding their share of
/// slow keep-alive connections, or thousands holding one each, only lose places to agents and
/// proxies instead of locking them out, and connections still in their handshake are not
/// traded between two addresses.
#[derive(Clone)]
pub struct Admission {
    inner: Arc<Mutex<Counts>>,
    max_total: usize,
    max_per_ip: usize,
    ipv6_prefix_len: u8,
}

#[derive(Default)]
struct Counts {
    total: usize,
    /// Each address's places, oldest first.
    per_ip: HashMap<IpAddr, Vec<Arc<Place>>>,
    /// Places an address may hold beyond its share: one for each rendezvous a listener of
    /// that address was asked to, until it came (see [`Admission::keep_place_for`]).
    expected: HashMap<IpAddr, usize>,
}

impl Counts {
    /// How many places `ip` may hold now.
    fn share(&self, ip: &IpAddr, max_per_ip: usize) -> usize {
        max_per_ip + self.expected.get(ip).copied().unwrap_or(0)
    }
}

/// One connection's place: whether it is serving a request, and how it is told to go.
pub struct Place {
    /// When the connection was admitted: the oldest idle place goes first.
    since: Instant,
    /// Requests in progress on the connection (an upgrade stays counted).
    busy: AtomicUsize,
    /// Taken back from the books (by eviction or when dropped).
    released: AtomicBool,
    evicted: CancellationToken,
}

impl Place {
    fn new() -> Place {
        Place {
            since: Instant::now(),
            busy: AtomicUsize::new(0),
            released: AtomicBool::new(false),
            evicted: CancellationToken::new(),
        }
    }

    /// Marks a request in progress until the guard is dropped.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }

    /// Resolves when the connection lost its place to a newcomer and is to be closed.
    pub async fn evicted(&self) {
        self.evicted.cancelled().await
    }
}

/// A request in progress on a connection (see [`Place::busy`]).
pub struct Busy(Arc<Place>);

impl Busy {
    /// The connection stays busy for good: it was upgraded into a listener or rendezvous.
    pub fn keep(self) {
        self.0.busy.fetch_add(1, Ordering::AcqRel);
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a connection was turned away before its TLS handshake.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// This address already holds its share of unauthenticated connections.
    PerIp,
    /// The relay holds as many unauthenticated connections as it allows, none of them idle
    /// at an address holding more than this one.
    Total,
}

impl Refused {
    /// The setting that refused it, as the metrics name it.
    pub fn limit(&self) -> &'static str {
        match self {
            Refused::PerIp => "max_unauthenticated_per_ip",
            Refused::Total => "max_unauthenticated",
        }
    }
}

/// A place under the global cap, not yet charged to an address; dropping it frees it.
pub struct Reserved {
    admission: Admission,
    place: Arc<Place>,
}

/// One admitted connection; dropping it frees its place.
pub struct Admitted {
    // Dropped after `Admitted::drop` has released the address's share.
    reserved: Reserved,
    ip: IpAddr,
}

impl Admitted {
    pub fn place(&self) -> Arc<Place> {
        self.reserved.place.clone()
    }

    /// Its entry on the books, for a request on it that authenticates (see [`Books::leave`]).
    pub fn books(&self) -> Books {
        Books {
            admission: self.reserved.admission.clone(),
            place: self.reserved.place.clone(),
            ip: self.ip,
        }
    }
}

/// A place expected for a listener's rendezvous (see [`Admission::keep_place_for`]).
pub struct KeptPlace {
    admission: Admission,
    ip: IpAddr,
}

impl Drop for KeptPlace {
    fn drop(&mut self) {
        let mut counts = self
            .admission
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.expected.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.expected.remove(&self.ip);
            }
        }
    }
}

/// An admitted connection's entry on the unauthenticated books, as its requests see it.
#[derive(Clone)]
pub struct Books {
    admission: Admission,
    place: Arc<Place>,
    ip: IpAddr,
}

impl Books {
    /// Takes the connection off the books for good, as an upgrade does: a request on it has
    /// authenticated and holds a connection slot instead, and the connection ends with that
    /// request. Its address's place is free for another stranger from then on.
    pub fn leave(&self) {
        let mut counts = self
            .admission
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if self.place.released.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(places) = counts.per_ip.get_mut(&self.ip) {
            places.retain(|p| !Arc::ptr_eq(p, &self.place));
            if places.is_empty() {
                counts.per_ip.remove(&self.ip);
            }
        }
        counts.total = counts.total.saturating_sub(1);
    }
}

impl Admission {
    pub fn new(max_total: usize, max_per_ip: usize, ipv6_prefix_len: u8) -> Admission {
        Admission {
            inner: Arc::default(),
            max_total: max_total.max(1),
            max_per_ip: max_per_ip.max(1),
            ipv6_prefix_len: ipv6_prefix_len.min(128),
        }
    }

    /// The source a connection from `ip` is counted under: one client whether a dual-stack
    /// socket or a PROXY header wrote it as IPv4 or as IPv4-mapped IPv6, and one IPv6
    /// network of `ipv6_prefix_len` bits however many of its addresses it connects from.
    fn source(&self, ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let host_bits = 128 - u32::from(self.ipv6_prefix_len);
                let mask = u128::MAX.checked_shl(host_bits).unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
            v4 => v4,
        }
    }

    /// Both caps at once, for a connection whose peer is its client.
    pub fn admit(&self, ip: IpAddr) -> Result<Admitted, Refused> {
        let ip = self.source(ip);
        let (holds, share) = {
            let counts = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            let holds = counts.per_ip.get(&ip).map_or(0, Vec::len);
            (holds, counts.share(&ip, self.max_per_ip))
        };
        // Refused for its own share before it could cost another address a place.
        if holds >= share {
            return Err(Refused::PerIp);
        }
        self.reserve_for(holds)?.identify(ip)
    }

    /// A place under the global cap only, for a connection whose client is not known yet.
    pub fn reserve(&self) -> Result<Reserved, Refused> {
        self.reserve_for(0)
    }

    /// A place under the global cap for a newcomer whose address holds `holds` places, taken
    /// from an idle connection when the cap is reached (see [`Admission`]).
    fn reserve_for(&self, holds: usize) -> Result<Reserved, Refused> {
        let mut counts = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if counts.total >= self.max_total && !counts.evict_one(holds) {
            return Err(Refused::Total);
        }
        counts.total += 1;
        Ok(Reserved {
            admission: self.clone(),
            place: Arc::new(Place::new()),
        })
    }

    /// One more place for `ip` until the returned guard is dropped: a listener there was
    /// asked to a rendezvous and will connect for it, unauthenticated until it upgrades. A
    /// burst of senders to one listener then does not find the listener's own connections
    /// refused at its address's share (they would wait for the accept timeout); the credit
    /// lasts only while the sender waits, and every sender behind it is authenticated.
    pub fn keep_place_for(&self, ip: IpAddr) -> KeptPlace {
        let ip = self.source(ip);
        let mut counts = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *counts.expected.entry(ip).or_default() += 1;
        KeptPlace {
            admission: self.clone(),
            ip,
        }
    }

    #[cfg(test)]
    fn tracked_addresses(&self) -> usize {
        self.inner.lock().map(|c| c.per_ip.len()).unwrap_or(0)
    }
}

impl Counts {
    /// Takes the place of an idle connection: one older than [`SETTLED`] if there is any,
    /// then of the address holding the most places (at least `holds + 2`, or one for a
    /// newcomer holding none, or any number for a settled one), the oldest among equals;
    /// false when there is none.
    fn evict_one(&mut self, holds: usize) -> bool {
        let least = if holds == 0 { 1 } else { holds + 2 };
        let now = Instant::now();
        // One pass, no allocation: this runs on the accept loop for every newcomer at the cap.
        let victim = self
            .per_ip
            .iter()
            .filter_map(|(ip, places)| {
                let at = places
                    .iter()
                    .position(|p| p.busy.load(Ordering::Acquire) == 0)?;
                let since = places[at].since;
                let settled = now.duration_since(since) >= SETTLED;
                let fair = places.len() >= least || settled;
                fair.then_some(((settled, places.len(), Reverse(since)), *ip, at))
            })
            // Settled places first: a client opening several connections at once holds the
            // most places, all in their handshake, and strangers must not cut those while
            // one of theirs has sat idle for longer.
            .max_by_key(|(rank, _, _)| *rank)
            .map(|(_, ip, at)| (ip, at));
        let Some((ip, at)) = victim else {
            return false;
        };
        let Some(places) = self.per_ip.get_mut(&ip) else {
            return false;
        };
        let place = places.remove(at);
        if places.is_empty() {
            self.per_ip.remove(&ip);
        }
        place.released.store(true, Ordering::Release);
        place.evicted.cancel();
        self.total = self.total.saturating_sub(1);
        true
    }
}

impl Reserved {
    /// Charges `ip` with this connection, keeping its global place; refused (and the place
    /// freed) when `ip` already holds its share.
    pub fn identify(self, ip: IpAddr) -> Result<Admitted, Refused> {
        let ip = self.admission.source(ip);
        let mut counts = self
            .admission
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let share = counts.share(&ip, self.admission.max_per_ip);
        let places = counts.per_ip.entry(ip).or_default();
        if places.len() >= share {
            return Err(Refused::PerIp);
        }
        places.push(self.place.clone());
        drop(counts);
        Ok(Admitted { reserved: self, ip })
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if self.place.released.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut counts = self
            .admission
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        counts.total = counts.total.saturating_sub(1);
        // A refused `identify` may have left its address an empty entry.
        counts.per_ip.retain(|_, places| !places.is_empty());
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut counts = self
            .reserved
            .admission
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(places) = counts.per_ip.get_mut(&self.ip) {
            places.retain(|p| !Arc::ptr_eq(p, &self.reserved.place));
            if places.is_empty() {
                counts.per_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_each_address_and_the_total_and_forgets_closed_ones() {
        let a = Admission::new(3, 2, 64);
        let one: IpAddr = "127.0.0.2".parse().unwrap();
        let two: IpAddr = "127.0.0.3".parse().unwrap();
        let first = a.admit(one).unwrap();
        let _second = a.admit(one).unwrap();
        assert_eq!(a.admit(one).err(), Some(Refused::PerIp));
        let _third = a.admit(two).unwrap();
        assert_eq!(a.admit(two).err(), Some(Refused::Total));
        drop(first);
        assert!(a.admit(two).is_ok());
        drop(_second);
        drop(_third);
        assert_eq!(
            a.tracked_addresses(),
            0,
            "closed connections leave no entry behind"
        );
    }

    #[test]
    fn an_expected_rendezvous_and_an_authenticated_request_change_an_address_share() {
        let a = Admission::new(10, 2, 64);
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        let first = a.admit(ip).unwrap();
        let _second = a.admit(ip).unwrap();
        assert_eq!(a.admit(ip).err(), Some(Refused::PerIp));
        let expected = a.keep_place_for(ip);
        let third = a
            .admit(ip)
            .expect("a place kept for a listener's rendezvous");
        assert_eq!(a.admit(ip).err(), Some(Refused::PerIp));
        drop(expected);
        drop(third);
        assert_eq!(a.admit(ip).err(), Some(Refused::PerIp));
        // Leaving the books frees the place at once, and only once.
        first.books().leave();
        first.books().leave();
        let back = a
            .admit(ip)
            .expect("the place an authenticated request left");
        drop(first);
        assert_eq!(a.admit(ip).err(), Some(Refused::PerIp));
        drop(back);
        assert!(a.admit(ip).is_ok());
    }

    #[test]
    fn a_newcomer_takes_an_idle_place_from_the_address_holding_the_most() {
        let a = Admission::new(4, 4, 64);
        let attacker: IpAddr = "127.0.0.2".parse().unwrap();
        let held: Vec<_> = (0..4).map(|_| a.admit(attacker).unwrap()).collect();
        let evicted = |i: usize| held[i].place().evicted.is_cancelled();
        // The attacker's oldest connection is serving a request: its place is not taken.
        let busy = held[0].place().busy();
        let newcomer: IpAddr = "127.0.0.3".parse().unwrap();
        let first = a.admit(newcomer).unwrap();
        assert!(!evicted(0) && evicted(1) && !evicted(2));
        // 3 places against 1: one more may go.
        let second = a.admit(newcomer).unwrap();
        assert!(evicted(2));
        // 2 against 2: even now.
        assert_eq!(a.admit(newcomer).err(), Some(Refused::Total));
        // An upgraded connection stays busy after its request.
        busy.keep();
        assert_eq!(held[0].place().busy.load(Ordering::Acquire), 1);
        // Evicted connections closing give back nothing twice: the attacker's two live
        // places come back, and only those.
        drop(held);
        let third: IpAddr = "127.0.0.4".parse().unwrap();
        let more: Vec<_> = (0..2).map(|_| a.admit(third).unwrap()).collect();
        assert_eq!(a.admit(third).err(), Some(Refused::Total));
        drop((first, second, more));
        assert_eq!(a.tracked_addresses(), 0);
    }

    #[test]
    fn reserved_places_count_globally_until_identified() {
        let a = Admission::new(3, 1, 64);
        let client: IpAddr = "203.0.113.7".parse().unwrap();
        let other: IpAddr = "203.0.113.8".parse().unwrap();
        // Three headers pending from one balancer: only the global cap applies.
        let r1 = a.reserve().unwrap();
        let r2 = a.reserve().unwrap();
        let r3 = a.reserve().unwrap();
        assert_eq!(a.reserve().err(), Some(Refused::Total));
        let first = r1.identify(client).unwrap();
        // Serving a request, so no newcomer takes its place.
        let busy = first.place().busy();
        assert_eq!(r2.identify(client).err(), Some(Refused::PerIp));
        // The refused one's place is free again; the identified one keeps its own.
        let r4 = a.reserve().unwrap();
        assert_eq!(a.reserve().err(), Some(Refused::Total));
        let second = r3.identify(other).unwrap();
        drop(r4);
        // One client however its address is written.
        let mapped: IpAddr = "::ffff:203.0.113.7".parse().unwrap();
        assert_eq!(
            a.reserve().unwrap().identify(mapped).err(),
            Some(Refused::PerIp)
        );
        drop((busy, first));
        drop(second);
        assert_eq!(a.tracked_addresses(), 0);
        let all: Vec<_> = (0..3).map(|_| a.reserve().unwrap()).collect();
        assert_eq!(all.len(), 3, "every place was given back");
    }

    #[test]
    fn ipv6_sources_share_per_network() {
        let a = Admission::new(100, 2, 64);
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_net: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
        let next_net: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let first = a.admit(one).unwrap();
        let second = a.admit(same_net).unwrap();
        // A third address of the same /64 is the same source.
        let third: IpAddr = "2001:db8:1:2::3".parse().unwrap();
        assert_eq!(a.admit(third).err(), Some(Refused::PerIp));
        assert_eq!(
            a.reserve().unwrap().identify(third).err(),
            Some(Refused::PerIp)
        );
        let other = a.admit(next_net).unwrap();
        // A rendezvous a listener in that /64 was asked to lends the whole network a place.
        let kept = a.keep_place_for(third);
        let lent = a.admit(one).unwrap();
        drop(kept);
        drop((first, second, other, lent));
        assert_eq!(a.tracked_addresses(), 0);

        // 128 counts each address alone; IPv4 is never grouped.
        let each = Admission::new(100, 1, 128);
        let _held = each.admit(one).unwrap();
        let _also = each.admit(third).unwrap();
        assert_eq!(each.admit(one).err(), Some(Refused::PerIp));
        let v4 = Admission::new(100, 1, 32);
        let _a = v4.admit("192.0.2.1".parse().unwrap()).unwrap();
        let _b = v4.admit("192.0.2.2".parse().unwrap()).unwrap();
    }

    #[test]
    fn an_address_holding_nothing_takes_the_oldest_idle_place_of_those_holding_one() {
        let a = Admission::new(3, 4, 64);
        let held: Vec<_> = (2..5)
            .map(|i| a.admit(IpAddr::from([127, 0, 0, i])).unwrap())
            .collect();
        let evicted = |i: usize| held[i].place().evicted.is_cancelled();
        let newcomer: IpAddr = "127.0.0.9".parse().unwrap();
        let first = a.admit(newcomer).unwrap();
        assert!(evicted(0) && !evicted(1) && !evicted(2), "the oldest went");
        // Holding one now, the newcomer may not take another address's only place.
        assert_eq!(a.admit(newcomer).err(), Some(Refused::Total));
        // A busy one is passed over.
        let _busy = held[1].place().busy();
        let _second = a.admit("127.0.0.10".parse().unwrap()).unwrap();
        assert!(!evicted(1) && evicted(2));
        drop(first);
    }

    #[test]
    fn a_settled_idle_place_goes_before_a_crowd_still_in_its_handshake() {
        let a = Admission::new(4, 4, 64);
        let stranger = a.admit("127.0.0.2".parse().unwrap()).unwrap();
        // Backdated on the books: idle longer than a handshake takes.
        let settled = Instant::now() - SETTLED;
        let mut counts = a.inner.lock().unwrap();
        let books = counts.per_ip.get_mut(&stranger.ip).unwrap();
        books[0] = Arc::new(Place {
            since: settled,
            ..Place::new()
        });
        let settled_place = books[0].clone();
        drop(counts);
        // A client opening three connections at once: the most places, all young.
        let client: IpAddr = "127.0.0.3".parse().unwrap();
        let crowd: Vec<_> = (0..3).map(|_| a.admit(client).unwrap()).collect();
        let _newcomer = a.admit("127.0.0.4".parse().unwrap()).unwrap();
        assert!(
            settled_place.evicted.is_cancelled(),
            "the settled stranger went"
        );
        assert!(crowd.iter().all(|c| !c.place().evicted.is_cancelled()));
    }
}
