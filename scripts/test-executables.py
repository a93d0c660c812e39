#!/usr/bin/env python3
"""The test executables of a cargo build, from its JSON messages on stdin.

cargo prints each test executable's path only in its JSON messages (`--message-format=json...`),
under a file name that carries a hash. Prints one line per executable: a stable name (`lib`,
`bin-<binary>`, or the test target's name) and the path.
"""
import json
import sys

for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("profile", {}).get("test") and msg.get("executable"):
        kind = msg["target"]["kind"][0]
        name = "lib" if kind == "lib" else ("bin-" if kind == "bin" else "") + msg["target"]["name"]
        print(name, msg["executable"])
