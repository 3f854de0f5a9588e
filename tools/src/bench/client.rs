//! A lean async MQTT client for the load generator: one socket, two buffers, the tiermq codec.
//! No background tasks, no reconnect logic, no per-message allocation on the publish path, so
//! thousands of connections cost little more than their sockets.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::{BufMut, Bytes, BytesMut};
use tiermq_common::codec::{
    self, ConnAck, Connect, ConnectProperties, Disconnect, Packet, Publish, Subscribe,
};
use tiermq_common::session_api::SubscriptionOptions;
use tiermq_common::{ProtocolVersion, QoS, ReasonCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::payload::{Stamp, HEADER_LEN};

/// Largest packet the bench accepts from a broker.
const MAX_INCOMING: u32 = 16 * 1024 * 1024;

/// How to open one connection.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub broker: SocketAddr,
    /// Source address to bind before connecting (spreads ports over 127.0.0.x).
    pub source: Option<IpAddr>,
    pub version: ProtocolVersion,
    pub client_id: String,
    pub clean_start: bool,
    pub keep_alive: u16,
    /// v5: Receive Maximum we announce (how many QoS1/2 messages the broker may have in flight
    /// towards us).
    pub receive_maximum: u16,
    pub timeout: Duration,
}

/// One MQTT connection after CONNACK.
pub struct Conn {
    pub stream: TcpStream,
    pub version: ProtocolVersion,
    pub rbuf: BytesMut,
    pub wbuf: BytesMut,
    pub connack: ConnAck,
}

/// Opens a TCP connection, bound to `source` if given.
pub async fn tcp_connect(broker: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = match broker {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(ip) = source {
        // Let connect() pick the port for the full 4-tuple instead of bind() reserving one
        // per source address: otherwise every source IP is limited to the ephemeral range once.
        #[cfg(target_os = "linux")]
        set_bind_no_port(&socket);
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(broker).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[cfg(target_os = "linux")]
fn set_bind_no_port(socket: &TcpSocket) {
    use std::os::fd::AsRawFd;
    const IP_BIND_ADDRESS_NO_PORT: libc::c_int = 24;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a pointer to a c_int of the given size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            IP_BIND_ADDRESS_NO_PORT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

impl Conn {
    /// Connects and waits for a successful CONNACK.
    pub async fn connect(o: &ConnectOptions) -> anyhow::Result<Conn> {
        tokio::time::timeout(o.timeout, Conn::connect_inner(o))
            .await
            .with_context(|| format!("no CONNACK within {:?}", o.timeout))?
    }

    async fn connect_inner(o: &ConnectOptions) -> anyhow::Result<Conn> {
        let stream = tcp_connect(o.broker, o.source)
            .await
            .with_context(|| format!("cannot connect to {}", o.broker))?;
        let conn = Conn::new(stream, o.version, 4096, 1024);
        let properties = if o.version.is_v5() {
            ConnectProperties {
                receive_maximum: Some(o.receive_maximum.max(1)),
                ..Default::default()
            }
        } else {
            ConnectProperties::default()
        };
        conn.handshake(Connect {
            protocol: o.version,
            clean_start: o.clean_start,
            keep_alive: o.keep_alive,
            client_id: o.client_id.clone(),
            will: None,
            username: None,
            password: None,
            properties,
        })
        .await
    }

    /// A connection on `stream` before CONNECT, with buffers of `rbuf` and `wbuf` bytes.
    pub fn new(stream: TcpStream, version: ProtocolVersion, rbuf: usize, wbuf: usize) -> Conn {
        Conn {
            stream,
            version,
            rbuf: BytesMut::with_capacity(rbuf),
            wbuf: BytesMut::with_capacity(wbuf),
            connack: ConnAck {
                session_present: false,
                reason_code: ReasonCode::SUCCESS,
                properties: Default::default(),
            },
        }
    }

    /// Sends `connect` and waits for a CONNACK that accepts it (kept in `connack`).
    pub async fn handshake(mut self, connect: Connect) -> anyhow::Result<Conn> {
        self.push(&Packet::Connect(connect))?;
        self.flush().await?;
        match self.next().await? {
            Some(Packet::ConnAck(ack)) if !ack.reason_code.is_error() => {
                self.connack = ack;
                Ok(self)
            }
            Some(Packet::ConnAck(ack)) => bail!("CONNACK refused: {:?}", ack.reason_code),
            Some(p) => bail!("expected CONNACK, got {}", p.name()),
            None => bail!("connection closed before CONNACK"),
        }
    }

    /// Encodes a packet into the write buffer.
    pub fn push(&mut self, p: &Packet) -> anyhow::Result<()> {
        codec::encode(p, self.version, &mut self.wbuf).map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Writes the write buffer out.
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Decodes one packet already in the read buffer.
    pub fn decode_buffered(&mut self) -> anyhow::Result<Option<Packet>> {
        codec::decode(&mut self.rbuf, Some(self.version), MAX_INCOMING)
            .map_err(|e| anyhow::anyhow!("bad packet from broker: {e}"))
    }

    /// Reads more bytes; `Ok(0)` at end of stream.
    pub async fn fill(&mut self) -> io::Result<usize> {
        if self.rbuf.capacity() - self.rbuf.len() < 2048 {
            self.rbuf.reserve(64 * 1024);
        }
        self.stream.read_buf(&mut self.rbuf).await
    }

    /// The next packet, `None` at end of stream.
    pub async fn next(&mut self) -> anyhow::Result<Option<Packet>> {
        loop {
            if let Some(p) = self.decode_buffered()? {
                return Ok(Some(p));
            }
            if self.fill().await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Subscribes and waits for the SUBACK (other packets arriving meanwhile are dropped, so
    /// subscribe before anything is published to the filters). Fails if a filter is refused.
    pub async fn subscribe(&mut self, filters: &[String], qos: QoS) -> anyhow::Result<()> {
        let options = SubscriptionOptions {
            qos,
            ..Default::default()
        };
        self.push(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: filters.iter().map(|f| (f.clone(), options)).collect(),
            properties: Default::default(),
        }))?;
        self.flush().await?;
        loop {
            match self.next().await? {
                Some(Packet::SubAck(ack)) => {
                    if let Some(rc) = ack.reason_codes.iter().find(|rc| rc.is_error()) {
                        bail!("subscription refused: {rc:?}");
                    }
                    return Ok(());
                }
                Some(_) => continue,
                None => bail!("connection closed before SUBACK"),
            }
        }
    }

    /// Sends DISCONNECT (best effort) and closes.
    pub async fn disconnect(mut self) {
        let _ = self.push(&Packet::Disconnect(Disconnect {
            reason_code: ReasonCode::SUCCESS,
            properties: Default::default(),
        }));
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = self.flush().await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }
}

/// A PUBLISH encoded once by the codec, then patched per message: only the packet id and the
/// payload header change, so sending costs a memcpy.
#[derive(Debug, Clone)]
pub struct PublishTemplate {
    bytes: Vec<u8>,
    packet_id_at: Option<usize>,
    payload_at: usize,
}

impl PublishTemplate {
    pub fn new(
        version: ProtocolVersion,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload_len: usize,
    ) -> anyhow::Result<PublishTemplate> {
        let payload_len = payload_len.max(HEADER_LEN);
        let packet = Packet::Publish(Publish {
            dup: false,
            qos,
            retain,
            topic: topic.to_string(),
            packet_id: (qos != QoS::AtMostOnce).then_some(1),
            properties: Default::default(),
            payload: Bytes::from(vec![0u8; payload_len]),
        });
        let mut out = BytesMut::new();
        codec::encode(&packet, version, &mut out).map_err(|e| anyhow::anyhow!("{e}"))?;
        // Fixed header: 1 byte + the remaining length's variable-length bytes.
        let mut header = 1;
        while out[header] & 0x80 != 0 {
            header += 1;
        }
        header += 1;
        let packet_id_at = (qos != QoS::AtMostOnce).then_some(header + 2 + topic.len());
        Ok(PublishTemplate {
            payload_at: out.len() - payload_len,
            bytes: out.to_vec(),
            packet_id_at,
        })
    }

    /// Appends one message to `out`.
    pub fn write(&self, out: &mut BytesMut, packet_id: u16, stamp: &Stamp) {
        let start = out.len();
        out.put_slice(&self.bytes);
        if let Some(at) = self.packet_id_at {
            out[start + at..start + at + 2].copy_from_slice(&packet_id.to_be_bytes());
        }
        let p = start + self.payload_at;
        stamp.write_into(&mut out[p..p + HEADER_LEN]);
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_one(buf: &mut BytesMut, v: ProtocolVersion) -> Publish {
        match codec::decode(buf, Some(v), MAX_INCOMING).unwrap().unwrap() {
            Packet::Publish(p) => p,
            p => panic!("unexpected {}", p.name()),
        }
    }

    #[test]
    fn template_patches_packet_id_and_stamp() {
        for v in [ProtocolVersion::V311, ProtocolVersion::V5] {
            for (qos, size) in [
                (QoS::AtMostOnce, 8),
                (QoS::AtLeastOnce, 64),
                (QoS::ExactlyOnce, 300),
            ] {
                let t = PublishTemplate::new(v, "bench/x/pairs/17", qos, false, size).unwrap();
                let mut buf = BytesMut::new();
                let s1 = Stamp {
                    sent_ns: 123,
                    publisher: 17,
                    seq: 0,
                };
                let s2 = Stamp {
                    sent_ns: 456,
                    publisher: 17,
                    seq: 1,
                };
                t.write(&mut buf, 7, &s1);
                t.write(&mut buf, 65535, &s2);
                assert_eq!(buf.len(), 2 * t.len());
                let a = decode_one(&mut buf, v);
                let b = decode_one(&mut buf, v);
                assert!(buf.is_empty());
                assert_eq!(a.topic, "bench/x/pairs/17");
                assert_eq!(a.qos, qos);
                assert_eq!(a.payload.len(), size.max(HEADER_LEN));
                assert_eq!(Stamp::read(&a.payload), Some(s1));
                assert_eq!(Stamp::read(&b.payload), Some(s2));
                if qos == QoS::AtMostOnce {
                    assert_eq!((a.packet_id, b.packet_id), (None, None));
                } else {
                    assert_eq!((a.packet_id, b.packet_id), (Some(7), Some(65535)));
                }
            }
        }
    }

    #[test]
    fn retained_flag_survives() {
        let t =
            PublishTemplate::new(ProtocolVersion::V5, "r/1", QoS::AtLeastOnce, true, 20).unwrap();
        let mut buf = BytesMut::new();
        t.write(
            &mut buf,
            3,
            &Stamp {
                sent_ns: 1,
                publisher: 0,
                seq: 9,
            },
        );
        let p = decode_one(&mut buf, ProtocolVersion::V5);
        assert!(p.retain);
    }
}
