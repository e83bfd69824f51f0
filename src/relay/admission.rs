//! Who may hold a connection before proving who they are. Every TCP connection starts
//! unauthenticated: it counts against a global cap and a per-source-IP cap until its HTTP
//! exchange ends or it is upgraded into an authenticated listener or rendezvous, which then
//! takes one of `max_connections` slots instead. A stranger can therefore hold at most
//! `max_unauthenticated_per_ip` connections, each only until the handshake or request
//! deadline, and never a slot that agents and proxies need.

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

/// One admitted connection; dropping it frees its place.
pub struct Admitted {
    admission: Admission,
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

    pub fn admit(&self, ip: IpAddr) -> Result<Admitted, Refused> {
        let mut counts = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if counts.total >= self.max_total {
            return Err(Refused::Total);
        }
        let n = counts.per_ip.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return Err(Refused::PerIp);
        }
        *n += 1;
        counts.total += 1;
        Ok(Admitted {
            admission: self.clone(),
            ip,
        })
    }

    #[cfg(test)]
    fn tracked_addresses(&self) -> usize {
        self.inner.lock().map(|c| c.per_ip.len()).unwrap_or(0)
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut counts = self
            .admission
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        counts.total = counts.total.saturating_sub(1);
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
}
