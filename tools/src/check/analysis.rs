//! Sorting a run's record into delivered / lost / duplicated / out of order / unexpected.

use std::collections::HashMap;

use super::wills::{self, WillSummary};
use super::{subscriber_version, Delivery, Record};

/// One finding worth printing.
#[derive(Debug, Clone)]
pub struct Finding {
    pub subscriber: u32,
    pub what: String,
}

#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub subscribers: u32,
    /// Messages sent (each once, whatever the resends).
    pub sent: u64,
    /// Acknowledged with a success code (PUBACK / PUBREC).
    pub acked: u64,
    /// Acknowledged "no matching subscribers" (a subset of `acked`).
    pub no_match: u64,
    /// Acknowledged with an error code: not accepted.
    pub refused: u64,
    /// Never acknowledged by the end (the broker may or may not have them).
    pub unacked: u64,
    /// (subscriber, message) pairs: acknowledged messages that arrived.
    pub delivered: u64,
    /// (subscriber, message) pairs: acknowledged messages that never arrived.
    pub lost: u64,
    /// Receptions beyond the first, per subscriber.
    pub duplicated: u64,
    /// Of which QoS2 (exactly once broken).
    pub duplicated_qos2: u64,
    /// First receptions after a later message of the same publisher and topic.
    pub out_of_order: u64,
    /// Undecodable, wrong topic, or never sent.
    pub unexpected: u64,
    /// Unacknowledged messages that arrived anyway (allowed).
    pub unacked_delivered: u64,
    pub sessions_lost: u64,
    pub reconnects: u64,
    /// Per fault: label, ms from the fault until every publisher had a message it sent after
    /// the fault acknowledged (`None`: not before the end).
    pub failovers: Vec<(String, Option<u64>)>,
    /// Longest time any publisher waited between two acknowledgements while publishing.
    pub max_ack_gap_ms: u64,
    /// `--wills`: owed, delivered, lost, duplicated, unexpected wills.
    pub wills: WillSummary,
    pub findings: Vec<Finding>,
}

impl Summary {
    /// No lost, out-of-order or unexpected message or will. Duplicates (QoS2 ones and wills
    /// included) are reported, not judged here: see the module doc.
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.out_of_order == 0
            && self.unexpected == 0
            && self.wills.lost == 0
            && self.wills.unexpected == 0
            && self.acked > 0
    }

    /// The largest failover time, `None` if some fault never recovered or there was none.
    pub fn failover_ms(&self) -> Option<u64> {
        if self.failovers.iter().any(|(_, t)| t.is_none()) {
            return None;
        }
        self.failovers.iter().filter_map(|(_, t)| *t).max()
    }

    pub fn print(&self, record: &Record, show: usize) {
        let per_qos = |q: u8| -> (u64, u64) {
            record
                .publishers
                .iter()
                .filter(|p| p.qos == q)
                .fold((0, 0), |(s, a), p| {
                    (
                        s + p.sent.len() as u64,
                        a + p.sent.iter().filter(|m| m.acked_ms.is_some()).count() as u64,
                    )
                })
        };
        let (s1, a1) = per_qos(1);
        let (s2, a2) = per_qos(2);
        println!(
            "check: sent {} (QoS1 {s1}, QoS2 {s2}), acked {} (QoS1 {a1}, QoS2 {a2}; {} with \"no matching subscribers\"), refused {}, unacked {}",
            self.sent, self.acked, self.no_match, self.refused, self.unacked
        );
        for (i, p) in record.publishers.iter().enumerate() {
            if p.connects > 1 || p.connect_failures > 0 {
                println!(
                    "check: publisher {i}: {} connections, {} failed attempts; last errors: {}",
                    p.connects,
                    p.connect_failures,
                    last(&p.errors, 3)
                );
            }
        }
        for (i, s) in record.subscribers.iter().enumerate() {
            println!(
                "check: subscriber {i} ({}): {} receptions, {} connections, {} failed attempts, {} sessions lost{}",
                if subscriber_version(i as u32).is_v5() { "5.0" } else { "3.1.1" },
                s.deliveries.len(),
                s.connects,
                s.connect_failures,
                s.sessions_lost,
                if s.errors.is_empty() {
                    String::new()
                } else {
                    format!("; last errors: {}", last(&s.errors, 3))
                }
            );
        }
        for (i, w) in record.wills.iter().enumerate() {
            if w.connect_failures > 0 {
                println!(
                    "check: will client {i}: {} failed attempts; last errors: {}",
                    w.connect_failures,
                    last(&w.errors, 3)
                );
            }
        }
        for (i, s) in record.will_subscribers.iter().enumerate() {
            println!(
                "check: will subscriber {i}: {} receptions, {} connections, {} failed attempts, {} sessions lost",
                s.deliveries.len(),
                s.connects,
                s.connect_failures,
                s.sessions_lost
            );
        }
        for (label, t) in &self.failovers {
            match t {
                Some(ms) => println!("check: failover after {label}: {ms} ms"),
                None => println!("check: failover after {label}: not recovered before the end"),
            }
        }
        let mut shown: HashMap<&str, usize> = HashMap::new();
        for f in &self.findings {
            let kind = f.what.split(':').next().unwrap_or("");
            let n = shown.entry(kind).or_default();
            *n += 1;
            if *n <= show {
                println!("check: subscriber {}: {}", f.subscriber, f.what);
            }
        }
        println!(
            "check: delivered {} of {} expected (acked × {} subscribers), lost {}, duplicated {} (QoS2 {}), out-of-order {}, unexpected {}, unacked-but-delivered {}",
            self.delivered,
            self.acked * u64::from(self.subscribers),
            self.subscribers,
            self.lost,
            self.duplicated,
            self.duplicated_qos2,
            self.out_of_order,
            self.unexpected,
            self.unacked_delivered
        );
        let w = &self.wills;
        if w.clients > 0 {
            println!(
                "check: wills: {} clients, {} owed (connection broken), delivered {}, lost {}, duplicated {}, unexpected {}, unsure {}",
                w.clients, w.expected, w.delivered, w.lost, w.duplicated, w.unexpected, w.unsure
            );
        }
        println!(
            "RESULT sent={} acked={} delivered={} lost={} duplicated={} qos2-duplicated={} out-of-order={} unexpected={} wills-expected={} wills-delivered={} wills-lost={} wills-duplicated={} wills-unexpected={} sessions-lost={} reconnects={} failover-ms={} max-ack-gap-ms={} verdict={}",
            self.sent,
            self.acked,
            self.delivered,
            self.lost,
            self.duplicated,
            self.duplicated_qos2,
            self.out_of_order,
            self.unexpected,
            w.expected,
            w.delivered,
            w.lost,
            w.duplicated,
            w.unexpected,
            self.sessions_lost,
            self.reconnects,
            match (self.failovers.is_empty(), self.failover_ms()) {
                (true, _) => "-".to_string(),
                (false, Some(ms)) => ms.to_string(),
                (false, None) => "unrecovered".to_string(),
            },
            self.max_ack_gap_ms,
            if self.passed() { "pass" } else { "FAIL" }
        );
    }
}

fn show_id(id: Option<u16>) -> String {
    id.map_or_else(|| "-".to_string(), |i| i.to_string())
}

fn last(errors: &[String], n: usize) -> String {
    let start = errors.len().saturating_sub(n);
    errors[start..].join(" | ")
}

/// Sorts the record. `faults`: `(epoch ms, label)`.
pub fn analyse(record: &Record, faults: &[(u64, String)], publish_started_ms: u64) -> Summary {
    let mut s = Summary {
        subscribers: record.subscribers.len() as u32,
        ..Default::default()
    };
    for p in &record.publishers {
        s.sent += p.sent.len() as u64;
        for m in &p.sent {
            if m.acked_ms.is_some() {
                s.acked += 1;
                s.no_match += u64::from(m.no_match);
            } else if m.refused {
                s.refused += 1;
            } else {
                s.unacked += 1;
            }
        }
        s.reconnects += u64::from(p.connects.saturating_sub(1));
        s.sessions_lost += u64::from(p.sessions_lost);
    }
    for (si, sub) in record.subscribers.iter().enumerate() {
        let si = si as u32;
        s.sessions_lost += u64::from(sub.sessions_lost);
        s.reconnects += u64::from(sub.connects.saturating_sub(1));
        // Copies received, and the packet id of the first.
        let mut count: HashMap<(u32, u64), (u32, Option<u16>)> = HashMap::new();
        let mut last_seq: HashMap<(u32, u32), u64> = HashMap::new();
        for d in &sub.deliveries {
            let (publisher, seq, topic, topic_ok, qos, dup, packet_id) = match d {
                Delivery::Unexpected(_) | Delivery::Will { .. } => {
                    let what = match d {
                        Delivery::Unexpected(text) => format!("unexpected: {text}"),
                        will => format!("unexpected: {will:?} on a message topic"),
                    };
                    s.unexpected += 1;
                    s.findings.push(Finding {
                        subscriber: si,
                        what,
                    });
                    continue;
                }
                Delivery::Message {
                    publisher,
                    seq,
                    topic,
                    topic_ok,
                    qos,
                    dup,
                    packet_id,
                } => (*publisher, *seq, *topic, *topic_ok, *qos, *dup, *packet_id),
            };
            let sent = record
                .publishers
                .get(publisher as usize)
                .and_then(|p| p.sent.get(seq as usize));
            let Some(sent) = sent.filter(|_| topic_ok) else {
                s.unexpected += 1;
                s.findings.push(Finding {
                    subscriber: si,
                    what: format!(
                        "unexpected: publisher {publisher} seq {seq} (never sent, or wrong topic)"
                    ),
                });
                continue;
            };
            let (n, first_id) = count.entry((publisher, seq)).or_insert((0, packet_id));
            *n += 1;
            if *n > 1 {
                s.duplicated += 1;
                if qos == 2 {
                    s.duplicated_qos2 += 1;
                    s.findings.push(Finding {
                        subscriber: si,
                        // Sent more than once: the publisher's re-send may have been taken
                        // for a new message (inbound); once: the broker sent it twice —
                        // queued twice (other packet ids) or sent again as new (same id).
                        what: format!(
                            "QoS2 duplicate: publisher {publisher} seq {seq} (sent {} time(s); packet id {} then {}, DUP={})",
                            sent.sends,
                            show_id(*first_id),
                            show_id(packet_id),
                            u8::from(dup)
                        ),
                    });
                }
                continue;
            }
            if sent.acked_ms.is_none() {
                s.unacked_delivered += 1;
            }
            let last = last_seq.entry((publisher, topic)).or_insert(seq);
            if seq < *last {
                s.out_of_order += 1;
                s.findings.push(Finding {
                    subscriber: si,
                    what: format!(
                        "out of order: publisher {publisher} topic t{topic}: seq {seq} after seq {} (seq {seq} sent {} time(s), {})",
                        *last,
                        sent.sends,
                        if sent.acked_ms.is_some() { "acked" } else { "unacked" }
                    ),
                });
            } else {
                *last = seq;
            }
        }
        for (pi, p) in record.publishers.iter().enumerate() {
            for (seq, m) in p.sent.iter().enumerate() {
                let Some(acked) = m.acked_ms else { continue };
                if count.contains_key(&(pi as u32, seq as u64)) {
                    s.delivered += 1;
                } else {
                    s.lost += 1;
                    s.findings.push(Finding {
                        subscriber: si,
                        what: format!(
                            "lost: publisher {pi} seq {seq} topic t{} (QoS{}, sent {} ms after start {} time(s), acked{} {} ms after start)",
                            m.topic,
                            p.qos,
                            m.first_sent_ms.saturating_sub(publish_started_ms),
                            m.sends,
                            if m.no_match { " \"no matching subscribers\"" } else { "" },
                            acked.saturating_sub(publish_started_ms)
                        ),
                    });
                }
            }
        }
    }
    // Failover: per publisher, the longest pause between two acknowledgements that began
    // around the fault (from 1 s before: the last ack before a stall; to 5 s after: docker
    // takes a moment to inject). The fault's failover time is when the longest such pause
    // of any publisher ended, counted from the fault; 0 when no publisher paused longer than
    // `STALL_MS` (the fault did not interrupt publishing).
    const STALL_MS: u64 = 300;
    for (t, label) in faults {
        let mut worst: Option<u64> = Some(0);
        for p in &record.publishers {
            let mut acks: Vec<u64> = p.sent.iter().filter_map(|m| m.acked_ms).collect();
            acks.sort_unstable();
            let sent_after = p.sent.iter().any(|m| m.first_sent_ms >= *t);
            let acked_after = acks.last().is_some_and(|a| *a >= *t);
            if sent_after && !acked_after {
                worst = None; // never acknowledged anything again
                continue;
            }
            let mut longest: Option<(u64, u64)> = None;
            for w in acks.windows(2) {
                let (from, to) = (w[0], w[1]);
                if from + 1_000 >= *t
                    && from <= t + 5_000
                    && to - from > STALL_MS
                    && longest.is_none_or(|(f, e)| to - from > e - f)
                {
                    longest = Some((from, to));
                }
            }
            if let (Some(w), Some((_, end))) = (worst, longest) {
                worst = Some(w.max(end.saturating_sub(*t)));
            }
        }
        s.failovers.push((label.clone(), worst));
    }
    s.wills = wills::analyse(record, &mut s.findings);
    for p in &record.publishers {
        let mut acks: Vec<u64> = p.sent.iter().filter_map(|m| m.acked_ms).collect();
        acks.sort_unstable();
        let mut prev = publish_started_ms;
        for a in acks {
            s.max_ack_gap_ms = s.max_ack_gap_ms.max(a.saturating_sub(prev));
            prev = a;
        }
    }
    s
}
