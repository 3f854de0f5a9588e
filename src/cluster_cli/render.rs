//! `tiermq cluster status` without `--json`: the status as tables for an operator.

use super::status::ClusterStatus;

impl ClusterStatus {
    /// Human-readable tables.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let reachable = self.members.iter().filter(|m| m.reachable).count();
        let led = self
            .partition_status
            .iter()
            .filter(|p| p.leader != 0)
            .count();
        let _ = writeln!(
            out,
            "cluster: map epoch {}, {} partitions × {} replicas, {}/{} members reachable, {}/{} partitions led — {}",
            self.epoch,
            self.partitions,
            self.replication,
            reachable,
            self.members.len(),
            led,
            self.partition_status.len(),
            if self.healthy { "healthy" } else { "DEGRADED" }
        );
        let _ = writeln!(out, "(asked node {} at {})", self.asked_node, self.asked);
        let _ = writeln!(out);
        let _ = writeln!(out, "MEMBERS");
        let addr_w = column_width(self.members.iter().map(|m| m.addr.len()), 7);
        let _ = writeln!(
            out,
            "  {:>4}  {:<addr_w$}  {:<9}  {:>5}  {:>5}",
            "ID", "ADDRESS", "REACHABLE", "LEADS", "EPOCH"
        );
        for m in &self.members {
            let _ = write!(
                out,
                "  {:>4}  {:<addr_w$}  {:<9}  {:>5}  {:>5}",
                m.id,
                m.addr,
                if m.reachable { "yes" } else { "NO" },
                if m.reachable {
                    m.leads.to_string()
                } else {
                    "-".into()
                },
                if m.reachable {
                    m.epoch.to_string()
                } else {
                    "-".into()
                },
            );
            if let Some(e) = &m.error {
                let _ = write!(out, "  ({e})");
            }
            let _ = writeln!(out);
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "FRONTENDS ({} known; CONNS = MQTT connections open, STREAMS = members with its event stream)",
            self.frontends.len()
        );
        let admin_w = column_width(
            self.frontends
                .iter()
                .filter_map(|f| f.admin.as_ref().map(String::len)),
            5,
        );
        let _ = writeln!(
            out,
            "  {:<16}  {:<admin_w$}  {:>6}  {:<5}  {:<8}  STREAMS",
            "ID", "ADMIN", "CONNS", "READY", "DRAINING"
        );
        let yes_no = |b: Option<bool>| match b {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        for f in &self.frontends {
            let id = if f.id == 0 {
                "?".to_string()
            } else {
                format!("{:016x}", f.id)
            };
            let streams: Vec<String> = f.event_streams.iter().map(u64::to_string).collect();
            let _ = write!(
                out,
                "  {:<16}  {:<admin_w$}  {:>6}  {:<5}  {:<8}  {}",
                id,
                f.admin.as_deref().unwrap_or("-"),
                f.connections.map_or("-".to_string(), |c| c.to_string()),
                yes_no(f.ready),
                match f.draining {
                    Some(true) => "DRAINING",
                    Some(false) => "no",
                    None => "-",
                },
                if streams.is_empty() {
                    "-".to_string()
                } else {
                    streams.join(",")
                }
            );
            if let Some(e) = f.error.as_ref().or(f.not_ready.as_ref()) {
                let _ = write!(out, "  ({e})");
            }
            let _ = writeln!(out);
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "PARTITIONS  (replica: commit/applied, lag = leader commit − applied; * = leader)"
        );
        let _ = writeln!(
            out,
            "  {:>4}  {:>6}  {:>5}  REPLICAS",
            "PART", "LEADER", "TERM"
        );
        for p in &self.partition_status {
            let _ = write!(
                out,
                "  {:>4}  {:>6}  {:>5} ",
                p.partition,
                if p.leader == 0 {
                    "NONE".to_string()
                } else {
                    p.leader.to_string()
                },
                p.term
            );
            for r in &p.replicas {
                let mark = if r.node == p.leader { "*" } else { " " };
                if r.reachable {
                    let _ = write!(
                        out,
                        "  {}{}: {}/{} lag {}",
                        r.node, mark, r.commit, r.applied, r.lag
                    );
                } else {
                    let _ = write!(out, "  {}{}: unreachable", r.node, mark);
                }
            }
            let _ = writeln!(out);
        }
        if !self.problems.is_empty() {
            let _ = writeln!(out);
            let _ = writeln!(out, "PROBLEMS");
            for p in &self.problems {
                let _ = writeln!(out, "  - {p}");
            }
        }
        out
    }
}

/// The widest of `widths`, at least `min` (the heading).
fn column_width(widths: impl Iterator<Item = usize>, min: usize) -> usize {
    widths.max().unwrap_or(0).max(min)
}
