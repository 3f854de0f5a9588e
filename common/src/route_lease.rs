//! How long a frontend may trust the route table a backend sent it.
//!
//! A frontend sends a publish only to the partitions whose routes (filters with a subscriber)
//! match its topic. A SUBSCRIBE is answered (SUBACK) once every frontend watching the
//! partition's leader has acknowledged the route update that adds its filter — that is "read
//! your subscription" across frontends. A frontend that stays alive but stops hearing from a
//! backend (a cut link, a half-open connection) cannot acknowledge, and the backend cannot wait
//! for it forever; yet that frontend must not keep routing by a table that lacks the new filter.
//!
//! So the table a backend sent is trusted only under a **lease**:
//! - The frontend renews it by acknowledging what it has applied (at least every
//!   [`RENEW_EVERY`]). The backend grants the renewal only if the acknowledgement covers every
//!   update it has sent that frontend; the frontend's lease then runs for [`LEASE`] from the
//!   moment it *sent* the acknowledgement (never from when the answer came back).
//! - Past its lease, the frontend treats the partitions whose routes came from that backend as
//!   unknown and sends them every publish (correct, only slower) until a renewal is granted.
//! - A backend that broadcast a route update waits, for each watcher that has not acknowledged
//!   it, until [`WAIT_AFTER_GRANT`] has passed since the last renewal it granted that watcher
//!   (measured from when the grant was made, which is after the frontend sent the request).
//!   Every renewal granted later covers the update. So when the SUBACK goes out, every frontend
//!   either has the filter or no longer trusts its table.
//!
//! The assumption, and the only one about clocks: while a lease runs, the frontend's clock and
//! the backend's clock advance at rates within a factor of 2 of each other, so [`LEASE`]
//! measured by the frontend ends before `2 × LEASE` measured by the backend. No bound on message
//! delay is needed, and the clocks need not agree on the time of day.
use std::time::Duration;

/// How long a granted renewal lets a frontend trust a backend's route table, from the moment
/// the frontend sent the acknowledgement that was granted.
pub const LEASE: Duration = Duration::from_millis(1_000);

/// How often a frontend renews when no route update arrives: a few times per lease, so a lost
/// or slow renewal does not make the routes unknown.
pub const RENEW_EVERY: Duration = Duration::from_millis(250);

/// How long a backend waits, after the last renewal it granted a watcher, before it stops
/// waiting for that watcher's acknowledgement: the lease, doubled for the clock-rate bound.
pub const WAIT_AFTER_GRANT: Duration = Duration::from_millis(2 * LEASE.as_millis() as u64);
