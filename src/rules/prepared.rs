//! Which prepared transactions enqueued deliveries. A transaction committed
//! in two phases (Citus writing to several nodes, a transaction manager)
//! becomes visible at COMMIT PREPARED, often in another session than the one
//! that wrote it: that COMMIT PREPARED wakes the delivery workers when its
//! transaction enqueued, and only then (on a Citus node most two-phase
//! commits are other tables' writes; waking for each would keep a worker
//! claiming nothing).
//!
//! Kept in shared memory as a ring of keys (database and transaction id
//! hashed). One pushed out of a full ring, or left by a PREPARE that failed,
//! is not known any more: until the ring is empty again every COMMIT PREPARED
//! wakes the workers, so that none that enqueued is missed.

/// How many enqueuing prepared transactions are remembered at once.
pub const CAPACITY: usize = 1024;

/// The keys of the prepared transactions that enqueued (0 = free).
#[derive(Clone, Copy)]
pub struct PreparedSet {
    keys: [u64; CAPACITY],
    next: usize,
    held: usize,
    /// a key was pushed out: every COMMIT PREPARED wakes until none is held
    lost: bool,
}

impl Default for PreparedSet {
    fn default() -> Self {
        PreparedSet { keys: [0; CAPACITY], next: 0, held: 0, lost: false }
    }
}

impl PreparedSet {
    /// A prepared transaction's key: its database and its transaction id
    /// (FNV-1a; never 0, which marks a free place).
    pub fn key(database: u32, gid: &[u8]) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in database.to_le_bytes().iter().chain(gid) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h.max(1)
    }

    /// PREPARE TRANSACTION of a transaction that enqueued deliveries.
    pub fn remember(&mut self, key: u64) {
        if self.keys[self.next] != 0 {
            self.lost = true;
            self.held -= 1;
        }
        self.keys[self.next] = key;
        self.held += 1;
        self.next = (self.next + 1) % CAPACITY;
    }

    /// Whether COMMIT PREPARED of `key` must wake the workers (read under a
    /// shared lock: most two-phase commits enqueued nothing).
    pub fn wakes_for(&self, key: u64) -> bool {
        self.lost || self.keys.contains(&key)
    }

    /// COMMIT or ROLLBACK PREPARED of `key`: forgets it; true when a COMMIT
    /// PREPARED of it wakes the workers.
    pub fn take(&mut self, key: u64) -> bool {
        let found = match self.keys.iter().position(|&k| k == key) {
            Some(i) => {
                self.keys[i] = 0;
                self.held -= 1;
                true
            }
            None => false,
        };
        let wake = found || self.lost;
        if self.held == 0 {
            self.lost = false;
        }
        wake
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxed() -> Box<PreparedSet> {
        Box::default()
    }

    #[test]
    fn only_a_transaction_that_enqueued_wakes_at_commit_prepared() {
        let mut s = boxed();
        let enqueued = PreparedSet::key(5, b"citus_0_123_7_2");
        let other = PreparedSet::key(5, b"citus_0_123_8_2");
        s.remember(enqueued);
        assert!(!s.wakes_for(other), "another table's two-phase commit");
        assert!(!s.take(other));
        assert!(s.wakes_for(enqueued));
        assert!(s.take(enqueued));
        assert!(!s.wakes_for(enqueued), "woken once");
    }

    #[test]
    fn the_same_transaction_id_in_another_database_is_another_key() {
        assert_ne!(PreparedSet::key(5, b"tx"), PreparedSet::key(6, b"tx"));
        assert_ne!(PreparedSet::key(5, b""), 0);
    }

    #[test]
    fn a_key_pushed_out_of_a_full_ring_makes_every_commit_prepared_wake_until_none_is_held() {
        let mut s = boxed();
        let keys: Vec<u64> = (0..=CAPACITY).map(|i| PreparedSet::key(1, format!("g{i}").as_bytes())).collect();
        for &k in &keys {
            s.remember(k);
        }
        // the first was pushed out: an unknown COMMIT PREPARED may be it
        let stranger = PreparedSet::key(1, b"unknown");
        assert!(s.wakes_for(stranger) && s.take(stranger));
        for &k in &keys[1..] {
            assert!(s.take(k));
        }
        assert!(!s.wakes_for(stranger), "none held: known again");
    }

    #[test]
    fn a_rolled_back_one_is_forgotten() {
        let mut s = boxed();
        let k = PreparedSet::key(1, b"g");
        s.remember(k);
        s.take(k);
        assert!(!s.wakes_for(k));
    }
}
