#!/usr/bin/env node
// VisionChat Node.js client: one chat over the bidirectional Chat RPC of visionchat.v1.
//
//   node client/node/chat.js --server HOST:PORT --image a.png [--video clip.mp4 --frames N]
//                            [--max-new-tokens N] [--num-crops N]
//                            [--ignore-eos] [--json] "PROMPT"
//
// The contract is loaded at run time from proto/ (../../proto) with @grpc/proto-loader, so there is
// nothing to generate. Images are streamed in chunks (start, image_chunk..., end_of_input); tokens
// are printed as they arrive and a usage line goes to stderr. --json prints one JSON object instead
// (the fields of the Python client's ChatResult: text, token_ids, finish_reason, usage, ...).
// Exit codes match the Python CLI's (`visionchat`): 0 ok, 1 server/transport error or a generation that finished
// with "error", 2 invalid input (bad flags, unreadable image, INVALID_ARGUMENT), 130 interrupted.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const { parseArgs } = require("node:util");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "proto");
const PROTO_FILE = "visionchat/v1/visionchat.proto";
const DEFAULT_SERVER = "127.0.0.1:50051";
const SERVER_ENV = "VISIONCHAT_SERVER";
// 1 MiB chunks keep every message far below gRPC's default 4 MiB limit (as the Python client does).
const DEFAULT_CHUNK_SIZE = 1 << 20;
const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;
const EXIT_OK = 0;
const EXIT_ERROR = 1;
const EXIT_INVALID = 2;
const EXIT_INTERRUPTED = 130;

const USAGE = `usage: node chat.js [--server HOST:PORT] [--image PATH]... [--video PATH]... [--frames N]
                    [--json-schema FILE | --regex RE | --choice A,B,...] [--system TEXT] [--num-crops N]
                    [--tls-ca FILE] [--tls-cert FILE --tls-key FILE] [--tls-server-name NAME] [--token T]
                    [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K] [--seed N]
                    [--ignore-eos] [--chunk-size BYTES] [--timeout S] [--request-id ID] [--json] PROMPT

  --server HOST:PORT  gRPC target, e.g. dns:///visionchat:50051 (default: $${SERVER_ENV} or ${DEFAULT_SERVER})
  --image PATH        image file; repeat for several (attached to the prompt in order)
  --video PATH        video clip; repeat for several (the server samples its frames)
  --frames N          frames sampled per video (default: the server's --default-video-frames)
  --json-schema FILE  constrain the reply to JSON valid against this schema (also --regex RE, --choice A,B)
  --tls-ca FILE       connect over TLS trusting this CA (--tls-cert/--tls-key: a client certificate)
  --token T           bearer token (default: $VISIONCHAT_TOKEN)
  --json              print one JSON object {text, token_ids, finish_reason, usage, ...} at the end
  PROMPT              the user prompt; "-" reads it from stdin`;

class UsageError extends Error {}

/** @param {string} name @param {string | undefined} text @param {boolean} positive */
function intFlag(name, text, positive) {
  if (text === undefined) return undefined;
  if (!/^\d+$/.test(text) || (positive && Number(text) === 0)) {
    throw new UsageError(`--${name} must be ${positive ? "> 0" : ">= 0"}, got ${JSON.stringify(text)}`);
  }
  return Number(text);
}

/** @param {string} name @param {string | undefined} text */
function floatFlag(name, text) {
  if (text === undefined) return undefined;
  const value = Number(text);
  if (text.trim() === "" || !(value >= 0)) throw new UsageError(`--${name} must be >= 0, got ${JSON.stringify(text)}`);
  return value;
}

/** @param {string[]} argv */
function parse(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      server: { type: "string", default: process.env[SERVER_ENV] || DEFAULT_SERVER },
      image: { type: "string", multiple: true, default: [] },
      video: { type: "string", multiple: true, default: [] },
      frames: { type: "string" },
      "json-schema": { type: "string" },
      regex: { type: "string" },
      choice: { type: "string" },
      system: { type: "string" },
      "num-crops": { type: "string" },
      "max-new-tokens": { type: "string" },
      temperature: { type: "string" },
      "top-p": { type: "string" },
      "top-k": { type: "string" },
      seed: { type: "string" },
      "ignore-eos": { type: "boolean", default: false },
      "chunk-size": { type: "string" },
      timeout: { type: "string" },
      "request-id": { type: "string", default: "" },
      "tls-ca": { type: "string" },
      "tls-cert": { type: "string" },
      "tls-key": { type: "string" },
      "tls-server-name": { type: "string" },
      token: { type: "string", default: process.env.VISIONCHAT_TOKEN || "" },
      json: { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) return null;
  if (positionals.length !== 1) throw new UsageError("expected exactly one PROMPT argument");
  const sampling = {
    max_new_tokens: intFlag("max-new-tokens", values["max-new-tokens"], false),
    temperature: floatFlag("temperature", values.temperature),
    top_p: floatFlag("top-p", values["top-p"]),
    top_k: intFlag("top-k", values["top-k"], false),
    seed: intFlag("seed", values.seed, false),
    ignore_eos: values["ignore-eos"],
    response_format: responseFormat(values),
  };
  return {
    server: String(values.server),
    images: /** @type {string[]} */ (values.image),
    videos: /** @type {string[]} */ (values.video),
    frames: intFlag("frames", values.frames, true),
    system: values.system,
    numCrops: intFlag("num-crops", values["num-crops"], true),
    sampling: Object.fromEntries(Object.entries(sampling).filter(([, v]) => v !== undefined)),
    chunkSize: intFlag("chunk-size", values["chunk-size"], true) ?? DEFAULT_CHUNK_SIZE,
    timeout: floatFlag("timeout", values.timeout),
    requestId: String(values["request-id"]),
    tls: { ca: values["tls-ca"], cert: values["tls-cert"], key: values["tls-key"], name: values["tls-server-name"] },
    token: String(values.token),
    json: Boolean(values.json),
    prompt: positionals[0] === "-" ? fs.readFileSync(0, "utf8") : positionals[0],
  };
}

/**
 * sampling.response_format from --json-schema FILE, --regex RE or --choice A,B,C (at most one).
 * @param {{"json-schema"?: string, regex?: string, choice?: string}} values
 */
function responseFormat(values) {
  const given = ["json-schema", "regex", "choice"].filter((k) => values[/** @type {"regex"} */ (k)] !== undefined);
  if (given.length > 1) throw new UsageError(`give at most one of --${given.join(", --")}`);
  if (values["json-schema"] !== undefined) return { json_schema: fs.readFileSync(values["json-schema"], "utf8") };
  if (values.regex !== undefined) return { regex: values.regex };
  if (values.choice !== undefined) return { choice: { options: values.choice.split(",") } };
  return undefined;
}

/** The generated-at-run-time client class of visionchat.v1.VisionChatService. */
function loadService() {
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // proto field names (token_id), as grpcurl and the Python client print them
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true, // adds `kind: "delta" | "finished"` to responses
  });
  const pkg = /** @type {any} */ (grpc.loadPackageDefinition(definition));
  return pkg.visionchat.v1.VisionChatService;
}

/** @param {string} value FINISH_REASON_STOP_STRING -> "stop_string"; unknown numbers stay visible. */
function finishReasonName(value) {
  return typeof value === "number" ? `unknown_${value}` : String(value).replace(/^FINISH_REASON_/, "").toLowerCase();
}

/** @param {any} result */
function usageLine(result) {
  const u = result.usage;
  const t = result.timings;
  return (
    `[finish=${result.finish_reason} prompt=${u.prompt_tokens} image=${u.image_tokens} ` +
    `completion=${u.completion_tokens} ttft=${t.time_to_first_token_seconds.toFixed(3)}s total=${t.total_seconds.toFixed(3)}s]`
  );
}

/** @param {any} call @param {object} message */
function write(call, message) {
  // Respect flow control: wait for 'drain' when grpc-js buffers more than it wants.
  return call.write(message) ? Promise.resolve() : new Promise((resolve) => call.once("drain", resolve));
}

/**
 * @param {any} call @param {ReturnType<typeof parse> & {}} args @param {Buffer[]} images
 * @param {Buffer[]} videos
 */
async function sendRequest(call, args, images, videos) {
  const messages = [];
  if (args.system !== undefined) messages.push({ role: "ROLE_SYSTEM", text: args.system, image_indices: [] });
  messages.push({
    role: "ROLE_USER",
    text: args.prompt,
    image_indices: images.map((_, i) => i),
    video_indices: videos.map((_, i) => i),
  });
  const start = {
    messages,
    sampling: args.sampling,
    image_count: images.length,
    image_options: args.numCrops === undefined ? {} : { num_crops: args.numCrops },
    request_id: args.requestId,
    videos: videos.map(() => (args.frames === undefined ? {} : { num_frames: args.frames })),
  };
  await write(call, { start });
  for (const [kind, items] of /** @type {const} */ ([["image", images], ["video", videos]])) {
    for (const [index, data] of items.entries()) {
      for (let off = 0; off < Math.max(data.length, 1); off += args.chunkSize) {
        const chunk = { [`${kind}_index`]: index, data: data.subarray(off, off + args.chunkSize) };
        await write(call, { [`${kind}_chunk`]: chunk });
      }
    }
  }
  await write(call, { end_of_input: {} });
  call.end();
}

/** @param {string[]} argv @returns {Promise<number>} */
async function main(argv) {
  let args;
  try {
    args = parse(argv);
  } catch (err) {
    process.stderr.write(`error: ${/** @type {Error} */ (err).message}\n${USAGE}\n`);
    return EXIT_INVALID;
  }
  if (args === null) {
    process.stdout.write(USAGE + "\n");
    return EXIT_OK;
  }
  let images, videos;
  try {
    images = args.images.map((p) => fs.readFileSync(p));
    videos = args.videos.map((p) => fs.readFileSync(p));
  } catch (err) {
    process.stderr.write(`error: cannot read file: ${/** @type {Error} */ (err).message}\n`);
    return EXIT_INVALID;
  }

  const VisionChat = loadService();
  let credentials = grpc.credentials.createInsecure();
  /** @type {Record<string, string>} */
  const tlsOptions = {};
  if (args.tls.ca || args.tls.cert) {
    try {
      const read = (/** @type {string | undefined} */ p) => (p ? fs.readFileSync(p) : null);
      credentials = grpc.credentials.createSsl(read(args.tls.ca), read(args.tls.key), read(args.tls.cert));
    } catch (err) {
      process.stderr.write(`error: cannot read a TLS file: ${/** @type {Error} */ (err).message}\n`);
      return EXIT_INVALID;
    }
    if (args.tls.name) tlsOptions["grpc.ssl_target_name_override"] = args.tls.name;
  }
  const metadata = new grpc.Metadata();
  if (args.token) metadata.add("authorization", `Bearer ${args.token}`);
  const client = new VisionChat(args.server, credentials, {
    ...tlsOptions,
    "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
    "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
    // round_robin spreads calls over every address of a dns:/// name (one per pod of a headless service).
    "grpc.service_config": JSON.stringify({ loadBalancingConfig: [{ round_robin: {} }] }),
  });
  const deadline = args.timeout === undefined ? Infinity : Date.now() + args.timeout * 1000;
  const call = client.Chat(metadata, { deadline });
  let interrupted = false;
  const onSigint = () => {
    interrupted = true;
    call.cancel();
  };
  process.once("SIGINT", onSigint);

  let text = "";
  let lastText = "";
  /** @type {number[]} */
  const tokenIds = [];
  /** @type {any} */
  let finished = null;
  try {
    await new Promise((resolve, reject) => {
      call.on("data", (/** @type {any} */ response) => {
        if (finished !== null) {
          reject(new Error("response received after the final `finished` message"));
        } else if (response.kind === "delta") {
          text += response.delta.text;
          for (const token of response.delta.tokens) tokenIds.push(token.token_id);
          if (!args.json && response.delta.text) {
            process.stdout.write(response.delta.text);
            lastText = response.delta.text;
          }
        } else if (response.kind === "finished") {
          finished = response.finished;
        }
      });
      call.on("error", reject);
      call.on("end", resolve);
      sendRequest(call, args, images, videos).catch(reject);
    });
    if (finished === null) throw new Error("response stream ended without a `finished` message");
  } catch (err) {
    const e = /** @type {any} */ (err);
    if (interrupted) {
      process.stderr.write("\ninterrupted\n");
      return EXIT_INTERRUPTED;
    }
    if (typeof e.code === "number") {
      process.stderr.write(`error: ${grpc.status[e.code]}: ${e.details}\n`);
      return e.code === grpc.status.INVALID_ARGUMENT ? EXIT_INVALID : EXIT_ERROR;
    }
    process.stderr.write(`error: ${e.message}\n`);
    return EXIT_ERROR;
  } finally {
    process.removeListener("SIGINT", onSigint);
    client.close();
  }

  const result = {
    text,
    token_ids: tokenIds,
    finish_reason: finishReasonName(finished.finish_reason),
    // An unset submessage arrives as null; report it as zeros like the Python client does.
    usage: { prompt_tokens: 0, image_tokens: 0, completion_tokens: 0, cached_tokens: 0, ...finished.usage },
    timings: { queue_seconds: 0, time_to_first_token_seconds: 0, total_seconds: 0, ...finished.timings },
    request_id: finished.request_id,
    matched_stop: finished.matched_stop,
    error_message: finished.error_message,
  };
  if (args.json) {
    process.stdout.write(JSON.stringify(result) + "\n");
  } else if (lastText && !lastText.endsWith("\n")) {
    process.stdout.write("\n");
  }
  process.stderr.write(usageLine(result) + "\n");
  if (result.finish_reason === "error") {
    process.stderr.write(`error: generation failed: ${result.error_message || "no detail given"}\n`);
    return EXIT_ERROR;
  }
  return EXIT_OK;
}

if (require.main === module) {
  main(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
  });
}

module.exports = { main, loadService, finishReasonName };
