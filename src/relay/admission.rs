//! Who may hold a connection before proving who they are. Every TCP connection starts
//! unauthenticated: it counts against a global cap and a per-source-IP cap until its HTTP
//! exchange ends or it is upgraded into an authenticated listener or rendezvous, which then
//! takes one of `max_connections` slots instead. A stranger can therefore hold at most
//! `max_unauthenticated_per_ip` connections, each only until the handshake or request
//! deadline, and never a slot that agents and proxies need.
//!
//! Behind a load balancer speaking the PROXY protocol the client's address is known only
//! once its header is read, so admission has two steps: [`Admission::reserve`] at accept
//! takes a place under the global cap alone (never under the balancer's own address, which
//! every client shares and one stalled client would otherwise exhaust), and
//! [`Reserved::identify`] then charges the declared client's address. A connection whose
//! header never comes holds only its global place, and only until the handshake deadline.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Counts unauthenticated connections, globally and per source address. The map holds an
/// entry only while that address has a connection open, so it is bounded by the global cap.
#[derive(Clone)]
pub struct Admission {
    inner: Arc<Mutex<Counts>>,
    max_total: usize,
    max_per_ip: usize,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Why a connection was turned away before its TLS handshake.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// This address already holds its share of unauthenticated connections.
    PerIp,
    /// The relay holds as many unauthenticated connections as it allows.
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
}

/// One admitted connection; dropping it frees its place.
pub struct Admitted {
    // Dropped after `Admitted::drop` has released the address's share.
    reserved: Reserved,
    ip: IpAddr,
}

impl Admission {
    pub fn new(max_total: usize, max_per_ip: usize) -> Admission {
        Admission {
            inner: Arc::default(),
            max_total: max_total.max(1),
            max_per_ip: max_per_ip.max(1),
        }
    }

    /// Both caps at once, for a connection whose peer is its client.
    pub fn admit(&self, ip: IpAddr) -> Result<Admitted, Refused> {
        self.reserve()?.identify(ip)
    }

    /// A place under the global cap only, for a connection whose client is not known yet.
    pub fn reserve(&self) -> Result<Reserved, Refused> {
        let mut counts = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if counts.total >= self.max_total {
            return Err(Refused::Total);
        }
        counts.total += 1;
        Ok(Reserved {
            admission: self.clone(),
        })
    }

    #[cfg(test)]
    fn tracked_addresses(&self) -> usize {
        self.inner.lock().map(|c| c.per_ip.len()).unwrap_or(0)
    }
}

impl Reserved {
    /// Charges `ip` with this connection, keeping its global place; refused (and the place
    /// freed) when `ip` already holds its share.
    pub fn identify(self, ip: IpAddr) -> Result<Admitted, Refused> {
        // One client, one share, whether a dual-stack socket or a header wrote it as IPv4
        // or as IPv4-mapped IPv6.
        let ip = ip.to_canonical();
        let mut counts = self
            .admission
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = counts.per_ip.entry(ip).or_insert(0);
        // `max_per_ip` is at least 1, so a refused address already has an entry to keep.
        if *n >= self.admission.max_per_ip {
            return Err(Refused::PerIp);
        }
        *n += 1;
        drop(counts);
        Ok(Admitted { reserved: self, ip })
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        let mut counts = self
            .admission
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        counts.total = counts.total.saturating_sub(1);
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
        if let Some(n) = counts.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
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
        let a = Admission::new(3, 2);
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
    fn reserved_places_count_globally_until_identified() {
        let a = Admission::new(3, 1);
        let client: IpAddr = "203.0.113.7".parse().unwrap();
        let other: IpAddr = "203.0.113.8".parse().unwrap();
        // Three headers pending from one balancer: only the global cap applies.
        let r1 = a.reserve().unwrap();
        let r2 = a.reserve().unwrap();
        let r3 = a.reserve().unwrap();
        assert_eq!(a.reserve().err(), Some(Refused::Total));
        let first = r1.identify(client).unwrap();
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
        drop(first);
        drop(second);
        assert_eq!(a.tracked_addresses(), 0);
        let all: Vec<_> = (0..3).map(|_| a.reserve().unwrap()).collect();
        assert_eq!(all.len(), 3, "every place was given back");
    }
}
