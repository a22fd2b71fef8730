//! Connections that have not joined yet, bounded in number, per source address and in time, so
//! that strangers can never fill the server's table and lock real workers out.
//!
//! A connection is *pending* from `accept` until its worker has joined (hello admitted and, over
//! RDMA, its offer answered). Pending connections are capped in total and per source address;
//! when a cap is reached the *oldest* pending connection (of that source, else of all) is
//! dropped, never the newcomer: a real worker completes its hello within a round trip, so it is
//! always among the youngest, while silent connections age out first. Each pending connection
//! also has a handshake deadline. Joined workers are not counted here (they are bounded by the
//! ranks of the job). Pure bookkeeping, fed with `now`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How many connections may wait for their handshake, and how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Pending connections in all.
    pub pending: usize,
    /// Pending connections from one source address.
    pub per_source: usize,
    /// How long a connection may take from `accept` to joining.
    pub handshake: Duration,
}

impl Limits {
    /// The defaults for a job of `workers` workers: 256 pending (or twice the workers, when
    /// more) and 64 per source (or the workers, when more: a node may start all its workers at
    /// once), 10 s to join.
    pub fn for_workers(workers: usize) -> Self {
        Self {
            pending: 256.max(2 * workers),
            per_source: 64.max(workers),
            handshake: Duration::from_secs(10),
        }
    }
}

/// Why a pending connection is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// Its source had `per_source` pending connections and this was the oldest.
    SourceFull,
    /// `pending` connections were pending and this was the oldest.
    PendingFull,
}

impl Eviction {
    /// The reason, as logged and told to the peer.
    pub fn reason(self, limits: &Limits) -> String {
        match self {
            Eviction::SourceFull => format!(
                "too many connections from this address without a handshake (the {} allowed; the oldest goes)",
                limits.per_source
            ),
            Eviction::PendingFull => format!(
                "too many connections without a handshake (the {} allowed; the oldest goes)",
                limits.pending
            ),
        }
    }
}

type Age = (Instant, u64);

/// The pending connections, by the index the server end knows them by.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    seq: u64,
    by_age: BTreeMap<Age, (usize, IpAddr)>,
    by_source: HashMap<IpAddr, BTreeSet<Age>>,
    age_of: HashMap<usize, Age>,
}

impl Admission {
    /// No pending connection yet.
    pub fn new(limits: Limits) -> Self {
        assert!(
            limits.pending > 0 && limits.per_source > 0,
            "limits must allow a connection"
        );
        Self {
            limits,
            seq: 0,
            by_age: BTreeMap::new(),
            by_source: HashMap::new(),
            age_of: HashMap::new(),
        }
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Connections pending.
    pub fn len(&self) -> usize {
        self.by_age.len()
    }

    /// Whether none is pending.
    pub fn is_empty(&self) -> bool {
        self.by_age.is_empty()
    }

    /// Connection `idx` from `source` was accepted at `now`. Returns the pending connections to
    /// drop to keep within the limits (older ones; `idx` is never among them).
    pub fn accepted(&mut self, idx: usize, source: IpAddr, now: Instant) -> Vec<(usize, Eviction)> {
        self.seq += 1;
        let age = (now, self.seq);
        self.by_age.insert(age, (idx, source));
        self.by_source.entry(source).or_default().insert(age);
        self.age_of.insert(idx, age);
        let mut out = Vec::new();
        while self.by_source[&source].len() > self.limits.per_source {
            let oldest = *self.by_source[&source].first().expect("over the cap");
            let (victim, _) = self.by_age[&oldest];
            self.remove(victim);
            out.push((victim, Eviction::SourceFull));
        }
        while self.by_age.len() > self.limits.pending {
            let (&_, &(victim, _)) = self.by_age.first_key_value().expect("over the cap");
            self.remove(victim);
            out.push((victim, Eviction::PendingFull));
        }
        out
    }

    /// Connection `idx` joined or closed: it is no longer pending (no-op if it was not).
    pub fn remove(&mut self, idx: usize) {
        let Some(age) = self.age_of.remove(&idx) else {
            return;
        };
        let (_, source) = self.by_age.remove(&age).expect("indexed both ways");
        let set = self.by_source.get_mut(&source).expect("indexed by source");
        set.remove(&age);
        if set.is_empty() {
            self.by_source.remove(&source);
        }
    }

    /// When the oldest pending connection's handshake deadline passes.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.by_age
            .first_key_value()
            .map(|(&(t, _), _)| t + self.limits.handshake)
    }

    /// Removes and returns the pending connections whose deadline `now` has reached.
    pub fn expired(&mut self, now: Instant) -> Vec<usize> {
        let mut out = Vec::new();
        while let Some((&(t, _), &(idx, _))) = self.by_age.first_key_value() {
            if t + self.limits.handshake > now {
                break;
            }
            self.remove(idx);
            out.push(idx);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn limits(pending: usize, per_source: usize) -> Limits {
        Limits {
            pending,
            per_source,
            handshake: Duration::from_secs(10),
        }
    }

    #[test]
    fn a_full_source_loses_its_oldest_connection_not_the_newcomer() {
        let t0 = Instant::now();
        let mut a = Admission::new(limits(100, 3));
        for i in 0..3 {
            assert!(a.accepted(i, ip(1), t0).is_empty());
        }
        assert!(
            a.accepted(3, ip(2), t0).is_empty(),
            "another source is unaffected"
        );
        assert_eq!(a.accepted(4, ip(1), t0), vec![(0, Eviction::SourceFull)]);
        assert_eq!(a.accepted(5, ip(1), t0), vec![(1, Eviction::SourceFull)]);
        assert_eq!(a.len(), 4);
    }

    #[test]
    fn when_all_pending_slots_are_taken_the_oldest_goes() {
        let t0 = Instant::now();
        let mut a = Admission::new(limits(4, 4));
        for i in 0..4 {
            a.accepted(i, ip(i as u8), t0 + Duration::from_millis(i as u64));
        }
        let later = |ms| t0 + Duration::from_millis(ms);
        // A silent crowd from many addresses cannot keep a newcomer out.
        assert_eq!(
            a.accepted(9, ip(9), later(10)),
            vec![(0, Eviction::PendingFull)]
        );
        a.remove(9); // it joined
        assert!(a.accepted(10, ip(10), later(11)).is_empty());
        assert_eq!(
            a.accepted(11, ip(11), later(12)),
            vec![(1, Eviction::PendingFull)]
        );
    }

    #[test]
    fn handshakes_expire_in_order_and_joined_connections_never_do() {
        let t0 = Instant::now();
        let mut a = Admission::new(limits(10, 10));
        a.accepted(0, ip(1), t0);
        a.accepted(1, ip(1), t0 + Duration::from_secs(1));
        a.accepted(2, ip(2), t0 + Duration::from_secs(2));
        a.remove(1);
        assert_eq!(a.next_deadline(), Some(t0 + Duration::from_secs(10)));
        assert!(a.expired(t0 + Duration::from_millis(9_999)).is_empty());
        assert_eq!(a.expired(t0 + Duration::from_secs(11)), vec![0]);
        assert_eq!(a.expired(t0 + Duration::from_secs(12)), vec![2]);
        assert!(a.is_empty() && a.next_deadline().is_none());
        a.remove(2); // already gone: a no-op
    }
}
