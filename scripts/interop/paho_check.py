"""Interop checks with Eclipse Paho (paho-mqtt 2.x) against a running tiermq.

Each check prints one line `ok <name>` or `FAIL <name>: why`; the exit code is the number of
failures. Usage: python3 paho_check.py HOST PORT
"""
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

    def __init__(self, v5=True, client_id=None, clean=True, will=None, props=None):
        self.v5 = v5
        proto = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
        kwargs = {"client_id": client_id or uid("paho"), "protocol": proto}
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

    def connect(self):
        if self.v5:
            self.c.connect(HOST, PORT, keepalive=30, clean_start=self.clean, properties=self.props)
        else:
            self.c.connect(HOST, PORT, keepalive=30)
        self.c.loop_start()
        self.wait(lambda: self.connack is not None, "CONNACK")
        return self

    def subscribe(self, topic, qos=1, **kw):
        n = len(self.subacks)
        if self.v5:
            opts = mqtt.SubscribeOptions(qos=qos, **kw)
            self.c.subscribe(topic, options=opts)
        else:
            self.c.subscribe(topic, qos)
        self.wait(lambda: len(self.subacks) > n, "SUBACK")
        return self.subacks[-1][1]

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


sys.exit(failures)
