"""Interop checks with Eclipse Paho (paho-mqtt 2.x) against a running tiermq.

Each check prints one line `ok <name>` or `FAIL <name>: why`; the exit code is the number of
failures. Usage: python3 paho_check.py HOST PORT
"""
import os
import sys
import threading
import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

HOST = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
PORT = int(sys.argv[2]) if len(sys.argv) > 2 else 1883
TIMEOUT = 5.0
failures = 0


def uid(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Client:
    """A paho client that records what it receives and waits for conditions."""

    def __init__(self, v5=True, client_id=None, clean=True, will=None, props=None, **extra):
        self.v5 = v5
        proto = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
        cid = uid("paho") if client_id is None else client_id
        kwargs = {"client_id": cid, "protocol": proto, **extra}
        if not v5:
            kwargs["clean_session"] = clean
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kwargs)
        self.messages = []
        self.connack = None
        self.cond = threading.Condition()
        self.c.on_message = self._on_message
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = self._on_subscribe
        self.subacks = []
        if will:
            self.c.will_set(*will)
        self.clean = clean
        self.props = props

    def _on_connect(self, c, userdata, flags, rc, props=None):
        with self.cond:
            self.connack = (flags.session_present, rc, props)
            self.cond.notify_all()

    def _on_subscribe(self, c, userdata, mid, rcs, props=None):
        with self.cond:
            self.subacks.append((mid, rcs))
            self.cond.notify_all()

    def _on_message(self, c, userdata, msg):
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()

    def wait(self, pred, what):
        deadline = time.time() + TIMEOUT
        with self.cond:
            while not pred():
                left = deadline - time.time()
                if left <= 0:
                    raise AssertionError(f"timeout waiting for {what}")
                self.cond.wait(left)

    def connect(self, keepalive=30):
        if self.v5:
            self.c.connect(
                HOST, PORT, keepalive=keepalive, clean_start=self.clean, properties=self.props
            )
        else:
            self.c.connect(HOST, PORT, keepalive=keepalive)
        self.c.loop_start()
        self.wait(lambda: self.connack is not None, "CONNACK")
        return self

    def subscribe(self, topic, qos=1, props=None, **kw):
        """Subscribes to one filter, or to a list of filters in one SUBSCRIBE; returns the
        reason codes as ints."""
        n = len(self.subacks)
        topics = topic if isinstance(topic, list) else [topic]
        if self.v5:
            opts = mqtt.SubscribeOptions(qos=qos, **kw)
            self.c.subscribe([(t, opts) for t in topics], properties=props)
        else:
            self.c.subscribe([(t, qos) for t in topics])
        self.wait(lambda: len(self.subacks) > n, "SUBACK")
        return [rc.value if hasattr(rc, "value") else rc for rc in self.subacks[-1][1]]

    def payloads(self):
        with self.cond:
            return [m.payload.decode() for m in self.messages]

    def close(self, clean=True):
        if clean:
            self.c.disconnect()
        self.c.loop_stop()


def check(name):
    def deco(fn):
        global failures
        try:
            fn()
            print(f"ok {name}", flush=True)
        except Exception as e:  # noqa: BLE001 - report every failure the same way
            failures += 1
            print(f"FAIL {name}: {e!r}", flush=True)
        return fn

    return deco


def pubsub(v5, qos):
    topic = uid("interop/pubsub")
    sub = Client(v5=v5).connect()
    sub.subscribe(topic, qos=qos)
    pub = Client(v5=v5).connect()
    for i in range(20):
        pub.c.publish(topic, f"m{i}".encode(), qos=qos).wait_for_publish(TIMEOUT)
    sub.wait(lambda: len(sub.messages) >= 20, "20 messages")
    got = [m.payload.decode() for m in sub.messages]
    assert got == [f"m{i}" for i in range(20)], got
    assert all(m.qos == qos for m in sub.messages)
    pub.close()
    sub.close()


for v5 in (False, True):
    for qos in (0, 1, 2):
        check(f"pubsub v{'5' if v5 else '3.1.1'} qos{qos}")(lambda v5=v5, qos=qos: pubsub(v5, qos))


@check("retained message delivered on subscribe")
def _():
    topic = uid("interop/retained")
    pub = Client().connect()
    pub.c.publish(topic, b"kept", qos=1, retain=True).wait_for_publish(TIMEOUT)
    sub = Client().connect()
    sub.subscribe(topic, qos=1)
    sub.wait(lambda: sub.messages, "retained")
    assert sub.messages[0].retain and sub.messages[0].payload == b"kept"
    pub.c.publish(topic, b"", qos=1, retain=True).wait_for_publish(TIMEOUT)
    sub2 = Client().connect()
    sub2.subscribe(topic, qos=1)
    time.sleep(0.5)
    assert not sub2.messages, "deleted retained message came back"
    for c in (pub, sub, sub2):
        c.close()


@check("v5 properties pass through")
def _():
    topic = uid("interop/props")
    sub = Client().connect()
    sub.subscribe(topic, qos=1)
    pub = Client().connect()
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "reply/here"
    props.CorrelationData = b"\x01\x02"
    props.UserProperty = [("k", "v")]
    props.ContentType = "text/plain"
    props.PayloadFormatIndicator = 1
    pub.c.publish(topic, b"hi", qos=1, properties=props).wait_for_publish(TIMEOUT)
    sub.wait(lambda: sub.messages, "message")
    p = sub.messages[0].properties
    assert p.ResponseTopic == "reply/here", p
    assert p.CorrelationData == b"\x01\x02", p
    assert ("k", "v") in p.UserProperty, p
    assert p.ContentType == "text/plain", p
    pub.close()
    sub.close()


@check("persistent session queues QoS1 while offline (v3.1.1)")
def _():
    topic = uid("interop/offline")
    cid = uid("persistent")
    sub = Client(v5=False, client_id=cid, clean=False).connect()
    sub.subscribe(topic, qos=1)
    sub.close()
    pub = Client().connect()
    for i in range(5):
        pub.c.publish(topic, f"q{i}".encode(), qos=1).wait_for_publish(TIMEOUT)
    sub2 = Client(v5=False, client_id=cid, clean=False).connect()
    assert sub2.connack[0], "session present expected"
    sub2.wait(lambda: len(sub2.messages) >= 5, "queued messages")
    assert [m.payload.decode() for m in sub2.messages] == [f"q{i}" for i in range(5)]
    pub.close()
    sub2.close()


@check("will fires on abnormal close")
def _():
    topic = uid("interop/will")
    watcher = Client().connect()
    watcher.subscribe(topic, qos=1)
    dying = Client(will=(topic, b"gone", 1, False)).connect()
    dying.c.loop_stop()
    dying.c.socket().close()  # no DISCONNECT
    watcher.wait(lambda: watcher.messages, "will")
    assert watcher.messages[0].payload == b"gone"
    watcher.close()


@check("session takeover")
def _():
    cid = uid("takeover")
    first = Client(client_id=cid).connect()
    disconnected = threading.Event()
    first.c.on_disconnect = lambda *a: disconnected.set()
    second = Client(client_id=cid).connect()
    assert disconnected.wait(TIMEOUT), "first connection not closed"
    first.close(clean=False)
    second.close()


def unsubscribe(v5):
    topic = uid("interop/unsub")
    sub = Client(v5=v5).connect()
    sub.subscribe(topic, qos=1)
    pub = Client(v5=v5).connect()
    pub.c.publish(topic, b"before", qos=1).wait_for_publish(TIMEOUT)
    sub.wait(lambda: sub.messages, "message before UNSUBSCRIBE")
    done = threading.Event()
    sub.c.on_unsubscribe = lambda *a: done.set()
    sub.c.unsubscribe(topic)
    assert done.wait(TIMEOUT), "no UNSUBACK"
    pub.c.publish(topic, b"after", qos=1).wait_for_publish(TIMEOUT)
    time.sleep(0.5)
    assert sub.payloads() == ["before"], sub.payloads()
    pub.close()
    sub.close()


for v5 in (False, True):
    check(f"unsubscribe v{'5' if v5 else '3.1.1'}")(lambda v5=v5: unsubscribe(v5))


# Settings of the broker under test (scripts/interop/run writes them into its config).
RESPONSE_PREFIX = os.environ.get("INTEROP_RESPONSE_PREFIX", "")
MAX_SUBSCRIPTIONS = int(os.environ.get("INTEROP_MAX_SUBSCRIPTIONS", "0"))
MAX_KEEP_ALIVE = int(os.environ.get("INTEROP_MAX_KEEP_ALIVE", "0"))


def wait_total(members, n, timeout=TIMEOUT):
    """Waits until the members received n messages in all, then a little longer (a
    duplicate would show up); returns each member's payloads."""
    deadline = time.time() + timeout
    while sum(len(m.messages) for m in members) < n and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    return [m.payloads() for m in members]


def shared_group(v5, n=20):
    topic = uid("interop/shared")
    group = uid("pg")
    members = [Client(v5=v5).connect() for _ in range(2)]
    for m in members:
        rcs = m.subscribe(f"$share/{group}/{topic}", qos=1)
        assert rcs == [1], rcs
    pub = Client().connect()
    for i in range(n):
        pub.c.publish(topic, f"s{i:02}".encode(), qos=1).wait_for_publish(TIMEOUT)
    got = wait_total(members, n)
    everything = sorted(sum(got, []))
    assert everything == [f"s{i:02}" for i in range(n)], f"each message once: {got}"
    assert all(got), f"both members get some: {got}"
    for c in (pub, *members):
        c.close()


check("shared subscription v3.1.1 (two paho members, each message once)")(
    lambda: shared_group(False)
)
check("shared subscription v5 (two paho members, each message once)")(lambda: shared_group(True))


@check("shared subscription: a lost member's unacknowledged messages go to the other member")
def _():
    topic = uid("interop/shared-loss")
    group = f"$share/{uid('pl')}/{topic}"
    victim = Client(manual_ack=True).connect()  # never acknowledges
    survivor = Client().connect()
    victim.subscribe(group, qos=1)
    survivor.subscribe(group, qos=1)
    pub = Client().connect()
    for i in range(10):
        pub.c.publish(topic, f"m{i}".encode(), qos=1).wait_for_publish(TIMEOUT)
    wait_total([victim, survivor], 10)
    held = victim.payloads()
    assert held, "round robin gave the victim its share"
    victim.c.loop_stop()
    victim.c.socket().close()  # no DISCONNECT, nothing acknowledged
    survivor.wait(lambda: len({m.payload for m in survivor.messages}) >= 10, "all 10 messages")
    assert sorted(set(survivor.payloads())) == sorted(f"m{i}" for i in range(10))
    pub.close()
    survivor.close()


@check("shared subscription: no retained message on a shared subscribe")
def _():
    topic = uid("interop/shared-retained")
    pub = Client().connect()
    pub.c.publish(topic, b"old", qos=1, retain=True).wait_for_publish(TIMEOUT)
    member = Client().connect()
    member.subscribe(f"$share/{uid('pr')}/{topic}", qos=1)
    time.sleep(0.7)
    assert not member.messages, f"retained message sent: {member.payloads()}"
    pub.c.publish(topic, b"new", qos=1).wait_for_publish(TIMEOUT)
    member.wait(lambda: member.messages, "a later publish")
    assert member.payloads() == ["new"], member.payloads()
    pub.c.publish(topic, b"", qos=1, retain=True).wait_for_publish(TIMEOUT)
    pub.close()
    member.close()


@check("outbound topic aliases received by paho v5 (Topic Alias Maximum 2)")
def _():
    # paho-mqtt 2.x hands the application the PUBLISH as sent: an aliased delivery has an
    # empty topic and the Topic Alias property, so the application resolves it (as here).
    base = uid("interop/alias")
    props = Properties(PacketTypes.CONNECT)
    props.TopicAliasMaximum = 2
    sub = Client(props=props).connect()
    sub.subscribe(f"{base}/#", qos=1)
    names = ["a", "a", "b", "a", "b", "c", "c", "a", "a"]
    sent = [f"{base}/{x}" for x in names]
    pub = Client().connect()
    for i, t in enumerate(sent):
        pub.c.publish(t, str(i).encode(), qos=1).wait_for_publish(TIMEOUT)
    sub.wait(lambda: len(sub.messages) >= len(sent), f"{len(sent)} messages")
    aliases, resolved, alias_only = {}, [], 0
    for m in sub.messages:
        alias = getattr(m.properties, "TopicAlias", None)
        topic = m.topic
        if alias is not None:
            assert 1 <= alias <= 2, f"alias {alias} above the client's maximum"
            if topic:
                aliases[alias] = topic
            else:
                assert alias in aliases, f"alias {alias} used before it was set"
                topic = aliases[alias]
                alias_only += 1
        else:
            assert topic, "empty topic without an alias"
        resolved.append((topic, m.payload.decode()))
    assert resolved == [(t, str(i)) for i, t in enumerate(sent)], resolved
    assert alias_only >= 4, f"only {alias_only} deliveries used an alias alone"
    pub.close()
    sub.close()


@check("v5 CONNACK: availability flags and limits as paho reads them")
def _():
    c = Client().connect()
    p = c.connack[2]
    for name in (
        "SharedSubscriptionAvailable",
        "WildcardSubscriptionAvailable",
        "SubscriptionIdentifierAvailable",
        "RetainAvailable",
    ):
        assert getattr(p, name, 1) == 1, f"{name}: {p}"
    assert getattr(p, "SharedSubscriptionAvailable", None) == 1, p
    assert not hasattr(p, "MaximumQoS"), f"QoS 2 is available: {p}"
    assert getattr(p, "ReceiveMaximum", 0) > 0 and getattr(p, "MaximumPacketSize", 0) > 0, p
    assert getattr(p, "TopicAliasMaximum", 0) > 0, p
    c.close()


@check("v5 CONNECT user properties and Request Response Information")
def _():
    props = Properties(PacketTypes.CONNECT)
    props.RequestResponseInformation = 1
    props.UserProperty = [("site", "interop"), ("site", "twice")]
    cid = uid("rri")
    c = Client(client_id=cid, props=props).connect()
    assert c.connack[1] == 0, c.connack
    assert RESPONSE_PREFIX, "INTEROP_RESPONSE_PREFIX not set"
    got = getattr(c.connack[2], "ResponseInformation", None)
    assert got == RESPONSE_PREFIX + cid, got
    plain = Client().connect()  # did not ask: none given
    assert not hasattr(plain.connack[2], "ResponseInformation"), plain.connack[2]
    c.close()
    plain.close()


@check("v5 Assigned Client Identifier for an empty client id")
def _():
    c = Client(client_id="").connect()
    assigned = getattr(c.connack[2], "AssignedClientIdentifier", "")
    assert assigned, c.connack[2]
    topic = uid("interop/assigned")
    c.subscribe(topic, qos=1)
    c.c.publish(topic, b"x", qos=1).wait_for_publish(TIMEOUT)
    c.wait(lambda: c.messages, "own message")
    c.close()


@check("v5 subscription identifier delivered")
def _():
    topic = uid("interop/subid")
    sub = Client().connect()
    sp = Properties(PacketTypes.SUBSCRIBE)
    sp.SubscriptionIdentifier = 42
    sub.subscribe(topic, qos=1, props=sp)
    pub = Client().connect()
    pub.c.publish(topic, b"x", qos=1).wait_for_publish(TIMEOUT)
    sub.wait(lambda: sub.messages, "message")
    assert sub.messages[0].properties.SubscriptionIdentifier == [42], sub.messages[0].properties
    pub.close()
    sub.close()


@check("v5 Server Keep Alive caps a larger keep alive")
def _():
    assert MAX_KEEP_ALIVE > 0, "INTEROP_MAX_KEEP_ALIVE not set"
    c = Client().connect(keepalive=MAX_KEEP_ALIVE * 2)
    assert getattr(c.connack[2], "ServerKeepAlive", None) == MAX_KEEP_ALIVE, c.connack[2]
    low = Client().connect(keepalive=MAX_KEEP_ALIVE // 2)
    assert not hasattr(low.connack[2], "ServerKeepAlive"), low.connack[2]
    c.close()
    low.close()


def subscription_quota(v5):
    assert MAX_SUBSCRIPTIONS > 0, "INTEROP_MAX_SUBSCRIPTIONS not set"
    base = uid("interop/quota")
    c = Client(v5=v5).connect()
    filters = [f"{base}/{i}" for i in range(MAX_SUBSCRIPTIONS + 1)]
    rcs = c.subscribe(filters, qos=1)
    refused = 0x97 if v5 else 0x80
    assert rcs == [1] * MAX_SUBSCRIPTIONS + [refused], rcs
    # Replacing an existing subscription is not a new one.
    assert c.subscribe(filters[0], qos=0) == [0]
    c.close()


check("v5 subscription quota: SUBACK 0x97 beyond max_subscriptions")(
    lambda: subscription_quota(True)
)
check("v3.1.1 subscription quota: SUBACK 0x80 beyond max_subscriptions")(
    lambda: subscription_quota(False)
)


sys.exit(failures)
