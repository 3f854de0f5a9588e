//! `tiermq cluster probe`: a real MQTT round trip through every frontend, so scripts can wait
//! until a cluster serves.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use tiermq_common::codec::{Packet, PubAck, Publish, PublishProperties};
use tiermq_common::{ProtocolVersion, QoS};

use tiermq_tools::bench::client::{Conn, ConnectOptions};

/// A QoS1 round trip through every frontend: a subscriber on each, one publish through each,
/// and every subscriber receives every message. Clean sessions, unique client ids and topic.
pub async fn probe(frontends: &[SocketAddr], timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    // Every step shares the deadline, and a timeout says which step it was.
    async fn step<T>(
        deadline: tokio::time::Instant,
        what: String,
        f: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        match tokio::time::timeout_at(deadline, f).await {
            Ok(r) => r.with_context(|| what),
            Err(_) => bail!("timed out: {what}"),
        }
    }
    if frontends.is_empty() {
        bail!("no frontend given");
    }
    let tag = format!(
        "{:x}{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    );
    let topic = format!("tiermq/probe/{tag}");
    let options = |addr: SocketAddr, role: &str, i: usize| ConnectOptions {
        broker: addr,
        source: None,
        version: ProtocolVersion::V5,
        client_id: format!("tiermq-probe-{role}{i}-{tag}"),
        clean_start: true,
        keep_alive: 30,
        receive_maximum: 16,
        timeout: Duration::from_secs(15),
    };
    let mut subs = Vec::new();
    for (i, addr) in frontends.iter().enumerate() {
        let mut c = step(
            deadline,
            format!("connect subscriber to {addr}"),
            Conn::connect(&options(*addr, "sub", i)),
        )
        .await?;
        step(
            deadline,
            format!("SUBSCRIBE through {addr}"),
            c.subscribe(std::slice::from_ref(&topic), QoS::AtLeastOnce),
        )
        .await?;
        subs.push((addr, c));
    }
    for (i, addr) in frontends.iter().enumerate() {
        let mut c = step(
            deadline,
            format!("connect publisher to {addr}"),
            Conn::connect(&options(*addr, "pub", i)),
        )
        .await?;
        c.push(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: topic.clone(),
            packet_id: Some(1),
            properties: PublishProperties::default(),
            payload: bytes::Bytes::from(format!("probe {i}")),
        }))?;
        c.flush().await?;
        step(
            deadline,
            format!("PUBACK of the publish through {addr}"),
            async {
                loop {
                    match c.next().await? {
                        Some(Packet::PubAck(a)) if a.packet_id == 1 => {
                            if a.reason_code.is_error() {
                                bail!("refused: {:?}", a.reason_code);
                            }
                            return Ok(());
                        }
                        Some(_) => continue,
                        None => bail!("connection closed"),
                    }
                }
            },
        )
        .await?;
        c.disconnect().await;
    }
    for (addr, mut c) in subs {
        let mut got = vec![false; frontends.len()];
        let what = format!("deliveries to the subscriber on {addr}");
        step(deadline, what, async {
            while got.iter().any(|g| !g) {
                match c
                    .next()
                    .await
                    .with_context(|| format!("missing from {:?}", missing(&got, frontends)))?
                {
                    Some(Packet::Publish(p)) if p.topic == topic => {
                        if let Some(pid) = p.packet_id {
                            c.push(&Packet::PubAck(PubAck::new(pid)))?;
                            c.flush().await?;
                        }
                        let text = String::from_utf8_lossy(&p.payload);
                        if let Some(i) = text
                            .strip_prefix("probe ")
                            .and_then(|n| n.parse::<usize>().ok())
                        {
                            if let Some(g) = got.get_mut(i) {
                                *g = true;
                            }
                        }
                    }
                    Some(_) => continue,
                    None => bail!(
                        "connection closed; missing the messages published through {:?}",
                        missing(&got, frontends)
                    ),
                }
            }
            Ok(())
        })
        .await
        .with_context(|| format!("received: {:?}", got))?;
        c.disconnect().await;
    }
    Ok(())
}

fn missing(got: &[bool], frontends: &[SocketAddr]) -> Vec<SocketAddr> {
    got.iter()
        .zip(frontends)
        .filter(|(g, _)| !**g)
        .map(|(_, a)| *a)
        .collect()
}
