#!/usr/bin/env python3
"""Seeds fuzz/corpus/decode from the captured client/broker fixtures.

Each seed is a selector byte (0: before CONNECT, 1: MQTT 3.1.1, 2: MQTT 5; see
fuzz_targets/decode.rs) followed by one direction of a captured session.
Run from fuzz/:  python3 seed_corpus.py && RUSTC_BOOTSTRAP=1 cargo fuzz run decode
"""
import glob, hashlib, os

os.makedirs("corpus/decode", exist_ok=True)
for f in glob.glob("../common/tests/fixtures/*.hex"):
    name = os.path.basename(f)
    streams = {"c2s": b"", "s2c": b""}
    for line in open(f):
        if line.startswith("#") or not line.strip():
            continue
        direction, hexdata = line.split()
        streams[direction] += bytes.fromhex(hexdata)
    server_to_client = 2 if name.startswith("v5") else 1
    for data in (bytes([0]) + streams["c2s"], bytes([server_to_client]) + streams["s2c"]):
        with open("corpus/decode/" + hashlib.sha1(data).hexdigest(), "wb") as out:
            out.write(data)
