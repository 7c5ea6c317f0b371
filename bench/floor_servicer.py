"""``python -m bench.floor_servicer``: the floors, a bare grpc.aio WebChatService.

CreateWebChat only awaits a sleep as long as the caller's deadline: the facade's memory and CPU
per queued caller are compared with it (``make bench`` section 7), what any grpc.aio server pays
to hold a call open. RefreshGuestToken answers a constant at once: the gRPC floor for a cheap
call (section 8). Same event loop as the facade (uvloop). Prints ``floor listening on PORT``
once serving; runs until SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal

import grpc
from flexwebchat.v1 import webchat_pb2, webchat_pb2_grpc


class Floor(webchat_pb2_grpc.WebChatServiceServicer):
    async def CreateWebChat(
        self, request: webchat_pb2.CreateWebChatRequest, context: grpc.aio.ServicerContext
    ) -> webchat_pb2.CreateWebChatResponse:
        await asyncio.sleep(context.time_remaining() or 60.0)
        return webchat_pb2.CreateWebChatResponse()

    async def RefreshGuestToken(
        self, request: webchat_pb2.RefreshGuestTokenRequest, context: grpc.aio.ServicerContext
    ) -> webchat_pb2.RefreshGuestTokenResponse:
        return webchat_pb2.RefreshGuestTokenResponse(access_token="x", identity="y")


async def main() -> None:
    server = grpc.aio.server()
    webchat_pb2_grpc.add_WebChatServiceServicer_to_server(Floor(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(f"floor listening on {port}", flush=True)
    await stop.wait()
    await server.stop(0)


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
