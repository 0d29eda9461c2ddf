// A Node test of wshub.js against examples/build_log (no browser):
//
//   cargo build --example build_log
//   BUILD_LOG=target/debug/examples/build_log node --experimental-websocket --test web/
//
// (Node 20 needs --experimental-websocket for its global WebSocket; Node 22 has it.)
// Skipped when BUILD_LOG is not set or there is no global WebSocket.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { WshubClient } from "./wshub.js";

const bin = process.env.BUILD_LOG;
const skip = !bin ? "BUILD_LOG is not set" : typeof WebSocket !== "function" ? "no WebSocket" : false;

/**
 * Starts build_log on `127.0.0.1:0` (the system picks a free port, so nothing races for one)
 * and resolves with the process and the port it names in its "build log at" line.
 */
function startServer(script) {
  const child = spawn(bin, ["--addr", "127.0.0.1:0", "--", "sh", "-c", script], {
    stdio: ["ignore", "ignore", "pipe"],
  });
  let stderr = "";
  return new Promise((resolve, reject) => {
    child.stderr.on("data", (chunk) => {
      stderr += chunk;
      const announced = stderr.match(/build log at http:\/\/127\.0\.0\.1:(\d+)\//);
      if (announced) resolve({ server: child, port: Number(announced[1]) });
    });
    child.on("exit", (code) => reject(new Error(`build_log exited ${code}: ${stderr}`)));
  });
}

test("a page that drops its connection gets every line once, in order", { skip }, async () => {
  const { server, port } = await startServer(
    'for i in $(seq 1 60); do echo "line $i"; sleep 0.03; done; echo oops >&2; exit 2',
  );
  try {
    // Join half-way: the page must still get the log from line 1.
    await new Promise((r) => setTimeout(r, 500));
    const lines = [];
    const resets = [];
    let reconnects = 0;
    const done = new Promise((resolve) => {
      const client = new WshubClient(`ws://127.0.0.1:${port}/ws`, {
        initialBackoff: 50,
        maxBackoff: 200,
        onReset: (info) => resets.push(info),
        onReconnect: () => reconnects++,
        onMessage: (msg) => {
          if (msg.type === "process_output") {
            lines.push(msg.data);
            // Cut the connection twice, as a network would.
            if (lines.length === 10 || lines.length === 40) client._socket.close();
          } else if (msg.type === "process_status") {
            client.close();
            resolve(msg.data);
          }
        },
      });
      client.subscribe("process:build-1", { fromStart: true });
      assert.throws(() => client.send({ type: "ping" }), /not connected/);
      client.connect();
    });
    const status = await done;
    assert.deepEqual(status, { status: "exited", exitCode: 2 });
    const expected = Array.from({ length: 60 }, (_, i) => `line ${i + 1}`);
    assert.deepEqual(lines.filter((l) => l !== "oops"), expected);
    assert.equal(lines.filter((l) => l === "oops").length, 1);
    assert.equal(reconnects, 2);
    assert.deepEqual(resets, []);
  } finally {
    server.kill("SIGTERM");
  }
});
