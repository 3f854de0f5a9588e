# TLS and WebSocket listeners, sourced by scripts/interop/run (uses its $bin, $venv, $port,
# result()): a second broker with tls, ws and wss listeners and throwaway certificates made
# with openssl; mosquitto_pub/sub with --cafile over TLS, paho with transport="websockets"
# over ws and wss.
tdir="$(mktemp -d)"
tp=$((port + 11)) # tcp; tls, ws, wss follow
(
  cd "$tdir" || exit 1
  ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  openssl req -x509 "${ec[@]}" -days 2 -keyout ca.key -out ca.pem -subj "/CN=tiermq interop CA" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign &&
    openssl req "${ec[@]}" -keyout server.key -out server.csr -subj "/CN=localhost" &&
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >server.ext &&
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
      -extfile server.ext -out server.pem
) >"$tdir/openssl.log" 2>&1
result $? "openssl test certificates"
"$bin" standalone --listen "127.0.0.1:$tp" --data-dir "$tdir/data" --metrics-listen "" \
  --log-level warn --tls-listen "127.0.0.1:$((tp + 1))" --tls-cert "$tdir/server.pem" \
  --tls-key "$tdir/server.key" --ws-listen "127.0.0.1:$((tp + 2))" \
  --wss-listen "127.0.0.1:$((tp + 3))" &
tpid=$!
for _ in $(seq 1 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$((tp + 3))") 2>/dev/null && break
  sleep 0.1
done
# mosquitto over TLS, verifying the broker against the CA.
out="$tdir/mosq.out"
timeout 10 mosquitto_sub -h localhost -p $((tp + 1)) --cafile "$tdir/ca.pem" -q 1 \
  -t interop/tls -C 1 -W 10 >"$out" &
sp=$!
sleep 0.5
timeout 10 mosquitto_pub -h localhost -p $((tp + 1)) --cafile "$tdir/ca.pem" -q 1 \
  -t interop/tls -m viatls
wait $sp && [[ "$(cat "$out")" == "viatls" ]]
result $? "mosquitto over TLS (--cafile)"
cat >"$tdir/ws.py" <<'PY'
import sys, threading
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

host, port, ca = sys.argv[1], int(sys.argv[2]), (sys.argv[3] if len(sys.argv) > 3 else None)
got, msgs = threading.Event(), []

def client(cid):
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, transport="websockets",
                    protocol=mqtt.MQTTv5)
    c.ws_set_options(path="/mqtt")
    if ca:
        c.tls_set(ca_certs=ca)
    up = threading.Event()
    c.on_connect = lambda c, u, f, rc, p: up.set()
    c.connect(host, port, 30)
    c.loop_start()
    assert up.wait(5), "no CONNACK"
    return c

sub = client("ws-sub")
subscribed = threading.Event()
sub.on_subscribe = lambda c, u, mid, rc, p: subscribed.set()
sub.on_message = lambda c, u, m: (msgs.append(m.payload), got.set())
sub.subscribe("interop/ws", qos=1)
assert subscribed.wait(5), "no SUBACK"
pub = client("ws-pub")
pub.publish("interop/ws", b"viaws", qos=1).wait_for_publish(5)
sys.exit(0 if got.wait(5) and msgs == [b"viaws"] else 1)
PY
timeout 20 "$venv/bin/python" "$tdir/ws.py" 127.0.0.1 $((tp + 2))
result $? "paho over WebSocket (transport=websockets, /mqtt)"
timeout 20 "$venv/bin/python" "$tdir/ws.py" localhost $((tp + 3)) "$tdir/ca.pem"
result $? "paho over secure WebSocket (wss, CA-verified)"
kill $tpid 2>/dev/null
wait $tpid 2>/dev/null
rm -rf "$tdir"
