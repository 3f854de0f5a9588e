//! Delivery accounting: which sequence numbers of which publisher a subscriber (or a shared
//! group of subscribers) got, and from that the lost / duplicated / out-of-order counts.

/// What one receiver (or a group, after [`StreamTracker::merge`]) saw of one publisher.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamTracker {
    /// Bit `seq` is set once `seq` has arrived.
    seen: Vec<u64>,
    /// Deliveries, duplicates included.
    pub received: u64,
    /// Distinct sequence numbers.
    pub unique: u64,
    /// Deliveries of a sequence number already seen.
    pub duplicated: u64,
    /// First deliveries that arrived after a higher sequence number.
    pub out_of_order: u64,
    /// Highest sequence number + 1 (0 = nothing yet).
    next_max: u64,
}

impl StreamTracker {
    /// Records one delivery of `seq`.
    pub fn record(&mut self, seq: u64) {
        self.received += 1;
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.seen.len() {
            // Grow geometrically: sequence numbers arrive mostly in order.
            let want = (word + 1).max(self.seen.len() * 2).max(16);
            self.seen.resize(want, 0);
        }
        let mask = 1u64 << bit;
        if self.seen[word] & mask != 0 {
            self.duplicated += 1;
            return;
        }
        self.seen[word] |= mask;
        self.unique += 1;
        if seq + 1 < self.next_max {
            self.out_of_order += 1;
        } else {
            self.next_max = seq + 1;
        }
    }

    /// Whether `seq` arrived.
    pub fn has(&self, seq: u64) -> bool {
        self.seen
            .get((seq / 64) as usize)
            .is_some_and(|w| w & (1 << (seq % 64)) != 0)
    }

    /// Combines what the members of a shared group saw: a message any member got is delivered,
    /// a message two members got is a duplicate. Out-of-order counts are summed (order only
    /// means something per member).
    pub fn merge(&mut self, other: &StreamTracker) {
        if other.seen.len() > self.seen.len() {
            self.seen.resize(other.seen.len(), 0);
        }
        let mut unique = 0u64;
        for (i, w) in self.seen.iter_mut().enumerate() {
            *w |= other.seen.get(i).copied().unwrap_or(0);
            unique += u64::from(w.count_ones());
        }
        self.received += other.received;
        self.unique = unique;
        self.duplicated = self.received - unique;
        self.out_of_order += other.out_of_order;
        self.next_max = self.next_max.max(other.next_max);
    }

    /// Messages `0..sent` that never arrived (those at or above `sent` do not count).
    pub fn lost(&self, sent: u64) -> u64 {
        let mut got = 0u64;
        let full = (sent / 64) as usize;
        for w in self.seen.iter().take(full) {
            got += u64::from(w.count_ones());
        }
        let rest = sent % 64;
        if rest > 0 {
            if let Some(w) = self.seen.get(full) {
                got += u64::from((w & ((1u64 << rest) - 1)).count_ones());
            }
        }
        sent - got
    }
}

/// Per-publisher trackers of one receiver, indexed by publisher id.
#[derive(Debug, Clone, Default)]
pub struct Receiver {
    pub streams: Vec<Option<StreamTracker>>,
}

impl Receiver {
    pub fn record(&mut self, publisher: u32, seq: u64) {
        let i = publisher as usize;
        if i >= self.streams.len() {
            self.streams.resize(i + 1, None);
        }
        self.streams[i]
            .get_or_insert_with(Default::default)
            .record(seq);
    }

    pub fn stream(&self, publisher: u32) -> Option<&StreamTracker> {
        self.streams
            .get(publisher as usize)
            .and_then(|s| s.as_ref())
    }
}

/// Totals over all expected (publisher, receiver set) streams.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tally {
    /// Deliveries the scenario expects: each publisher's sent count times its receiver sets.
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    /// Deliveries from a publisher to a receiver that should not have got it.
    pub unexpected: u64,
}

/// Accounts deliveries. `sent[p]` is how many messages publisher `p` wrote; `sets[p]` lists
/// the receiver sets that must each get all of them (a plain subscriber is a set of one, a
/// shared group a set of its members). Deliveries to receivers outside every set of `p` are
/// unexpected.
pub fn tally(sent: &[u64], sets: &[Vec<Vec<usize>>], receivers: &[Receiver]) -> Tally {
    let mut t = Tally::default();
    let mut expected_pair = vec![false; receivers.len()];
    for (p, &n) in sent.iter().enumerate() {
        expected_pair.iter_mut().for_each(|e| *e = false);
        for set in sets.get(p).map(Vec::as_slice).unwrap_or(&[]) {
            let mut merged = StreamTracker::default();
            for &r in set {
                expected_pair[r] = true;
                if let Some(s) = receivers[r].stream(p as u32) {
                    merged.merge(s);
                }
            }
            t.expected += n;
            t.received += merged.received;
            t.lost += merged.lost(n);
            t.duplicated += merged.duplicated;
            t.out_of_order += merged.out_of_order;
        }
        for (r, rec) in receivers.iter().enumerate() {
            if !expected_pair[r] {
                if let Some(s) = rec.stream(p as u32) {
                    t.unexpected += s.received;
                }
            }
        }
    }
    // Publisher ids nobody sent as (stale messages from elsewhere).
    for rec in receivers {
        for s in rec.streams.iter().skip(sent.len()).flatten() {
            t.unexpected += s.received;
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_stream() {
        let mut t = StreamTracker::default();
        for s in 0..1000 {
            t.record(s);
        }
        assert_eq!(
            (t.received, t.unique, t.duplicated, t.out_of_order),
            (1000, 1000, 0, 0)
        );
        assert_eq!(t.lost(1000), 0);
        assert_eq!(t.lost(1010), 10);
    }

    #[test]
    fn gaps_duplicates_and_reordering() {
        let mut t = StreamTracker::default();
        for s in [0, 1, 3, 2, 2, 5, 5, 4, 9] {
            t.record(s);
        }
        assert_eq!(t.received, 9);
        assert_eq!(t.unique, 7);
        assert_eq!(t.duplicated, 2);
        // 2 after 3, 4 after 5.
        assert_eq!(t.out_of_order, 2);
        // 6, 7, 8 missing out of 0..10; 10 and 11 too out of 0..12.
        assert_eq!(t.lost(10), 3);
        assert_eq!(t.lost(12), 5);
        assert!(t.has(9) && !t.has(8) && !t.has(100_000));
    }

    #[test]
    fn shared_group_merge() {
        let (mut a, mut b) = (StreamTracker::default(), StreamTracker::default());
        for s in (0..100).filter(|s| s % 2 == 0) {
            a.record(s);
        }
        for s in (0..100).filter(|s| s % 2 == 1) {
            b.record(s);
        }
        b.record(10); // also delivered to a
        let mut g = StreamTracker::default();
        g.merge(&a);
        g.merge(&b);
        assert_eq!(g.unique, 100);
        assert_eq!(g.received, 101);
        assert_eq!(g.duplicated, 1);
        assert_eq!(g.lost(100), 0);
    }

    #[test]
    fn tally_pairs_fan_out_and_shared() {
        // Publisher 0 → receiver 0 (pairs); publisher 1 → receivers 1 and 2 each (fan-out);
        // publisher 2 → the group {3, 4}.
        let mut rs = vec![Receiver::default(); 5];
        for s in 0..10 {
            rs[0].record(0, s);
            rs[1].record(1, s);
            if s != 4 {
                rs[2].record(1, s);
            }
            rs[3 + (s as usize % 2)].record(2, s);
        }
        rs[0].record(1, 0); // unexpected: receiver 0 only listens to publisher 0
        rs[2].record(1, 7); // duplicate
        rs[1].record(9, 0); // unknown publisher
        let sets = vec![vec![vec![0]], vec![vec![1], vec![2]], vec![vec![3, 4]]];
        let t = tally(&[10, 10, 10], &sets, &rs);
        assert_eq!(t.expected, 40);
        assert_eq!(t.lost, 1);
        assert_eq!(t.duplicated, 1);
        assert_eq!(t.unexpected, 2);
        assert_eq!(t.received, 40);
        assert_eq!(t.out_of_order, 0);
    }
}
