// A real browser against the examples: headless Chromium, driven by playwright-core, loads
// examples/build_log's page and the go-ws wiki snippet's page. Run it with one command, which
// installs what it needs (Debian's chromium, playwright-core from web/package-lock.json):
//
//   bash .ci/browser.sh
//
// or by hand, once both are installed and the examples are built:
//
//   BUILD_LOG=target/debug/examples/build_log SERVER=target/debug/examples/server \
//     node --experimental-websocket --test web/browser.test.mjs
//
// CHROMIUM overrides the browser (default /usr/bin/chromium). Skipped when BUILD_LOG or SERVER
// is not set, like web/wshub.test.mjs; once they are, a missing browser or driver fails.
// Only loopback addresses are used; every wait is bounded.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";

const buildLog = process.env.BUILD_LOG;
const server = process.env.SERVER;
const chromiumPath = process.env.CHROMIUM ?? "/usr/bin/chromium";
const skip = !buildLog || !server ? "BUILD_LOG or SERVER is not set" : false;

// Every wait of the test is bounded by one of these.
const START_TIMEOUT = 15_000; // an example starting, Chromium starting
const WAIT_TIMEOUT = 20_000; // something appearing in a page

/** `promise`, or an error naming `what` after `ms` milliseconds. */
function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer in ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * Starts an example on `127.0.0.1:0` (the system picks a free port, so nothing races for one)
 * and resolves with the process and its port once its stderr has said `ready`: the example
 * names the address it bound in that line.
 */
function startExample(bin, args, ready) {
  const child = spawn(bin, args, { stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`${bin} did not start in ${START_TIMEOUT} ms: ${stderr}`));
    }, START_TIMEOUT);
    child.stderr.on("data", (chunk) => {
      stderr += chunk;
      const at = stderr.indexOf(ready);
      const announced = at >= 0 && stderr.slice(at).match(/^[^\n]*?127\.0\.0\.1:(\d+)/);
      if (announced) {
        clearTimeout(timer);
        resolve({ child, port: Number(announced[1]) });
      }
    });
    child.on("error", (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.on("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`${bin} exited ${code}: ${stderr}`));
    });
  });
}

/** Stops an example started by startExample and waits for it to be gone (bounded). */
async function stopExample(child) {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  const gone = new Promise((resolve) => child.once("exit", resolve));
  child.kill("SIGTERM");
  const timer = setTimeout(() => child.kill("SIGKILL"), 5_000);
  await gone;
  clearTimeout(timer);
}

/**
 * A TCP proxy on loopback between the browser and `targetPort`, so that the test can cut the
 * browser's connections from outside, as a network does: `cut()` resets the browser's side
 * (RST) and closes the example's side. Neither the page nor the example knows it is there.
 */
async function startProxy(targetPort) {
  const pairs = new Set();
  let webSockets = 0;
  const proxy = net.createServer((downstream) => {
    const upstream = net.connect(targetPort, "127.0.0.1");
    const pair = { downstream, upstream };
    pairs.add(pair);
    downstream.once("data", (chunk) => {
      if (/^GET \/ws[ ?]/.test(String(chunk))) webSockets++;
    });
    downstream.pipe(upstream);
    upstream.pipe(downstream);
    const end = () => {
      pairs.delete(pair);
      downstream.destroy();
      upstream.destroy();
    };
    downstream.on("error", end).on("close", end);
    upstream.on("error", end).on("close", end);
  });
  await new Promise((resolve) => proxy.listen(0, "127.0.0.1", resolve));
  return {
    port: proxy.address().port,
    /** How many WebSocket handshakes came through. */
    webSockets: () => webSockets,
    cut() {
      for (const { downstream, upstream } of pairs) {
        downstream.resetAndDestroy();
        upstream.destroy();
      }
      pairs.clear();
    },
    close() {
      this.cut();
      return new Promise((resolve) => proxy.close(resolve));
    },
  };
}

// Bounds for a whole test (node --test has none by default).
const TEST_TIMEOUT = 90_000;

describe("in headless Chromium", { skip, timeout: 4 * TEST_TIMEOUT }, () => {
  let chromium;
  let context;
  let userDataDir;
  let serverProcess;
  let serverPort;

  before(async () => {
    try {
      ({ chromium } = await import("playwright-core"));
    } catch (err) {
      const why = `playwright-core is not installed (run: npm ci --prefix web): ${err.message}`;
      throw new Error(why);
    }
    if (!fs.existsSync(chromiumPath)) {
      throw new Error(`no browser at ${chromiumPath} (apt-get install chromium, or set CHROMIUM)`);
    }
    // examples/server for the go-ws snippet, which connects to ws://localhost:8080/ws: the
    // browser maps that address to the server's (below), so the snippet runs unchanged and
    // the test needs no fixed port.
    ({ child: serverProcess, port: serverPort } = await startExample(
      server,
      ["--addr", "127.0.0.1:0", "--allow-publish"],
      "wshub listening",
    ));
    // A new, empty profile. CI runs as root, hence --no-sandbox; this machine's network is
    // closed and refuses Chromium's own connections, hence the background-networking flags.
    userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "wshub-chromium-"));
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: chromiumPath,
      headless: true,
      timeout: START_TIMEOUT,
      args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        `--host-resolver-rules=MAP localhost:8080 127.0.0.1:${serverPort}`,
      ],
    });
    context.setDefaultTimeout(WAIT_TIMEOUT);
  }, { timeout: TEST_TIMEOUT });

  after(async () => {
    await context?.close();
    await stopExample(serverProcess);
    if (userDataDir) fs.rmSync(userDataDir, { recursive: true, force: true });
  }, { timeout: TEST_TIMEOUT });

  const dropped = "the build-log page shows every line once, in order, across a dropped connection";
  test(dropped, { timeout: TEST_TIMEOUT }, async () => {
    const total = 100;
    const cutAt = 40;
    // A build of `total` lines in two parts, then exit code 3. Between them it waits (30 s at
    // most) for the test to have cut the page's connection, so that the cut always lands
    // mid-build however slow the machine: the second part is written while the page is
    // disconnected and reconnecting (up to 1 s of backoff), and after.
    const flag = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "wshub-build-")), "cut");
    const script = [
      `for i in $(seq 1 ${cutAt}); do echo "line $i"; sleep 0.03; done`,
      `n=0; while [ ! -e '${flag}' ] && [ $n -lt 600 ]; do sleep 0.05; n=$((n+1)); done`,
      `for i in $(seq ${cutAt + 1} ${total}); do echo "line $i"; sleep 0.03; done`,
      "exit 3",
    ].join("\n");
    const { child: build, port } = await startExample(
      buildLog,
      ["--addr", "127.0.0.1:0", "--", "sh", "-c", script],
      "build log at",
    );
    const proxy = await startProxy(port);
    const page = await context.newPage();
    try {
      // Open the page half-way through the first part: it must still show the log from line 1.
      await new Promise((resolve) => setTimeout(resolve, 500));
      await page.goto(`http://127.0.0.1:${proxy.port}/`);
      const lines = () =>
        page.evaluate(() => document.getElementById("log").textContent.split("\n").slice(0, -1));

      await page.waitForFunction(
        (count) => document.getElementById("log").textContent.split("\n").length > count,
        cutAt,
      );
      assert.deepEqual(
        await lines(),
        Array.from({ length: cutAt }, (_, i) => `line ${i + 1}`),
        "before the cut, the log from its first line, in order",
      );
      assert.equal(await page.textContent("#state"), "connected");

      // Cut the page's connection while the build still runs, recording what the page shows
      // of its connection from then on (a reconnection may be too quick to poll for).
      await page.evaluate(() => {
        const state = document.getElementById("state");
        window.statesSeen = [];
        new MutationObserver(() => window.statesSeen.push(state.textContent)).observe(state, {
          childList: true,
          characterData: true,
          subtree: true,
        });
      });
      proxy.cut();
      fs.writeFileSync(flag, "");
      await page.waitForFunction(
        () => document.getElementById("status").textContent !== "running",
      );
      assert.equal(await page.textContent("#status"), "exited (3)");

      const got = await lines();
      assert.deepEqual(
        got,
        Array.from({ length: total }, (_, i) => `line ${i + 1}`),
        "every line once, in order",
      );
      assert.equal(await page.locator("#log .note").count(), 0, "no gap reported");
      assert.equal(await page.textContent("#state"), "connected");
      const states = await page.evaluate(() => window.statesSeen);
      assert.equal(states[0], "disconnected", `the page saw the cut: ${states}`);
      assert.equal(proxy.webSockets(), 2, "one WebSocket before the cut, one after");
    } finally {
      await page.close();
      await proxy.close();
      await stopExample(build);
      fs.rmSync(path.dirname(flag), { recursive: true, force: true });
    }
  });

  const snippet = "the go-ws wiki snippet subscribes and receives from examples/server";
  test(snippet, { timeout: TEST_TIMEOUT }, async () => {
    // build_log serves the snippet's page; the snippet itself talks to examples/server.
    const { child: build, port } = await startExample(
      buildLog,
      ["--addr", "127.0.0.1:0", "--", "true"],
      "build log at",
    );
    const page = await context.newPage();
    const publisher = new WebSocket(`ws://127.0.0.1:${serverPort}/ws`);
    const replies = [];
    publisher.onmessage = (event) => replies.push(JSON.parse(event.data));
    const opened = new Promise((resolve, reject) => {
      publisher.onopen = resolve;
      publisher.onerror = () => reject(new Error("the publisher could not connect"));
    });
    try {
      const pageErrors = [];
      page.on("pageerror", (err) => pageErrors.push(err.message));
      await page.goto(`http://127.0.0.1:${port}/go-ws.html`);
      // The snippet logs `msg.type, msg.data`: the hub's acknowledgement has no data.
      await page.waitForFunction(() => document.getElementById("out").textContent.length > 0);
      assert.equal(await page.textContent("#out"), "subscribed \n");

      await withTimeout(opened, START_TIMEOUT, "the publisher's connection");
      const data = { text: "hello from Node", n: 42 };
      publisher.send(JSON.stringify({ type: "publish", channel: "process:build-1", data }));

      await page.waitForFunction(() =>
        document.getElementById("out").textContent.includes("message"),
      );
      // What the snippet renders: `console.log(msg.type, msg.data)`, data as JSON.
      const rendered = `subscribed \nmessage ${JSON.stringify(data)}\n`;
      assert.equal(await page.textContent("#out"), rendered);
      // The snippet as the wiki has it sends before its socket is open, which a browser
      // refuses: the page says so, and its own script sends the subscribe once open.
      assert.equal(pageErrors.length, 1, `${pageErrors}`);
      assert.match(pageErrors[0], /CONNECTING/);
      assert.match(await page.textContent("#note"), /before the socket was open/);
      assert.deepEqual(replies.filter((msg) => msg.type === "error"), []);
    } finally {
      publisher.close();
      await page.close();
      await stopExample(build);
    }
  });
});
