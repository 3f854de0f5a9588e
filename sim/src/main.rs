//! `tiermq-sim`: a deterministic simulation of a tiermq cluster.
//!
//! Each seed draws a plan (`plan.rs`): a cluster shape, publishers and subscribers with
//! persistent sessions (some subscribing only mid-run), clients with wills (`will.rs`; fired
//! wills are carried out by the production dispatch, `leader_work.rs`), and faults — backend crashes (kill -9) and restarts, cut links,
//! isolated nodes, frontends cut off or crashed, dropped client connections, message loss,
//! delay and reordering. The run drives the real backend (Raft driver, partition state
//! machine, sled storage) on one thread in virtual time (`world.rs`) with a model of the
//! frontend (`frontend.rs`) and of MQTT clients (`client.rs`), heals everything, lets the
//! clients drain, and checks the history against the promises (`history.rs`) and the
//! replicas against each other. The same seed gives the same history (checked by
//! `--twice`), so a failing seed replays exactly: `scripts/simulate 1 SEED --history`.

mod client;
mod frontend;
mod history;
mod leader_work;
mod path;
mod plan;
mod will;
mod world;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tiermq_backend::placement::NodeId;
use tiermq_backend::raft::node::RaftHandle;
use tiermq_common::hashing::partition_of;
use tiermq_common::partition_api::{AckCmd, Command, Reply};
use tokio::sync::Notify;
use tokio::time::{sleep, sleep_until, Instant};

use crate::client::{run_publisher, run_subscriber, Ctx};
use crate::frontend::Frontend;
use crate::plan::{Fault, Plan, Planted, Subscriber};
use crate::will::run_will_client;
use crate::world::{Endpoint, World};

#[derive(Parser, Debug)]
#[command(about = "Deterministic simulation of a tiermq cluster under faults chosen by a seed")]
struct Args {
    /// How many seeds to run.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    first: u64,
    /// Print each run's plan and history (not only the failing ones' replay command).
    #[arg(long)]
    history: bool,
    /// Run every seed twice and demand the same history (determinism).
    #[arg(long)]
    twice: bool,
    /// Put a known bug in, to show that the simulation finds it.
    #[arg(long, value_enum)]
    plant: Option<Planted>,
    /// Report the broken promises of a known, documented gap without failing the seed
    /// (CI uses it while the gap is open; a plain run counts everything).
    #[arg(long, value_enum)]
    known_gap: Vec<KnownGap>,
}

/// A gap the docs state (docs/architecture.md §6), told apart from new failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum KnownGap {
    /// Inbound QoS2 queued twice by a partition other than the publisher's (a publish
    /// retried after a lost answer or re-sent after a reconnect): no idempotency key there.
    InboundQos2,
    /// A CONNECT re-sent after an unanswered attempt and applied twice: the partition takes
    /// the second for a new connection taking over the first and publishes the will of a
    /// client that never lost its connection (`history::CONNECT_RESENT`). Closed: the
    /// CONNECT names its connection, and a re-applied copy gets the first answer.
    ConnectRetry,
}

impl KnownGap {
    fn covers(self, violation: &str) -> bool {
        match self {
            KnownGap::InboundQos2 => violation.starts_with("qos2-duplicated (queued twice"),
            KnownGap::ConnectRetry => {
                violation.starts_with("will-") && violation.ends_with(history::CONNECT_RESENT)
            }
        }
    }
}

/// What one seed's run came to.
struct Outcome {
    digest: u64,
    violations: Vec<String>,
    acked: usize,
    delivered: usize,
    wills_fired: usize,
    history: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut failed = 0u64;
    let mut seeds_with_gaps = 0u64;
    for seed in args.first..args.first + args.seeds {
        let plan = Plan {
            planted: args.plant,
            ..Plan::from_seed(seed)
        };
        let mut outcome = run(plan.clone());
        if args.twice {
            let again = run(plan.clone());
            if again.digest != outcome.digest {
                outcome.violations.push(format!(
                    "not deterministic: digest {:016x} then {:016x}",
                    outcome.digest, again.digest
                ));
            }
        }
        let faults = plan.faults.len();
        let (gaps, broken): (Vec<String>, Vec<String>) = outcome
            .violations
            .drain(..)
            .partition(|v| args.known_gap.iter().any(|g| g.covers(v)));
        outcome.violations = broken;
        if !gaps.is_empty() {
            seeds_with_gaps += 1;
            println!(
                "seed {seed}: {} broken promises of known gaps ({:?}), e.g. {}",
                gaps.len(),
                args.known_gap,
                gaps[0]
            );
        }
        if outcome.violations.is_empty() {
            println!(
                "seed {seed}: ok — {} acknowledged, {} delivered, {} wills fired, {faults} faults, history {:016x}",
                outcome.acked, outcome.delivered, outcome.wills_fired, outcome.digest
            );
        } else {
            failed += 1;
            println!(
                "seed {seed}: FAILED — {} broken promises ({} acknowledged, {} delivered, {faults} faults)",
                outcome.violations.len(),
                outcome.acked,
                outcome.delivered
            );
            for v in outcome.violations.iter().take(12) {
                println!("  {v}");
            }
            if outcome.violations.len() > 12 {
                println!("  ... and {} more", outcome.violations.len() - 12);
            }
            println!("  replay: scripts/simulate 1 {seed} --history");
        }
        if args.history {
            println!("{plan}");
            print!("{}", outcome.history);
        }
    }
    if !args.known_gap.is_empty() {
        println!(
            "simulate: {seeds_with_gaps} seeds broke promises of the known gaps {:?} (not counted as failed for them)",
            args.known_gap
        );
    }
    println!(
        "simulate: {} seeds (first {}), {failed} failed",
        args.seeds, args.first
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs one plan on a fresh single-threaded runtime in paused (virtual) time.
fn run(plan: Plan) -> Outcome {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("tokio runtime");
    let outcome = runtime.block_on(simulate(plan));
    runtime.shutdown_background();
    outcome
}

async fn simulate(plan: Plan) -> Outcome {
    let world = World::new(plan.clone());
    let start = Instant::now();
    for id in 1..=plan.nodes {
        world.start_node(id);
    }
    let frontends: Vec<Arc<Frontend>> = (1..=plan.frontends)
        .map(|slot| Frontend::new(world.clone(), slot))
        .collect();
    let ctx = Ctx {
        world: world.clone(),
        frontends: frontends.clone(),
    };
    // Client #i: subscribers first, then publishers, late subscribers, will clients (the
    // plan's DropClient names them so: `Plan::client_names`).
    let mut kills = Vec::new();
    let mut kill = || {
        let kill = Arc::new(Notify::new());
        kills.push(kill.clone());
        kill
    };
    for (i, s) in plan.subscribers.iter().enumerate() {
        let spec = Subscriber {
            client_id: s.clone(),
            filter: "t/#".to_string(),
            at_ms: 0,
        };
        tokio::spawn(run_subscriber(ctx.clone(), spec, i, kill()));
    }
    for (i, p) in plan.publishers.iter().enumerate() {
        tokio::spawn(run_publisher(ctx.clone(), p.clone(), i, kill()));
    }
    for (i, s) in plan.late_subscribers.iter().enumerate() {
        tokio::spawn(run_subscriber(ctx.clone(), s.clone(), i, kill()));
    }
    for (i, w) in plan.will_clients.iter().enumerate() {
        tokio::spawn(run_will_client(ctx.clone(), w.clone(), i, kill()));
    }
    for (t, fault) in &plan.faults {
        sleep_until(start + Duration::from_millis(*t)).await;
        world.trace(format!("fault: {fault}"));
        inject(&world, &frontends, &kills, *fault);
    }
    sleep_until(start + Duration::from_millis(plan.heal_ms)).await;
    world.trace("heal: every link restored, every process started");
    world.heal_all();
    for id in world.node_ids() {
        if world.incarnation(id) > 0 {
            world.start_node(id);
        }
    }
    for f in &frontends {
        if !f.is_up() {
            f.start();
        }
    }
    world.finish();
    sleep(Duration::from_millis(plan.settle_ms)).await;
    check_no_deaf_sessions(&world, &frontends).await;
    check_replicas(&world).await;
    let history = world.history();
    Outcome {
        digest: history.digest(),
        violations: history.check(),
        acked: history.acked_count(),
        delivered: history.delivered_count(),
        wills_fired: history.wills_fired_count(),
        history: history.lines(),
    }
}

/// Applies one fault now and schedules its end.
fn inject(world: &Arc<World>, frontends: &[Arc<Frontend>], kills: &[Arc<Notify>], fault: Fault) {
    let later = |ms: u64, f: Box<dyn FnOnce() + Send>| {
        tokio::spawn(async move {
            sleep(Duration::from_millis(ms)).await;
            f();
        });
    };
    match fault {
        Fault::CrashNode { node, down_ms } => {
            world.crash_node(node);
            let w = world.clone();
            later(down_ms, Box::new(move || w.start_node(node)));
        }
        Fault::CutNodes { a, b, ms } => {
            let (a, b) = (Endpoint::Node(a), Endpoint::Node(b));
            world.cut(a, b);
            let w = world.clone();
            later(ms, Box::new(move || w.heal(a, b)));
        }
        Fault::IsolateNode { node, ms } => {
            let me = Endpoint::Node(node);
            let others: Vec<Endpoint> = world
                .node_ids()
                .into_iter()
                .filter(|n| *n != node)
                .map(Endpoint::Node)
                .chain(frontends.iter().map(|f| Endpoint::Frontend(f.slot)))
                .collect();
            for o in &others {
                world.cut(me, *o);
            }
            let w = world.clone();
            later(
                ms,
                Box::new(move || {
                    for o in others {
                        w.heal(me, o);
                    }
                }),
            );
        }
        Fault::CutFrontend { frontend, node, ms } => {
            let (a, b) = (Endpoint::Frontend(frontend), Endpoint::Node(node));
            world.cut(a, b);
            let w = world.clone();
            later(ms, Box::new(move || w.heal(a, b)));
        }
        Fault::CrashFrontend { frontend, down_ms } => {
            let f = frontends[(frontend - 1) as usize].clone();
            if f.is_up() {
                f.crash();
                later(down_ms, Box::new(move || f.start()));
            }
        }
        Fault::DiskError { node, ms } => {
            world.fail_disk(node);
            let w = world.clone();
            later(
                ms,
                Box::new(move || {
                    // The driver stopped itself (or will at its next write): the process is
                    // restarted on a working disk from what it had flushed.
                    w.crash_node(node);
                    w.start_node(node);
                }),
            );
        }
        Fault::Members { members, count } => {
            let members = &members[..count];
            world.set_map(members);
            for &n in members {
                world.start_node(n); // a joining node (no-op for running ones)
            }
        }
        Fault::DropClient { client } => {
            if let Some(k) = kills.get(client) {
                k.notify_one();
            }
        }
    }
}

/// A client whose connection is open must have its session attached to that connection:
/// a session detached behind the client's back (e.g. its frontend declared lost while the
/// client stayed connected) receives nothing and tells nobody (issue 19 §2, "deaf sessions").
async fn check_no_deaf_sessions(world: &Arc<World>, frontends: &[Arc<Frontend>]) {
    let late = world.plan.late_subscribers.iter().map(|s| &s.client_id);
    for client in world.plan.subscribers.iter().chain(late) {
        let Some((slot, epoch)) = world.connection(client) else {
            continue;
        };
        let frontend = &frontends[(slot - 1) as usize];
        let client_id: Arc<str> = Arc::from(client.as_str());
        let home = partition_of(client, world.plan.partitions);
        // An ack of packet id 0 changes nothing; it answers whether the epoch is attached.
        let probe = Command::Ack {
            client_id,
            epoch,
            kind: AckCmd::PubAck,
            packet_id: 0,
        };
        match frontend.call(home, probe).await {
            Ok(Reply::Acked { .. }) => {}
            other => world.history().violation(format!(
                "deaf session: {client} is connected (frontend {slot}, epoch {epoch}) but its session answers {other:?}"
            )),
        }
    }
}

/// Replicas that applied the same index must hold the same state (apply is deterministic;
/// a replica restored from a checkpoint or a snapshot must equal one that replayed the log).
async fn check_replicas(world: &Arc<World>) {
    for partition in 0..world.plan.partitions {
        let replicas = world.map().replicas_of(partition).to_vec();
        let mut compared = false;
        for _ in 0..40 {
            let mut images = Vec::new();
            let mut missing = Vec::new();
            for &node in &replicas {
                if let Some(h) = world.handle(node) {
                    match h.applied_image(partition).await {
                        Some((applied, image)) => images.push((node, applied, image)),
                        None => missing.push(node),
                    }
                }
            }
            if !missing.is_empty() {
                // 30 s after every fault healed, each replica of the map must exist.
                world.history().violation(format!(
                    "replica missing: partition {partition} has no replica on nodes {missing:?} of its map {replicas:?}"
                ));
                return;
            }
            for (i, (na, aa, ia)) in images.iter().enumerate() {
                for (nb, ab, ib) in &images[i + 1..] {
                    if aa == ab {
                        compared = true;
                        if ia != ib {
                            world.history().violation(format!(
                                "replicas diverge: partition {partition} on nodes {na} and {nb} at applied index {aa}"
                            ));
                            return;
                        }
                    }
                }
            }
            if compared {
                break;
            }
            sleep(Duration::from_millis(7)).await;
        }
        if !compared {
            world.trace(format!(
                "partition {partition}: no two replicas at the same index to compare"
            ));
        }
    }
    check_no_replicas_left_behind(world).await;
}

/// 30 s after every fault healed, no running node holds a replica that its map does not
/// place on it and that the partition's leader no longer counts (voter or learner): a removed
/// replica that missed its removal's commit must have asked and been told (docs/architecture.md
/// §6), not be kept forever. A replica the leader still counts belongs to a move not finished:
/// traced, not a broken promise of removal.
async fn check_no_replicas_left_behind(world: &Arc<World>) {
    let map = world.map();
    let nodes: Vec<(NodeId, RaftHandle)> = world
        .node_ids()
        .into_iter()
        .filter_map(|n| world.handle(n).map(|h| (n, h)))
        .collect();
    for (node, h) in &nodes {
        let Some(progress) = h.move_progress().await else {
            continue;
        };
        let placed = map.partitions_of(*node);
        for p in progress.held.into_iter().filter(|p| !placed.contains(p)) {
            let mut counted = None;
            for (_, other) in &nodes {
                if let Some(s) = other.status(p).await.filter(|s| s.is_leader) {
                    counted = Some(s.voters.contains(node) || s.learners.contains(node));
                }
            }
            match counted {
                Some(false) => world.history().violation(format!(
                    "replica left behind: node {node} still holds partition {p}, which the map (epoch {}) does not place on it and its leader no longer counts",
                    map.epoch
                )),
                Some(true) => world.trace(format!(
                    "node {node} holds partition {p} outside the map: its leader still counts it (a move not finished)"
                )),
                None => world.trace(format!(
                    "node {node} holds partition {p} outside the map; the partition has no leader"
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same seed gives the same history, bit for bit (what makes a failure replayable).
    #[test]
    fn a_seed_replays_the_same_history() {
        let a = run(Plan::from_seed(7));
        let b = run(Plan::from_seed(7));
        assert!(a.acked > 0, "the run did something");
        assert_eq!(a.digest, b.digest, "{}\n-----\n{}", a.history, b.history);
    }
}
