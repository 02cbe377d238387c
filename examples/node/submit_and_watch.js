#!/usr/bin/env node
// Submit a debug.sleep job to Spool and print its progress until it ends.
//
//   npm install
//   SPOOL_SERVER=127.0.0.1:50051 SPOOL_TOKEN=<key> node submit_and_watch.js [seconds]
//
// Loads the protos from ../../protos at run time (no code generation). The
// watch resumes after its last seq when the connection breaks, so a restart of
// the control plane neither loses nor repeats events. Exits 0 when the job
// SUCCEEDED, 1 otherwise.
"use strict";

const path = require("path");
const crypto = require("crypto");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_DIR = path.resolve(__dirname, "..", "..", "protos");
const TERMINAL = new Set(["JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELED"]);
const RECONNECT_DELAY_MS = 500;
const RECONNECT_ATTEMPTS = 60;

const definition = protoLoader.loadSync(path.join(PROTO_DIR, "spool/v1/job_service.proto"), {
  includeDirs: [PROTO_DIR],
  keepCase: true, // field names as in the .proto (job_id, after_seq)
  longs: String, // int64 (seq, done, total) as strings: no precision loss
  enums: String, // JOB_STATE_RUNNING rather than 2
  defaults: true,
  oneofs: true,
});
const spool = grpc.loadPackageDefinition(definition).spool.v1;

// A plain JS object as a google.protobuf.Struct.
function toValue(v) {
  if (v === null || v === undefined) return { nullValue: "NULL_VALUE" };
  if (typeof v === "number") return { numberValue: v };
  if (typeof v === "string") return { stringValue: v };
  if (typeof v === "boolean") return { boolValue: v };
  if (Array.isArray(v)) return { listValue: { values: v.map(toValue) } };
  return { structValue: toStruct(v) };
}
function toStruct(obj) {
  const fields = {};
  for (const [k, v] of Object.entries(obj)) fields[k] = toValue(v);
  return { fields };
}

function metadata(token) {
  const md = new grpc.Metadata();
  if (token) md.add("authorization", `Bearer ${token}`);
  return md;
}

function submit(client, token, spec) {
  return new Promise((resolve, reject) => {
    client.Submit({ job: spec }, metadata(token), { deadline: Date.now() + 30_000 }, (err, res) =>
      err ? reject(err) : resolve(res.job),
    );
  });
}

// Resolves with the terminal state; calls onEvent for every event exactly once.
function watch(client, token, jobId, onEvent) {
  let lastSeq = 0;
  let terminal = null;
  let failures = 0;
  return new Promise((resolve, reject) => {
    const open = () => {
      const call = client.WatchProgress({ job_id: jobId, after_seq: lastSeq }, metadata(token));
      let closed = false; // a call ends once: with "end" or with "error"
      call.on("data", ({ event }) => {
        const seq = Number(event.seq);
        if (seq <= lastSeq) return; // already seen before a reconnect
        lastSeq = seq;
        failures = 0;
        if (event.kind === "JOB_EVENT_KIND_STATE" && TERMINAL.has(event.state)) terminal = event;
        onEvent(event);
      });
      call.on("error", (err) => {
        if (closed) return;
        closed = true;
        const transient = err.code === grpc.status.UNAVAILABLE || err.code === grpc.status.CANCELLED;
        if (transient && ++failures <= RECONNECT_ATTEMPTS) {
          setTimeout(open, RECONNECT_DELAY_MS);
        } else {
          reject(err);
        }
      });
      call.on("end", () => {
        if (closed) return;
        closed = true;
        // The server ends the stream after the terminal event; an earlier end
        // (a server shutting down) is resumed like a broken connection.
        if (terminal) resolve(terminal);
        else if (++failures <= RECONNECT_ATTEMPTS) setTimeout(open, RECONNECT_DELAY_MS);
        else reject(new Error(`watch of ${jobId} kept ending without a terminal event`));
      });
    };
    open();
  });
}

function describe(event) {
  if (event.kind === "JOB_EVENT_KIND_PROGRESS") {
    const p = event.progress;
    const units = Number(p.total) ? ` ${p.done}/${p.total} ${p.unit}` : "";
    const rate = p.rate ? ` ${p.rate.toFixed(1)} ${p.unit || "units"}/s` : "";
    return `progress ${(p.fraction * 100).toFixed(0)}%${units}${rate} ${p.stage}`.trimEnd();
  }
  if (event.kind === "JOB_EVENT_KIND_STATE") {
    const error = event.error && event.error.code ? ` ${event.error.code}: ${event.error.message}` : "";
    return `state ${event.state.replace("JOB_STATE_", "")} (attempt ${event.attempt})${error}`;
  }
  return event.kind.replace("JOB_EVENT_KIND_", "").toLowerCase();
}

async function main() {
  const server = process.env.SPOOL_SERVER || "127.0.0.1:50051";
  const token = process.env.SPOOL_TOKEN || "";
  const seconds = Number(process.argv[2] || 3);
  const credentials =
    process.env.SPOOL_TLS === "on" ? grpc.credentials.createSsl() : grpc.credentials.createInsecure();
  const client = new spool.JobService(server, credentials, {
    "grpc.keepalive_time_ms": 20_000,
    "grpc.keepalive_timeout_ms": 10_000,
  });
  try {
    const job = await submit(client, token, {
      type: "debug.sleep",
      params: toStruct({ duration: seconds, steps: 10 }),
      priority: 0,
      labels: { example: "node" },
      // Makes a retried Submit safe: the same request_id returns the same job.
      request_id: crypto.randomUUID(),
    });
    console.log(`submitted ${job.id} (${job.type})`);
    const final = await watch(client, token, job.id, (event) =>
      console.log(`#${event.seq} ${describe(event)}`),
    );
    console.log(`job ${job.id} ${final.state.replace("JOB_STATE_", "")}`);
    process.exitCode = final.state === "JOB_STATE_SUCCEEDED" ? 0 : 1;
  } finally {
    client.close();
  }
}

main().catch((err) => {
  console.error(`error: ${err.code !== undefined ? grpc.status[err.code] + ": " : ""}${err.details || err.message}`);
  process.exitCode = 1;
});
