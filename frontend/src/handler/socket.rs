//! The socket: the next packet from the client, and the write buffer going out as fast as
//! the client takes it — never waiting on a client that does not read.

use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use futures::{Future, SinkExt};
use tiermq_common::codec::{DecodeError, EncodeError, MqttCodec, Packet};
use tiermq_common::session_api::SessionService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Encoder, Framed};
use tracing::debug;

use super::{Close, Handler};

/// An empty write buffer larger than this is released after a flush.
const WRITE_BUFFER_KEEP: usize = 64 * 1024;

/// The longest a connection waits to write its last packets (DISCONNECT) to a client that
/// does not read them before closing anyway.
const CLOSE_FLUSH_WAIT: Duration = Duration::from_secs(5);

/// How [`next_packet`] reads.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Reading {
    /// Waits for the next packet.
    Wait,
    /// Does not read: the publish limits paused the connection.
    Paused,
    /// Takes only what the client already sent, without waiting: after a write error (a
    /// client that sent DISCONNECT and closed makes our next write fail, and that DISCONNECT
    /// still counts), or when a newer connection of the same client takes over
    /// ([`crate::takeover`]).
    Available,
}

/// What [`next_packet`] found.
// Moved once per packet, as `Option<Result<Packet, _>>` was; boxing the packet would cost an
// allocation per packet for nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum Next {
    Packet(Packet),
    /// Bytes that do not decode, or a read error.
    Failed(DecodeError),
    /// The client closed the connection.
    Closed,
    /// Writing failed; what the client sent before may still be read.
    WriteFailed(std::io::Error),
    /// [`Reading::Available`]: nothing more has arrived.
    Drained,
}

/// The next packet from the client, while writing out what is buffered as fast as the socket
/// takes it (unless `write` is false: writing failed before). One future does both because
/// both need the socket: a client that does not read its deliveries must not stop us reading
/// its packets, nor the other way round.
pub(super) fn next_packet<IO>(
    framed: &mut Framed<IO, MqttCodec>,
    reading: Reading,
    write: bool,
) -> impl Future<Output = Next> + '_
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    std::future::poll_fn(move |cx| {
        if write && !framed.write_buffer().is_empty() {
            if let Poll::Ready(Err(e)) =
                futures::Sink::<&Packet>::poll_flush(Pin::new(&mut *framed), cx)
            {
                return Poll::Ready(Next::WriteFailed(match e {
                    EncodeError::Io(io) => io,
                    other => std::io::Error::other(other.to_string()),
                }));
            }
        }
        if reading == Reading::Paused {
            return Poll::Pending;
        }
        match futures::Stream::poll_next(Pin::new(&mut *framed), cx) {
            Poll::Ready(Some(Ok(p))) => Poll::Ready(Next::Packet(p)),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Next::Failed(e)),
            Poll::Ready(None) => Poll::Ready(Next::Closed),
            Poll::Pending if reading == Reading::Available => Poll::Ready(Next::Drained),
            Poll::Pending => Poll::Pending,
        }
    })
}

impl<S, IO> Handler<S, IO>
where
    S: SessionService,
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// Writing to the client failed (most likely it closed the connection after its last
    /// packets: our write meets its reset). The connection does not end yet: what the client
    /// sent before is still read, so a DISCONNECT among it is honoured (no will, §3.14.4).
    pub(super) fn on_write_failed(&mut self, e: &std::io::Error) {
        debug!(peer = %self.peer, error = %e, "write failed; reading what the client sent");
        self.write_failed = true;
        self.framed.write_buffer_mut().clear();
    }

    /// Writes the buffered packets to the socket (waiting at most [`CLOSE_FLUSH_WAIT`]: this
    /// is for the last words before a close), then gives back a large write buffer a burst
    /// left behind.
    pub(super) async fn flush(&mut self) -> Result<(), EncodeError> {
        if self.write_failed {
            return Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe).into());
        }
        let flush = SinkExt::<&Packet>::flush(&mut self.framed);
        match tokio::time::timeout(CLOSE_FLUSH_WAIT, flush).await {
            Ok(r) => r?,
            Err(_) => return Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()),
        }
        self.release_write_buffer();
        Ok(())
    }

    /// Writes what the socket takes *now* and returns; the rest goes out as the socket drains
    /// (see [`next_packet`]). Never waiting here is what keeps a client that does not read
    /// from stalling its own connection: its deliveries keep being taken off the session
    /// channel (QoS0 dropped once the buffer passes `max_write_buffer`), its keep alive and
    /// its packets are still handled. A write error is not the end: see
    /// [`Self::on_write_failed`].
    pub(super) async fn flush_now(&mut self) {
        if self.write_failed {
            self.framed.write_buffer_mut().clear();
            return;
        }
        let framed = &mut self.framed;
        let written = std::future::poll_fn(|cx| {
            match futures::Sink::<&Packet>::poll_flush(Pin::new(&mut *framed), cx) {
                Poll::Ready(r) => Poll::Ready(r),
                Poll::Pending => Poll::Ready(Ok(())),
            }
        })
        .await;
        match written {
            Ok(()) => self.release_write_buffer(),
            Err(EncodeError::Io(e)) => self.on_write_failed(&e),
            Err(e) => self.on_write_failed(&std::io::Error::other(e.to_string())),
        }
    }

    fn release_write_buffer(&mut self) {
        let buf = self.framed.write_buffer_mut();
        if buf.is_empty() && buf.capacity() > WRITE_BUFFER_KEEP {
            *buf = BytesMut::new();
        }
    }

    /// Encodes a packet into the write buffer; the main loop flushes once per wake-up.
    pub(super) fn feed(&mut self, packet: Packet) -> Result<(), Close> {
        // The codec is `Copy`; a copy encodes into the buffer the framed transport owns.
        let mut codec = *self.framed.codec();
        match codec.encode(&packet, self.framed.write_buffer_mut()) {
            Ok(()) => Ok(()),
            Err(e) => {
                debug!(peer = %self.peer, error = %e, packet = packet.name(), "cannot encode");
                Err(Close::Abnormal)
            }
        }
    }
}
