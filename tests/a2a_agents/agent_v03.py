"""A real a2a-sdk 0.3.x agent (protocol v0.3) for the relay's end-to-end tests.

It answers `message/send` with a message describing what it received, so a test can check
that the relay delivered a valid v0.3 message: the SDK's own pydantic models validate the
request before this code runs (a v0.2 `content` string is refused with -32602). Requests
without `Authorization: Bearer $INBOUND_SECRET` are refused with 401.

Usage: python agent_v03.py PORT   (env INBOUND_SECRET)
"""
import json
import os
import sys

import uvicorn
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.apps import A2AStarletteApplication
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.tasks import InMemoryTaskStore
from a2a.types import AgentCapabilities, AgentCard, AgentSkill
from a2a.utils import new_agent_text_message
from starlette.responses import JSONResponse


class Echo(AgentExecutor):
    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        m = context.message
        seen = {
            "sdk": "0.3",
            "role": m.role.value,
            "kinds": [p.root.kind for p in m.parts],
            "text": "".join(getattr(p.root, "text", "") for p in m.parts),
            "message_id": m.message_id,
        }
        await event_queue.enqueue_event(new_agent_text_message(json.dumps(seen, sort_keys=True)))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        raise NotImplementedError


def main() -> None:
    port = int(sys.argv[1])
    secret = os.environ.get("INBOUND_SECRET", "")
    card = AgentCard(
        name="echo-v03",
        description="a2a-sdk 0.3 test agent",
        url=f"http://127.0.0.1:{port}/",
        version="1.0.0",
        protocol_version="0.3.0",
        default_input_modes=["text"],
        default_output_modes=["text"],
        capabilities=AgentCapabilities(streaming=False),
        skills=[AgentSkill(id="echo", name="echo", description="echo", tags=["echo"])],
    )
    app = A2AStarletteApplication(
        agent_card=card,
        http_handler=DefaultRequestHandler(agent_executor=Echo(), task_store=InMemoryTaskStore()),
    ).build()

    async def auth(scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = dict(scope["headers"])
            if headers.get(b"authorization", b"").decode() != f"Bearer {secret}":
                await JSONResponse({"error": "unauthorized"}, status_code=401)(scope, receive, send)
                return
        await app(scope, receive, send)

    uvicorn.run(auth, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
