"""A real a2a-sdk 1.x agent (protocol v1.0) for the relay's end-to-end tests.

It answers `SendMessage` with a message describing what it received, so a test can check
that the relay delivered a valid v1.0 message: the SDK parses the request into its proto
types before this code runs and answers a v0.3 `message/send` with -32601 (its v0.3
compatibility is off). Requests without `Authorization: Bearer $INBOUND_SECRET` are
refused with 401; the `A2A-Version` header it got is echoed back.

Usage: python agent_v10.py PORT   (env INBOUND_SECRET)
"""
import json
import os
import sys

import uvicorn
from a2a.helpers.proto_helpers import new_text_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore
from a2a.types.a2a_pb2 import AgentCapabilities, AgentCard, AgentInterface, AgentSkill, Role
from starlette.applications import Starlette
from starlette.responses import JSONResponse

LAST_VERSION_HEADER = {"value": None}


class Echo(AgentExecutor):
    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        m = context.message
        seen = {
            "sdk": "1.x",
            "role": Role.Name(m.role),
            "kinds": [p.WhichOneof("content") for p in m.parts],
            "text": "".join(p.text for p in m.parts),
            "message_id": m.message_id,
            "a2a_version_header": LAST_VERSION_HEADER["value"],
        }
        await event_queue.enqueue_event(new_text_message(json.dumps(seen, sort_keys=True)))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        raise NotImplementedError


def main() -> None:
    port = int(sys.argv[1])
    secret = os.environ.get("INBOUND_SECRET", "")
    card = AgentCard(
        name="echo-v10",
        description="a2a-sdk 1.x test agent",
        version="1.0.0",
        supported_interfaces=[
            AgentInterface(url=f"http://127.0.0.1:{port}/", protocol_binding="JSONRPC", protocol_version="1.0")
        ],
        default_input_modes=["text"],
        default_output_modes=["text"],
        capabilities=AgentCapabilities(streaming=False),
        skills=[AgentSkill(id="echo", name="echo", description="echo", tags=["echo"])],
    )
    handler = DefaultRequestHandler(agent_executor=Echo(), task_store=InMemoryTaskStore(), agent_card=card)
    app = Starlette(routes=create_agent_card_routes(card) + create_jsonrpc_routes(handler, "/"))

    async def auth(scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = dict(scope["headers"])
            if headers.get(b"authorization", b"").decode() != f"Bearer {secret}":
                await JSONResponse({"error": "unauthorized"}, status_code=401)(scope, receive, send)
                return
            v = headers.get(b"a2a-version")
            LAST_VERSION_HEADER["value"] = v.decode() if v is not None else None
        await app(scope, receive, send)

    uvicorn.run(auth, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
