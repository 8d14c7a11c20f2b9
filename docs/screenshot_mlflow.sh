#!/usr/bin/env bash
# Regenerates docs/mlflow_model_version.png from a real local MLflow server. A doc helper, not a test.
#   1. `mlflow server` on loopback (SQLite store, local artifacts) in a temp folder;
#   2. two pipeline runs through the CLI: version 1 becomes `champion`, version 2 (one training step)
#      is registered as `challenger` and held by the gate, with its reasons in the version's tags;
#   3. headless Chromium (driven over its DevTools protocol) screenshots version 2's page.
# Needs .venv (`make test` builds it) and Chromium (`apt-get install chromium`); the two runs take a
# few minutes on 2 cores. Usage: docs/screenshot_mlflow.sh [OUT.png]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/mlflow_model_version.png}
BIN=$PWD/.venv/bin
PY=$BIN/python
TMP=$(mktemp -d /tmp/notellm2-mlflow-shot.XXXXXX)
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export MLFLOW_TRACKING_URI=http://127.0.0.1:$PORT

(cd "$TMP" && exec "$PY" -m mlflow server --host 127.0.0.1 --port "$PORT" --workers 1 \
   --backend-store-uri "sqlite:///$TMP/mlflow.db" --artifacts-destination "$TMP/artifacts") \
  >"$TMP/server.log" 2>&1 &
SERVER=$!
stop() { kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; rm -rf "$TMP"; }
trap stop EXIT
for _ in $(seq 120); do curl -sf "$MLFLOW_TRACKING_URI/health" >/dev/null && break; sleep 0.5; done
curl -sf "$MLFLOW_TRACKING_URI/health" >/dev/null || { cat "$TMP/server.log"; exit 1; }

"$BIN/notellm2" make-demo-data --out "$TMP/data"
"$BIN/notellm2" run-local --data "$TMP/data" --work "$TMP/first"                     # v1: champion
"$BIN/notellm2" run-local --data "$TMP/data" --work "$TMP/second" --set train.max_steps=1  # v2: held

"$PY" - "$MLFLOW_TRACKING_URI/#/models/notellm2/versions/2" "$OUT" "$TMP/chromium" <<'EOF'
import base64, io, json, subprocess, sys, time, urllib.request
import websocket  # websocket-client, in .venv already (an mlflow dependency)
from PIL import Image

url, out, profile = sys.argv[1:]
browser = subprocess.Popen(
    ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
     "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    for _ in range(100):
        try:
            port = open(f"{profile}/DevToolsActivePort").readline().strip()
            tabs = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json"))
            break
        except (OSError, ValueError):
            time.sleep(0.2)
    ws = websocket.create_connection(next(t for t in tabs if t["type"] == "page")["webSocketDebuggerUrl"])
    ids = iter(range(1, 10**6))

    def cdp(method, **params):
        i = next(ids)
        ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while (m := json.loads(ws.recv())).get("id") != i:
            pass
        return m["result"]

    def js(expr):
        r = cdp("Runtime.evaluate", expression=expr, returnByValue=True)
        if "exceptionDetails" in r:
            sys.exit(f"javascript failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def load():  # wait until the page shows the last tag the gate writes
        for _ in range(120):
            if js("!!document.body && document.body.innerText.includes('promotion_rule')"):
                return time.sleep(1)
            time.sleep(0.5)
        sys.exit(f"{url} never showed the version's tags")

    cdp("Emulation.setDeviceMetricsOverride", width=1300, height=2400, deviceScaleFactor=1,
        mobile=False)
    cdp("Page.navigate", url=url)
    load()
    js("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false')")  # close the chat panel
    cdp("Page.reload")
    load()
    # show every tag: lift the tags table's 280 px scroll box, widen its value column
    js("""document.head.insertAdjacentHTML('beforeend', '<style>.du-bois-light-table-body'
          + '{max-height:none!important;overflow:visible!important}'
          + 'colgroup col:nth-child(2){width:620px!important}</style>')""")
    time.sleep(1)
    box = js("""(() => {
      const main = document.querySelector('main').getBoundingClientRect();
      const tags = document.querySelector('.du-bois-light-table-body').getBoundingClientRect();
      return {x: main.left, y: main.top, width: main.width, height: tags.bottom + 8 - main.top, scale: 1};
    })()""")
    png = cdp("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=box)
    Image.open(io.BytesIO(base64.b64decode(png["data"]))).quantize(256).save(out, optimize=True)
finally:
    browser.terminate()
    browser.wait()
EOF
echo "wrote $OUT"
