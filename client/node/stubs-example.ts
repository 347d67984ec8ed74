// Minimal TypeScript client on the stubs that `make stubs` generates (gen/ts: ts-proto for
// @grpc/grpc-js): GetModelInfo, then a Generate with one inline image, streamed.
//   usage: stubs-example HOST:PORT IMAGE [NUM_CROPS] [MAX_NEW_TOKENS] "PROMPT"
// Prints two JSON lines: the model info, then {text, token_ids, finish_reason, usage}.
// tools/gen-stubs.sh type-checks it along with the stubs (tsconfig.json); tests/test_polyglot.py
// also compiles it and runs it against a real server.
import { readFileSync } from "node:fs";
import { credentials, type ServiceError } from "@grpc/grpc-js";
import {
  type ChatFinished,
  type GenerateResponse,
  FinishReason,
  finishReasonToJSON,
  GenerateRequest,
  GetModelInfoResponse,
  Role,
  VisionChatServiceClient,
} from "../../gen/ts/visionchat/v1/visionchat";

const [target = "127.0.0.1:50051", imagePath, numCrops = "4", maxNewTokens = "16", prompt = "Describe the image."] =
  process.argv.slice(2);
if (!imagePath) {
  console.error("usage: stubs-example HOST:PORT IMAGE [NUM_CROPS] [MAX_NEW_TOKENS] PROMPT");
  process.exit(2);
}

const client = new VisionChatServiceClient(target, credentials.createInsecure(), {
  "grpc.max_send_message_length": 64 << 20,
  // round_robin spreads calls over every address of a dns:/// target (one per pod).
  "grpc.service_config": JSON.stringify({ loadBalancingConfig: [{ round_robin: {} }] }),
});

function fail(err: ServiceError | Error): never {
  console.error(`error: ${err.message}`);
  client.close();
  process.exit(1);
}

client.getModelInfo({}, (err, info) => {
  if (err) fail(err);
  console.log(JSON.stringify(GetModelInfoResponse.toJSON(info)));

  const request = GenerateRequest.fromPartial({
    messages: [{ role: Role.ROLE_USER, text: prompt, imageIndices: [0] }],
    images: [readFileSync(imagePath)],
    imageOptions: { numCrops: Number(numCrops) },
    sampling: { maxNewTokens: Number(maxNewTokens), ignoreEos: true },
  });
  let text = "";
  const tokenIds: number[] = [];
  let finished: ChatFinished | undefined;
  const call = client.generate(request);
  call.on("data", (response: GenerateResponse) => {
    if (response.delta) {
      text += response.delta.text;
      tokenIds.push(...response.delta.tokens.map((t) => t.tokenId));
    }
    if (response.finished) finished = response.finished;
  });
  call.on("error", fail);
  call.on("end", () => {
    client.close();
    if (!finished) fail(new Error("stream ended without `finished`"));
    const reason = finishReasonToJSON(finished.finishReason).replace(/^FINISH_REASON_/, "").toLowerCase();
    console.log(JSON.stringify({ text, token_ids: tokenIds, finish_reason: reason, usage: finished.usage }));
    if (finished.finishReason === FinishReason.FINISH_REASON_ERROR) process.exitCode = 1;
  });
});
