//! Counts of open things per key, each under a cap: a [`Place`] holds one and gives it back
//! when dropped, and a key back at zero is forgotten, so the map is only as large as what is
//! open right now.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

pub struct Gauges<K: Hash + Eq> {
    open: Arc<Mutex<HashMap<K, usize>>>,
}

impl<K: Hash + Eq> Default for Gauges<K> {
    fn default() -> Self {
        Gauges {
            open: Arc::default(),
        }
    }
}

impl<K: Hash + Eq> Clone for Gauges<K> {
    fn clone(&self) -> Self {
        Gauges {
            open: self.open.clone(),
        }
    }
}

/// One place under a key's cap, held until dropped.
pub struct Place<K: Hash + Eq + Clone> {
    gauges: Gauges<K>,
    key: K,
}

impl<K: Hash + Eq + Clone> Gauges<K> {
    /// A place for `key`, unless it already has `max`.
    pub fn take(&self, key: K, max: usize) -> Option<Place<K>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key.clone()).or_insert(0);
        if *n >= max {
            if *n == 0 {
                open.remove(&key);
            }
            return None;
        }
        *n += 1;
        Some(Place {
            gauges: self.clone(),
            key,
        })
    }

    #[cfg(test)]
    pub fn count(&self, key: &K) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(key).copied().unwrap_or(0)
    }

    #[cfg(test)]
    pub fn keys(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl<K: Hash + Eq + Clone> Drop for Place<K> {
    fn drop(&mut self) {
        let mut open = self.gauges.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_each_key_and_forgets_keys_with_nothing_open() {
        let gauges: Gauges<&str> = Gauges::default();
        let a1 = gauges.take("a", 2).unwrap();
        let a2 = gauges.take("a", 2).unwrap();
        assert!(gauges.take("a", 2).is_none());
        let b = gauges.take("b", 2).unwrap();
        assert_eq!((gauges.count(&"a"), gauges.keys()), (2, 2));
        drop(a1);
        assert!(gauges.take("a", 2).is_some());
        drop((a2, b));
        assert_eq!(gauges.keys(), 0);
        assert!(gauges.take("z", 0).is_none());
        assert_eq!(gauges.keys(), 0);
    }
}
