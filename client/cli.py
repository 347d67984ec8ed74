"""Command line front end: `visionchat {chat,count-tokens,info} ...` (also `python -m client ...`).

Exit codes: 0 success, 1 server/transport error or a generation that finished with "error",
2 invalid input (INVALID_ARGUMENT from the server, unreadable images, bad flags), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import grpc

from .channel import tls_credentials
from .errors import describe_rpc_error
from .requests import DEFAULT_CHUNK_SIZE
from .results import StreamProtocolError
from .sync import VisionChatClient
from .types import ChatResult, Delta, Video

DEFAULT_SERVER = "127.0.0.1:50051"
SERVER_ENV = "VISIONCHAT_SERVER"
TOKEN_ENV = "VISIONCHAT_TOKEN"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INVALID = 2
EXIT_INTERRUPTED = 130


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        default=os.environ.get(SERVER_ENV, DEFAULT_SERVER),
        help=f"host:port or any gRPC target, e.g. dns:///svc:50051 (default: ${SERVER_ENV} or {DEFAULT_SERVER})",
    )
    parser.add_argument("--timeout", type=_non_negative_float, default=None, metavar="S", help="deadline in seconds")
    parser.add_argument("--tls", action="store_true", help="connect over TLS (trusting the system CAs unless --tls-ca)")
    parser.add_argument("--tls-ca", metavar="FILE", help="PEM CA bundle to trust (implies --tls)")
    parser.add_argument("--tls-cert", metavar="FILE", help="client certificate for mutual TLS (implies --tls)")
    parser.add_argument("--tls-key", metavar="FILE", help="the client certificate's private key")
    parser.add_argument(
        "--tls-server-name", metavar="NAME", help="name to check the server certificate against (default: the host)"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"bearer token sent as `authorization: Bearer ...` (default: ${TOKEN_ENV})",
    )


def _add_input(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--image",
        action="append",
        default=None,
        metavar="PATH",
        help="image file; repeat for several (attached to the prompt in order)",
    )
    parser.add_argument(
        "--video",
        action="append",
        default=None,
        metavar="PATH",
        help="video clip (MP4, MKV, WebM, AVI, MPEG-TS); repeat for several; the server samples its frames",
    )
    parser.add_argument("--frames", type=_positive_int, default=None, metavar="N", help="frames sampled per video")
    parser.add_argument(
        "--fps", type=_non_negative_float, default=None, metavar="R", help="or frames per second sampled per video"
    )
    parser.add_argument("--start", type=_non_negative_float, default=None, metavar="S", help="video range start (s)")
    parser.add_argument("--end", type=_non_negative_float, default=None, metavar="S", help="video range end (s)")
    parser.add_argument(
        "--video-num-crops", type=_positive_int, default=None, metavar="N", help="HD crop budget per frame, 1..16"
    )
    parser.add_argument(
        "--timestamps", action="store_true", help='write each frame\'s time ("1.50s: ") before it in the prompt'
    )
    parser.add_argument("--system", default=None, metavar="TEXT", help="system message")
    parser.add_argument("--num-crops", type=_positive_int, default=None, metavar="N", help="HD crop budget, 1..16")
    parser.add_argument("prompt", metavar="PROMPT", help='user prompt; "-" reads it from stdin')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visionchat", description="VisionChat command line client")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    chat = sub.add_parser("chat", help="generate a reply, streaming it as it is produced")
    _add_common(chat)
    _add_input(chat)
    chat.add_argument("--max-new-tokens", type=_non_negative_int, default=None, metavar="N")
    chat.add_argument("--temperature", type=_non_negative_float, default=None, metavar="T", help="0 = greedy")
    chat.add_argument("--top-p", type=_non_negative_float, default=None, metavar="P")
    chat.add_argument("--top-k", type=_non_negative_int, default=None, metavar="K")
    chat.add_argument("--repetition-penalty", type=_non_negative_float, default=None, metavar="R")
    chat.add_argument("--seed", type=_non_negative_int, default=None, metavar="N")
    chat.add_argument("--stop", action="append", default=None, metavar="S", help="stop string; repeatable")
    chat.add_argument(
        "--stop-token-id",
        action="append",
        type=_non_negative_int,
        default=None,
        metavar="ID",
        help="stop token id; repeatable",
    )
    chat.add_argument("--ignore-eos", action="store_true", default=None, help="keep generating past end-of-sequence")
    chat.add_argument("--logprobs", type=_non_negative_int, default=None, metavar="N", help="top-N logprobs per token")
    formats = chat.add_mutually_exclusive_group()
    formats.add_argument("--json-schema", metavar="FILE", help="constrain the reply to JSON valid against this schema")
    formats.add_argument("--json-object", action="store_true", help="constrain the reply to a JSON object")
    formats.add_argument("--regex", metavar="RE", help="constrain the reply to a full match of this regex")
    formats.add_argument("--choice", metavar="A,B,...", help="constrain the reply to one of these strings")
    formats.add_argument("--lark", metavar="FILE", help="constrain the reply to this Lark grammar's language")
    chat.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    chat.add_argument("--generate", action="store_true", help="use the Generate RPC (inline images) instead of Chat")
    chat.add_argument(
        "--chunk-size",
        type=_positive_int,
        default=DEFAULT_CHUNK_SIZE,
        metavar="BYTES",
        help=f"image chunk size for the Chat RPC (default {DEFAULT_CHUNK_SIZE})",
    )
    chat.add_argument("--request-id", default=None, metavar="ID", help="id the server logs the request under")

    count = sub.add_parser("count-tokens", help="count prompt tokens without generating; prints JSON")
    _add_common(count)
    _add_input(count)

    info = sub.add_parser("info", help="model, limits and worker facts; prints JSON")
    _add_common(info)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling keywords a chat invocation sets; unset flags are left to the server default."""
    values = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": args.stop,
        "stop_token_ids": args.stop_token_id,
        "ignore_eos": args.ignore_eos,
        "logprobs": args.logprobs,
        "response_format": _response_format(args),
    }
    return {k: v for k, v in values.items() if v is not None}


def _response_format(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.json_schema:
        return {"json_schema": Path(args.json_schema).read_text(encoding="utf-8")}
    if args.json_object:
        return {"json_object": True}
    if args.regex is not None:
        return {"regex": args.regex}
    if args.choice is not None:
        return {"choice": args.choice.split(",")}
    if args.lark:
        return {"lark_grammar": Path(args.lark).read_text(encoding="utf-8")}
    return None


def usage_line(result: ChatResult) -> str:
    u, t = result.usage, result.timings
    return (
        f"[finish={result.finish_reason} prompt={u.prompt_tokens} image={u.image_tokens} "
        f"completion={u.completion_tokens} ttft={t.time_to_first_token_seconds:.3f}s total={t.total_seconds:.3f}s]"
    )


def _prompt(args: argparse.Namespace, stdin: TextIO) -> str:
    return stdin.read() if args.prompt == "-" else args.prompt


def _videos(args: argparse.Namespace) -> list[Video]:
    return [
        Video(
            path,
            num_frames=args.frames,
            frames_per_second=args.fps,
            start_seconds=args.start,
            end_seconds=args.end,
            num_crops=args.video_num_crops,
            timestamps_in_prompt=args.timestamps,
        )
        for path in args.video or ()
    ]


def _input_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"system": args.system, "num_crops": args.num_crops, "timeout": args.timeout, "videos": _videos(args)}


def _run_chat(client: VisionChatClient, args: argparse.Namespace, out: TextIO, err: TextIO, stdin: TextIO) -> int:
    kwargs = _input_kwargs(args) | sampling_kwargs(args) | {"request_id": args.request_id}
    if args.generate:
        stream = client.stream_generate(_prompt(args, stdin), args.image or (), **kwargs)
    else:
        stream = client.stream_chat(_prompt(args, stdin), args.image or (), chunk_size=args.chunk_size, **kwargs)
    result: ChatResult | None = None
    last_text = ""
    for item in stream:
        if isinstance(item, Delta):
            if not args.json and item.text:
                out.write(item.text)
                out.flush()
                last_text = item.text
        else:
            result = item
    assert result is not None  # the stream raises StreamProtocolError otherwise

    if args.json:
        out.write(json.dumps(result.to_dict(), ensure_ascii=False) + "\n")
    elif last_text and not last_text.endswith("\n"):
        out.write("\n")
    out.flush()
    print(usage_line(result), file=err, flush=True)
    if result.finish_reason == "error":
        print(f"error: generation failed: {result.error_message or 'no detail given'}", file=err)
        return EXIT_ERROR
    return EXIT_OK


def _run_count_tokens(client: VisionChatClient, args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    count = client.count_tokens(_prompt(args, stdin), args.image or (), **_input_kwargs(args))
    out.write(json.dumps(count.to_dict(), indent=2) + "\n")
    return EXIT_OK


def _run_info(client: VisionChatClient, args: argparse.Namespace, out: TextIO) -> int:
    out.write(json.dumps(client.model_info(timeout=args.timeout), indent=2, ensure_ascii=False) + "\n")
    return EXIT_OK


def _client(args: argparse.Namespace) -> VisionChatClient:
    credentials = None
    options = {}
    if args.tls or args.tls_ca or args.tls_cert:
        credentials = tls_credentials(args.tls_ca, args.tls_cert, args.tls_key)
        if args.tls_server_name:
            options["grpc.ssl_target_name_override"] = args.tls_server_name
    return VisionChatClient(args.server, options=options, credentials=credentials, token=args.token)


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    stdin: TextIO | None = None,
) -> int:
    """Runs one command and returns the exit code; streams are injectable for tests."""
    out, err, inp = stdout or sys.stdout, stderr or sys.stderr, stdin or sys.stdin
    args = parse_args(argv)
    try:
        with _client(args) as client:
            if args.command == "chat":
                return _run_chat(client, args, out, err, inp)
            if args.command == "count-tokens":
                return _run_count_tokens(client, args, out, inp)
            return _run_info(client, args, out)
    except grpc.RpcError as exc:
        info = describe_rpc_error(exc)
        for line in info.lines():
            print(line, file=err)
        return EXIT_INVALID if info.code == grpc.StatusCode.INVALID_ARGUMENT else EXIT_ERROR
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away; nothing useful is left to say.
        return EXIT_ERROR
    except OSError as exc:
        # Almost always an --image or --video path that cannot be read.
        print(f"error: {exc}", file=err)
        return EXIT_INVALID
    except (ValueError, TypeError) as exc:
        print(f"error: invalid input: {exc}", file=err)
        return EXIT_INVALID
    except StreamProtocolError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=err)
        return EXIT_INTERRUPTED
