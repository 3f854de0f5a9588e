//! Will clients: connections with a will, ended every way a connection ends — a normal
//! DISCONNECT (the will is discarded), a dropped connection (it fires, at once or after its
//! delay), a reconnect within the delay (it is cancelled), a fault (a dropped client, a
//! crashed frontend, a frontend declared lost) — so the wills' promises are checked
//! (`History::check_wills`).
//!
//! What the client records is only what it can know for sure:
//! - each CONNECT attempt carries a will of its own (`WillId`): once sent, it *may fire*, at
//!   most once — a failed attempt may still have attached a connection, which the retry
//!   takes over and whose will then rightly fires — and is never owed;
//! - a will is *set* when the CONNECT carrying it is answered;
//! - it is *discarded* by a normal DISCONNECT only when that DISCONNECT was answered `Done`
//!   (the session was attached to this connection when it applied, so no will had fired);
//! - a delayed will is *cancelled* only when the reconnect was answered before `alive + delay`,
//!   where `alive` is when a command last found the session attached to the old connection
//!   (its send time; the CONNECT's at first). The entry that detached the session comes after
//!   that command in the log and is stamped later, so the will was due after `alive + delay`,
//!   after the reconnect entry (stamped before its answer) cancelled it. A probe every 700 ms
//!   keeps `alive` close; the frontend's lost-lease detach needs no client to know of it.

use std::sync::Arc;
use std::time::Duration;

use tiermq_common::hashing::partition_of;
use tiermq_common::partition_api::{AckCmd, Command, Reply};
use tiermq_common::session_api::{SessionEvent, Will};
use tiermq_common::Message;
use tokio::sync::Notify;
use tokio::time::sleep;

use crate::client::{Conn, ConnectArgs, Ctx, Tried};
use crate::frontend::Frontend;
use crate::history::{will_topic, WillId, ENDED_NORMALLY};
use crate::plan::{WillClient, TRAFFIC_START_MS};

/// How often a will client checks that its session is still attached to its connection.
const PROBE_EVERY: Duration = Duration::from_millis(700);

/// How a connection ended.
enum End {
    /// By the client: a normal DISCONNECT (`true`: answered `Done`).
    Normal(bool),
    /// Without DISCONNECT: dropped, its frontend gone, closed by the server, detached.
    Abnormal(&'static str),
}

pub async fn run_will_client(ctx: Ctx, spec: WillClient, preferred: usize, kill: Arc<Notify>) {
    let world = ctx.world.clone();
    let client_id: Arc<str> = Arc::from(spec.client_id.as_str());
    let home = partition_of(&client_id, ctx.partitions());
    let delay_ms = u64::from(spec.delay_secs) * 1000;
    sleep(Duration::from_millis(
        TRAFFIC_START_MS + world.range(0..1_000),
    ))
    .await;
    let mut had_session = false;
    // The previous connection's delayed will and when it was last known attached.
    let mut pending: Option<(WillId, u64)> = None;
    for n in 1u32.. {
        let (mut conn, will) = connect(&ctx, &spec, &client_id, n, preferred, had_session).await;
        had_session = true;
        let answered = world.elapsed_ms();
        if let Some((prev, alive)) = pending.take() {
            if answered < alive + delay_ms {
                world.trace(format!(
                    "{client_id}: the delayed will of connection {} is cancelled (attached at {alive} ms, reconnected at {answered} ms)",
                    prev.connection
                ));
                world.history().will_discarded(
                    prev,
                    format!(
                        "a reconnect answered at {answered} ms cancelled it (attached at {alive} ms, delay {} s)",
                        spec.delay_secs
                    ),
                );
            }
        }
        world.history().will_set(will.clone(), conn.resent);
        let mut alive = conn.sent_ms;
        let ends_at = answered + world.range(1_000..6_000);
        let end = loop {
            // Once the run settles, the connection stays as it is (no planned end, no probe).
            let settling = world.finished();
            let wait = Duration::from_millis(ends_at.saturating_sub(world.elapsed_ms()));
            tokio::select! {
                biased;
                _ = kill.notified() => break End::Abnormal("dropped"),
                e = conn.events.recv() => match e {
                    None => break End::Abnormal("its frontend went down"),
                    Some(SessionEvent::Disconnect { .. }) => break End::Abnormal("closed by the server"),
                    Some(_) => {}
                },
                _ = sleep(wait), if !settling => {
                    if spec.normal_disconnects && world.chance(0.5) {
                        let done = disconnect(&conn, &client_id, home).await;
                        break End::Normal(done);
                    }
                    break End::Abnormal("dropped by the client");
                }
                (sent, probed) = probe(&ctx, &conn.frontend, conn.epoch, &client_id, home), if !settling => match probed {
                    Some(true) => alive = alive.max(sent),
                    Some(false) => break End::Abnormal("detached (probe)"),
                    None => {}
                },
            }
        };
        let end = match end {
            End::Normal(false) => End::Abnormal("its normal DISCONNECT was not answered"),
            other => other,
        };
        match end {
            End::Normal(done) => {
                world.set_connection(&client_id, None);
                conn.frontend.forget(&client_id, conn.epoch);
                debug_assert!(done);
                world
                    .history()
                    .will_discarded(will, ENDED_NORMALLY.to_string());
                world.trace(format!(
                    "{client_id} connection {n} ended by a normal DISCONNECT (epoch {})",
                    conn.epoch
                ));
            }
            End::Abnormal(how) => {
                world.trace(format!(
                    "{client_id} connection {n} ended: {how} (last attached at {alive} ms)"
                ));
                ctx.drop_conn(&client_id, conn);
                if delay_ms > 0 {
                    pending = Some((will, alive));
                }
            }
        }
        // Half the pauses are well within a delayed will's delay (the reconnect cancels it).
        let pause = if delay_ms > 0 && world.chance(0.5) {
            world.range(0..delay_ms / 2)
        } else {
            world.range(0..delay_ms * 2 + 1_500)
        };
        sleep(Duration::from_millis(pause)).await;
    }
}

/// Connects (connection `n`), each CONNECT attempt with a will of its own, and returns the
/// connection with the will it set. A failed attempt (its frontend crashed, no answer) may
/// still have reached the partition and attached a connection, which the retry then takes
/// over: that connection ended without DISCONNECT, so its will rightly fires. Under the
/// retry's name it would pass for a will of a live connection; under its own it is recorded
/// as sent, never set — it may fire, once, and is never owed.
async fn connect(
    ctx: &Ctx,
    spec: &WillClient,
    client_id: &Arc<str>,
    n: u32,
    preferred: usize,
    had_session: bool,
) -> (Conn, WillId) {
    let mut attempt = 1;
    let mut turn = 0;
    loop {
        let will = WillId::new(&spec.client_id, n, attempt);
        let args = ConnectArgs {
            session_expiry_secs: spec.session_expiry_secs,
            will: Some(Will {
                message: Message::new(will_topic(&spec.client_id), will.payload(), spec.qos, false),
                delay_secs: spec.delay_secs,
            }),
        };
        ctx.world.history().will_sent(will.clone());
        match ctx
            .try_connect(client_id, preferred, turn, had_session, &args)
            .await
        {
            Tried::Connected(conn) => return (conn, will),
            Tried::Failed => {
                ctx.world.trace(format!(
                    "{client_id}: CONNECT attempt {attempt} of connection {n} failed, its will may fire"
                ));
                attempt += 1;
            }
            Tried::NoFrontend => {}
        }
        turn += 1;
    }
}

/// After [`PROBE_EVERY`], an ack of packet id 0 (changes nothing, logged as a command), and
/// when it was sent: `Some(true)` the session was attached to this connection when it
/// applied, `Some(false)` it was not (the connection is dead: the frontend's audit would
/// close it), `None` no answer.
async fn probe(
    ctx: &Ctx,
    frontend: &Frontend,
    epoch: u64,
    client_id: &Arc<str>,
    home: u32,
) -> (u64, Option<bool>) {
    sleep(PROBE_EVERY).await;
    let sent = ctx.world.elapsed_ms();
    let command = Command::Ack {
        client_id: client_id.clone(),
        epoch,
        kind: AckCmd::PubAck,
        packet_id: 0,
    };
    let answer = match frontend.call(home, command).await {
        Ok(Reply::Acked { .. }) => Some(true),
        Ok(Reply::Fenced | Reply::NoSession) => Some(false),
        _ => None,
    };
    (sent, answer)
}

/// A normal DISCONNECT (no will, the session kept); whether it was answered `Done`.
async fn disconnect(conn: &Conn, client_id: &Arc<str>, home: u32) -> bool {
    let command = Command::Disconnect {
        client_id: client_id.clone(),
        epoch: conn.epoch,
        normal: true,
        with_will: false,
        session_expiry_secs: None,
    };
    matches!(conn.frontend.call(home, command).await, Ok(Reply::Done))
}
