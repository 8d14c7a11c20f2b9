#!/usr/bin/env bash
# Regenerates docs/mlflow_model_version.png and docs/mlflow_runs.png from a real local MLflow server.
# A doc helper, not a test.
#   1. `mlflow server` on loopback (SQLite store, local artifacts) in a temp folder;
#   2. two pipeline runs through the CLI: version 1 becomes `champion`, version 2 (one training step)
#      is registered as `challenger` and held by the gate, with its reasons in the version's tags;
#   3. headless Chromium (driven over its DevTools protocol) screenshots version 2's page, then the
#      experiment's runs table with version 2's pipeline run expanded to its eight step runs.
# Needs .venv (`make test` builds it) and Chromium (`apt-get install chromium`); on 2 cores the script
# takes about 12 minutes, nearly all of it the first run's training. Usage:
# docs/screenshot_mlflow.sh [VERSION.png [RUNS.png]]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/mlflow_model_version.png}
RUNS_OUT=${2:-docs/mlflow_runs.png}
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

"$PY" - "$MLFLOW_TRACKING_URI" "$OUT" "$RUNS_OUT" "$TMP/chromium" <<'EOF'
import base64, io, json, subprocess, sys, time, urllib.request
import websocket  # websocket-client, in .venv already (an mlflow dependency)
from PIL import Image

base, out, runs_out, profile = sys.argv[1:]
url = f"{base}/#/models/notellm2/versions/2"
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
    def save(box, path):
        png = cdp("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=box)
        Image.open(io.BytesIO(base64.b64decode(png["data"]))).quantize(256).save(path, optimize=True)

    save(box, out)

    # The runs table: both pipeline runs, oldest first; version 2's run (the parent run its model
    # was logged to) expanded to its step runs; columns Models, metric R_at_100 and tag kfp_step.
    def rest(path):
        return json.load(urllib.request.urlopen(f"{base}/api/2.0/mlflow/{path}"))

    exp = rest("experiments/get-by-name?experiment_name=notellm2")["experiment"]["experiment_id"]
    parent = rest("model-versions/get?name=notellm2&version=2")["model_version"]["run_id"]
    runs_url = f"{base}/#/experiments/{exp}/runs?workflowType=machine_learning&orderByAsc=true"

    def rows(n):  # wait until the table shows n rows and the registered versions' badges
        for _ in range(120):
            if js(f"""document.querySelectorAll('.ag-center-cols-container .ag-row').length >= {n}
                      && document.body.innerText.includes('v2')"""):
                return time.sleep(1)
            time.sleep(0.5)
        sys.exit(f"{runs_url} never showed {n} runs")

    cdp("Page.navigate", url=runs_url)
    rows(2)  # the page stores its view state (columns, expanded runs) in localStorage: edit, reload
    key = json.dumps(f'MLflowLocalStorage-1.1-ExperimentPage-["{exp}"]-ReactComponentState')
    state = json.loads(js(f"localStorage.getItem({key})") or "{}")
    state.update(selectedColumns=["attributes.`Models`", "metrics.`R_at_100`", "tags.`kfp_step`"],
                 runsExpanded={parent: True})
    js(f"localStorage.setItem({key}, {json.dumps(json.dumps(state))})")
    cdp("Page.reload")
    rows(10)
    # the table cuts R_at_100 to ~8 characters; size that column to its values through ag-grid's
    # column API, which the table's React props hold
    js("""(() => {
      const el = document.querySelector('.ag-root-wrapper');
      let f = el[Object.keys(el).find(k => k.startsWith('__reactFiber'))];
      while (!f.memoizedProps?.columnApiRef) f = f.return;
      f.memoizedProps.columnApiRef.current.autoSizeColumns(['metrics.`R_at_100`']);
    })()""")
    time.sleep(1)
    box = js("""(() => {
      const main = document.querySelector('main').getBoundingClientRect();
      const rows = [...document.querySelectorAll('.ag-center-cols-container .ag-row')];
      const bottom = Math.max(...rows.map(r => r.getBoundingClientRect().bottom));
      return {x: main.left, y: main.top, width: main.width, height: bottom + 12 - main.top, scale: 1};
    })()""")
    save(box, runs_out)
finally:
    browser.terminate()
    browser.wait()
EOF
echo "wrote $OUT and $RUNS_OUT"
